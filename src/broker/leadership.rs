//! The broker's part in leading ([`crate::leader`]): every 2 s it takes or renews the
//! leader lease on a catalog connection of its own (never waiting behind service calls); on
//! election it heals (interrupted logoffs, pool moves), and while it leads it adopts every
//! running rollout whose driver is gone, each driven on a thread of its own. The reaper and
//! the host watch ask [`crate::leader::Leadership::leads`] at every tick.

use super::{Broker, BrokerError};
use crate::catalog::leases::Driver;
use crate::context::Context;
use crate::leader::{self, Standing};
use crate::store::Actor;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Rollouts this broker is adopting or driving after an adoption.
#[derive(Default)]
pub(crate) struct Adopted(Mutex<BTreeSet<i64>>);

/// One try for the lease; then, as leader, the rollouts to adopt.
fn tick(ctx: &mut Context) -> Result<(Standing, Vec<Driver>), crate::catalog::CatalogError> {
    let standing = leader::try_lead(ctx.catalog(), leader::me(), leader::now_ms())?;
    if !matches!(standing, Standing::Leader { .. }) {
        return Ok((standing, vec![]));
    }
    let (here, now) = (leader::hostname(), leader::now_ms());
    let drivers = ctx.catalog().read(|tx| tx.rollout_drivers())?;
    let gone = drivers
        .into_iter()
        .filter(|d| leader::driver_gone(d, &here, now, |p| crate::home::pid_alive(p as i32)))
        .collect();
    Ok((standing, gone))
}

/// Tries for the lease once, before serving: a lone broker leads (and heals) at once.
pub(super) fn first(ctx: &mut Context) -> Result<Standing, BrokerError> {
    let standing =
        leader::try_lead(ctx.catalog(), leader::me(), leader::now_ms()).map_err(crate::context::ContextError::from)?;
    if let Standing::Leader { .. } = standing {
        let healed = ctx.heal(&Actor("broker".into())).map_err(|e| BrokerError::Heal(e.to_string()))?;
        if !healed.finished.is_empty() || !healed.ended.is_empty() || !healed.failed.is_empty() {
            tracing::warn!(ended = ?healed.ended, finished = ?healed.finished, failed = ?healed.failed, "healed sessions at start");
        }
    }
    Ok(standing)
}

/// The lease loop; `ctx` is its own catalog connection.
pub(super) async fn lead(b: Arc<Broker>, ctx: Context) {
    let mut ctx = Some(ctx);
    let mut tick_at = tokio::time::interval(leader::LEASE_TICK);
    tick_at.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick_at.tick().await;
    loop {
        tick_at.tick().await;
        let since = Instant::now();
        let Some(mut c) = ctx.take() else { return };
        let (c, got) = match tokio::task::spawn_blocking(move || {
            let got = tick(&mut c);
            (c, got)
        })
        .await
        {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "the lease loop's catalog call panicked; this broker no longer leads");
                b.leadership.lost();
                return;
            }
        };
        ctx = Some(c);
        match got {
            Ok((Standing::Leader { term, elected }, gone)) => {
                b.leadership.led(since, term);
                if elected {
                    tracing::warn!(term, broker = leader::me(), "this broker leads now");
                    tokio::spawn(heal(b.clone()));
                }
                for d in gone {
                    adopt(&b, d);
                }
            }
            Ok((Standing::Follower { leader }, _)) => {
                if b.leadership.leads() {
                    tracing::warn!(leader = ?leader, "this broker no longer leads");
                }
                b.leadership.lost();
            }
            Err(e) => {
                b.leadership.lost();
                tracing::warn!(error = %crate::error::message(&e), "cannot take or renew the leader lease; not leading");
            }
        }
    }
}

/// Finishes what a crash left half done, as a newly elected leader.
pub(super) async fn heal(b: Arc<Broker>) {
    let healed = b.blocking(|_, ctx| Ok(ctx.heal(&Actor("broker".into()))?)).await;
    match healed {
        Ok(h) if !h.finished.is_empty() || !h.ended.is_empty() || !h.failed.is_empty() => {
            tracing::warn!(ended = ?h.ended, finished = ?h.finished, failed = ?h.failed, "healed sessions on election")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e.message(), "healing on election failed; the reaper retries logoffs"),
    }
}

/// Drives the rollout of `d` on a thread of its own, unless this broker already does.
fn adopt(b: &Arc<Broker>, d: Driver) {
    if !b.adopted.0.lock().unwrap_or_else(|p| p.into_inner()).insert(d.rollout) {
        return;
    }
    let b = b.clone();
    std::thread::spawn(move || {
        let id = d.rollout;
        let out = b.contexts.connector.open().map_err(|e| crate::error::message(&e)).and_then(|mut ctx| {
            let mut engine = ctx.engine(Actor("broker".into())).map_err(|e| crate::error::message(&e))?;
            engine.adopt(&d).map_err(|e| crate::error::message(&e))
        });
        match out {
            Ok(Some(r)) => tracing::warn!(rollout = id, state = %r.rollout.state, "adopted rollout ended"),
            Ok(None) => {}
            Err(e) => tracing::warn!(rollout = id, error = %e, "adopted rollout stopped"),
        }
        b.adopted.0.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    });
}
