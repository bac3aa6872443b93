//! One error kind that every module error maps to, so that "not found" means the same to a
//! script reading the exit code, to a thin client reading the HTTP status, and to a reader of
//! `--json`. Each module's error enum implements [`Kind`] next to its definition; wrappers
//! (`#[error(transparent)]`, `#[from]`) delegate to the error they wrap, so the kind of a
//! missing version is `NotFound` however many layers it passed through.
//!
//! | kind        | exit | HTTP | meaning                                                      |
//! |-------------|------|------|--------------------------------------------------------------|
//! | `internal`  | 1    | 500  | vdim, libvirt, qemu-img or the disk failed; not the caller's |
//! | `invalid`   | 2    | 400  | the request itself is wrong (a name, an argument, a file)    |
//! | `busy`      | 3    | 409  | another command is changing the object now: retry            |
//! | `not_found` | 4    | 404  | the named image, version, pool, desktop, user... is not there |
//! | `conflict`  | 5    | 409  | the object's state does not allow it (exists, pinned, in use) |
//! | `forbidden` | 6    | 403  | the caller may not do this                                   |
//! | `exhausted` | 7    | 503  | no capacity now: pool full or stopped, no display, no space  |
//!
//! Exit 2 is also what clap exits with for a bad command line: both say "fix the input".
//! Busy is 409, not 503: it is a conflict with another command's work on the same object,
//! which the caller resolves by retrying, while 503 says the service itself has no capacity.

use serde::Serialize;
use std::error::Error as StdError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Invalid,
    NotFound,
    Conflict,
    Busy,
    Forbidden,
    Exhausted,
    Internal,
}

impl ErrorKind {
    /// The process exit code the CLI ends with (README, "Commands").
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Internal => 1,
            ErrorKind::Invalid => 2,
            ErrorKind::Busy => 3,
            ErrorKind::NotFound => 4,
            ErrorKind::Conflict => 5,
            ErrorKind::Forbidden => 6,
            ErrorKind::Exhausted => 7,
        }
    }

    /// The HTTP status the broker answers with.
    pub fn http_status(self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict | ErrorKind::Busy => StatusCode::CONFLICT,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::Exhausted => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Busy => "busy",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Exhausted => "exhausted",
            ErrorKind::Internal => "internal",
        }
    }

    /// For an I/O error on a path the caller named (an import's source file, a listen
    /// address); I/O on vdim's own files is `Internal` whatever the OS said.
    pub fn of_io(e: &std::io::Error) -> ErrorKind {
        match e.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::Forbidden,
            std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::AddrInUse => ErrorKind::Conflict,
            _ => ErrorKind::Internal,
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Implemented by every module's error enum, right after its definition.
pub trait Kind {
    fn kind(&self) -> ErrorKind;
}

/// The kind of one error in a chain, if it is one of vdim's module errors. The one list of
/// them: a new module error enum is added here.
fn kind_of_one(e: &(dyn StdError + 'static)) -> Option<ErrorKind> {
    macro_rules! try_types {
        ($($t:ty),* $(,)?) => {
            $(if let Some(x) = e.downcast_ref::<$t>() {
                return Some(x.kind());
            })*
        };
    }
    try_types!(
        crate::context::ContextError,
        crate::dev::DevError,
        crate::rollout::RolloutError,
        crate::users::UserError,
        crate::pool::PoolError,
        crate::hosts::HostError,
        crate::replica::ReplicaError,
        crate::store::StoreError,
        crate::backup::BackupError,
        crate::failover::FailoverError,
        crate::watch::WatchError,
        crate::watch::webhook::WebhookError,
        crate::incident::IncidentError,
        crate::catalog::CatalogError,
        crate::lock::LockError,
        crate::names::NameError,
        crate::rules::Denied,
        crate::rules::PromotionDenied,
        crate::imgfmt::ImgFmtError,
        crate::qcow2::Qcow2Error,
        crate::qemu_img::QemuImgError,
        crate::profile::ProfileError,
        crate::hypervisor::HypervisorError,
        crate::broker::BrokerError,
        crate::broker::error::ApiError,
        crate::broker::vv::VvError,
        crate::broker::vnc::VncError,
    );
    None
}

/// The kind of an error: that of the first error in its chain that has one (an
/// `anyhow` context has none), else `Internal`.
pub fn kind(err: &anyhow::Error) -> ErrorKind {
    err.chain().find_map(kind_of_one).unwrap_or(ErrorKind::Internal)
}

/// The CLI's exit code for an error.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    kind(err).exit_code()
}

/// An error with its causes on one line, each cause once (a message that already quotes its
/// source does not repeat it).
pub fn message(err: &(dyn StdError + 'static)) -> String {
    let mut msg = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !msg.contains(&s) {
            msg = format!("{msg}: {s}");
        }
        cause = c.source();
    }
    msg
}

/// What the CLI prints on stderr for an error: the chain as text, or with `--json` one line
/// `{"error": {"kind": ..., "message": ...}}`.
pub fn render(err: &anyhow::Error, json: bool) -> String {
    if json {
        let v = serde_json::json!({"error": {"kind": kind(err), "message": message(err.as_ref())}});
        return v.to_string();
    }
    let mut s = format!("error: {err}");
    for cause in err.chain().skip(1) {
        s += &format!("\n  caused by: {cause}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::CatalogError;
    use crate::context::ContextError;
    use crate::dev::DevError;
    use crate::hypervisor::HypervisorError;
    use crate::imgfmt::ImgFmtError;
    use crate::lock::LockError;
    use crate::names::NameError;
    use crate::pool::PoolError;
    use crate::profile::ProfileError;
    use crate::qcow2::Qcow2Error;
    use crate::qemu_img::QemuImgError;
    use crate::rollout::RolloutError;
    use crate::rules::{Denied, PromotionDenied};
    use crate::store::StoreError;
    use crate::users::UserError;
    use std::path::PathBuf;

    fn name() -> NameError {
        NameError::Invalid { kind: "image", name: "Bad!".into() }
    }
    fn missing_version() -> CatalogError {
        CatalogError::VersionNotFound { image: "img".into(), version: 9 }
    }
    fn busy() -> LockError {
        LockError::Busy { what: "image 'img'".into(), holder: "42".into() }
    }
    fn libvirt() -> HypervisorError {
        HypervisorError::Connect { uri: "test:///default".into(), message: "down".into() }
    }
    fn no_profile() -> ProfileError {
        ProfileError::NotFound { name: "ghost".into(), path: PathBuf::from("/p/ghost.toml") }
    }
    fn missing_file() -> ImgFmtError {
        ImgFmtError::Unreadable { path: "/x".into(), source: std::io::Error::from(std::io::ErrorKind::NotFound) }
    }

    #[test]
    fn every_transparent_wrapper_has_the_kind_of_what_it_wraps() {
        use ErrorKind::*;
        let cases: Vec<(Box<dyn Kind>, ErrorKind)> = vec![
            (Box::new(StoreError::Name(name())), Invalid),
            (Box::new(StoreError::Catalog(missing_version())), NotFound),
            (Box::new(StoreError::Lock(busy())), Busy),
            (Box::new(StoreError::Format(missing_file())), NotFound),
            (Box::new(StoreError::Format(ImgFmtError::Empty { path: "/x".into() })), Invalid),
            (Box::new(StoreError::Qcow2(Qcow2Error::NotQcow2 { path: "/l".into() })), Internal),
            (
                Box::new(StoreError::QemuImg(QemuImgError::Timeout { op: "convert", path: "/x".into(), secs: 1 })),
                Internal,
            ),
            (Box::new(PoolError::Name(name())), Invalid),
            (Box::new(PoolError::Catalog(missing_version())), NotFound),
            (Box::new(PoolError::Store(StoreError::Lock(busy()))), Busy),
            (Box::new(PoolError::Lock(busy())), Busy),
            (Box::new(PoolError::Hypervisor(libvirt())), Internal),
            (Box::new(PoolError::Profile(no_profile())), NotFound),
            (Box::new(PoolError::Qcow2(Qcow2Error::Exists { path: "/o".into() })), Internal),
            (Box::new(PoolError::Denied(Denied::Pinned { pool: "p".into(), version: 1 })), Conflict),
            (Box::new(RolloutError::Name(name())), Invalid),
            (Box::new(RolloutError::Catalog(missing_version())), NotFound),
            (Box::new(RolloutError::Store(StoreError::Catalog(CatalogError::ImageNotFound("g".into())))), NotFound),
            (Box::new(RolloutError::Pool(PoolError::Exhausted { pool: "p".into(), size: 1 })), Exhausted),
            (Box::new(RolloutError::Hypervisor(libvirt())), Internal),
            (Box::new(RolloutError::Lock(busy())), Busy),
            (Box::new(RolloutError::Denied(PromotionDenied::RolloutOpen { image: "i".into(), version: 2 })), Conflict),
            (Box::new(UserError::Name(name())), Invalid),
            (Box::new(UserError::Catalog(missing_version())), NotFound),
            (Box::new(UserError::Pool(PoolError::NotFound("p".into()))), NotFound),
            (Box::new(DevError::Store(StoreError::NoDraft("img".into()))), NotFound),
            (Box::new(DevError::Pool(PoolError::Lock(busy()))), Busy),
            (Box::new(DevError::Hypervisor(libvirt())), Internal),
            (Box::new(DevError::Profile(no_profile())), NotFound),
            (Box::new(crate::broker::BrokerError::Context(ContextError::Catalog(missing_version()))), NotFound),
            (Box::new(crate::broker::BrokerError::Context(ContextError::Hypervisor(libvirt()))), Internal),
            (Box::new(ContextError::Heal(UserError::Pool(PoolError::Lock(busy())))), Busy),
        ];
        for (i, (e, want)) in cases.into_iter().enumerate() {
            assert_eq!(e.kind(), want, "case {i}");
        }
    }

    #[test]
    fn the_first_error_with_a_kind_in_an_anyhow_chain_decides_the_exit_code() {
        let e = anyhow::Error::from(RolloutError::Catalog(missing_version())).context("promoting 'img'");
        assert_eq!((kind(&e), exit_code(&e)), (ErrorKind::NotFound, 4));
        let e = anyhow::Error::from(PoolError::Lock(busy()));
        assert_eq!(exit_code(&e), 3);
        let e = anyhow::anyhow!("verify found 2 problem(s)");
        assert_eq!((kind(&e), exit_code(&e)), (ErrorKind::Internal, 1));
    }

    #[test]
    fn json_errors_carry_the_kind_and_the_whole_chain() {
        let e = anyhow::Error::from(StoreError::Catalog(CatalogError::ImageNotFound("ghost".into())))
            .context("exporting 'ghost' version 1");
        let v: serde_json::Value = serde_json::from_str(&render(&e, true)).unwrap();
        assert_eq!(v["error"]["kind"], "not_found");
        let m = v["error"]["message"].as_str().unwrap();
        assert_eq!(m, "exporting 'ghost' version 1: no image named 'ghost' (see 'vdim image list')");
        assert!(!render(&e, true).contains('\n'), "one line, after any warnings");
        let text = render(&e, false);
        assert_eq!(
            text,
            "error: exporting 'ghost' version 1\n  caused by: no image named 'ghost' (see 'vdim image list')"
        );
    }

    #[test]
    fn the_readme_codes_hold_and_no_two_kinds_share_an_exit_code() {
        use ErrorKind::*;
        let all = [Invalid, NotFound, Conflict, Busy, Forbidden, Exhausted, Internal];
        assert_eq!((Busy.exit_code(), NotFound.exit_code(), Internal.exit_code()), (3, 4, 1));
        let codes: std::collections::BTreeSet<i32> = all.iter().map(|k| k.exit_code()).collect();
        assert_eq!(codes.len(), all.len());
        for k in all {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        assert_eq!(NotFound.http_status().as_u16(), 404);
        assert_eq!(Exhausted.http_status().as_u16(), 503);
    }
}
