//! The manual-review queue over HTTP: an axum router, protected by a bearer token.

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::record::{Payload, Task, TaskId};
use super::review::{ManualReview, Page};
use crate::error::ConfigError;

#[derive(Clone)]
struct Admin {
    review: ManualReview,
    token: crate::auth::Token,
}

impl ManualReview {
    /// An axum router over this queue, every request needing `Authorization: Bearer <token>`
    /// (compared in constant time; a wrong or missing token gets 401):
    ///
    /// | request | answer |
    /// |---|---|
    /// | `GET /review?after=<id>&limit=<n>` | a page: `{"tasks": [...], "next": "<id>" or null}` |
    /// | `GET /review/audit?after=<id>&limit=<n>` | dropped tasks, with who and why |
    /// | `GET /review/{id}` | one task, or 404 |
    /// | `POST /review/{id}/requeue` | replay it now; 404 if it is not in the queue |
    /// | `POST /review/{id}/drop?by=<who>&reason=<why>` | drop it (the reason is required; `by` is `admin` when not given) |
    ///
    /// A page holds `limit` tasks (default 50; digits, brought into 1 to 1,000: `0` is 1, a
    /// count past 1,000 is 1,000; anything else is a 400). Query values are
    /// percent-decoded where they are valid escapes and kept as written where not.
    ///
    /// Nest it where only operators reach it (bind it to loopback, or behind your own
    /// authentication): it shows what clients sent, bodies included. A token shorter than 16
    /// bytes is refused.
    ///
    /// ```no_run
    /// # fn f(review: tower_degrade::fallback::ManualReview) -> Result<(), tower_degrade::error::ConfigError> {
    /// let token = std::env::var("REVIEW_TOKEN").unwrap_or_default();
    /// let admin = axum::Router::new().nest("/admin", review.admin_router(&token)?);
    /// # drop(admin);
    /// # Ok(())
    /// # }
    /// ```
    pub fn admin_router(&self, token: &str) -> Result<Router, ConfigError> {
        let state = Admin {
            review: self.clone(),
            token: crate::auth::Token::new(token, "review.admin_router.token")?,
        };
        Ok(Router::new()
            .route("/review", get(list))
            .route("/review/audit", get(audit))
            .route("/review/{id}", get(show))
            .route("/review/{id}/requeue", post(requeue))
            .route("/review/{id}/drop", post(drop_task))
            .method_not_allowed_fallback(crate::auth::method_not_allowed)
            .layer(axum::middleware::from_fn_with_state(
                state.token.clone(),
                crate::auth::require,
            ))
            .with_state(state))
    }
}

fn answer(status: StatusCode, body: Value) -> Response {
    let mut res = Response::new(Body::from(body.to_string()));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

fn bad(what: impl std::fmt::Display) -> Response {
    answer(StatusCode::BAD_REQUEST, json!({"error": what.to_string()}))
}

fn store_error(e: impl std::fmt::Display) -> Response {
    answer(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"error": e.to_string()}),
    )
}

/// The query parameters, percent-decoded.
fn query(req: &Request) -> Vec<(String, String)> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// A query component as forms encode it: `+` is a space, `%XX` a byte.
fn decode(s: &str) -> String {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
}

/// The value of the query parameter `name`, if given; an error if it is given more than once
/// (which of them was meant cannot be told, and the audit record keeps one).
fn param<'a>(q: &'a [(String, String)], name: &str) -> Result<Option<&'a str>, String> {
    let mut values = q.iter().filter(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let first = values.next();
    if values.next().is_some() {
        return Err(format!("`{name}` is given more than once"));
    }
    Ok(first)
}

/// `after` and `limit` of a page request.
fn paging(req: &Request) -> Result<(Option<TaskId>, usize), String> {
    let q = query(req);
    let after = match param(&q, "after")? {
        Some(a) => Some(a.parse::<TaskId>().map_err(|e| e.to_string())?),
        None => None,
    };
    let limit = match param(&q, "limit")? {
        // Digits: a count, however large (the page is brought into 1 to 1,000).
        Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
            l.parse::<usize>().unwrap_or(usize::MAX)
        }
        Some(l) => {
            return Err(format!(
                "`limit`: `{l}` is not a count of tasks (digits only; brought into 1 to 1,000)"
            ));
        }
        None => 50,
    };
    Ok((after, limit))
}

fn page_json(page: Page) -> Value {
    json!({
        "tasks": page.tasks.iter().map(task_json).collect::<Vec<_>>(),
        "next": page.next.map(|n| n.to_string()),
    })
}

/// A task as JSON: bodies as text (lossy for bytes that are not UTF-8).
pub(crate) fn task_json(t: &Task) -> Value {
    let payload = match t.payload() {
        Payload::Http(r) => json!({
            "kind": "http",
            "method": r.method,
            "uri": r.uri,
            "headers": r.headers.iter()
                .map(|(n, v)| json!([n, String::from_utf8_lossy(v)]))
                .collect::<Vec<_>>(),
            "body": String::from_utf8_lossy(&r.body),
        }),
        Payload::Bytes(b) => json!({"kind": "task", "body": String::from_utf8_lossy(b)}),
    };
    json!({
        "id": t.id().to_string(),
        "key": t.key(),
        "class": t.class(),
        "reason": t.reason(),
        "attempts": t.attempts(),
        "created_ms": t.created_ms(),
        "last_answer": t.last_answer(),
        "payload": payload,
    })
}

fn id(raw: &str) -> Result<TaskId, String> {
    raw.parse::<TaskId>().map_err(|e| e.to_string())
}

async fn list(State(admin): State<Admin>, req: Request) -> Response {
    let (after, limit) = match paging(&req) {
        Ok(p) => p,
        Err(e) => return bad(e),
    };
    match admin.review.list(after, limit).await {
        Ok(page) => answer(StatusCode::OK, page_json(page)),
        Err(e) => store_error(e),
    }
}

async fn audit(State(admin): State<Admin>, req: Request) -> Response {
    let (after, limit) = match paging(&req) {
        Ok(p) => p,
        Err(e) => return bad(e),
    };
    match admin.review.audit(after, limit).await {
        Ok(page) => answer(StatusCode::OK, page_json(page)),
        Err(e) => store_error(e),
    }
}

fn not_found(id: TaskId) -> Response {
    answer(
        StatusCode::NOT_FOUND,
        json!({"error": format!("task {id} is not waiting for review")}),
    )
}

async fn show(State(admin): State<Admin>, raw: Result<Path<String>, PathRejection>) -> Response {
    let raw = match raw {
        Ok(Path(raw)) => raw,
        Err(e) => return crate::auth::rejected(e),
    };
    let id = match id(&raw) {
        Ok(id) => id,
        Err(e) => return bad(e),
    };
    match admin.review.show(id).await {
        Ok(Some(t)) => answer(StatusCode::OK, task_json(&t)),
        Ok(None) => not_found(id),
        Err(e) => store_error(e),
    }
}

async fn requeue(State(admin): State<Admin>, raw: Result<Path<String>, PathRejection>) -> Response {
    let raw = match raw {
        Ok(Path(raw)) => raw,
        Err(e) => return crate::auth::rejected(e),
    };
    let id = match id(&raw) {
        Ok(id) => id,
        Err(e) => return bad(e),
    };
    match admin.review.requeue(id).await {
        Ok(true) => answer(StatusCode::OK, json!({"requeued": id.to_string()})),
        Ok(false) => not_found(id),
        Err(e) => store_error(e),
    }
}

async fn drop_task(
    State(admin): State<Admin>,
    raw: Result<Path<String>, PathRejection>,
    req: Request,
) -> Response {
    let raw = match raw {
        Ok(Path(raw)) => raw,
        Err(e) => return crate::auth::rejected(e),
    };
    let id = match id(&raw) {
        Ok(id) => id,
        Err(e) => return bad(e),
    };
    let q = query(&req);
    let (by, reason) = match (param(&q, "by"), param(&q, "reason")) {
        (Ok(by), Ok(reason)) => (by.unwrap_or("admin"), reason.unwrap_or("")),
        (Err(why), _) | (_, Err(why)) => return bad(why),
    };
    if let Err(why) = super::review::audit_text(by, reason) {
        return bad(why);
    }
    match admin.review.drop_task(id, by, reason).await {
        Ok(true) => answer(StatusCode::OK, json!({"dropped": id.to_string()})),
        Ok(false) => not_found(id),
        Err(e) => store_error(e),
    }
}
