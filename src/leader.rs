//! Who leads the brokers, and whether a rollout's driver is gone. Several `vdim serve` may
//! share one catalog; every one serves requests, but the background duties (session reaper,
//! heal, host watch, adopting rollouts whose driver died) run on exactly one: the holder of
//! the `leader` lease in the catalog.
//!
//! ```text
//!  every 2 s, each broker: read the lease ─► decide (pure) ─► compare-and-set in one write
//!    nobody / expired ─► take it: term + 1, audit leader.elected (and whom it took over from)
//!    mine, live       ─► renew: expires = now + 6 s
//!    another's, live  ─► follow
//!  a leader leads until its renewal began + 4 s: one that stalls stops its duties before
//!  another may take the lease (6 s), with 2 s to spare for clocks that disagree.
//! ```
//! A rollout's driver (any `vdim` process) beats every second on the rollout's row. On its
//! own machine a driver is gone when its pid is; elsewhere, when it has been silent for 5 s.

use crate::catalog::leases::{Driver, Lease};
use crate::catalog::{Audit, Catalog, CatalogError, Tx};
use serde_json::json;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// The one lease brokers compete for.
pub const LEADER: &str = "leader";
/// How long a lease lasts unless renewed.
pub const LEASE_TTL: Duration = Duration::from_secs(6);
/// How often every broker tries to take or renew it.
pub const LEASE_TICK: Duration = Duration::from_secs(2);
/// How long a leader acts on one renewal: less than the TTL by what clocks may disagree.
pub const LEADS_FOR: Duration = Duration::from_secs(4);
/// How often a rollout's driver says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A driver on another machine silent this long is gone.
pub const DRIVER_SILENCE: Duration = Duration::from_secs(5);

/// Milliseconds since the epoch by this machine's clock.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A process that may hold a lease or drive a rollout: `host:pid:suffix`. The random suffix
/// keeps a restarted process with a reused pid apart from the one before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    pub suffix: String,
}

impl Holder {
    pub fn parse(s: &str) -> Option<Holder> {
        let mut parts = s.rsplitn(3, ':');
        let suffix = parts.next()?.to_string();
        let pid = parts.next()?.parse().ok()?;
        let host = parts.next()?.to_string();
        Some(Holder { host, pid, suffix })
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.host, self.pid, self.suffix)
    }
}

/// This machine's host name (of its UTS namespace).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = if ok { String::from_utf8_lossy(&buf[..end]).replace(':', "_") } else { String::new() };
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// This process, as it names itself in leases and rollouts.
pub fn me() -> &'static str {
    static ME: OnceLock<String> = OnceLock::new();
    ME.get_or_init(|| {
        let mut b = [0u8; 4];
        let suffix = match getrandom::fill(&mut b) {
            Ok(()) => hex::encode(b),
            // Only uniqueness matters here, not secrecy.
            Err(_) => format!("{:08x}", now_ms() as u32),
        };
        Holder { host: hostname(), pid: std::process::id(), suffix }.to_string()
    })
}

/// What a broker may do with the lease, as read now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// It is ours and live: extend it.
    Renew,
    /// Nobody holds it, or it expired: take it in a new term.
    Take { term: i64, from: Option<String> },
    /// Another holds it, live.
    Follow { leader: String },
}

/// The lease rule: may `me` take the lease `current` at `now_ms`? A holder on this machine
/// (`here`) whose process is gone (`alive` says no for its pid) holds nothing, live lease or
/// not: a broker restarted after a crash leads at once instead of waiting the lease out.
pub fn decide(current: Option<&Lease>, me: &str, now_ms: i64, here: &str, alive: impl Fn(u32) -> bool) -> Decision {
    let dead_here = |holder: &str| Holder::parse(holder).is_some_and(|h| h.host == here && !alive(h.pid));
    match current {
        None => Decision::Take { term: 1, from: None },
        Some(l) if l.expires_ms > now_ms && l.holder == me => Decision::Renew,
        Some(l) if l.expires_ms > now_ms && !dead_here(&l.holder) => Decision::Follow { leader: l.holder.clone() },
        Some(l) => Decision::Take { term: l.term + 1, from: Some(l.holder.clone()) },
    }
}

/// Where a broker stands after trying for the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// It leads in `term`; `elected`: it took the lease now (heal and adopt follow).
    Leader {
        term: i64,
        elected: bool,
    },
    Follower {
        leader: Option<String>,
    },
}

/// Takes or renews the lease for `me`, in one write transaction; a takeover is audited.
pub fn try_lead(catalog: &mut Catalog, me: &str, now_ms: i64) -> Result<Standing, CatalogError> {
    catalog.write(|tx| {
        let current = tx.lease(LEADER)?;
        let expires_ms = now_ms + LEASE_TTL.as_millis() as i64;
        let alive = |pid: u32| crate::home::pid_alive(pid as i32);
        match (decide(current.as_ref(), me, now_ms, &hostname(), alive), current) {
            (Decision::Renew, Some(seen)) => {
                let new = Lease { expires_ms, ..seen.clone() };
                Ok(if tx.replace_lease(LEADER, &seen, &new)? {
                    Standing::Leader { term: seen.term, elected: false }
                } else {
                    Standing::Follower { leader: None }
                })
            }
            (Decision::Take { term, from }, seen) => {
                let new = Lease { holder: me.to_string(), term, expires_ms };
                let won = match &seen {
                    None => tx.insert_lease(LEADER, &new)?,
                    Some(seen) => tx.replace_lease(LEADER, seen, &new)?,
                };
                if !won {
                    return Ok(Standing::Follower { leader: None });
                }
                tx.audit(Audit {
                    actor: "broker",
                    action: "leader.elected",
                    detail: json!({"broker": me, "term": term, "took_over_from": from}),
                    ..Default::default()
                })?;
                Ok(Standing::Leader { term, elected: true })
            }
            (Decision::Follow { leader }, _) => Ok(Standing::Follower { leader: Some(leader) }),
            (Decision::Renew, None) => Ok(Standing::Follower { leader: None }),
        }
    })
}

/// Whether some broker holds the lease now: then it, not the command that asks, deals with
/// rollouts whose driver is gone.
pub fn live_leader(tx: &Tx, now_ms: i64) -> Result<Option<String>, CatalogError> {
    Ok(tx.lease(LEADER)?.filter(|l| l.expires_ms > now_ms).map(|l| l.holder))
}

/// Gives the lease up (a broker stopping), so another takes over at its next tick.
pub fn step_down(catalog: &mut Catalog, me: &str) -> Result<(), CatalogError> {
    catalog.write(|tx| tx.release_lease(LEADER, me))
}

/// Whether a rollout's driver is gone: on this machine (`here`), when its process is;
/// elsewhere, when silent for longer than [`DRIVER_SILENCE`]. A row of an older vdim names
/// only a pid, of this machine.
pub fn driver_gone(d: &Driver, here: &str, now_ms: i64, alive: impl Fn(i64) -> bool) -> bool {
    match d.owner.as_deref().map(Holder::parse) {
        None => d.pid.is_none_or(|p| !alive(p)),
        Some(Some(h)) if h.host == here => !alive(h.pid as i64),
        Some(_) => d.seen_ms.is_none_or(|s| now_ms - s > DRIVER_SILENCE.as_millis() as i64),
    }
}

/// A broker's own view of its leadership, read by its duties at every tick.
#[derive(Debug, Default)]
pub struct Leadership {
    until: Mutex<Option<(Instant, i64)>>,
}

impl Leadership {
    /// Leads in `term` until `since` (when the renewal began) plus [`LEADS_FOR`].
    pub fn led(&self, since: Instant, term: i64) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = Some((since + LEADS_FOR, term));
    }

    pub fn lost(&self) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The term this broker leads in now, if it does.
    pub fn term(&self) -> Option<i64> {
        self.until.lock().unwrap_or_else(|p| p.into_inner()).filter(|(u, _)| Instant::now() < *u).map(|(_, t)| t)
    }

    pub fn leads(&self) -> bool {
        self.term().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, term: i64, expires_ms: i64) -> Lease {
        Lease { holder: holder.into(), term, expires_ms }
    }

    #[test]
    fn the_first_broker_takes_an_unheld_lease_in_term_one() {
        assert_eq!(decide(None, "a:1:x", 1000, "a", |_| true), Decision::Take { term: 1, from: None });
    }

    #[test]
    fn a_live_lease_is_renewed_by_its_holder_and_followed_by_everyone_else() {
        let l = lease("a:1:x", 4, 7000);
        assert_eq!(decide(Some(&l), "a:1:x", 6999, "a", |_| true), Decision::Renew);
        assert_eq!(decide(Some(&l), "b:2:y", 6999, "b", |_| true), Decision::Follow { leader: "a:1:x".into() });
    }

    #[test]
    fn an_expired_lease_is_taken_over_in_the_next_term_naming_the_old_holder() {
        let l = lease("a:1:x", 4, 7000);
        assert_eq!(
            decide(Some(&l), "b:2:y", 7000, "b", |_| true),
            Decision::Take { term: 5, from: Some("a:1:x".into()) }
        );
        // Its own holder, back after a stall, is elected again too: its duties had stopped.
        assert_eq!(
            decide(Some(&l), "a:1:x", 9000, "a", |_| true),
            Decision::Take { term: 5, from: Some("a:1:x".into()) }
        );
    }

    #[test]
    fn a_live_lease_whose_holder_died_on_this_machine_is_taken_at_once() {
        let l = lease("a:1:x", 4, 7000);
        // Broker 1 on host a crashed; broker 3 starts there.
        assert_eq!(
            decide(Some(&l), "a:3:z", 1000, "a", |pid| pid != 1),
            Decision::Take { term: 5, from: Some("a:1:x".into()) }
        );
        // Its process still there (or another host's, whose pid says nothing here): followed.
        assert_eq!(decide(Some(&l), "a:3:z", 1000, "a", |_| true), Decision::Follow { leader: "a:1:x".into() });
        assert_eq!(decide(Some(&l), "b:3:z", 1000, "b", |pid| pid != 1), Decision::Follow { leader: "a:1:x".into() });
    }

    #[test]
    fn two_brokers_on_one_catalog_never_lead_in_the_same_term() {
        let (_d, mut c) = crate::catalog::tests::cat();
        assert_eq!(try_lead(&mut c, "a:1:x", 1000).unwrap(), Standing::Leader { term: 1, elected: true });
        assert_eq!(try_lead(&mut c, "b:2:y", 1500).unwrap(), Standing::Follower { leader: Some("a:1:x".into()) });
        assert_eq!(try_lead(&mut c, "a:1:x", 3000).unwrap(), Standing::Leader { term: 1, elected: false });
        // a stops renewing: b takes over once the lease (renewed at 3000) has expired.
        assert!(matches!(try_lead(&mut c, "b:2:y", 8999).unwrap(), Standing::Follower { .. }));
        assert_eq!(try_lead(&mut c, "b:2:y", 9000).unwrap(), Standing::Leader { term: 2, elected: true });
        assert!(matches!(try_lead(&mut c, "a:1:x", 9500).unwrap(), Standing::Follower { .. }));
        let log = c.read(|tx| tx.audit_log(None, None, 10)).unwrap();
        let elected: Vec<_> = log.iter().filter(|e| e.action == "leader.elected").map(|e| e.detail.clone()).collect();
        assert_eq!(elected[1], json!({"broker": "b:2:y", "term": 2, "took_over_from": "a:1:x"}));
        assert_eq!(elected.len(), 2);
    }

    #[test]
    fn a_lease_read_before_another_took_it_cannot_be_replaced() {
        let (_d, mut c) = crate::catalog::tests::cat();
        try_lead(&mut c, "a:1:x", 0).unwrap();
        let seen = c.read(|tx| tx.lease(LEADER)).unwrap().unwrap();
        try_lead(&mut c, "b:2:y", 10_000).unwrap();
        let stale = c.write(|tx| tx.replace_lease(LEADER, &seen, &lease("c:3:z", 2, 20_000))).unwrap();
        assert!(!stale);
        assert_eq!(c.read(|tx| tx.lease(LEADER)).unwrap().unwrap().holder, "b:2:y");
    }

    #[test]
    fn holder_names_round_trip_and_host_names_keep_colons_out() {
        let h = Holder { host: "ws1.example".into(), pid: 42, suffix: "00ff".into() };
        assert_eq!(Holder::parse(&h.to_string()), Some(h));
        assert_eq!(Holder::parse("nonsense"), None);
        assert!(Holder::parse(me()).is_some_and(|h| h.pid == std::process::id()));
    }

    #[test]
    fn a_driver_here_is_gone_with_its_process_and_one_elsewhere_after_5_s_of_silence() {
        let d =
            |owner: Option<&str>, pid, seen| Driver { rollout: 1, owner: owner.map(Into::into), pid, seen_ms: seen };
        let dead = |_| false;
        let alive = |_| true;
        // Here: the pid decides, whatever the heartbeat says.
        assert!(driver_gone(&d(Some("me:7:a"), Some(7), Some(10_000)), "me", 10_000, dead));
        assert!(!driver_gone(&d(Some("me:7:a"), Some(7), Some(0)), "me", 60_000, alive));
        // Elsewhere: only the heartbeat can tell.
        let there = d(Some("other:7:a"), Some(7), Some(10_000));
        assert!(!driver_gone(&there, "me", 15_000, dead));
        assert!(driver_gone(&there, "me", 15_001, alive));
        assert!(driver_gone(&d(Some("other:7:a"), Some(7), None), "me", 0, alive));
        // An older vdim's row: its pid, on this machine.
        assert!(driver_gone(&d(None, Some(7), None), "me", 0, dead));
        assert!(!driver_gone(&d(None, Some(7), None), "me", 0, alive));
        assert!(driver_gone(&d(None, None, None), "me", 0, alive));
    }

    #[test]
    fn a_leader_stops_leading_before_its_lease_could_pass_to_another() {
        let l = Leadership::default();
        assert!(!l.leads());
        l.led(Instant::now(), 3);
        assert_eq!(l.term(), Some(3));
        l.led(Instant::now() - LEADS_FOR, 3);
        assert!(!l.leads(), "a renewal older than LEADS_FOR no longer counts");
        const { assert!(LEADS_FOR.as_millis() + 2000 <= LEASE_TTL.as_millis()) };
        l.led(Instant::now(), 4);
        l.lost();
        assert!(!l.leads());
    }
}
