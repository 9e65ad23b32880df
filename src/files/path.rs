//! URL paths made safe to open beneath a root.
//!
//! The kernel does the real containment (`openat2` with `RESOLVE_BENEATH`,
//! see `files/mod.rs`); this step only turns the URL into a relative path and
//! refuses what no file name can legitimately contain, so a `..` never even
//! reaches the kernel and a bad request gets 400 rather than 404.

/// A request path, percent-decoded and split into plain segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clean {
    /// Segments joined by `/`, no leading slash; empty for the root itself.
    pub rel: Vec<u8>,
    /// The URL ended in `/` (the client asked for a directory).
    pub dir: bool,
}

/// Cleans the path part of a request target (no query).
pub fn clean(path: &str) -> Result<Clean, &'static str> {
    let decoded = percent_decode(path.as_bytes())?;
    if decoded.contains(&0) {
        return Err("NUL byte in path");
    }
    let mut rel: Vec<u8> = Vec::with_capacity(decoded.len());
    for seg in decoded.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => return Err("'..' in path"),
            _ => {
                if !rel.is_empty() {
                    rel.push(b'/');
                }
                rel.extend_from_slice(seg);
            }
        }
    }
    Ok(Clean {
        rel,
        dir: decoded.last() == Some(&b'/'),
    })
}

fn percent_decode(s: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("truncated %-escape in path")?;
            // Exactly two hex digits: a number parser would also take a
            // sign (`%+1`), which no URL encoder ever writes.
            let digit = |b: u8| (b as char).to_digit(16);
            let (Some(hi), Some(lo)) = (digit(hex[0]), digit(hex[1])) else {
                return Err("bad %-escape in path");
            };
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop_assert, proptest};

    fn rel(p: &str) -> Result<String, &'static str> {
        clean(p).map(|c| String::from_utf8(c.rel).unwrap())
    }

    #[test]
    fn plain_paths() {
        assert_eq!(rel("/").unwrap(), "");
        assert_eq!(rel("/a/b.js").unwrap(), "a/b.js");
        assert_eq!(rel("//a///b/./c").unwrap(), "a/b/c");
        assert_eq!(rel("/a%20b").unwrap(), "a b");
        assert_eq!(rel("/%41%7a%7A").unwrap(), "Azz");
        assert!(clean("/a/").unwrap().dir);
        assert!(!clean("/a").unwrap().dir);
    }

    #[test]
    fn traversal_is_refused() {
        for p in [
            "/..",
            "/../etc/passwd",
            "/a/../../etc/passwd",
            "/%2e%2e/etc/passwd",
            "/%2E%2E%2Fetc%2Fpasswd",
            "/a/%2e%2e",
            "/a%2f..%2f..",
            "/a%00.html",
            "/%zz",
            "/%2",
            "/%+1",
            "/%+f",
            "/%-1",
            "/%1g",
        ] {
            assert!(clean(p).is_err(), "{p} accepted");
        }
    }

    proptest! {
        #[test]
        fn never_a_dotdot_segment(p in "(/(\\.|\\.\\.|%2[eEfF]|[a-z]|%00){0,4}){1,6}") {
            if let Ok(c) = clean(&p) {
                prop_assert!(!c.rel.split(|&b| b == b'/').any(|s| s == b".." || s.is_empty() && !c.rel.is_empty()));
                prop_assert!(!c.rel.contains(&0));
                prop_assert!(!c.rel.starts_with(b"/"));
            }
        }
    }
}
