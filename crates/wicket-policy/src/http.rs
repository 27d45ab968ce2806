//! HTTP route patterns: how an HTTP gate names a request for policy.
//!
//! A pattern is a path of `/`-separated segments: a literal segment matches
//! itself, `{name}` or `*` matches any one non-empty segment, and a final
//! `**` matches whatever is left (nothing included). Paths are matched after
//! the gate normalised them (see [`normalize_path`]), so `/a/../admin` and
//! `/%61dmin` cannot slip past a rule about `/admin/**`.

use crate::model::{HttpRoute, HttpSpec};

/// One parsed segment of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Literal(String),
    One,
    Rest,
}

/// A parsed path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    segs: Vec<Seg>,
}

impl PathPattern {
    /// Parses a pattern, or says what is wrong with it.
    pub fn parse(pattern: &str) -> Result<PathPattern, String> {
        let Some(rest) = pattern.strip_prefix('/') else {
            return Err(format!("`{pattern}` does not start with `/`"));
        };
        let mut segs = Vec::new();
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        for (i, p) in parts.iter().enumerate() {
            let seg = match *p {
                "**" if i + 1 == parts.len() => Seg::Rest,
                "**" => return Err(format!("`{pattern}`: `**` may only be the last segment")),
                "*" => Seg::One,
                "" if i + 1 == parts.len() => continue, // a trailing slash
                "" => return Err(format!("`{pattern}` has an empty segment")),
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => Seg::One,
                p if p.contains(['{', '}', '*', '?', '#']) => {
                    return Err(format!(
                        "`{pattern}`: segment `{p}` mixes text with a wildcard (use a whole segment: `*`, `{{name}}` or `**`)"
                    ));
                }
                p => Seg::Literal(p.to_string()),
            };
            segs.push(seg);
        }
        Ok(PathPattern { segs })
    }

    /// Whether a normalised path matches.
    pub fn matches(&self, path: &str) -> bool {
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        let trimmed = trimmed.strip_suffix('/').unwrap_or(trimmed);
        let parts = if trimmed.is_empty() {
            Vec::new()
        } else {
            trimmed.split('/').collect::<Vec<_>>()
        };
        for (i, seg) in self.segs.iter().enumerate() {
            match seg {
                Seg::Rest => return true,
                Seg::One => {
                    if parts.get(i).is_none_or(|p| p.is_empty()) {
                        return false;
                    }
                }
                Seg::Literal(l) => {
                    if parts.get(i) != Some(&l.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.len() == self.segs.len()
    }
}

/// A spec's routes with their patterns parsed once.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    routes: Vec<(PathPattern, std::sync::Arc<HttpRoute>)>,
}

impl Routes {
    /// Parses every route's pattern (a policy that compiled has valid ones).
    pub fn new(spec: &HttpSpec) -> Result<Routes, String> {
        let routes = spec
            .routes
            .iter()
            .map(|r| Ok((PathPattern::parse(&r.path)?, std::sync::Arc::new(r.clone()))))
            .collect::<Result<_, String>>()?;
        Ok(Routes { routes })
    }

    /// The first route matching a request (`path` normalised, `host`
    /// lower-case without its port).
    pub fn find(&self, method: &str, host: &str, path: &str) -> Option<&std::sync::Arc<HttpRoute>> {
        self.routes
            .iter()
            .find(|(p, r)| route_matches(r, p, method, host, path))
            .map(|(_, r)| r)
    }
}

fn route_matches(
    route: &HttpRoute,
    pattern: &PathPattern,
    method: &str,
    host: &str,
    path: &str,
) -> bool {
    if !route.methods.is_empty() && !route.methods.iter().any(|m| m.eq_ignore_ascii_case(method)) {
        return false;
    }
    if !route.host.is_empty() && !crate::glob::matches(&route.host.to_ascii_lowercase(), host) {
        return false;
    }
    pattern.matches(path)
}

/// Why a path is refused outright.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// Not an origin-form path (`/…`).
    NotAbsolute,
    /// `..` above the root.
    AboveRoot,
    /// A percent sign not followed by two hex digits.
    BadEscape,
    /// An encoded NUL, or a control character.
    Control,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathError::NotAbsolute => "the request path does not start with `/`",
            PathError::AboveRoot => "the request path climbs above the root with `..`",
            PathError::BadEscape => "the request path has a malformed percent escape",
            PathError::Control => "the request path holds a control character",
        })
    }
}

/// The canonical form of a request path, which the gate both matches and
/// forwards, so the gate and the upstream agree on what was asked:
/// percent-escapes of unreserved characters are decoded (`%61` is `a`),
/// other escapes are kept with upper-case hex (`%2F` stays an escaped
/// slash, part of its segment), runs of `/` are merged, and `.` and `..`
/// segments (also escaped ones) are resolved.
pub fn normalize_path(path: &str) -> Result<String, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = |c: u8| (c as char).to_digit(16);
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).and_then(|c| hex(*c)),
                bytes.get(i + 2).and_then(|c| hex(*c)),
            ) else {
                return Err(PathError::BadEscape);
            };
            let v = (h * 16 + l) as u8;
            if v < 0x20 || v == 0x7f {
                return Err(PathError::Control);
            }
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                decoded.push(v as char);
            } else {
                decoded.push('%');
                decoded.push_str(&format!("{v:02X}"));
            }
            i += 3;
            continue;
        }
        if b < 0x20 || b == 0x7f {
            return Err(PathError::Control);
        }
        decoded.push(b as char);
        i += 1;
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing = false;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "" => trailing = n == last,
            "." => trailing = n == last,
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing = n == last;
            }
            s => {
                out.push(s);
                trailing = false;
            }
        }
    }
    let mut s = String::with_capacity(decoded.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if out.is_empty() || trailing {
        s.push('/');
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_segments() {
        let cases = [
            ("/api/users", "/api/users", true),
            ("/api/users", "/api/users/", true),
            ("/api/users", "/api/users/1", false),
            ("/api/users", "/api/user", false),
            ("/api/users/{id}", "/api/users/7", true),
            ("/api/users/{id}", "/api/users", false),
            ("/api/users/{id}", "/api/users/7/orders", false),
            ("/api/*/orders", "/api/7/orders", true),
            ("/admin/**", "/admin", true),
            ("/admin/**", "/admin/a/b/c", true),
            ("/admin/**", "/administrator", false),
            ("/**", "/anything/at/all", true),
            ("/", "/", true),
            ("/", "/x", false),
        ];
        for (p, path, want) in cases {
            let pat = PathPattern::parse(p).unwrap();
            assert_eq!(pat.matches(path), want, "{p} vs {path}");
        }
    }

    #[test]
    fn bad_patterns_are_named() {
        for p in ["api", "/a/**/b", "/a//b", "/a/x*", "/a/{id}x"] {
            assert!(PathPattern::parse(p).is_err(), "{p}");
        }
    }

    #[test]
    fn paths_are_normalised_before_matching() {
        let cases = [
            ("/a/b", "/a/b"),
            ("/a//b", "/a/b"),
            ("/a/./b", "/a/b"),
            ("/a/x/../b", "/a/b"),
            ("/a/%2e%2E/b", "/b"),
            ("/%61dmin", "/admin"),
            ("/a%2fb", "/a%2Fb"),
            ("/a/b/", "/a/b/"),
            ("/a/b/.", "/a/b/"),
            ("/", "/"),
            ("//", "/"),
            ("/a/..", "/"),
            ("/caf%C3%A9", "/caf%C3%A9"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_path(input).unwrap(), want, "{input}");
        }
        assert_eq!(normalize_path("/.."), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("/a/../.."), Err(PathError::AboveRoot));
        assert_eq!(normalize_path("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/a%00"), Err(PathError::Control));
        assert_eq!(normalize_path("a"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn routes_match_method_host_and_path() {
        let route = |name: &str, methods: &[&str], host: &str, path: &str| HttpRoute {
            name: name.into(),
            methods: methods.iter().map(|m| m.to_string()).collect(),
            host: host.into(),
            path: path.into(),
            kind: None,
            risk: None,
            body_fields: vec![],
            max_body_bytes: None,
        };
        let spec = HttpSpec {
            routes: vec![
                route("del", &["DELETE"], "*.internal", "/api/users/{id}"),
                route("any", &[], "", "/api/**"),
            ],
            ..Default::default()
        };
        let routes = Routes::new(&spec).unwrap();
        let name = |m, h, p| routes.find(m, h, p).map(|r| r.name.as_str());
        assert_eq!(name("delete", "svc.internal", "/api/users/1"), Some("del"));
        assert_eq!(name("GET", "svc.internal", "/api/users/1"), Some("any"));
        assert_eq!(name("DELETE", "evil.example", "/api/users/1"), Some("any"));
        assert_eq!(name("GET", "svc.internal", "/other"), None);
    }
}
