//! The command line: parses arguments into calls of the same service functions the HTTP
//! API uses, and prints their reports as text or `--json`. One module per command group;
//! each depends only on `global` (flags, opening the home) and `output` (printing), never
//! on another group, except `pool` using `user`'s entitle and `rollout` using `pool`'s move text.

mod audit;
mod global;
mod image;
mod output;
mod pool;
mod rollout;
mod serve;
mod user;

pub use global::Global;
pub use output::human_bytes;

use crate::catalog::CatalogError;
use crate::context::Context;
use crate::pool::PoolError;
use crate::store;
use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use output::print;

#[derive(Parser, Debug)]
#[command(
    name = "vdim",
    version,
    about = "Virtual desktop image manager: versioned golden images, pools, canary rollouts, thin-client broker"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the store and catalog under the vdim home (safe to run again)
    Init,
    /// Golden images and their versions
    #[command(subcommand)]
    Image(image::ImageCmd),
    /// Pools of desktops booting from one image version
    #[command(subcommand)]
    Pool(pool::PoolCmd),
    /// Promote a version to test or prod: a rollout in canary waves that undoes itself on a crash
    Promote(rollout::PromoteArgs),
    /// Rollouts: status, halt, resume
    #[command(subcommand)]
    Rollout(rollout::RolloutCmd),
    /// One command back: a pool to the version it ran before (pinned), or a whole channel
    /// (--image and --channel) and all its pools at once
    Rollback(rollout::RollbackArgs),
    /// Thin-client users and their tokens
    #[command(subcommand)]
    User(user::UserCmd),
    /// Run the thin-client broker and admin API (HTTP, or HTTPS with --tls-cert)
    Serve(serve::ServeArgs),
    /// The append-only audit log
    Audit(audit::AuditArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Init => {
            let ctx = Context::init(g.settings())?;
            let profiles = &ctx.settings().profiles;
            crate::profile::install_shipped(profiles)
                .with_context(|| format!("installing profiles into {}", profiles.display()))?;
            let root = ctx.home().root().display().to_string();
            print(g.json, &serde_json::json!({"home": root}), |_| format!("vdim home ready at {root}"))
        }
        Command::Image(cmd) => image::run(g, cmd),
        Command::Pool(cmd) => pool::run(g, cmd),
        Command::Promote(args) => rollout::promote(g, args),
        Command::Rollout(cmd) => rollout::run(g, cmd),
        Command::Rollback(args) => rollout::rollback(g, args),
        Command::User(cmd) => user::run(g, cmd),
        Command::Serve(args) => serve::run(g, args),
        Command::Audit(args) => audit::run(g, args),
    }
}

/// Exit code for an error: 3 for busy (retry later), 4 for not found, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(store::StoreError::Lock(crate::lock::LockError::Busy { .. })) = cause.downcast_ref() {
            return 3;
        }
        if let Some(crate::lock::LockError::Busy { .. }) = cause.downcast_ref() {
            return 3;
        }
        if let Some(store::StoreError::Catalog(CatalogError::ImageNotFound(_) | CatalogError::VersionNotFound { .. })) =
            cause.downcast_ref()
        {
            return 4;
        }
        if let Some(crate::dev::DevError::Store(store::StoreError::Catalog(CatalogError::ImageNotFound(_)))) =
            cause.downcast_ref()
        {
            return 4;
        }
        if let Some(crate::dev::DevError::Store(store::StoreError::Lock(_))) = cause.downcast_ref() {
            return 3;
        }
        match cause.downcast_ref::<PoolError>() {
            Some(PoolError::NotFound(_) | PoolError::DesktopNotFound(_)) => return 4,
            Some(PoolError::Catalog(CatalogError::ImageNotFound(_) | CatalogError::VersionNotFound { .. })) => {
                return 4
            }
            Some(PoolError::Lock(_)) => return 3,
            _ => {}
        }
    }
    1
}
