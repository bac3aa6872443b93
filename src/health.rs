//! The soak's health rules: what counts as a failed desktop while a rollout watches a wave.
//!
//! A pure state machine over a stream of events and the time: no I/O, no locks, no tokio. The
//! rollout engine only collects events (libvirt's lifecycle events, a state check as backstop,
//! guest-agent pings) and feeds them here; the verdict is decided here alone.
//!
//! ```text
//!              Started        Rebooted × REBOOT_LOOP / Stopped (after a start)
//!  Soaking ──────────────► Running ──────────────────────────────────────► Failed
//!     │ Crashed / FoundOff (any time)                                         ▲
//!     └───────────────────────────────────────────────────────────────────────┤
//!  until ──► no agent, or AgentReplied ─────────────────────────► Passed      │
//!        └─► agent expected, none by until + grace ──────────────────────────┘ AgentSilent
//! ```
//! The first failure of a desktop is the one reported; a wave fails when any desktop fails.

use crate::hypervisor::{DomainState, HypervisorError, LifecycleKind};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

/// Reboots within one soak that count as a boot loop.
pub const REBOOT_LOOP: u32 = 2;

/// What happened to a desktop, in the rules' own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The guest booted (on the new version: the engine subscribes before it moves desktops).
    Started,
    /// The guest panicked or its QEMU process died; the reason is libvirt's word.
    Crashed(String),
    Rebooted,
    /// A stop or shutdown event. The move itself destroys the old guest, so it counts only
    /// once this desktop has started again.
    Stopped(String),
    /// The state check found the domain off or gone. Counts at any time: the engine checks
    /// only desktops it has already started.
    FoundOff(String),
    /// The guest agent answered a ping.
    AgentReplied,
    /// A guest-agent ping failed; kept to say why in a later `AgentSilent`.
    AgentFailed(String),
}

/// Why a desktop failed its soak; `Display` is what the report prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Crashed(String),
    RebootLoop(u32),
    Stopped(String),
    /// Ran the whole soak, but its guest agent (where the profile has one) did not answer.
    AgentSilent {
        last_error: String,
        waited: Duration,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Crashed(why) => write!(f, "crashed ({why})"),
            Reason::RebootLoop(n) => write!(f, "reboot loop ({n} reboots)"),
            Reason::Stopped(why) => write!(f, "stopped ({why})"),
            Reason::AgentSilent { last_error, waited } => {
                write!(f, "guest agent did not answer ({last_error}; waited {} s after the soak)", waited.as_secs())
            }
        }
    }
}

/// A failure with when it happened (`at`, the event's time) and when vdim saw it (`seen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reason: Reason,
    pub at: SystemTime,
    pub seen: SystemTime,
}

/// One desktop's verdict at a given time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The soak is still running.
    Soaking,
    /// The soak is over; the guest agent has until `until + grace` to answer.
    AwaitingAgent,
    Passed,
    Failed(Failure),
}

/// The timing of one soak, the same for every desktop of a wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Events before this (the old guest's, before the move) are ignored.
    pub since: SystemTime,
    /// The soak passes at this time when nothing went wrong.
    pub until: SystemTime,
    /// How long after `until` a guest agent may take to answer at all.
    pub agent_grace: Duration,
}

/// One desktop under watch.
#[derive(Debug, Clone)]
pub struct Watch {
    window: Window,
    has_agent: bool,
    started: bool,
    reboots: u32,
    agent_replied: bool,
    agent_error: String,
    failure: Option<Failure>,
}

impl Watch {
    /// `has_agent`: the desktop's profile has a guest-agent channel, so silence fails it.
    pub fn new(window: Window, has_agent: bool) -> Watch {
        Watch {
            window,
            has_agent,
            started: false,
            reboots: 0,
            agent_replied: false,
            agent_error: String::new(),
            failure: None,
        }
    }

    /// Feed one event that happened `at`, seen by vdim `now`. Returns the failure when this
    /// event is the one that fails the desktop.
    pub fn observe(&mut self, event: Event, at: SystemTime, now: SystemTime) -> Option<&Failure> {
        if at < self.window.since || self.failure.is_some() {
            return None;
        }
        let reason = match event {
            Event::Started => {
                self.started = true;
                None
            }
            Event::Crashed(why) => Some(Reason::Crashed(if why.is_empty() { "crashed".into() } else { why })),
            Event::FoundOff(why) => Some(Reason::Stopped(why)),
            Event::AgentReplied => {
                self.agent_replied = true;
                None
            }
            Event::AgentFailed(why) => {
                self.agent_error = why;
                None
            }
            _ if !self.started => None,
            Event::Rebooted => {
                self.reboots += 1;
                (self.reboots >= REBOOT_LOOP).then_some(Reason::RebootLoop(self.reboots))
            }
            Event::Stopped(why) => Some(Reason::Stopped(why)),
        };
        self.failure = reason.map(|reason| Failure { reason, at, seen: now });
        self.failure.as_ref()
    }

    /// The verdict at `now`; once failed or passed, it stays so.
    pub fn verdict_at(&self, now: SystemTime) -> Verdict {
        if let Some(f) = &self.failure {
            return Verdict::Failed(f.clone());
        }
        if now < self.window.until {
            return Verdict::Soaking;
        }
        if !self.has_agent || self.agent_replied {
            return Verdict::Passed;
        }
        if now < self.window.until + self.window.agent_grace {
            return Verdict::AwaitingAgent;
        }
        Verdict::Failed(Failure {
            reason: Reason::AgentSilent { last_error: self.agent_error.clone(), waited: self.window.agent_grace },
            at: now,
            seen: now,
        })
    }
}

/// A wave's verdict: it fails as soon as any desktop fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaveVerdict {
    Soaking,
    /// Every desktop ran the soak; these still owe a guest-agent answer.
    AwaitingAgents(Vec<String>),
    Passed,
    Failed(BTreeMap<String, Failure>),
}

/// The desktops of one wave under watch.
#[derive(Debug, Clone)]
pub struct Wave {
    watches: BTreeMap<String, Watch>,
}

impl Wave {
    /// `desktops`: each desktop with whether its profile has a guest agent.
    pub fn new(window: Window, desktops: impl IntoIterator<Item = (String, bool)>) -> Wave {
        Wave { watches: desktops.into_iter().map(|(d, agent)| (d, Watch::new(window, agent))).collect() }
    }

    /// Feed an event of `desktop`; events of desktops outside the wave are ignored.
    /// Returns true when it failed that desktop (and so the wave).
    pub fn observe(&mut self, desktop: &str, event: Event, at: SystemTime, now: SystemTime) -> bool {
        self.watches.get_mut(desktop).is_some_and(|w| w.observe(event, at, now).is_some())
    }

    pub fn verdict_at(&self, now: SystemTime) -> WaveVerdict {
        let verdicts: BTreeMap<&String, Verdict> = self.watches.iter().map(|(d, w)| (d, w.verdict_at(now))).collect();
        let failed: BTreeMap<String, Failure> = verdicts
            .iter()
            .filter_map(|(d, v)| match v {
                Verdict::Failed(f) => Some(((*d).clone(), f.clone())),
                _ => None,
            })
            .collect();
        // A failure during the soak ends the wave at once; agent silence is judged only
        // when every desktop ran the soak and the grace is over.
        let soak_failed = failed.values().any(|f| !matches!(f.reason, Reason::AgentSilent { .. }));
        if soak_failed {
            return WaveVerdict::Failed(failed);
        }
        if verdicts.values().any(|v| *v == Verdict::Soaking) {
            return WaveVerdict::Soaking;
        }
        let awaiting: Vec<String> =
            verdicts.iter().filter(|(_, v)| **v == Verdict::AwaitingAgent).map(|(d, _)| (*d).clone()).collect();
        if !awaiting.is_empty() {
            return WaveVerdict::AwaitingAgents(awaiting);
        }
        if failed.is_empty() {
            WaveVerdict::Passed
        } else {
            WaveVerdict::Failed(failed)
        }
    }
}

// ---- the hypervisor's words, mapped to events in this one place ------------------------------

/// A lifecycle event as the rules see it; `None` for events that say nothing about health.
pub fn from_lifecycle(kind: &LifecycleKind, detail: &str) -> Option<Event> {
    match kind {
        LifecycleKind::Started => Some(Event::Started),
        LifecycleKind::Crashed => Some(Event::Crashed(detail.to_string())),
        LifecycleKind::Rebooted => Some(Event::Rebooted),
        LifecycleKind::Stopped | LifecycleKind::Shutdown => Some(Event::Stopped(detail.to_string())),
        _ => None,
    }
}

/// A domain state read by the backstop check; `None` while it looks alive.
pub fn from_state(state: &Result<(DomainState, String), HypervisorError>) -> Option<Event> {
    match state {
        Ok((DomainState::Crashed, why)) => Some(Event::Crashed(why.clone())),
        // A guest paused by its panic device (on_crash=preserve with some drivers).
        Ok((DomainState::Paused, why)) if why.contains("panic") || why.contains("crash") => {
            Some(Event::Crashed(why.clone()))
        }
        Ok((DomainState::ShutOff, why)) => Some(Event::FoundOff(why.clone())),
        Ok(_) => None,
        Err(e) => Some(Event::FoundOff(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOAK: Duration = Duration::from_secs(60);
    const GRACE: Duration = Duration::from_secs(30);

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    fn window() -> Window {
        Window { since: t(0), until: t(0) + SOAK, agent_grace: GRACE }
    }

    fn watch(agent: bool) -> Watch {
        Watch::new(window(), agent)
    }

    fn feed(w: &mut Watch, events: &[(u64, Event)]) {
        for (s, e) in events {
            w.observe(e.clone(), t(*s), t(*s));
        }
    }

    fn reason(v: Verdict) -> Reason {
        match v {
            Verdict::Failed(f) => f.reason,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn a_crash_fails_at_once_with_libvirts_reason_and_time() {
        let mut w = watch(false);
        let f = w.observe(Event::Crashed("panicked".into()), t(3), t(4)).cloned();
        assert_eq!(f, Some(Failure { reason: Reason::Crashed("panicked".into()), at: t(3), seen: t(4) }));
        assert_eq!(reason(w.verdict_at(t(5))), Reason::Crashed("panicked".into()), "long before the deadline");
        assert_eq!(Reason::Crashed("panicked".into()).to_string(), "crashed (panicked)");
    }

    #[test]
    fn a_crash_counts_even_before_the_first_start_event() {
        let mut w = watch(false);
        assert!(w.observe(Event::Crashed(String::new()), t(1), t(1)).is_some());
        assert_eq!(reason(w.verdict_at(t(2))), Reason::Crashed("crashed".into()), "an empty reason still says what");
    }

    #[test]
    fn reboot_loop_many_reboots_within_the_window_is_a_loop() {
        let mut w = watch(false);
        feed(&mut w, &[(1, Event::Started)]);
        for n in 1..REBOOT_LOOP {
            assert!(w.observe(Event::Rebooted, t(1 + n as u64), t(1 + n as u64)).is_none(), "reboot {n} is fine");
        }
        assert!(w.observe(Event::Rebooted, t(20), t(20)).is_some());
        assert_eq!(reason(w.verdict_at(t(21))), Reason::RebootLoop(REBOOT_LOOP));
        assert_eq!(Reason::RebootLoop(2).to_string(), "reboot loop (2 reboots)");
    }

    #[test]
    fn one_reboot_within_the_window_passes() {
        let mut w = watch(false);
        feed(&mut w, &[(1, Event::Started), (10, Event::Rebooted)]);
        assert_eq!(w.verdict_at(t(60)), Verdict::Passed);
    }

    #[test]
    fn reboots_and_stops_before_the_first_start_do_not_count() {
        let mut w = watch(false);
        feed(&mut w, &[(1, Event::Stopped("destroyed".into())), (1, Event::Rebooted), (1, Event::Rebooted)]);
        assert_eq!(w.verdict_at(t(59)), Verdict::Soaking);
        assert_eq!(w.verdict_at(t(60)), Verdict::Passed);
    }

    #[test]
    fn a_stop_after_a_restart_counts() {
        let mut w = watch(false);
        feed(&mut w, &[(1, Event::Stopped("destroyed".into())), (2, Event::Started)]);
        assert!(w.observe(Event::Stopped("shutdown".into()), t(9), t(9)).is_some());
        assert_eq!(reason(w.verdict_at(t(10))), Reason::Stopped("shutdown".into()));
        assert_eq!(Reason::Stopped("shutdown".into()).to_string(), "stopped (shutdown)");
    }

    #[test]
    fn a_domain_found_off_by_the_state_check_counts_without_a_start_event() {
        let mut w = watch(false);
        assert!(w.observe(Event::FoundOff("destroyed".into()), t(2), t(2)).is_some());
        assert_eq!(reason(w.verdict_at(t(3))), Reason::Stopped("destroyed".into()));
    }

    #[test]
    fn events_from_before_the_soak_began_are_ignored() {
        let mut w = Watch::new(Window { since: t(10), ..window() }, false);
        feed(&mut w, &[(9, Event::Crashed("panicked".into())), (9, Event::Started), (11, Event::Stopped("x".into()))]);
        assert_eq!(w.verdict_at(t(60)), Verdict::Passed, "the old guest's crash and start are not this soak's");
    }

    #[test]
    fn the_soak_passes_at_its_deadline_without_events() {
        let w = watch(false);
        assert_eq!(w.verdict_at(t(0)), Verdict::Soaking);
        assert_eq!(w.verdict_at(t(59)), Verdict::Soaking);
        assert_eq!(w.verdict_at(t(60)), Verdict::Passed);
    }

    #[test]
    fn the_first_failure_is_the_one_reported() {
        let mut w = watch(false);
        feed(&mut w, &[(1, Event::Started), (2, Event::Crashed("panicked".into()))]);
        assert!(w.observe(Event::Stopped("destroyed".into()), t(3), t(3)).is_none());
        let Verdict::Failed(f) = w.verdict_at(t(99)) else { panic!("failed") };
        assert_eq!((f.reason, f.at), (Reason::Crashed("panicked".into()), t(2)));
    }

    #[test]
    fn agent_silence_after_the_soak_fails_only_where_the_profile_has_an_agent() {
        let (mut with, mut without) = (watch(true), watch(false));
        for w in [&mut with, &mut without] {
            feed(w, &[(1, Event::Started), (61, Event::AgentFailed("agent not connected".into()))]);
        }
        assert_eq!(without.verdict_at(t(60)), Verdict::Passed);
        assert_eq!(without.verdict_at(t(200)), Verdict::Passed);
        assert_eq!(with.verdict_at(t(59)), Verdict::Soaking);
        assert_eq!(with.verdict_at(t(60)), Verdict::AwaitingAgent, "a slow boot is not a silent agent");
        assert_eq!(with.verdict_at(t(89)), Verdict::AwaitingAgent);
        let r = reason(with.verdict_at(t(90)));
        assert_eq!(r, Reason::AgentSilent { last_error: "agent not connected".into(), waited: GRACE });
        assert_eq!(r.to_string(), "guest agent did not answer (agent not connected; waited 30 s after the soak)");
    }

    #[test]
    fn an_agent_that_answers_within_its_grace_passes() {
        let mut w = watch(true);
        feed(&mut w, &[(1, Event::Started), (62, Event::AgentFailed("no".into())), (70, Event::AgentReplied)]);
        assert_eq!(w.verdict_at(t(200)), Verdict::Passed);
    }

    #[test]
    fn a_wave_fails_when_one_desktop_fails_and_names_only_that_one() {
        let mut wave = Wave::new(window(), [("a".to_string(), false), ("b".to_string(), true)]);
        assert!(!wave.observe("a", Event::Started, t(1), t(1)));
        assert!(!wave.observe("elsewhere", Event::Crashed("panicked".into()), t(1), t(1)), "not in the wave");
        assert_eq!(wave.verdict_at(t(2)), WaveVerdict::Soaking);
        assert!(wave.observe("b", Event::Crashed("panicked".into()), t(3), t(3)));
        let WaveVerdict::Failed(f) = wave.verdict_at(t(4)) else { panic!("the wave fails before its deadline") };
        assert_eq!(f.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn a_wave_awaits_only_the_agents_it_expects_then_fails_the_silent_ones() {
        let mut wave = Wave::new(window(), [("a".into(), false), ("b".into(), true), ("c".into(), true)]);
        assert_eq!(wave.verdict_at(t(60)), WaveVerdict::AwaitingAgents(vec!["b".into(), "c".into()]));
        wave.observe("b", Event::AgentReplied, t(61), t(61));
        assert_eq!(wave.verdict_at(t(62)), WaveVerdict::AwaitingAgents(vec!["c".into()]));
        let WaveVerdict::Failed(f) = wave.verdict_at(t(90)) else { panic!("c stayed silent") };
        assert_eq!(f.keys().collect::<Vec<_>>(), ["c"]);
        wave.observe("c", Event::AgentReplied, t(63), t(63));
        assert_eq!(wave.verdict_at(t(90)), WaveVerdict::Passed);
    }

    #[test]
    fn libvirts_words_map_to_events_in_one_place() {
        use DomainState as S;
        assert_eq!(from_lifecycle(&LifecycleKind::Crashed, "panicked"), Some(Event::Crashed("panicked".into())));
        assert_eq!(from_lifecycle(&LifecycleKind::Shutdown, "guest"), Some(Event::Stopped("guest".into())));
        assert_eq!(from_lifecycle(&LifecycleKind::Stopped, "destroyed"), Some(Event::Stopped("destroyed".into())));
        assert_eq!(from_lifecycle(&LifecycleKind::Rebooted, ""), Some(Event::Rebooted));
        assert_eq!(from_lifecycle(&LifecycleKind::Started, "booted"), Some(Event::Started));
        assert_eq!(from_lifecycle(&LifecycleKind::Defined, "updated"), None);
        assert_eq!(from_state(&Ok((S::Running, "booted".into()))), None);
        assert_eq!(from_state(&Ok((S::Crashed, "panicked".into()))), Some(Event::Crashed("panicked".into())));
        assert_eq!(from_state(&Ok((S::Paused, "panicked".into()))), Some(Event::Crashed("panicked".into())));
        assert_eq!(from_state(&Ok((S::Paused, "user".into()))), None, "an admin's pause is not a crash");
        assert_eq!(from_state(&Ok((S::ShutOff, "destroyed".into()))), Some(Event::FoundOff("destroyed".into())));
        let gone = Err(HypervisorError::NotFound { domain: "vdim-p-001".into() });
        assert_eq!(from_state(&gone), Some(Event::FoundOff("Domain vdim-p-001 is not defined".into())));
    }

    /// Property, over random streams: the verdict is the declarative rule (a crash or a found-off
    /// at any time; a stop or the REBOOT_LOOP-th reboot after a start), and once failed it stays
    /// failed with the same failure whatever follows.
    #[test]
    fn random_streams_fail_exactly_when_a_rule_says_so_and_stay_failed() {
        let mut rng = crate::qcow2::tests::rng(0x5eed);
        for _ in 0..2000 {
            let len = (rng() % 12) as usize;
            let events: Vec<(u64, Event)> = (0..len)
                .map(|i| {
                    let e = match rng() % 7 {
                        0 => Event::Started,
                        1 => Event::Crashed("panicked".into()),
                        2 | 3 => Event::Rebooted,
                        4 => Event::Stopped("destroyed".into()),
                        5 => Event::FoundOff("shut off".into()),
                        _ => Event::AgentReplied,
                    };
                    (i as u64, e)
                })
                .collect();
            let mut expected = None;
            let (mut started, mut reboots) = (false, 0);
            for (s, e) in &events {
                let r = match e {
                    Event::Started => {
                        started = true;
                        None
                    }
                    Event::Crashed(why) => Some(Reason::Crashed(why.clone())),
                    Event::FoundOff(why) | Event::Stopped(why) if matches!(e, Event::FoundOff(_)) || started => {
                        Some(Reason::Stopped(why.clone()))
                    }
                    Event::Rebooted if started => {
                        reboots += 1;
                        (reboots == REBOOT_LOOP).then_some(Reason::RebootLoop(reboots))
                    }
                    _ => None,
                };
                if expected.is_none() {
                    expected = r.map(|r| (r, t(*s)));
                }
            }
            let mut w = watch(false);
            let mut first = None;
            for (s, e) in &events {
                w.observe(e.clone(), t(*s), t(*s));
                let v = w.verdict_at(t(*s));
                if let Verdict::Failed(f) = &v {
                    assert_eq!(*first.get_or_insert_with(|| f.clone()), *f, "a failure never changes: {events:?}");
                }
            }
            match (w.verdict_at(t(60)), expected) {
                (Verdict::Passed, None) => {}
                (Verdict::Failed(f), Some((r, at))) => assert_eq!((f.reason, f.at), (r, at), "{events:?}"),
                (v, e) => panic!("{events:?}: verdict {v:?}, rule says {e:?}"),
            }
        }
    }
}
