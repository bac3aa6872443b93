//! The circuit breaker: whether the crashes of one version pass its channel's policy.
//!
//! A pure function over recorded crashes and the time: no I/O. It counts distinct desktops,
//! so the same crash seen twice, or one desktop crashing again and again (a reboot loop),
//! counts once; a policy needs at least two desktops, so one desktop never trips it alone.

use crate::catalog::incidents::Policy;
use std::collections::BTreeMap;

/// One recorded crash (or reboot loop) of the version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crash {
    pub desktop: String,
    /// When it happened, milliseconds since the epoch.
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not enough distinct desktops crashed within the window.
    Below { desktops: usize, needed: usize },
    /// The breaker trips.
    Trip(Trip),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trip {
    /// The desktops that crashed within the window, in the order they first crashed.
    pub desktops: Vec<String>,
    pub needed: usize,
    /// The first crash in the window.
    pub first_ms: i64,
    /// The crash that passed the threshold (the `needed`-th desktop's first crash).
    pub threshold_ms: i64,
    /// Why, in a sentence.
    pub reason: String,
}

/// Distinct desktops needed: the policy's count, or its share of the `on_version` desktops
/// when that is fewer, never fewer than two.
pub fn needed(policy: &Policy, on_version: usize) -> usize {
    let by_count = policy.crashes as usize;
    let by_share = policy.share.map(|p| (on_version * p as usize).div_ceil(100)).unwrap_or(usize::MAX);
    by_count.min(by_share).max(2)
}

/// The breaker's decision at `now_ms` over the version's crashes; `on_version`: how many
/// desktops of the channel run the version (for a share).
pub fn decide(policy: &Policy, crashes: &[Crash], on_version: usize, now_ms: i64) -> Decision {
    let since = now_ms - policy.within.as_millis() as i64;
    let mut first: BTreeMap<&str, i64> = BTreeMap::new();
    for c in crashes.iter().filter(|c| c.at_ms >= since && c.at_ms <= now_ms) {
        let at = first.entry(&c.desktop).or_insert(c.at_ms);
        *at = (*at).min(c.at_ms);
    }
    let mut order: Vec<(i64, &str)> = first.into_iter().map(|(d, at)| (at, d)).collect();
    order.sort();
    let needed = needed(policy, on_version);
    if order.len() < needed {
        return Decision::Below { desktops: order.len(), needed };
    }
    let within = humantime::format_duration(policy.within);
    Decision::Trip(Trip {
        desktops: order.iter().map(|(_, d)| d.to_string()).collect(),
        needed,
        first_ms: order[0].0,
        threshold_ms: order[needed - 1].0,
        reason: format!(
            "{} desktops crashed within {within} (the {} policy trips at {needed})",
            order.len(),
            policy.channel
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::incidents::{Action, Policy};
    use crate::catalog::Channel;
    use std::time::Duration;

    const MIN: i64 = 60_000;

    fn policy(crashes: u32, within_min: u64) -> Policy {
        Policy {
            channel: Channel::Prod,
            crashes,
            share: None,
            within: Duration::from_secs(within_min * 60),
            action: Action::Rollback,
            set: true,
        }
    }

    fn crash(d: &str, at_ms: i64) -> Crash {
        Crash { desktop: d.into(), at_ms }
    }

    fn trips(d: &Decision) -> bool {
        matches!(d, Decision::Trip(_))
    }

    #[test]
    fn two_desktops_crashing_within_the_window_trip_it_at_the_second_crash() {
        let p = policy(2, 15);
        let crashes = [crash("a", 1000), crash("b", 5000)];
        let Decision::Trip(t) = decide(&p, &crashes, 6, 6000) else { panic!("it trips") };
        assert_eq!((t.desktops, t.first_ms, t.threshold_ms), (vec!["a".into(), "b".into()], 1000, 5000));
        assert_eq!(t.reason, "2 desktops crashed within 15m (the prod policy trips at 2)");
    }

    #[test]
    fn the_same_crash_counted_twice_never_trips_it() {
        let p = policy(2, 15);
        let crashes = [crash("a", 1000), crash("a", 1000)];
        assert_eq!(decide(&p, &crashes, 6, 2000), Decision::Below { desktops: 1, needed: 2 });
    }

    #[test]
    fn one_desktops_reboot_loop_never_trips_it_alone() {
        let p = policy(2, 15);
        let crashes: Vec<Crash> = (0..20).map(|i| crash("a", 1000 + i * 500)).collect();
        assert!(!trips(&decide(&p, &crashes, 6, 20_000)));
        // Even a policy that asks for one desktop needs two.
        assert_eq!(decide(&policy(1, 15), &crashes, 6, 20_000), Decision::Below { desktops: 1, needed: 2 });
    }

    #[test]
    fn crashes_outside_the_window_do_not_count() {
        let p = policy(2, 15);
        let crashes = [crash("a", 0), crash("b", 16 * MIN)];
        assert!(!trips(&decide(&p, &crashes, 6, 16 * MIN)), "a's crash is 16 minutes old");
        let crashes = [crash("a", 2 * MIN), crash("b", 16 * MIN)];
        assert!(trips(&decide(&p, &crashes, 6, 16 * MIN)));
    }

    #[test]
    fn crashes_in_the_future_of_the_decision_do_not_count() {
        let crashes = [crash("a", 1000), crash("b", 9000)];
        assert!(!trips(&decide(&policy(2, 15), &crashes, 6, 5000)));
    }

    #[test]
    fn a_share_trips_it_earlier_on_a_small_fleet_but_never_under_two() {
        let mut p = policy(10, 15);
        p.share = Some(30);
        assert_eq!(needed(&p, 10), 3, "30% of 10");
        assert_eq!(needed(&p, 100), 10, "the count is fewer than 30% of 100");
        assert_eq!(needed(&p, 2), 2, "30% of 2 rounds up to 1, but one desktop never trips it");
        let crashes = [crash("a", 1), crash("b", 2), crash("c", 3)];
        assert!(trips(&decide(&p, &crashes, 10, 10)));
        assert!(!trips(&decide(&p, &crashes[..2], 10, 10)));
    }

    #[test]
    fn threshold_is_the_first_crash_of_the_needed_th_desktop() {
        let p = policy(3, 15);
        let crashes = [crash("a", 1), crash("a", 2), crash("b", 3), crash("b", 4), crash("c", 7), crash("d", 9)];
        let Decision::Trip(t) = decide(&p, &crashes, 6, 10) else { panic!("it trips") };
        assert_eq!((t.first_ms, t.threshold_ms, t.desktops.len()), (1, 7, 4));
    }

    /// Property: over random crash streams, the breaker trips exactly when the number of
    /// distinct desktops crashing within the window reaches max(2, crashes).
    #[test]
    fn random_streams_trip_exactly_at_enough_distinct_desktops() {
        let mut rng = crate::qcow2::tests::rng(0xb4ea);
        for _ in 0..2000 {
            let n = (rng() % 10) as usize;
            let crashes: Vec<Crash> =
                (0..n).map(|_| crash(&format!("d{}", rng() % 4), (rng() % (30 * MIN as u64)) as i64)).collect();
            let p = policy((rng() % 4) as u32 + 1, 15);
            let now = 30 * MIN;
            let distinct: std::collections::BTreeSet<&str> =
                crashes.iter().filter(|c| c.at_ms >= now - 15 * MIN).map(|c| c.desktop.as_str()).collect();
            let want = distinct.len() >= (p.crashes as usize).max(2);
            assert_eq!(trips(&decide(&p, &crashes, 4, now)), want, "{crashes:?} {p:?}");
        }
    }
}
