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
    for (i, p) in parts.iter().enumerate() {
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
            return true;
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
        assert!(matches(&segs("/"), "/"));
        assert!(!matches(&segs("/a"), "/b"));
        assert!(matches(&segs("/users/:id/cart"), "/users/u1/cart"));
        assert!(parse_pattern("no-slash").is_err());
        assert!(parse_pattern("/{*rest}/x").is_err());
    }
}
