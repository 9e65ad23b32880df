//! Path routing: the longest matching prefix wins.
//!
//! A prefix matches on segment boundaries: `/capture` matches `/capture`,
//! `/capture/x` and `/capture?q`, but not `/captures`. A prefix that ends in
//! `/` (like `/` itself) matches anything below it.

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
