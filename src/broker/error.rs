//! The one place where error kinds become HTTP status codes. Handlers return the service's
//! own errors; nothing else in the broker picks a status.
//!
//! 400 bad input · 401 no valid token · 403 not allowed · 404 no such thing (another user's
//! session included) · 409 conflicts with the current state · 413 body too large ·
//! 503 pool exhausted, stopped, or the desktop's display not reachable now (no console, or
//! a display on every address while the broker has no `--display-host`).

use super::vv::VvError;
use crate::catalog::CatalogError;
use crate::lock::LockError;
use crate::names::NameError;
use crate::pool::PoolError;
use crate::profile::ProfileError;
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
}

fn catalog_status(e: &CatalogError) -> StatusCode {
    match e {
        CatalogError::ImageNotFound(_) | CatalogError::VersionNotFound { .. } => StatusCode::NOT_FOUND,
        CatalogError::ImageExists(_) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn lock_status(e: &LockError) -> StatusCode {
    match e {
        LockError::Busy { .. } => StatusCode::CONFLICT,
        LockError::Open { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn store_status(e: &StoreError) -> StatusCode {
    match e {
        StoreError::Name(_) => StatusCode::BAD_REQUEST,
        StoreError::Catalog(c) => catalog_status(c),
        StoreError::Lock(l) => lock_status(l),
        StoreError::NoDraft(_) => StatusCode::NOT_FOUND,
        StoreError::Removed { .. } | StoreError::Exists(_) | StoreError::DraftElsewhere { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn pool_status(e: &PoolError) -> StatusCode {
    match e {
        PoolError::Name(_)
        | PoolError::Size { .. }
        | PoolError::NameTooLong(_)
        | PoolError::VirtType(_)
        | PoolError::DisplayListen(_) => StatusCode::BAD_REQUEST,
        PoolError::Profile(ProfileError::NotFound { .. } | ProfileError::InvalidProfileName { .. }) => {
            StatusCode::BAD_REQUEST
        }
        PoolError::Catalog(c) => catalog_status(c),
        PoolError::Store(s) => store_status(s),
        PoolError::Lock(l) => lock_status(l),
        PoolError::NotFound(_) | PoolError::DesktopNotFound(_) => StatusCode::NOT_FOUND,
        PoolError::Exists(_)
        | PoolError::InUse { .. }
        | PoolError::Denied(_)
        | PoolError::DisplayTlsUnavailable { .. } => StatusCode::CONFLICT,
        PoolError::Exhausted { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn rollout_status(e: &RolloutError) -> StatusCode {
    match e {
        RolloutError::Name(_) | RolloutError::Waves(_) | RolloutError::ForceWithoutReason => StatusCode::BAD_REQUEST,
        RolloutError::Catalog(c) => catalog_status(c),
        RolloutError::Store(s) => store_status(s),
        RolloutError::Pool(p) => pool_status(p),
        RolloutError::Lock(l) => lock_status(l),
        RolloutError::Denied(_)
        | RolloutError::NothingOpen(_)
        | RolloutError::NotRunning { .. }
        | RolloutError::Failed { .. }
        | RolloutError::NoPrevious { .. } => StatusCode::CONFLICT,
        RolloutError::Hypervisor(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn user_status(e: &UserError) -> StatusCode {
    match e {
        UserError::Name(_) => StatusCode::BAD_REQUEST,
        UserError::Catalog(c) => catalog_status(c),
        UserError::Pool(p) => pool_status(p),
        UserError::Unauthenticated | UserError::TokenExpired { .. } | UserError::ConsoleDenied(_) => {
            StatusCode::UNAUTHORIZED
        }
        UserError::NotAdmin { .. } | UserError::NotEntitled { .. } => StatusCode::FORBIDDEN,
        UserError::NotFound(_) | UserError::SessionNotFound(_) => StatusCode::NOT_FOUND,
        UserError::Exists(_) | UserError::LoggingOff { .. } => StatusCode::CONFLICT,
        UserError::PoolStopped(_) | UserError::NoConsole { .. } => StatusCode::SERVICE_UNAVAILABLE,
        UserError::BadTime(_) | UserError::Random(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::User(e) => user_status(e),
            ApiError::Pool(e) => pool_status(e),
            ApiError::Store(e) => store_status(e),
            ApiError::Catalog(e) => catalog_status(e),
            ApiError::Rollout(e) => rollout_status(e),
            ApiError::Vv(VvError::NoDisplayHost { .. } | VvError::NoDisplayCa { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Vv(VvError::BadValue { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Name(_) | ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ApiError::Origin { .. } => StatusCode::FORBIDDEN,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message with its causes, as the CLI prints them.
    pub fn message(&self) -> String {
        let mut msg = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            let s = c.to_string();
            if !msg.contains(&s) {
                msg = format!("{msg}: {s}");
            }
            cause = c.source();
        }
        msg
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.message();
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(%status, error = %message, "request failed");
        }
        let mut r = (status, Json(serde_json::json!({"error": message, "status": status.as_u16()}))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert("www-authenticate", axum::http::HeaderValue::from_static("Bearer"));
        }
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
        ];
        for (e, code) in cases {
            assert_eq!(e.status().as_u16(), code, "{e}");
        }
    }

    #[test]
    fn exhausted_says_which_pool() {
        let e: ApiError = PoolError::Exhausted { pool: "finance".into(), size: 20 }.into();
        assert!(e.message().contains("pool 'finance' is exhausted"), "{}", e.message());
    }
}
