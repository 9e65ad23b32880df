//! Argument value types: humantime durations and byte sizes.

use serde::{Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A duration written as `10s`, `500ms`, `1m`; serialized as seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HDuration(pub Duration);

impl FromStr for HDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s.trim())
            .map(HDuration)
            .map_err(|e| format!("invalid duration {s:?} (use e.g. 10s, 500ms): {e}"))
    }
}

impl fmt::Display for HDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for HDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0.as_secs_f64())
    }
}

/// A byte count written as `64`, `1KiB`, `1MiB`, `1k`, `2MB`; serialized as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid size {s:?} (use e.g. 64, 1KiB, 1MiB)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "kb" => 1000,
            "m" | "mib" => 1 << 20,
            "mb" => 1_000_000,
            "g" | "gib" => 1 << 30,
            "gb" => 1_000_000_000,
            _ => {
                return Err(format!(
                    "invalid size unit in {s:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!("64".parse::<Size>().unwrap().0, 64);
        assert_eq!("1KiB".parse::<Size>().unwrap().0, 1024);
        assert_eq!("1MiB".parse::<Size>().unwrap().0, 1 << 20);
        assert_eq!("2MB".parse::<Size>().unwrap().0, 2_000_000);
        assert!("1XB".parse::<Size>().is_err());
        assert!("KiB".parse::<Size>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(
            "10s".parse::<HDuration>().unwrap().0,
            Duration::from_secs(10)
        );
        assert_eq!(
            "500ms".parse::<HDuration>().unwrap().0,
            Duration::from_millis(500)
        );
        assert!("10".parse::<HDuration>().is_err());
    }
}
