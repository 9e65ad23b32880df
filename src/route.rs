//! Path routing: the longest matching prefix wins.
//!
//! A prefix matches on segment boundaries: `/capture` matches `/capture`,
//! `/capture/x` and `/capture?q`, but not `/captures`. A prefix that ends in
//! `/` (like `/` itself) matches anything below it.

use std::borrow::Cow;

use crate::config::RouteConfig;

#[derive(Debug, Clone)]
pub struct Router {
    /// Sorted longest prefix first, so the first match is the best one.
    routes: Vec<RouteConfig>,
}

impl Router {
    pub fn new(routes: &[RouteConfig]) -> Router {
        let mut routes = routes.to_vec();
        routes.sort_by_key(|r| std::cmp::Reverse(r.path.len()));
        Router { routes }
    }

    /// The route for a request path (no query).
    pub fn find(&self, path: &str) -> Option<&RouteConfig> {
        self.routes.iter().find(|r| prefix_matches(&r.path, path))
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// The target the backend sees. With `strip_prefix`, `/api/x?q` under `/api`
/// becomes `/x?q`, and `/api` itself becomes `/`.
pub fn rewrite_target(route: &RouteConfig, target: &str) -> String {
    if !route.strip_prefix || &*route.path == "/" {
        return target.to_string();
    }
    let prefix = route.path.trim_end_matches('/');
    let rest = target.strip_prefix(prefix).unwrap_or(target);
    if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    }
}

/// Whether a WebSocket upgrade with this `Origin` header may go on.
/// Patterns and the header compare as `scheme://host[:port]`, without
/// case; `*.example.com` takes any subdomain of example.com, not
/// example.com itself, and the scheme and port must match exactly.
pub fn origin_allowed(policy: &crate::config::OriginPolicy, origin: Option<&[u8]>) -> bool {
    let Some(origin) = origin else {
        return policy.allow_missing;
    };
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    let origin = origin.trim().to_ascii_lowercase();
    policy.allowed.iter().any(|p| match p.split_once("://*.") {
        None => *p == origin,
        Some((scheme, suffix)) => origin
            .strip_prefix(scheme)
            .and_then(|o| o.strip_prefix("://"))
            .and_then(|host| host.strip_suffix(suffix))
            .is_some_and(|sub| sub.ends_with('.') && sub.len() > 1 && !sub.contains(['/', ':'])),
    })
}

/// The request target with dot segments removed from its path (RFC 3986
/// §5.2.4), `%2e` counting as a dot, so routing and the backend see the same
/// path: `/public/../admin` is routed as `/admin`, as nginx does, and a
/// backend that normalises paths itself cannot be led past a route.
///
/// Refused: a `..` that climbs above the root, and a dot segment hidden
/// behind an encoded or back slash (`..%2f`, `..\`), which some backends
/// decode into a separator after ringlb has routed the request.
pub fn normalize_target(target: &str) -> Result<Cow<'_, str>, &'static str> {
    let (path, query) = target.split_at(target.find('?').unwrap_or(target.len()));
    let suspicious = path.contains('.') || path.contains('%') || path.contains('\\');
    if !suspicious {
        return Ok(Cow::Borrowed(target));
    }
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    let mut kept: Vec<&str> = Vec::with_capacity(segments.len());
    let mut changed = false;
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        match dots(seg) {
            Some(1) => {
                changed = true;
                trailing_slash = last;
            }
            Some(_) => {
                changed = true;
                if kept.pop().is_none() {
                    return Err("path climbs above the root");
                }
                trailing_slash = last;
            }
            None => {
                if hides_dot_segment(seg) {
                    return Err("dot segment behind an encoded or back slash");
                }
                kept.push(seg);
            }
        }
    }
    if !changed {
        return Ok(Cow::Borrowed(target));
    }
    let mut out = String::with_capacity(target.len());
    out.push('/');
    out.push_str(&kept.join("/"));
    if trailing_slash && !kept.is_empty() {
        out.push('/');
    }
    out.push_str(query);
    Ok(Cow::Owned(out))
}

/// `Some(1)` for `.`, `Some(2)` for `..`, with `%2e` for any dot.
fn dots(seg: &str) -> Option<u8> {
    let decoded = decode_dots(seg);
    match decoded.as_str() {
        "." => Some(1),
        ".." => Some(2),
        _ => None,
    }
}

fn decode_dots(seg: &str) -> String {
    seg.replace("%2e", ".").replace("%2E", ".")
}

fn hides_dot_segment(seg: &str) -> bool {
    let decoded = decode_dots(seg)
        .replace("%2f", "/")
        .replace("%2F", "/")
        .replace("%5c", "/")
        .replace("%5C", "/")
        .replace('\\', "/");
    decoded.split('/').any(|p| p == "." || p == "..")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::{prop_assert, prop_assert_eq, proptest};

    fn r(path: &str, upstream: usize, strip: bool) -> RouteConfig {
        RouteConfig {
            path: path.into(),
            target: crate::config::RouteTarget::Upstream(upstream),
            strip_prefix: strip,
            websocket_only: false,
            response_timeout: None,
            gzip: None,
            origins: None,
        }
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let p = crate::config::OriginPolicy {
            allowed: vec![
                "https://app.example.com".into(),
                "https://*.example.org:8443".into(),
            ],
            allow_missing: false,
        };
        let ok = |o: &str| origin_allowed(&p, Some(o.as_bytes()));
        assert!(ok("https://app.example.com"));
        assert!(ok("HTTPS://App.Example.com"));
        assert!(ok("https://a.example.org:8443"));
        assert!(ok("https://a.b.example.org:8443"));
        for bad in [
            "http://app.example.com",
            "https://app.example.com:444",
            "https://evil.com",
            "https://app.example.com.evil.com",
            "https://example.org:8443",
            "https://evilexample.org:8443",
            "https://a.example.org",
            "https://a.example.org:84430",
            "null",
        ] {
            assert!(!ok(bad), "{bad} allowed");
        }
        assert!(!origin_allowed(&p, None));
        let open = crate::config::OriginPolicy {
            allow_missing: true,
            ..p
        };
        assert!(origin_allowed(&open, None));
    }

    #[test]
    fn dot_segments_are_removed_before_routing() {
        for (from, to) in [
            ("/a/b", "/a/b"),
            ("/a/b?x=/../y", "/a/b?x=/../y"),
            ("/public/../admin/users", "/admin/users"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E./ws/x", "/ws/x"),
            ("/a/./b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/a/..", "/"),
            ("/.", "/"),
            ("/a//../b", "/a/b"),
            ("/v1.2/file.tar.gz", "/v1.2/file.tar.gz"),
            ("/...", "/..."),
            ("/a%2Fb", "/a%2Fb"),
        ] {
            assert_eq!(normalize_target(from).as_deref(), Ok(to), "{from}");
        }
        for bad in [
            "/..",
            "/a/../..",
            "/%2e%2e/x",
            "/a/..%2f..%2fetc",
            "/a/..\\x",
            "/a/%2e%2e%5cb",
        ] {
            assert!(normalize_target(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let router = Router::new(&[
            r("/", 0, false),
            r("/capture", 1, false),
            r("/capture/live", 2, false),
        ]);
        assert_eq!(router.find("/").unwrap().upstream().unwrap(), 0);
        assert_eq!(router.find("/other").unwrap().upstream().unwrap(), 0);
        assert_eq!(router.find("/capture").unwrap().upstream().unwrap(), 1);
        assert_eq!(router.find("/capture/x").unwrap().upstream().unwrap(), 1);
        assert_eq!(router.find("/captures").unwrap().upstream().unwrap(), 0);
        assert_eq!(
            router.find("/capture/live/1").unwrap().upstream().unwrap(),
            2
        );
    }

    #[test]
    fn no_match() {
        let router = Router::new(&[r("/api", 0, false)]);
        assert!(router.find("/").is_none());
        assert!(router.find("/apix").is_none());
    }

    #[test]
    fn strip() {
        let api = r("/api", 0, true);
        assert_eq!(rewrite_target(&api, "/api/x"), "/x");
        assert_eq!(rewrite_target(&api, "/api"), "/");
        assert_eq!(rewrite_target(&api, "/api?q=1"), "/?q=1");
        assert_eq!(rewrite_target(&api, "/api/a/b?c"), "/a/b?c");
        let slash = r("/api/", 0, true);
        assert_eq!(rewrite_target(&slash, "/api/x"), "/x");
        assert_eq!(rewrite_target(&r("/api", 0, false), "/api/x"), "/api/x");
    }

    proptest! {
        #[test]
        fn strip_round_trips(rest in "(/[a-z0-9]{0,8}){0,4}(\\?[a-z=&]{0,8})?") {
            let api = r("/api", 0, true);
            let target = format!("/api{rest}");
            let out = rewrite_target(&api, &target);
            prop_assert!(out.starts_with('/'));
            // Putting the prefix back gives the original, up to the "/" that
            // stands for an empty remainder.
            let back = format!("/api{}", if rest.starts_with('/') { out.as_str() } else { &out[1..] });
            prop_assert_eq!(back, target);
        }
    }
}
