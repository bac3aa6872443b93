//! Lifecycle rules as plain functions over plain data: which pool move, rollback, pin or
//! release is allowed, and what it does. No I/O, no locks, no clock: the pool and rollout
//! code gathers facts, asks here, and carries out the plan.
//!
//! ```text
//!                update (follow channel)          rollback [--to N] (pins)
//!   pool@v1 ───────────────────────────► pool@v2 ───────────────────────────► pool@v1 (pinned)
//!      each desktop:  idle ──► moves now (new overlay, O(1))
//!                     in use ──► marked, moves at logoff   (or now with --force)
//!      persistent pool: refused without --force (system-disk changes are lost)
//! ```

use serde::Serialize;
use std::collections::BTreeMap;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFacts {
    pub name: String,
    pub version: u32,
    pub pinned: Option<u32>,
    pub persistent: bool,
    /// The version the pool's channel points at now.
    pub channel_version: u32,
    /// Versions the pool was moved to, oldest first (creation included).
    pub history: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesktopFacts {
    pub name: String,
    pub version: u32,
    pub target: Option<u32>,
    pub in_use: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionFacts {
    pub number: u32,
    pub removed: bool,
    pub failed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MovePlan {
    pub pool: String,
    pub from: u32,
    pub to: u32,
    /// Desktops whose overlay is recreated on `to` now.
    pub now: Vec<String>,
    /// In-use desktops that move when their user logs off.
    pub at_logoff: Vec<String>,
    /// In-use desktops whose pending move is cancelled (they already run `to`).
    pub cancel_pending: Vec<String>,
    /// The pin the pool has afterwards.
    pub pinned: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Denied {
    #[error("pool '{pool}' is pinned at version {version}: 'vdim pool unpin {pool}' to follow its channel again")]
    Pinned { pool: String, version: u32 },
    #[error("pool '{pool}' is persistent: moving it replaces each desktop's system disk and users' changes on it are lost; repeat with --force to do it anyway")]
    PersistentNeedsForce { pool: String },
    #[error("pool '{pool}' already runs version {version}")]
    AlreadyThere { pool: String, version: u32 },
    #[error("pool '{pool}' has not run any other version: nothing to roll back to (use --to N)")]
    NoPreviousVersion { pool: String },
    #[error("version {version} was removed by gc and cannot run again")]
    VersionRemoved { version: u32 },
    #[error(
        "version {version} is marked failed (a rollout caught it crashing desktops); use --force to run it anyway"
    )]
    VersionFailed { version: u32 },
}

impl crate::error::Kind for Denied {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            Denied::Pinned { .. }
            | Denied::PersistentNeedsForce { .. }
            | Denied::AlreadyThere { .. }
            | Denied::NoPreviousVersion { .. }
            | Denied::VersionRemoved { .. }
            | Denied::VersionFailed { .. } => K::Conflict,
        }
    }
}

fn plan_move(
    pool: &PoolFacts,
    desktops: &[DesktopFacts],
    to: VersionFacts,
    force: bool,
    pinned: Option<u32>,
) -> Result<MovePlan, Denied> {
    if to.removed {
        return Err(Denied::VersionRemoved { version: to.number });
    }
    if to.failed && !force {
        return Err(Denied::VersionFailed { version: to.number });
    }
    let all_there = desktops.iter().all(|d| d.version == to.number && d.target.is_none());
    if pool.version == to.number && all_there && pinned == pool.pinned {
        return Err(Denied::AlreadyThere { pool: pool.name.clone(), version: to.number });
    }
    if pool.persistent && !force && !all_there {
        return Err(Denied::PersistentNeedsForce { pool: pool.name.clone() });
    }
    let mut plan = MovePlan {
        pool: pool.name.clone(),
        from: pool.version,
        to: to.number,
        now: vec![],
        at_logoff: vec![],
        cancel_pending: vec![],
        pinned,
    };
    for d in desktops {
        if d.version == to.number {
            if d.target.is_some() {
                plan.cancel_pending.push(d.name.clone());
            }
        } else if d.in_use && !force {
            plan.at_logoff.push(d.name.clone());
        } else {
            plan.now.push(d.name.clone());
        }
    }
    Ok(plan)
}

/// `pool update`: move to what the channel points at, unless pinned.
pub fn plan_update(
    pool: &PoolFacts,
    desktops: &[DesktopFacts],
    channel: VersionFacts,
    force: bool,
) -> Result<MovePlan, Denied> {
    if let Some(v) = pool.pinned {
        return Err(Denied::Pinned { pool: pool.name.clone(), version: v });
    }
    plan_move(pool, desktops, channel, force, None)
}

/// The version a pool ran before its current one.
pub fn previous_version(pool: &PoolFacts) -> Option<u32> {
    pool.history.iter().rev().copied().find(|v| *v != pool.version)
}

/// `rollback [--to N]`: back to the previous (or named) version, and pin there.
pub fn plan_rollback(
    pool: &PoolFacts,
    desktops: &[DesktopFacts],
    to: Option<VersionFacts>,
    force: bool,
) -> Result<MovePlan, Denied> {
    let to = match to {
        Some(t) => t,
        None => {
            let v = previous_version(pool).ok_or_else(|| Denied::NoPreviousVersion { pool: pool.name.clone() })?;
            VersionFacts { number: v, removed: false, failed: false }
        }
    };
    // Rolling back to a version that failed a rollout is what an on-call admin may need: allowed.
    let to = VersionFacts { failed: false, ..to };
    plan_move(pool, desktops, to, force, Some(to.number))
}

/// `pool pin N`: run N and stay there.
pub fn plan_pin(
    pool: &PoolFacts,
    desktops: &[DesktopFacts],
    to: VersionFacts,
    force: bool,
) -> Result<MovePlan, Denied> {
    plan_move(pool, desktops, to, force, Some(to.number))
}

/// What happens to a desktop when its user logs off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Release {
    /// Version the desktop's overlay is recreated on.
    pub version: u32,
    /// A fresh overlay is needed: always for non-persistent desktops and for moves.
    pub reset: bool,
}

pub fn plan_release(persistent: bool, desktop: &DesktopFacts) -> Release {
    match desktop.target {
        Some(t) if t != desktop.version => Release { version: t, reset: true },
        _ => Release { version: desktop.version, reset: !persistent },
    }
}

// ---- desktops given to a user meanwhile ----------------------------------------------------
//
//   command looks: desktop idle ──► broker gives it to a user ──► command's write transaction
//                                                                  claims only idle desktops;
//                                                                  a taken one gets `when_taken`

/// A command about to move, stop or remove idle desktops it picked earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// A rollout wave moving desktops to the new version.
    Wave,
    /// A failed rollout moving its desktops back.
    Revert,
    /// `pool resize` to fewer desktops.
    Shrink,
    /// `pool stop` (`force`: cut users off).
    Stop { force: bool },
    /// `pool delete` (`force`: cut users off).
    Delete { force: bool },
}

/// What becomes of a picked desktop that a user was given before the command wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Taken {
    /// Left with its user, the command carries on with the rest: a wave never moves an
    /// in-use desktop; it follows the channel at logoff once the rollout succeeds.
    Skip,
    /// Moves where the command meant it to when its user logs off: a revert never pulls
    /// a desktop from under its user, even off a failed version.
    AtLogoff,
    /// The whole command refuses, exactly as if the user had been there when it looked,
    /// and nothing changes: shrink, stop and delete without `--force`.
    Refuse,
    /// Taken anyway: `--force` says users are cut off.
    Proceed,
}

pub fn when_taken(claim: Claim) -> Taken {
    match claim {
        Claim::Wave => Taken::Skip,
        Claim::Revert => Taken::AtLogoff,
        Claim::Shrink => Taken::Refuse,
        Claim::Stop { force } | Claim::Delete { force } => {
            if force {
                Taken::Proceed
            } else {
                Taken::Refuse
            }
        }
    }
}

// ---- promotion ---------------------------------------------------------------------------
//
//   seal ──► dev ──promote──► test ──(every test desktop healthy)──promote──► prod
//                               │                                             │
//                        rollout in waves                              rollout in waves
//                       crash ─► revert, version failed        crash ─► revert, version failed

/// Facts about one requested promotion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromotionFacts {
    pub image: String,
    pub version: u32,
    pub failed: bool,
    pub removed: bool,
    pub to: crate::catalog::Channel,
    /// The version the target channel points at now.
    pub current: u32,
    /// The dev channel has held this version (it was sealed and went through dev).
    pub was_on_dev: bool,
    /// A rollout of this version to test finished with every test desktop healthy.
    pub passed_test: bool,
    /// A rollout of this image is running or halted.
    pub rollout_open: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Gate {
    FromDev,
    PassedTest,
    NotFailed,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PromotionDenied {
    #[error("versions reach dev by 'vdim image seal'; promote to test or prod")]
    ToDev,
    #[error("version {version} of '{image}' was removed by gc")]
    Removed { image: String, version: u32 },
    #[error("{channel} already runs version {version} of '{image}'")]
    AlreadyThere { image: String, channel: String, version: u32 },
    #[error("promoting backwards: {channel} runs version {current} of '{image}', newer than {version}; to go back use 'vdim rollback --image {image} --channel {channel} --to {version}'")]
    Backwards { image: String, channel: String, current: u32, version: u32 },
    #[error("a rollout of '{image}' (version {version}) is not finished: 'vdim rollout status {image}', then resume or roll it back first")]
    RolloutOpen { image: String, version: u32 },
    #[error("version {version} of '{image}' never was on dev: only sealed versions go to test (--force --reason to skip this gate)")]
    NotFromDev { image: String, version: u32 },
    #[error("version {version} of '{image}' has not run on test with every test desktop healthy: promote it to test first (--force --reason to skip this gate)")]
    NotTested { image: String, version: u32 },
    #[error(
        "version {version} of '{image}' failed a rollout: it crashed desktops (--force --reason to promote it anyway)"
    )]
    Failed { image: String, version: u32 },
}

impl crate::error::Kind for PromotionDenied {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            PromotionDenied::ToDev
            | PromotionDenied::Removed { .. }
            | PromotionDenied::AlreadyThere { .. }
            | PromotionDenied::Backwards { .. }
            | PromotionDenied::RolloutOpen { .. }
            | PromotionDenied::NotFromDev { .. }
            | PromotionDenied::NotTested { .. }
            | PromotionDenied::Failed { .. } => K::Conflict,
        }
    }
}

/// May this promotion start? `Ok` lists the gates that `force` skipped (for the audit log).
pub fn check_promotion(f: &PromotionFacts, force: bool) -> Result<Vec<Gate>, PromotionDenied> {
    use crate::catalog::Channel;
    let (image, version, channel) = (f.image.clone(), f.version, f.to.as_str().to_string());
    if f.to == Channel::Dev {
        return Err(PromotionDenied::ToDev);
    }
    if f.removed {
        return Err(PromotionDenied::Removed { image, version });
    }
    if let Some(v) = f.rollout_open {
        return Err(PromotionDenied::RolloutOpen { image, version: v });
    }
    if f.current == version {
        return Err(PromotionDenied::AlreadyThere { image, channel, version });
    }
    if f.current > version {
        return Err(PromotionDenied::Backwards { image, channel, current: f.current, version });
    }
    let mut skipped = vec![];
    let mut gate = |ok: bool, g: Gate, denied: PromotionDenied| -> Result<(), PromotionDenied> {
        match (ok, force) {
            (true, _) => Ok(()),
            (false, true) => {
                skipped.push(g);
                Ok(())
            }
            (false, false) => Err(denied),
        }
    };
    gate(!f.failed, Gate::NotFailed, PromotionDenied::Failed { image: image.clone(), version })?;
    match f.to {
        Channel::Test => gate(f.was_on_dev, Gate::FromDev, PromotionDenied::NotFromDev { image, version })?,
        Channel::Prod => gate(f.passed_test, Gate::PassedTest, PromotionDenied::NotTested { image, version })?,
        Channel::Dev => {}
    }
    Ok(skipped)
}

/// One wave of a rollout: how many of each pool's desktops have moved once it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum WaveSize {
    Count(u32),
    Percent(u32),
}

impl WaveSize {
    /// Cumulative number of desktops of a pool of `size` moved by the end of this wave.
    pub fn of(self, size: u32) -> u32 {
        match self {
            WaveSize::Count(n) => n.min(size),
            WaveSize::Percent(p) => (size * p).div_ceil(100).min(size),
        }
    }
}

/// Parse `1,10%,50%,100%`: increasing, ending at 100%.
pub fn parse_waves(s: &str) -> Result<Vec<WaveSize>, String> {
    let mut out = vec![];
    for part in s.split(',').map(str::trim) {
        let w = match part.strip_suffix('%') {
            Some(p) => match p.parse::<u32>() {
                Ok(n @ 1..=100) => WaveSize::Percent(n),
                _ => return Err(format!("wave '{part}' is not a percentage from 1% to 100%")),
            },
            None => match part.parse::<u32>() {
                Ok(n @ 1..) => WaveSize::Count(n),
                _ => return Err(format!("wave '{part}' is neither a desktop count nor a percentage")),
            },
        };
        out.push(w);
    }
    if out.last() != Some(&WaveSize::Percent(100)) {
        return Err("the last wave must be 100% so every desktop ends on the new version".into());
    }
    Ok(out)
}

/// Which not-yet-moved desktops of a pool a wave takes: enough idle ones to reach the
/// wave's cumulative count, lowest index first.
pub fn wave_pick(wave: WaveSize, size: u32, moved: u32, idle_unmoved: &[String]) -> Vec<String> {
    let want = wave.of(size).saturating_sub(moved) as usize;
    idle_unmoved.iter().take(want).cloned().collect()
}

/// The host a rollout's first wave stays on (the canary host): the one with the most idle
/// desktops to move, the lowest id on a tie; none when no desktop is on a registered host.
pub fn canary_host(idle: &[(String, Option<i64>)]) -> Option<i64> {
    let mut count: BTreeMap<i64, usize> = BTreeMap::new();
    for h in idle.iter().filter_map(|(_, h)| *h) {
        *count.entry(h).or_default() += 1;
    }
    count.into_iter().max_by(|(ha, a), (hb, b)| a.cmp(b).then(hb.cmp(ha))).map(|(h, _)| h)
}

/// The order a wave takes a pool's idle desktops in: the first wave those of the canary host
/// first (a bad version meets one host before it meets many); later waves one host after
/// another in turn, so each wave spreads over every host.
pub fn wave_order(first: bool, canary: Option<i64>, idle: &[(String, Option<i64>)]) -> Vec<String> {
    if first {
        let mut out: Vec<&(String, Option<i64>)> = idle.iter().collect();
        out.sort_by_key(|(_, h)| *h != canary || canary.is_none());
        return out.into_iter().map(|(d, _)| d.clone()).collect();
    }
    let mut by_host: BTreeMap<Option<i64>, std::collections::VecDeque<&String>> = BTreeMap::new();
    for (d, h) in idle {
        by_host.entry(*h).or_default().push_back(d);
    }
    let mut out = Vec::with_capacity(idle.len());
    while out.len() < idle.len() {
        for q in by_host.values_mut() {
            if let Some(d) = q.pop_front() {
                out.push(d.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_wave_stays_on_the_canary_host_and_later_waves_spread() {
        let idle: Vec<(String, Option<i64>)> = [("a", 1), ("b", 2), ("c", 2), ("d", 3), ("e", 2), ("f", 1)]
            .iter()
            .map(|(d, h)| (d.to_string(), Some(*h)))
            .collect();
        assert_eq!(canary_host(&idle), Some(2), "most idle desktops");
        assert_eq!(wave_order(true, Some(2), &idle)[..3], ["b", "c", "e"]);
        assert_eq!(wave_order(false, Some(2), &idle), ["a", "b", "d", "f", "c", "e"], "one per host in turn");
        let tie: Vec<(String, Option<i64>)> = vec![("x".into(), Some(5)), ("y".into(), Some(4))];
        assert_eq!(canary_host(&tie), Some(4), "lowest id on a tie");
        let local: Vec<(String, Option<i64>)> = vec![("p".into(), None), ("q".into(), None)];
        assert_eq!((canary_host(&local), wave_order(true, None, &local)), (None, vec!["p".into(), "q".into()]));
    }

    #[test]
    fn a_desktop_given_to_a_user_meanwhile_is_never_taken_without_force() {
        assert_eq!(when_taken(Claim::Wave), Taken::Skip);
        assert_eq!(when_taken(Claim::Revert), Taken::AtLogoff);
        for c in [Claim::Shrink, Claim::Stop { force: false }, Claim::Delete { force: false }] {
            assert_eq!(when_taken(c), Taken::Refuse, "{c:?}");
        }
        for c in [Claim::Stop { force: true }, Claim::Delete { force: true }] {
            assert_eq!(when_taken(c), Taken::Proceed, "{c:?}");
        }
    }

    fn pool(version: u32, pinned: Option<u32>, persistent: bool, history: &[u32]) -> PoolFacts {
        PoolFacts { name: "finance".into(), version, pinned, persistent, channel_version: 2, history: history.to_vec() }
    }
    fn d(name: &str, version: u32, in_use: bool) -> DesktopFacts {
        DesktopFacts { name: name.into(), version, target: None, in_use }
    }
    fn v(n: u32) -> VersionFacts {
        VersionFacts { number: n, removed: false, failed: false }
    }

    #[test]
    fn update_moves_idle_desktops_now_and_in_use_ones_at_logoff() {
        let p = plan_update(&pool(1, None, false, &[1]), &[d("a", 1, false), d("b", 1, true)], v(2), false).unwrap();
        assert_eq!((p.now, p.at_logoff, p.to, p.pinned), (vec!["a".to_string()], vec!["b".to_string()], 2, None));
    }

    #[test]
    fn force_moves_in_use_desktops_too() {
        let p = plan_update(&pool(1, None, false, &[1]), &[d("a", 1, true)], v(2), true).unwrap();
        assert_eq!(p.now, ["a"]);
        assert!(p.at_logoff.is_empty());
    }

    #[test]
    fn a_pinned_pool_ignores_updates() {
        let e = plan_update(&pool(1, Some(1), false, &[1]), &[d("a", 1, false)], v(2), true).unwrap_err();
        assert_eq!(e, Denied::Pinned { pool: "finance".into(), version: 1 });
    }

    #[test]
    fn persistent_pools_need_force_and_say_what_is_lost() {
        let e = plan_update(&pool(1, None, true, &[1]), &[d("a", 1, false)], v(2), false).unwrap_err();
        assert!(e.to_string().contains("changes on it are lost"));
        assert!(plan_update(&pool(1, None, true, &[1]), &[d("a", 1, false)], v(2), true).is_ok());
    }

    #[test]
    fn rollback_goes_to_the_version_run_before_and_pins_it() {
        let p = plan_rollback(&pool(3, None, false, &[1, 2, 3]), &[d("a", 3, false)], None, false).unwrap();
        assert_eq!((p.to, p.pinned, p.now), (2, Some(2), vec!["a".to_string()]));
    }

    #[test]
    fn rollback_to_a_named_version_pins_that_version() {
        let p = plan_rollback(&pool(3, None, false, &[1, 2, 3]), &[d("a", 3, false)], Some(v(1)), false).unwrap();
        assert_eq!((p.to, p.pinned), (1, Some(1)));
    }

    #[test]
    fn rollback_without_history_is_refused() {
        let e = plan_rollback(&pool(1, None, false, &[1]), &[d("a", 1, false)], None, false).unwrap_err();
        assert_eq!(e, Denied::NoPreviousVersion { pool: "finance".into() });
    }

    #[test]
    fn rollback_to_a_failed_version_is_allowed_but_not_to_a_removed_one() {
        let failed = VersionFacts { number: 1, removed: false, failed: true };
        assert!(plan_rollback(&pool(2, None, false, &[1, 2]), &[d("a", 2, false)], Some(failed), false).is_ok());
        let removed = VersionFacts { number: 1, removed: true, failed: false };
        assert_eq!(
            plan_rollback(&pool(2, None, false, &[1, 2]), &[d("a", 2, false)], Some(removed), false).unwrap_err(),
            Denied::VersionRemoved { version: 1 }
        );
    }

    #[test]
    fn a_failed_version_needs_force_to_update_to() {
        let failed = VersionFacts { number: 2, removed: false, failed: true };
        assert_eq!(
            plan_update(&pool(1, None, false, &[1]), &[], failed, false).unwrap_err(),
            Denied::VersionFailed { version: 2 }
        );
    }

    #[test]
    fn moving_back_cancels_pending_moves_of_in_use_desktops() {
        let mut b = d("b", 1, true);
        b.target = Some(2);
        let p = plan_rollback(&pool(2, None, false, &[1, 2]), &[d("a", 2, false), b], None, false).unwrap();
        assert_eq!((p.now, p.cancel_pending), (vec!["a".to_string()], vec!["b".to_string()]));
    }

    #[test]
    fn nothing_to_do_is_said_plainly() {
        let e = plan_update(&pool(2, None, false, &[1, 2]), &[d("a", 2, false)], v(2), false).unwrap_err();
        assert_eq!(e, Denied::AlreadyThere { pool: "finance".into(), version: 2 });
    }

    #[test]
    fn release_resets_non_persistent_desktops_and_applies_pending_moves() {
        assert_eq!(plan_release(false, &d("a", 1, true)), Release { version: 1, reset: true });
        assert_eq!(plan_release(true, &d("a", 1, true)), Release { version: 1, reset: false });
        let mut m = d("a", 1, true);
        m.target = Some(3);
        assert_eq!(plan_release(true, &m), Release { version: 3, reset: true });
    }

    fn promo(to: crate::catalog::Channel, version: u32, current: u32) -> PromotionFacts {
        PromotionFacts {
            image: "win11".into(),
            version,
            failed: false,
            removed: false,
            to,
            current,
            was_on_dev: true,
            passed_test: true,
            rollout_open: None,
        }
    }

    use crate::catalog::Channel;

    #[test]
    fn a_sealed_version_goes_to_test_and_a_tested_one_to_prod() {
        assert_eq!(check_promotion(&promo(Channel::Test, 4, 3), false), Ok(vec![]));
        assert_eq!(check_promotion(&promo(Channel::Prod, 4, 3), false), Ok(vec![]));
    }

    #[test]
    fn prod_needs_a_healthy_test_run_unless_forced_and_force_is_recorded() {
        let f = PromotionFacts { passed_test: false, ..promo(Channel::Prod, 4, 3) };
        assert!(matches!(check_promotion(&f, false), Err(PromotionDenied::NotTested { .. })));
        assert_eq!(check_promotion(&f, true), Ok(vec![Gate::PassedTest]));
    }

    #[test]
    fn test_needs_a_version_that_was_on_dev() {
        let f = PromotionFacts { was_on_dev: false, ..promo(Channel::Test, 4, 3) };
        assert!(matches!(check_promotion(&f, false), Err(PromotionDenied::NotFromDev { .. })));
        assert_eq!(check_promotion(&f, true), Ok(vec![Gate::FromDev]));
    }

    #[test]
    fn a_failed_version_needs_force() {
        let f = PromotionFacts { failed: true, ..promo(Channel::Test, 4, 3) };
        assert!(matches!(check_promotion(&f, false), Err(PromotionDenied::Failed { .. })));
        assert_eq!(check_promotion(&f, true), Ok(vec![Gate::NotFailed]));
    }

    #[test]
    fn backwards_same_version_dev_and_open_rollouts_are_refused_even_with_force() {
        assert!(matches!(check_promotion(&promo(Channel::Prod, 2, 3), true), Err(PromotionDenied::Backwards { .. })));
        assert!(matches!(
            check_promotion(&promo(Channel::Prod, 3, 3), true),
            Err(PromotionDenied::AlreadyThere { .. })
        ));
        assert_eq!(check_promotion(&promo(Channel::Dev, 4, 3), true), Err(PromotionDenied::ToDev));
        let f = PromotionFacts { rollout_open: Some(4), ..promo(Channel::Prod, 5, 3) };
        assert!(matches!(check_promotion(&f, true), Err(PromotionDenied::RolloutOpen { version: 4, .. })));
    }

    #[test]
    fn waves_parse_and_must_end_at_everyone() {
        assert_eq!(
            parse_waves("1,10%,50%,100%").unwrap(),
            vec![WaveSize::Count(1), WaveSize::Percent(10), WaveSize::Percent(50), WaveSize::Percent(100)]
        );
        assert!(parse_waves("1,50%").is_err());
        assert!(parse_waves("0,100%").is_err());
        assert!(parse_waves("101%").is_err());
        assert!(parse_waves("x,100%").is_err());
    }

    #[test]
    fn waves_are_cumulative_and_never_take_in_use_desktops() {
        assert_eq!(WaveSize::Count(1).of(4), 1);
        assert_eq!(WaveSize::Percent(10).of(4), 1);
        assert_eq!(WaveSize::Percent(50).of(4), 2);
        assert_eq!(WaveSize::Percent(100).of(4), 4);
        assert_eq!(WaveSize::Count(5).of(3), 3);
        let idle = vec!["d2".to_string(), "d3".to_string()];
        assert_eq!(wave_pick(WaveSize::Percent(50), 4, 1, &idle), ["d2"]);
        assert!(wave_pick(WaveSize::Percent(10), 4, 1, &idle).is_empty(), "an already-reached wave moves nobody");
        assert_eq!(wave_pick(WaveSize::Percent(100), 4, 2, &idle), ["d2", "d3"]);
    }

    #[test]
    fn the_first_canary_wave_is_one_desktop_per_pool_however_large() {
        for size in [1, 2, 20, 200, 999] {
            assert_eq!(WaveSize::Count(1).of(size), 1);
        }
    }
}
