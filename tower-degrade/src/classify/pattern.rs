//! Route patterns in axum's syntax, matched byte-wise without allocating.

use crate::error::ConfigError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Literal(Box<str>),
    Param,
    CatchAll,
}

pub(crate) fn parse_pattern(pattern: &str) -> Result<Box<[Segment]>, ConfigError> {
    if !pattern.starts_with('/') {
        return Err(ConfigError::InvalidValue {
            field: "http.route",
            reason: format!("pattern `{pattern}` must start with `/`"),
        });
    }
    let parts: Vec<&str> = pattern[1..].split('/').collect();
    let mut segs = Vec::with_capacity(parts.len());
    let mut names: Vec<&str> = Vec::new();
    let bad = |why: String| ConfigError::InvalidValue {
        field: "http.route",
        reason: format!("pattern `{pattern}`: {why}"),
    };
    for (i, p) in parts.iter().enumerate() {
        // As axum (matchit) has it: a parameter is a whole segment `{name}` or `{*name}`, its
        // name given once; a brace anywhere else is an error, not a literal.
        if let Some(name) = p.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            let name = name.strip_prefix('*').unwrap_or(name);
            if name.is_empty() || name.contains(['{', '}']) {
                return Err(bad(format!("`{p}` is not a parameter (`{{name}}`)")));
            }
            if names.contains(&name) {
                return Err(bad(format!("the parameter `{name}` is named twice")));
            }
            names.push(name);
        } else if p.contains(['{', '}']) {
            return Err(bad(format!(
                "`{p}`: a parameter is a whole segment, `{{name}}`"
            )));
        }
        // What no request's path holds: the query and the fragment are not the path, and a
        // client percent-encodes spaces and control characters (an HTTP server refuses them).
        if let Some(c) = p
            .chars()
            .find(|&c| matches!(c, '?' | '#') || c.is_whitespace() || c.is_control())
        {
            return Err(bad(format!(
                "{:?} can never match: no request's path holds it (the query is not part of \
                 the path; spaces and control characters are sent percent-encoded)",
                c
            )));
        }
        let seg = if p.starts_with("{*") && p.ends_with('}') || *p == "*" {
            if i + 1 != parts.len() {
                return Err(ConfigError::InvalidValue {
                    field: "http.route",
                    reason: format!("pattern `{pattern}`: a catch-all must be the last segment"),
                });
            }
            Segment::CatchAll
        } else if p.starts_with('{') && p.ends_with('}') || p.starts_with(':') {
            Segment::Param
        } else {
            Segment::Literal((*p).into())
        };
        segs.push(seg);
    }
    Ok(segs.into())
}

#[inline]
pub(crate) fn matches(segments: &[Segment], path: &str) -> bool {
    // Byte-wise: `str::split` costs more than the whole rest of the data path.
    let mut rest = Some(path.strip_prefix('/').unwrap_or(path));
    for seg in segments {
        if *seg == Segment::CatchAll {
            // As axum's: at least one byte (`/static/{*rest}` is not `/static` or `/static/`).
            return rest.is_some_and(|r| !r.is_empty());
        }
        let Some(r) = rest else { return false };
        let (part, tail) = match r.as_bytes().iter().position(|&b| b == b'/') {
            Some(i) => (&r[..i], Some(&r[i + 1..])),
            None => (r, None),
        };
        let ok = match seg {
            Segment::Param => !part.is_empty(),
            Segment::Literal(l) => part == &**l,
            Segment::CatchAll => true,
        };
        if !ok {
            return false;
        }
        rest = tail;
    }
    rest.is_none()
}

/// Whether some path matches both `a` and `b`: segment by segment, two literals are equal, and
/// either runs into a catch-all where the other still has a segment, or they end together.
pub(crate) fn overlap(a: &[Segment], b: &[Segment]) -> bool {
    let mut i = 0;
    loop {
        match (a.get(i), b.get(i)) {
            (None, None) => return true,
            (Some(Segment::CatchAll), Some(_)) | (Some(_), Some(Segment::CatchAll)) => return true,
            (Some(Segment::Literal(x)), Some(Segment::Literal(y))) if x != y => return false,
            (Some(_), Some(_)) => i += 1,
            // One ends while the other has a segment left: a catch-all must take a byte.
            _ => return false,
        }
    }
}

/// Whether `a` is more specific than `b`, two patterns that match one path: at the first
/// segment where they differ, a literal beats a parameter and a parameter a catch-all (axum's
/// router's priority).
pub(crate) fn more_specific(a: &[Segment], b: &[Segment]) -> bool {
    let rank = |s: &Segment| match s {
        Segment::Literal(_) => 2,
        Segment::Param => 1,
        Segment::CatchAll => 0,
    };
    for (x, y) in a.iter().zip(b) {
        if rank(x) != rank(y) {
            return rank(x) > rank(y);
        }
    }
    // One is a prefix of the other: only a catch-all makes a shorter one match the same path,
    // and the longer, which spells that part out, is the more specific.
    a.len() > b.len()
}

/// Whether `pattern`, a route pattern as axum reports it (`MatchedPath`), is the pattern of
/// `segments`: the same literals, a parameter where it has one (whatever the name or the
/// syntax, `{id}` or `:id`), a catch-all where it has one.
#[inline]
pub(crate) fn same_pattern(segments: &[Segment], pattern: &str) -> bool {
    let Some(mut rest) = pattern.strip_prefix('/') else {
        return false;
    };
    for (i, seg) in segments.iter().enumerate() {
        let (part, tail) = match rest.as_bytes().iter().position(|&b| b == b'/') {
            Some(at) => (&rest[..at], Some(&rest[at + 1..])),
            None => (rest, None),
        };
        let catch_all = part.starts_with("{*") && part.ends_with('}') || part == "*";
        let param =
            !catch_all && (part.starts_with('{') && part.ends_with('}') || part.starts_with(':'));
        let ok = match seg {
            Segment::CatchAll => catch_all,
            Segment::Param => param,
            Segment::Literal(l) => !catch_all && !param && part == &**l,
        };
        match (ok, tail) {
            (false, _) => return false,
            (true, None) => return i + 1 == segments.len(),
            (true, Some(t)) => rest = t,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(p: &str) -> Box<[Segment]> {
        parse_pattern(p).unwrap()
    }

    #[test]
    fn patterns_match_like_axum() {
        assert!(matches(&segs("/orders/{id}"), "/orders/7"));
        assert!(!matches(&segs("/orders/{id}"), "/orders/7/items"));
        assert!(!matches(&segs("/orders/{id}"), "/orders/"));
        assert!(matches(&segs("/static/{*rest}"), "/static/a/b/c"));
        // A catch-all takes at least one byte, as axum's does: these are axum's 404s.
        assert!(!matches(&segs("/static/{*rest}"), "/static"));
        assert!(!matches(&segs("/static/{*rest}"), "/static/"));
        assert!(matches(&segs("/static/{*rest}"), "/static/a/"));
        assert!(matches(&segs("/"), "/"));
        assert!(!matches(&segs("/a"), "/b"));
        assert!(matches(&segs("/users/:id/cart"), "/users/u1/cart"));
        assert!(parse_pattern("no-slash").is_err());
        assert!(parse_pattern("/{*rest}/x").is_err());
        // Patterns axum refuses were taken, a stray brace as a literal.
        for (bad, why) in [
            ("/a/{", "whole segment"),
            ("/a/x{y}", "whole segment"),
            ("/a/{}", "not a parameter"),
            ("/a/{x}/{x}", "named twice"),
            ("/a/{x}/{*x}", "named twice"),
        ] {
            let e = parse_pattern(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn the_more_specific_pattern_is_the_one_axum_routes_to() {
        let featured = segs("/products/featured");
        let product = segs("/products/{id}");
        let any = segs("/products/{*rest}");
        assert!(more_specific(&featured, &product) && !more_specific(&product, &featured));
        assert!(more_specific(&product, &any) && !more_specific(&any, &product));
        assert!(more_specific(&segs("/a/{x}/b"), &segs("/a/{x}/{y}")));
        assert!(
            !more_specific(&product, &segs("/products/{sku}")),
            "equal: the first wins"
        );
        // Which pairs can meet one path at all (the search stops at a hit no later rule can
        // beat).
        assert!(overlap(&featured, &product) && overlap(&product, &any));
        assert!(!overlap(&segs("/orders/{id}/pay"), &segs("/log")));
        assert!(!overlap(&segs("/a/{x}"), &segs("/a/{x}/b")));
        assert!(
            !overlap(&segs("/a"), &segs("/a/{*rest}")),
            "a catch-all takes a byte"
        );
        assert!(overlap(&segs("/a/b/c"), &segs("/a/{*rest}")));
        assert!(!overlap(&segs("/a/b"), &segs("/a/c")));
    }

    #[test]
    fn a_rule_is_the_route_axum_matched_whatever_its_parameters_are_called() {
        let rule = segs("/pay/:id");
        assert!(same_pattern(&rule, "/pay/{id}"));
        assert!(same_pattern(
            &segs("/products/{product_id}"),
            "/products/{id}"
        ));
        assert!(same_pattern(&segs("/static/{*rest}"), "/static/{*path}"));
        assert!(same_pattern(&segs("/"), "/"));
        assert!(!same_pattern(&rule, "/pay/{id}/refund"));
        assert!(!same_pattern(&segs("/pay/{id}/refund"), "/pay/{id}"));
        assert!(
            !same_pattern(&rule, "/pay/latest"),
            "a literal is not a parameter"
        );
        assert!(!same_pattern(&segs("/pay/latest"), "/pay/{id}"));
        assert!(!same_pattern(&segs("/static/{id}"), "/static/{*path}"));
        assert!(!same_pattern(&rule, "pay/{id}"));
    }
}
