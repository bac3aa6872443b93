//! `vdim promote`, `vdim rollout status|halt|resume` and `vdim rollback`: rollouts and
//! the way back.

use super::global::{open, Global};
use super::output::{fail_on, failures_text, print};
use super::pool::move_text;
use crate::catalog::Channel;
use crate::rollout::{self, PoolRollback, PromoteRequest, RolloutError, RolloutReport};
use crate::store::Actor;
use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum RolloutCmd {
    /// Wave by wave: desktops moved, healthy, failed
    Status {
        image: Option<String>,
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
    /// Stop a running rollout after its current wave; keeps what moved
    Halt { image: String },
    /// Carry on a halted or interrupted rollout
    Resume { image: String },
}

pub fn rollout_text(r: &RolloutReport) -> String {
    let o = &r.rollout;
    let mut s = format!(
        "rollout {} of '{}' version {} to {} (from {}): {}",
        o.id, o.image, o.version, o.channel, o.from_version, o.state
    );
    if let Some(f) = &o.forced {
        s += &format!(" [forced: {f}]");
    }
    for w in &r.waves {
        s +=
            &format!("\n  wave {} ({}): {} moved, {} healthy, {} failed", w.wave, w.size, w.moved, w.healthy, w.failed);
        for d in &w.desktops {
            s += &format!("\n    {:<24} {:<9} from v{}  {}", d.desktop, d.state, d.from_version, d.detail);
        }
    }
    for (host, pool) in &r.pending {
        s += &format!(
            "\n  pending on host {host} (pool {pool}): the version is not verified there ('vdim host sync {host}')"
        );
    }
    let rep = &o.report;
    for f in &rep.failures {
        s += &format!("\n  FAILED {} {} (at {})", f.desktop, f.how, f.at);
    }
    if !rep.failures.is_empty() {
        let or_unknown = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        s += &format!(
            "\n  crash reported by libvirt at {}; acted on {} ms later; failed desktops running the previous version {} ms after that",
            or_unknown(rep.crash_event_at.clone()),
            or_unknown(rep.event_to_verdict_ms.map(|ms| ms.to_string())),
            or_unknown(rep.restore_ms.map(|ms| ms.to_string()))
        );
    }
    if let Some(i) = &rep.interrupted {
        s += &format!("\n  interrupted: vdim pid {} died during wave {}", i.pid.unwrap_or(0), i.wave);
    }
    s
}

#[derive(Args, Debug)]
pub struct PromoteArgs {
    image: String,
    version: u32,
    #[arg(long, value_enum)]
    to: Channel,
    /// Cumulative share of each pool's desktops per wave
    #[arg(long, default_value = rollout::DEFAULT_WAVES)]
    waves: String,
    /// How long each wave's desktops must run without crash or reboot loop
    #[arg(long, default_value = rollout::DEFAULT_SOAK, value_parser = humantime::parse_duration)]
    soak: std::time::Duration,
    /// Skip a promotion gate (recorded in the audit log with --reason)
    #[arg(long)]
    force: bool,
    #[arg(long)]
    reason: Option<String>,
}

#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// The pool to roll back
    #[arg(required_unless_present = "image", conflicts_with_all = ["image", "channel"])]
    pool: Option<String>,
    /// Emergency rollback of a channel of this image
    #[arg(long, requires = "channel")]
    image: Option<String>,
    #[arg(long, value_enum, requires = "image")]
    channel: Option<Channel>,
    #[arg(long)]
    to: Option<u32>,
    /// Also move desktops in use now, and persistent pools (their system-disk changes are lost)
    #[arg(long)]
    force: bool,
}

/// The image and the promotion asked for it.
pub fn request(a: PromoteArgs) -> (String, PromoteRequest) {
    let PromoteArgs { image, version, to, waves, soak, force, reason } = a;
    (image, PromoteRequest { version, to, waves, soak, force, reason })
}

pub fn promote(g: &Global, a: PromoteArgs) -> Result<()> {
    let (image, request) = request(a);
    let mut ctx = open(g)?;
    match ctx.engine(Actor::resolve(None))?.promote(&request.options(&image)) {
        Ok(r) => print(g.json, &r, rollout_text),
        Err(e) => failed(g, e),
    }
}

/// A failed rollout prints its report like a finished one, then exits with its error's kind.
fn failed(g: &Global, e: RolloutError) -> Result<()> {
    if let RolloutError::Failed { report, .. } = &e {
        print(g.json, &**report, rollout_text)?;
    }
    Err(e.into())
}

pub fn run(g: &Global, cmd: RolloutCmd) -> Result<()> {
    let mut ctx = open(g)?;
    let mut engine = ctx.engine(Actor::resolve(None))?;
    match cmd {
        RolloutCmd::Status { image, limit } => {
            let r = engine.status(image.as_deref(), limit)?;
            print(g.json, &r, |r| {
                if r.is_empty() {
                    return "no rollouts".into();
                }
                r.iter().map(rollout_text).collect::<Vec<_>>().join("\n\n")
            })
        }
        RolloutCmd::Halt { image } => {
            let r = engine.halt(&image)?;
            print(g.json, &r, |r| {
                format!(
                    "rollout of '{}' version {} halts after wave {}",
                    r.rollout.image,
                    r.rollout.version,
                    r.rollout.wave + 1
                )
            })
        }
        RolloutCmd::Resume { image } => match engine.resume(&image) {
            Ok(r) => print(g.json, &r, rollout_text),
            Err(e) => failed(g, e),
        },
    }
}

pub fn rollback(g: &Global, a: RollbackArgs) -> Result<()> {
    let RollbackArgs { pool, image, channel, to, force } = a;
    if let Some(name) = pool {
        let r = open(g)?.pools()?.rollback(&name, to, force, &Actor::resolve(None))?;
        print(g.json, &r, |r| move_text(r, "rolled back"))?;
        return fail_on(&r.failed);
    }
    let (image, channel) = (image.unwrap_or_default(), channel.unwrap_or(Channel::Prod));
    let r = open(g)?.engine(Actor::resolve(None))?.rollback_channel(&image, channel, to, force)?;
    print(g.json, &r, |r| {
        let mut s = format!("channel {channel} of '{image}' now points at version {}", r.version);
        if let Some(id) = r.stopped_rollout {
            s += &format!("; rollout {id} stopped and {} desktop(s) moved back", r.reverted_desktops.len());
        }
        for (p, res) in &r.pools {
            s += &format!("\n  pool {p}: ");
            s += &match res {
                PoolRollback::Moved { at_logoff, moved_now, failed } => {
                    format!("{} moved now, {} at logoff", moved_now.len(), at_logoff.len())
                        + &failures_text(failed).replace("\n  ", "\n    ")
                }
                PoolRollback::Error { error } => format!("not moved: {error}"),
            };
        }
        s
    })?;
    let failed: Vec<_> = r
        .pools
        .values()
        .flat_map(|p| match p {
            PoolRollback::Moved { failed, .. } => failed.clone(),
            PoolRollback::Error { .. } => vec![],
        })
        .collect();
    fail_on(&failed)
}
