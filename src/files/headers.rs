//! The HTTP rules of static responses: validators, conditional requests
//! (RFC 9110 §13), single byte ranges (§14) and content negotiation of the
//! encoding. Pure functions over header values.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// nginx's format, `"<mtime hex>-<size hex>"`, so caches that sat behind
/// nginx keep their validators after the switch.
pub fn etag(mtime: SystemTime, size: u64) -> String {
    let secs = mtime
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    format!("\"{secs:x}-{size:x}\"")
}

pub fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

/// Which encodings the client takes, from `Accept-Encoding`; `q=0` refuses.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Accepts {
    pub gzip: bool,
    pub br: bool,
}

pub fn accept_encoding(value: Option<&[u8]>) -> Accepts {
    let mut a = Accepts::default();
    let Some(v) = value.and_then(|v| std::str::from_utf8(v).ok()) else {
        return a;
    };
    let (mut star, mut gzip, mut br): (Option<bool>, Option<bool>, Option<bool>) =
        (None, None, None);
    for item in v.split(',') {
        let mut parts = item.split(';');
        let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let mut ok = true;
        for p in parts {
            let p = p.trim();
            if let Some(q) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                ok = q.trim().parse::<f32>().is_ok_and(|q| q > 0.0);
            }
        }
        match name.as_str() {
            "gzip" | "x-gzip" => gzip = Some(ok),
            "br" => br = Some(ok),
            "*" => star = Some(ok),
            _ => {}
        }
    }
    a.gzip = gzip.or(star).unwrap_or(false);
    a.br = br.or(star).unwrap_or(false);
    a
}

/// Weak comparison (§8.8.3.2): `W/"x"` matches `"x"`.
fn etag_matches_weak(list: &[u8], tag: &str) -> bool {
    let tag = tag.strip_prefix("W/").unwrap_or(tag);
    let Ok(list) = std::str::from_utf8(list) else {
        return false;
    };
    if list.trim() == "*" {
        return true;
    }
    list.split(',').any(|t| {
        let t = t.trim();
        t.strip_prefix("W/").unwrap_or(t) == tag
    })
}

/// Strong comparison (§8.8.3.2): equal, and neither is weak.
fn etag_matches_strong(list: &[u8], tag: &str) -> bool {
    let Ok(list) = std::str::from_utf8(list) else {
        return false;
    };
    if list.trim() == "*" {
        // Any current representation; the caller has one.
        return true;
    }
    !tag.starts_with("W/") && list.split(',').any(|t| t.trim() == tag)
}

/// Whether the preconditions of §13.1.1 and §13.1.4 fail (412), evaluated
/// in the order of §13.2.2: If-Match decides when present; only without it
/// does If-Unmodified-Since count (and an invalid date is ignored). Called
/// only for an existing file, before If-None-Match / If-Modified-Since.
pub fn precondition_failed(
    if_match: Option<&[u8]>,
    if_unmodified_since: Option<&[u8]>,
    tag: &str,
    mtime: SystemTime,
) -> bool {
    if let Some(im) = if_match {
        return !etag_matches_strong(im, tag);
    }
    let Some(ius) = if_unmodified_since
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
    else {
        return false;
    };
    truncate_secs(mtime) > ius
}

/// Whether a GET/HEAD may be answered 304: If-None-Match decides when
/// present; only without it does If-Modified-Since count (§13.2.2).
pub fn not_modified(
    if_none_match: Option<&[u8]>,
    if_modified_since: Option<&[u8]>,
    tag: &str,
    mtime: SystemTime,
) -> bool {
    if let Some(inm) = if_none_match {
        return etag_matches_weak(inm, tag);
    }
    let Some(ims) = if_modified_since
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
    else {
        return false;
    };
    // HTTP dates have whole seconds.
    let m = mtime
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let i = ims.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    m <= i
}

/// What a `Range` header asks of a representation of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// No usable range: send everything with 200.
    Full,
    /// Inclusive byte positions, for 206.
    Part(u64, u64),
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

/// One `bytes=` range. Several ranges are answered with the whole
/// representation (allowed by §14.2; multipart/byteranges buys browsers
/// nothing for static assets). `If-Range` that does not match the current
/// validator also means the whole representation.
pub fn range(
    value: Option<&[u8]>,
    if_range: Option<&[u8]>,
    tag: &str,
    mtime: SystemTime,
    size: u64,
) -> Range {
    let Some(v) = value.and_then(|v| std::str::from_utf8(v).ok()) else {
        return Range::Full;
    };
    if let Some(ir) = if_range.and_then(|v| std::str::from_utf8(v).ok()) {
        let ir = ir.trim();
        let current = if ir.starts_with('"') || ir.starts_with("W/") {
            // Strong comparison: a weak tag never matches.
            ir == tag && !tag.starts_with("W/")
        } else {
            httpdate::parse_http_date(ir).is_ok_and(|d| d == truncate_secs(mtime))
        };
        if !current {
            return Range::Full;
        }
    }
    let Some(spec) = v.trim().strip_prefix("bytes=") else {
        return Range::Full;
    };
    if spec.contains(',') {
        return Range::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Full;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.trim().is_empty(), num(a), num(b)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || size == 0 {
                Range::Unsatisfiable
            } else {
                Range::Part(size.saturating_sub(n), size - 1)
            }
        }
        (false, Some(first), last) if b.trim().is_empty() || last.is_some() => {
            if let Some(l) = last {
                if l < first {
                    return Range::Full; // invalid syntax: ignored (§14.1.1)
                }
            }
            if first >= size {
                return Range::Unsatisfiable;
            }
            let last = last.map_or(size - 1, |l| l.min(size - 1));
            Range::Part(first, last)
        }
        _ => Range::Full,
    }
}

fn truncate_secs(t: SystemTime) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
}

/// Whether `mime` (no parameters) is listed, `text/*` style wildcards included.
pub fn type_listed(list: &[String], mime: &str) -> bool {
    let (top, _) = mime.split_once('/').unwrap_or((mime, ""));
    list.iter().any(|t| {
        t == mime
            || t.strip_suffix("/*")
                .is_some_and(|wild| wild.eq_ignore_ascii_case(top))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn etag_like_nginx() {
        assert_eq!(etag(t(0x5f00_0000), 0x800), "\"5f000000-800\"");
    }

    #[test]
    fn accept_encoding_q_values() {
        let a = |s: &str| accept_encoding(Some(s.as_bytes()));
        assert_eq!(
            a("gzip, deflate, br"),
            Accepts {
                gzip: true,
                br: true
            }
        );
        assert_eq!(
            a("gzip;q=0, br"),
            Accepts {
                gzip: false,
                br: true
            }
        );
        assert_eq!(
            a("*"),
            Accepts {
                gzip: true,
                br: true
            }
        );
        assert_eq!(
            a("*;q=0, gzip"),
            Accepts {
                gzip: true,
                br: false
            }
        );
        assert_eq!(a("identity"), Accepts::default());
        assert_eq!(accept_encoding(None), Accepts::default());
    }

    #[test]
    fn conditional() {
        let tag = "\"1-2\"";
        let m = t(1_000_000);
        assert!(not_modified(Some(b"\"1-2\""), None, tag, m));
        assert!(not_modified(Some(b"W/\"1-2\""), None, tag, m));
        assert!(not_modified(Some(b"\"x\", \"1-2\""), None, tag, m));
        assert!(not_modified(Some(b"*"), None, tag, m));
        assert!(!not_modified(Some(b"\"x\""), None, tag, m));
        let later = http_date(t(1_000_100));
        let earlier = http_date(t(999_000));
        assert!(not_modified(None, Some(later.as_bytes()), tag, m));
        assert!(!not_modified(None, Some(earlier.as_bytes()), tag, m));
        // If-None-Match wins over If-Modified-Since.
        assert!(!not_modified(
            Some(b"\"x\""),
            Some(later.as_bytes()),
            tag,
            m
        ));
        assert!(!not_modified(None, Some(b"yesterday"), tag, m));
    }

    #[test]
    fn preconditions() {
        let tag = "\"1-2\"";
        let m = t(1_000_000);
        let fails = |im: Option<&str>, ius: Option<&str>, tag: &str| {
            precondition_failed(im.map(str::as_bytes), ius.map(str::as_bytes), tag, m)
        };
        assert!(!fails(None, None, tag));
        assert!(!fails(Some("\"1-2\""), None, tag));
        assert!(!fails(Some("\"x\" , \"1-2\""), None, tag));
        assert!(!fails(Some("*"), None, tag));
        assert!(fails(Some("\"x\""), None, tag));
        assert!(fails(Some("W/\"1-2\""), None, tag), "strong comparison");
        assert!(
            fails(Some("W/\"1-2\""), None, "W/\"1-2\""),
            "weak never matches"
        );
        assert!(!fails(Some("*"), None, "W/\"1-2\""));
        let same = http_date(m);
        let later = http_date(t(1_000_100));
        let earlier = http_date(t(999_000));
        assert!(!fails(None, Some(&same), tag));
        assert!(!fails(None, Some(&later), tag));
        assert!(fails(None, Some(&earlier), tag));
        assert!(!fails(None, Some("garbage"), tag), "invalid date ignored");
        // If-Match present: If-Unmodified-Since is not evaluated.
        assert!(!fails(Some("\"1-2\""), Some(&earlier), tag));
        assert!(fails(Some("\"x\""), Some(&later), tag));
        // Sub-second mtimes compare by whole seconds, as the header has.
        let frac = precondition_failed(
            None,
            Some(same.as_bytes()),
            tag,
            m + Duration::from_millis(700),
        );
        assert!(!frac);
    }

    #[test]
    fn ranges() {
        let r = |v: &str| range(Some(v.as_bytes()), None, "\"a\"", t(5), 1000);
        assert_eq!(r("bytes=0-99"), Range::Part(0, 99));
        assert_eq!(r("bytes=900-"), Range::Part(900, 999));
        assert_eq!(r("bytes=-100"), Range::Part(900, 999));
        assert_eq!(r("bytes=-5000"), Range::Part(0, 999));
        assert_eq!(r("bytes=990-2000"), Range::Part(990, 999));
        assert_eq!(r("bytes=1000-"), Range::Unsatisfiable);
        assert_eq!(r("bytes=-0"), Range::Unsatisfiable);
        assert_eq!(r("bytes=5-1"), Range::Full);
        assert_eq!(r("bytes=0-1,5-6"), Range::Full);
        assert_eq!(r("items=0-1"), Range::Full);
        assert_eq!(r("bytes=a-b"), Range::Full);
        assert_eq!(range(None, None, "\"a\"", t(5), 10), Range::Full);
        assert_eq!(
            range(Some(b"bytes=0-0"), None, "\"a\"", t(5), 0),
            Range::Unsatisfiable
        );
    }

    #[test]
    fn if_range() {
        let r = |ir: &str| range(Some(b"bytes=0-1"), Some(ir.as_bytes()), "\"a\"", t(5), 10);
        assert_eq!(r("\"a\""), Range::Part(0, 1));
        assert_eq!(r("\"b\""), Range::Full);
        assert_eq!(r("W/\"a\""), Range::Full);
        assert_eq!(r(&http_date(t(5))), Range::Part(0, 1));
        assert_eq!(r(&http_date(t(6))), Range::Full);
    }

    #[test]
    fn types() {
        let list: Vec<String> = ["text/*", "application/json"].map(String::from).to_vec();
        assert!(type_listed(&list, "text/css"));
        assert!(type_listed(&list, "application/json"));
        assert!(!type_listed(&list, "image/png"));
    }
}
