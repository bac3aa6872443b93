//! A host leaves: drained by an admin, or dead and fenced. The host service says what a host
//! is; the pool service moves desktops; this module is the order between them, the same for
//! `vdim host drain|fence|unfence|check` and the broker's host watch.
//!
//! ```text
//!  probe every 2 s (broker) ─► missed 1: suspect ─► missed 3: dead
//!      dead + fence command ─► command exits 0 ─► fenced ─► desktops made again elsewhere
//!      dead, no command     ─► nothing moves (it may still run desktops) until
//!                              `vdim host fence NAME --confirm`
//!  fenced host back ─► `vdim host unfence NAME`: what was made elsewhere is removed there
//! ```

use crate::context::{Context, ContextError};
use crate::hosts::{HostError, Probe, DEAD_AFTER};
use crate::pool::{Evacuated, PoolError};
use crate::store::Actor;
use serde::Serialize;
use serde_json::json;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum FailoverError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error(transparent)]
    Context(#[from] ContextError),
}

impl crate::error::Kind for FailoverError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            FailoverError::Host(e) => e.kind(),
            FailoverError::Pool(e) => e.kind(),
            FailoverError::Context(e) => e.kind(),
        }
    }
}

pub type Result<T> = std::result::Result<T, FailoverError>;

/// What leaving a host did.
#[derive(Debug, Serialize)]
pub struct Left {
    pub host: String,
    #[serde(flatten)]
    pub desktops: Evacuated,
}

/// No new desktops on the host; its idle desktops move to the pool's other hosts now, those
/// in use at logoff.
pub fn drain(ctx: &mut Context, name: &str, actor: &Actor) -> Result<Left> {
    let h = ctx.hosts().get(name)?;
    if h.state == "fenced" {
        return Err(HostError::State { host: h.name, state: h.state, what: "unfence it first".into() }.into());
    }
    let h = ctx.hosts().set_state(name, "draining", actor, json!(null))?;
    let desktops = ctx.pools()?.evacuate(h.id, false, actor)?;
    Ok(Left { host: h.name, desktops })
}

/// The host is off (an admin confirmed it, or its fence command succeeded): its sessions end
/// and its non-persistent desktops are made again on the other hosts of their pools.
pub fn fence(ctx: &mut Context, name: &str, confirmed: bool, why: &str, actor: &Actor) -> Result<Left> {
    if !confirmed {
        return Err(HostError::Unconfirmed(name.to_string()).into());
    }
    let h = ctx.hosts().set_state(name, "fenced", actor, json!({"why": why}))?;
    ctx.links().forget(&h.uri);
    let desktops = ctx.pools()?.evacuate(h.id, true, actor)?;
    Ok(Left { host: h.name, desktops })
}

/// A drained or fenced host takes desktops again; a fenced one first loses what was made
/// elsewhere while it was off. Returns the domains removed there.
pub fn unfence(ctx: &mut Context, name: &str, actor: &Actor) -> Result<Vec<String>> {
    let h = ctx.hosts().get(name)?;
    let removed = if h.state == "fenced" { ctx.hosts().reconcile(name)? } else { vec![] };
    ctx.hosts().set_state(name, "up", actor, json!({"removed": removed}))?;
    Ok(removed)
}

/// One round of the host watch: every host probed; a dead host with a fence command is
/// fenced when the command succeeds, and its desktops are made again elsewhere. A dead host
/// without one is left alone (it may be cut off, not off): reported, never replaced.
pub fn watch_round(ctx: &mut Context, actor: &Actor) -> Result<(Vec<Probe>, Vec<Left>)> {
    let probes = ctx.hosts().probe_all()?;
    let mut left = vec![];
    for p in probes.iter().filter(|p| p.missed >= DEAD_AFTER) {
        let h = ctx.hosts().get(&p.host)?;
        if h.fence_command.is_none() || h.state == "fenced" {
            continue;
        }
        if ctx.hosts().run_fence_command(&h.name)? {
            let why = format!("dead ({} probes missed), fence command succeeded", p.missed);
            left.push(fence(ctx, &h.name, true, &why, actor)?);
        }
    }
    Ok((probes, left))
}

#[cfg(test)]
mod tests;
