//! The command line: parses arguments into calls of the same service functions the HTTP
//! API uses, and prints their reports as text or `--json`. One module per command group;
//! each depends only on `global` (flags, opening the home) and `output` (printing), never
//! on another group, except `pool` using `user`'s entitle and `rollout` using `pool`'s move text.

mod audit;
mod backup;
mod global;
mod host;
mod image;
mod incident;
mod output;
mod pool;
mod rollout;
mod serve;
mod user;
mod watch;

pub use global::Global;
pub use output::human_bytes;

use crate::context::Context;
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
    /// libvirt hosts and the layers each holds verified
    #[command(subcommand)]
    Host(host::HostCmd),
    /// Run the thin-client broker and admin API (HTTP, or HTTPS with --tls-cert)
    Serve(serve::ServeArgs),
    /// The fleet watch's circuit breaker: its policy per channel, what it recorded
    #[command(subcommand)]
    Watch(watch::WatchCmd),
    /// Incidents the fleet watch opened: list, the review (--markdown), acknowledge
    #[command(subcommand)]
    Incident(incident::IncidentCmd),
    /// The append-only audit log
    Audit(audit::AuditArgs),
    /// Back up the catalog (a consistent copy, while vdim runs), a manifest of its layers, and
    /// with --layers the layers themselves
    Backup(backup::BackupArgs),
    /// Restore a backup onto an empty home: layers verified first, the catalog put in place
    /// last, every desktop made afresh on its version, running pools started again
    Restore(backup::RestoreArgs),
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
        Command::Host(cmd) => host::run(g, cmd),
        Command::Serve(args) => serve::run(g, args),
        Command::Watch(cmd) => watch::run(g, cmd),
        Command::Incident(cmd) => incident::run(g, cmd),
        Command::Audit(args) => audit::run(g, args),
        Command::Backup(args) => backup::backup(g, args),
        Command::Restore(args) => backup::restore(g, args),
    }
}

/// Exit code for an error: from the kind of the first error in its chain that has one.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    crate::error::exit_code(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(args: &[&str]) -> Command {
        Cli::try_parse_from([&["vdim"], args].concat()).unwrap().command
    }

    #[test]
    fn a_pool_created_with_no_options_gets_the_same_defaults_from_the_cli_and_the_api() {
        let Command::Pool(pool::PoolCmd::Create(args)) =
            parse(&["pool", "create", "p", "--image", "img", "--size", "2"])
        else {
            panic!("not pool create")
        };
        let api: crate::pool::CreateRequest =
            serde_json::from_value(json!({"name": "p", "image": "img", "size": 2})).unwrap();
        assert_eq!(crate::pool::CreateRequest::from(*args), api);
        assert_eq!((api.channel.as_str(), api.profile.as_str()), ("prod", "windows11"));
        assert_eq!(api.display_listen.to_string(), "127.0.0.1");
    }

    #[test]
    fn a_promotion_with_no_options_gets_the_same_waves_and_soak_from_the_cli_and_the_api() {
        let Command::Promote(args) = parse(&["promote", "img", "2", "--to", "test"]) else { panic!("not promote") };
        let api: crate::rollout::PromoteRequest = serde_json::from_value(json!({"version": 2, "to": "test"})).unwrap();
        assert_eq!(rollout::request(args).1, api);
        assert_eq!((api.waves.as_str(), api.soak), ("1,10%,50%,100%", std::time::Duration::from_secs(120)));
    }

    #[test]
    fn request_bodies_refuse_unknown_fields_and_bad_values() {
        for bad in [
            json!({"name": "p", "image": "img", "size": 2, "evil": true}),
            json!({"name": "p", "image": "img", "size": 2, "channel": "staging"}),
            json!({"name": "p", "image": "img", "size": 2, "display_listen": "localhost"}),
        ] {
            assert!(serde_json::from_value::<crate::pool::CreateRequest>(bad.clone()).is_err(), "{bad}");
        }
        for bad in [json!({"version": 2, "to": "test", "soak": "soon"}), json!({"version": 2, "to": "test", "x": 1})] {
            assert!(serde_json::from_value::<crate::rollout::PromoteRequest>(bad.clone()).is_err(), "{bad}");
        }
    }
}
