//! The one place where error kinds become HTTP status codes. Handlers return the service's
//! own errors; nothing else in the broker picks a status. A module error's status is its
//! [`ErrorKind`]'s (`crate::error`: invalid 400, not found 404, conflict and busy 409,
//! forbidden 403, exhausted 503, internal 500); only what HTTP says more precisely than a
//! kind is picked here: 401 for missing or stale credentials, 408 and 413 for the body.
//!
//! 400 bad input · 401 no valid token · 403 not allowed · 404 no such thing (another user's
//! session included) · 408 the request body did not arrive in time · 409 conflicts with the
//! current state · 413 body too large · 503 pool exhausted, stopped, the request took longer
//! than `--request-timeout`, or the desktop's display not reachable now (no console, or a
//! display on every address while the broker has no `--display-host`).
//!
//! It is also where a message is judged fit for a thin client. Messages about the caller's
//! own request (4xx) and the few 503s that name only pools and desktops go out as they are.
//! Anything else (a 500, a console that libvirt could not give) may carry host paths or
//! libvirt's words: the client gets a short, actionable message with an error id, the log
//! gets the full message under the same id, and the admin API ([`with_detail`]) puts the
//! full message back in the body for administrators.

use super::vv::VvError;
use crate::catalog::CatalogError;
use crate::context::ContextError;
use crate::error::{ErrorKind, Kind};
use crate::names::NameError;
use crate::pool::PoolError;
use crate::rollout::RolloutError;
use crate::store::StoreError;
use crate::users::UserError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ApiError {
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Rollout(#[from] RolloutError),
    #[error(transparent)]
    Vv(#[from] VvError),
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error(transparent)]
    Failover(#[from] crate::failover::FailoverError),
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
    #[error(transparent)]
    Incident(#[from] crate::incident::IncidentError),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("no such endpoint: {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("WebSocket origin {origin:?} is not this broker's origin {expected:?}")]
    Origin { origin: String, expected: String },
    #[error("the broker could not run the request: {0}")]
    Internal(String),
    #[error("the request did not finish within {}; try again", humantime::format_duration(*after))]
    Timeout { after: std::time::Duration },
    #[error("the request body did not arrive in time")]
    BodyTimeout,
}

impl crate::error::Kind for ApiError {
    fn kind(&self) -> ErrorKind {
        match self {
            ApiError::User(e) => e.kind(),
            ApiError::Pool(e) => e.kind(),
            ApiError::Store(e) => e.kind(),
            ApiError::Catalog(e) => e.kind(),
            ApiError::Name(e) => e.kind(),
            ApiError::Rollout(e) => e.kind(),
            ApiError::Vv(e) => e.kind(),
            ApiError::Context(e) => e.kind(),
            ApiError::Failover(e) => e.kind(),
            ApiError::Watch(e) => e.kind(),
            ApiError::Incident(e) => e.kind(),
            ApiError::BadRequest(_) | ApiError::TooLarge { .. } | ApiError::BodyTimeout => ErrorKind::Invalid,
            ApiError::NoRoute { .. } => ErrorKind::NotFound,
            ApiError::Origin { .. } => ErrorKind::Forbidden,
            ApiError::Internal(_) => ErrorKind::Internal,
            ApiError::Timeout { .. } => ErrorKind::Exhausted,
        }
    }
}

impl ApiError {
    /// The status: the kind's, except where HTTP has a more precise code than the kind.
    pub fn status(&self) -> StatusCode {
        match self {
            // Credentials missing or stale, as opposed to a known caller who may not.
            ApiError::User(
                UserError::Unauthenticated | UserError::TokenExpired { .. } | UserError::ConsoleDenied(_),
            ) => StatusCode::UNAUTHORIZED,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            e => e.kind().http_status(),
        }
    }

    /// The message for a client that is not an administrator, when [`ApiError::message`]
    /// may carry host detail (paths, libvirt's or SQLite's words): `None` when it is fit to
    /// show as it is.
    pub fn public_message(&self) -> Option<String> {
        let safe_503 = matches!(
            self,
            ApiError::User(
                UserError::PoolStopped(_) | UserError::Pool(PoolError::Exhausted { .. }) | UserError::LoggingOff { .. }
            ) | ApiError::Pool(PoolError::Exhausted { .. })
                | ApiError::Vv(VvError::NoDisplayHost { .. } | VvError::NoDisplayCa { .. })
                | ApiError::Timeout { .. }
        );
        if !self.status().is_server_error() || safe_503 {
            return None;
        }
        Some(match self {
            ApiError::User(UserError::NoConsole { desktop, .. }) => {
                format!("the console of desktop {desktop} is not available now; try again in a moment or contact your administrator")
            }
            _ => "the broker could not complete this request; try again or contact your administrator".to_string(),
        })
    }

    /// The message with its causes, as the CLI prints them.
    pub fn message(&self) -> String {
        crate::error::message(self)
    }
}

/// The full message of an error whose body carries only its public message, for
/// [`with_detail`].
#[derive(Debug, Clone)]
struct Detail {
    message: String,
    id: String,
}

/// A short random id that ties a client's error to its log line.
fn error_id() -> String {
    let mut b = [0u8; 6];
    if getrandom::fill(&mut b).is_err() {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        b[..6].copy_from_slice(&N.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_be_bytes()[2..]);
    }
    hex::encode(b)
}

fn body(status: StatusCode, message: &str, id: Option<&str>) -> Response {
    let mut v = serde_json::json!({"error": message, "status": status.as_u16()});
    if let Some(id) = id {
        v["error_id"] = id.into();
    }
    let mut r = (status, Json(v)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert("www-authenticate", axum::http::HeaderValue::from_static("Bearer"));
    }
    r
}

/// For the admin API: puts the full message of an internal error back in the body.
pub async fn with_detail(resp: Response) -> Response {
    match resp.extensions().get::<Detail>().cloned() {
        Some(d) => body(resp.status(), &format!("{} (error id {})", d.message, d.id), Some(&d.id)),
        None => resp,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.message();
        let Some(public) = self.public_message() else {
            return body(status, &message, None);
        };
        let id = error_id();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(error_id = %id, %status, error = %message, "request failed");
        } else {
            tracing::error!(error_id = %id, %status, error = %message, "request failed");
        }
        let mut r = body(status, &format!("{public} (error id {id})"), Some(&id));
        r.extensions_mut().insert(Detail { message, id });
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_the_documented_codes() {
        let cases: Vec<(ApiError, u16)> = vec![
            (UserError::Unauthenticated.into(), 401),
            (UserError::NotAdmin { user: "a".into() }.into(), 403),
            (UserError::NotEntitled { user: "a".into(), pool: "p".into() }.into(), 403),
            (UserError::SessionNotFound("x".into()).into(), 404),
            (UserError::Pool(PoolError::NotFound("p".into())).into(), 404),
            (PoolError::Exhausted { pool: "p".into(), size: 20 }.into(), 503),
            (UserError::Pool(PoolError::Exhausted { pool: "p".into(), size: 20 }).into(), 503),
            (UserError::Exists("a".into()).into(), 409),
            (ApiError::TooLarge { limit: 1 }, 413),
            (ApiError::BadRequest("x".into()), 400),
            (PoolError::DisplayListen("x".into()).into(), 400),
            (VvError::NoDisplayHost { desktop: "d".into(), listen: "0.0.0.0".into() }.into(), 503),
            (VvError::BadValue { desktop: "d".into(), key: "host" }.into(), 500),
            (ApiError::Timeout { after: std::time::Duration::from_secs(1) }, 503),
            (ApiError::BodyTimeout, 408),
            (UserError::TokenExpired { user: "a".into(), at: "t".into() }.into(), 401),
            (RolloutError::Catalog(CatalogError::VersionNotFound { image: "i".into(), version: 9 }).into(), 404),
            (
                PoolError::Profile(crate::profile::ProfileError::NotFound { name: "x".into(), path: "/x".into() })
                    .into(),
                404,
            ),
            (
                RolloutError::Pool(PoolError::Lock(crate::lock::LockError::Busy {
                    what: "w".into(),
                    holder: "1".into(),
                }))
                .into(),
                409,
            ),
            (ApiError::NoRoute { method: "GET".into(), path: "/x".into() }, 404),
            (ApiError::Origin { origin: "a".into(), expected: "b".into() }, 403),
        ];
        for (e, code) in cases {
            assert_eq!(e.status().as_u16(), code, "{e}");
        }
    }

    #[test]
    fn internal_detail_is_kept_from_thin_clients() {
        let libvirt = crate::hypervisor::HypervisorError::Connect {
            uri: "qemu+unix:///system?socket=/srv/x.sock".into(),
            message: "Failed to connect socket to '/srv/x.sock'".into(),
        };
        let e: ApiError =
            UserError::NoConsole { desktop: "vdim-a-001".into(), session: "s".into(), source: libvirt }.into();
        let public = e.public_message().expect("scrubbed");
        assert!(public.contains("vdim-a-001") && !public.contains('/') && !public.contains("ibvirt"), "{public}");
        assert!(e.message().contains("/srv/x.sock"));
        let e = ApiError::Internal("cannot open /srv/home/catalog.db".into());
        assert!(!e.public_message().unwrap().contains('/'));
        for shown in [
            ApiError::from(PoolError::Exhausted { pool: "p".into(), size: 1 }),
            UserError::NotEntitled { user: "a".into(), pool: "p".into() }.into(),
            ApiError::Timeout { after: std::time::Duration::from_secs(60) },
            ApiError::BodyTimeout,
        ] {
            assert_eq!(shown.public_message(), None, "{shown}");
        }
    }

    #[test]
    fn exhausted_says_which_pool() {
        let e: ApiError = PoolError::Exhausted { pool: "finance".into(), size: 20 }.into();
        assert!(e.message().contains("pool 'finance' is exhausted"), "{}", e.message());
    }
}
