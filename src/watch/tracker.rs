//! Which lifecycle events of a desktop become watch events: pure, no I/O.
//!
//! The watch feeds it every event of every desktop (libvirt's lifecycle events, and a state
//! sweep as backstop, both in [`crate::health`]'s words). A desktop's crash is reported once
//! until it starts again, however often it is seen (event and sweep, or two brokers'
//! sweeps); its reboots become one reboot loop; a stop becomes a watch event only if the
//! desktop is still off a moment later (vdim's own resets stop and start it at once), which
//! the caller checks.

use crate::catalog::incidents::EventKind;
use crate::health::{Event, REBOOT_LOOP};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

/// Reboots within this time that make a reboot loop.
pub const REBOOT_WINDOW: Duration = Duration::from_secs(300);
/// How long a guest agent may go without answering (since its desktop started, or since it
/// last answered) before it counts as silent; the same grace a rollout gives it.
pub const AGENT_GRACE: Duration = Duration::from_secs(60);
/// How long a stopped desktop must stay off before its stop is reported.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Something worth recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    pub desktop: String,
    pub kind: EventKind,
    pub detail: String,
    pub at: SystemTime,
}

#[derive(Debug, Default, Clone)]
struct Track {
    /// A crash was reported since the desktop last started.
    crashed: bool,
    reboots: Vec<SystemTime>,
    looping: bool,
    /// A stop seen, not yet reported: when and libvirt's word.
    stopped: Option<(SystemTime, String)>,
    /// A stop was handed out since the desktop last started.
    stop_due: bool,
    /// Since when its guest agent has had nothing to say: its start, or its last answer.
    quiet_since: Option<SystemTime>,
    /// Its agent's silence was reported since it last started or answered.
    agent_silent: bool,
}

#[derive(Debug, Default)]
pub struct Tracker {
    desktops: BTreeMap<String, Track>,
}

/// libvirt's words for a QEMU process that died under its guest: a crash, not a stop.
fn qemu_died(why: &str) -> bool {
    why == "failed" || why == "crashed"
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Feeds one event of `desktop` that happened `at`; returns what to record now.
    pub fn observe(&mut self, desktop: &str, event: Event, at: SystemTime) -> Option<Signal> {
        let t = self.desktops.entry(desktop.to_string()).or_default();
        let signal = |kind, detail: String| Signal { desktop: desktop.to_string(), kind, detail, at };
        match event {
            Event::Started => {
                t.crashed = false;
                t.stopped = None;
                t.stop_due = false;
                t.quiet_since = Some(at);
                t.agent_silent = false;
                None
            }
            Event::Crashed(why) => {
                crash(t, if why.is_empty() { "crashed".into() } else { why }).map(|d| signal(EventKind::Crash, d))
            }
            Event::Stopped(why) | Event::FoundOff(why) if qemu_died(&why) => {
                crash(t, format!("QEMU process died ({why})")).map(|d| signal(EventKind::Crash, d))
            }
            Event::Stopped(why) | Event::FoundOff(why) => {
                if !t.crashed && !t.stop_due && t.stopped.is_none() {
                    t.stopped = Some((at, why));
                }
                None
            }
            Event::Rebooted => {
                t.reboots.retain(|r| at.duration_since(*r).unwrap_or_default() < REBOOT_WINDOW);
                t.reboots.push(at);
                if t.reboots.len() as u32 >= REBOOT_LOOP && !t.looping {
                    t.looping = true;
                    return Some(signal(
                        EventKind::RebootLoop,
                        format!("{} reboots within {} s", t.reboots.len(), REBOOT_WINDOW.as_secs()),
                    ));
                }
                if t.reboots.len() == 1 {
                    t.looping = false;
                }
                None
            }
            Event::AgentReplied | Event::AgentFailed(_) => None,
        }
    }

    /// Stops seen at least [`STOP_GRACE`] before `now`, each once: (desktop, libvirt's word,
    /// when). The caller records one only if the desktop is still off and was meant to run.
    pub fn due_stops(&mut self, now: SystemTime) -> Vec<(String, String, SystemTime)> {
        let mut out = vec![];
        for (d, t) in self.desktops.iter_mut() {
            if let Some((at, why)) = &t.stopped {
                if now.duration_since(*at).unwrap_or_default() >= STOP_GRACE {
                    out.push((d.clone(), why.clone(), *at));
                    t.stopped = None;
                    t.stop_due = true;
                }
            }
        }
        out
    }

    /// A guest-agent ping of a running desktop whose profile has an agent, made `now`:
    /// silence is reported once the agent said nothing for [`AGENT_GRACE`] (a slow boot is
    /// not a silent agent), once until it answers or the desktop starts again.
    pub fn agent(&mut self, desktop: &str, answer: Result<(), String>, now: SystemTime) -> Option<Signal> {
        let t = self.desktops.entry(desktop.to_string()).or_default();
        let since = *t.quiet_since.get_or_insert(now);
        match answer {
            Ok(()) => {
                t.quiet_since = Some(now);
                t.agent_silent = false;
                None
            }
            Err(why)
                if !t.crashed && !t.agent_silent && now.duration_since(since).unwrap_or_default() >= AGENT_GRACE =>
            {
                t.agent_silent = true;
                let waited = now.duration_since(since).unwrap_or_default().as_secs();
                let detail = format!("guest agent did not answer for {waited} s ({why})");
                Some(Signal { desktop: desktop.to_string(), kind: EventKind::AgentSilent, detail, at: now })
            }
            Err(_) => None,
        }
    }

    /// A desktop the state sweep found running: whatever crash or stop it had is over (its
    /// start event may have come before this watch did).
    pub fn running(&mut self, desktop: &str) {
        if let Some(t) = self.desktops.get_mut(desktop) {
            t.crashed = false;
            t.stopped = None;
            t.stop_due = false;
        }
    }

    /// A desktop whose crash is recorded already (found so by a watch that starts afresh).
    pub fn already_crashed(&mut self, desktop: &str) {
        self.desktops.entry(desktop.to_string()).or_default().crashed = true;
    }

    /// Whether a crash of the desktop was reported since it last started.
    pub fn has_crashed(&self, desktop: &str) -> bool {
        self.desktops.get(desktop).is_some_and(|t| t.crashed)
    }
}

fn crash(t: &mut Track, detail: String) -> Option<String> {
    t.stopped = None;
    if t.crashed {
        return None;
    }
    t.crashed = true;
    Some(detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    fn kinds(signals: &[Option<Signal>]) -> Vec<EventKind> {
        signals.iter().flatten().map(|s| s.kind).collect()
    }

    #[test]
    fn a_crash_seen_twice_is_reported_once_until_the_desktop_starts_again() {
        let mut tr = Tracker::new();
        let s = [
            tr.observe("a", Event::Crashed("panicked".into()), t(1)),
            tr.observe("a", Event::Crashed("panicked".into()), t(2)),
            tr.observe("a", Event::FoundOff("crashed".into()), t(3)),
        ];
        assert_eq!(kinds(&s), [EventKind::Crash]);
        assert_eq!(s[0].as_ref().unwrap().detail, "panicked");
        tr.observe("a", Event::Started, t(10));
        assert!(tr.observe("a", Event::Crashed("panicked".into()), t(11)).is_some(), "a new boot, a new crash");
    }

    #[test]
    fn a_qemu_process_that_died_is_a_crash_not_a_stop() {
        let mut tr = Tracker::new();
        let s = tr.observe("a", Event::Stopped("failed".into()), t(1)).unwrap();
        assert_eq!((s.kind, s.detail.as_str()), (EventKind::Crash, "QEMU process died (failed)"));
        assert!(tr.due_stops(t(100)).is_empty());
    }

    #[test]
    fn reboots_become_one_reboot_loop() {
        let mut tr = Tracker::new();
        tr.observe("a", Event::Started, t(0));
        let s: Vec<_> = (1..6).map(|i| tr.observe("a", Event::Rebooted, t(i))).collect();
        assert_eq!(kinds(&s), [EventKind::RebootLoop]);
        let mut tr = Tracker::new();
        let s =
            [tr.observe("a", Event::Rebooted, t(0)), tr.observe("a", Event::Rebooted, t(REBOOT_WINDOW.as_secs() + 1))];
        assert!(kinds(&s).is_empty(), "reboots far apart are no loop");
    }

    #[test]
    fn a_stop_is_due_only_after_its_grace_and_only_once() {
        let mut tr = Tracker::new();
        assert!(tr.observe("a", Event::Stopped("destroyed".into()), t(1)).is_none());
        assert!(tr.due_stops(t(2)).is_empty());
        assert_eq!(tr.due_stops(t(6)), [("a".to_string(), "destroyed".to_string(), t(1))]);
        assert!(tr.due_stops(t(60)).is_empty());
    }

    #[test]
    fn a_stop_seen_again_by_events_and_sweeps_is_due_once_until_the_desktop_starts() {
        let mut tr = Tracker::new();
        tr.observe("a", Event::Stopped("host".into()), t(1));
        tr.observe("a", Event::Stopped("destroyed".into()), t(2));
        assert_eq!(tr.due_stops(t(7)).len(), 1);
        tr.observe("a", Event::FoundOff("destroyed".into()), t(8));
        assert!(tr.due_stops(t(20)).is_empty(), "the sweep sees the same stop");
        tr.observe("a", Event::Started, t(30));
        tr.observe("a", Event::Stopped("destroyed".into()), t(31));
        assert_eq!(tr.due_stops(t(40)).len(), 1, "a new boot, a new stop");
    }

    #[test]
    fn a_stop_followed_by_a_start_is_never_due() {
        let mut tr = Tracker::new();
        tr.observe("a", Event::Stopped("destroyed".into()), t(1));
        tr.observe("a", Event::Started, t(2));
        assert!(tr.due_stops(t(60)).is_empty(), "vdim's own reset: stop, then start");
    }

    #[test]
    fn a_silent_agent_is_reported_after_its_grace_once_until_it_answers_or_restarts() {
        let mut tr = Tracker::new();
        let no = || Err("agent not connected".to_string());
        tr.observe("a", Event::Started, t(0));
        assert!(tr.agent("a", no(), t(30)).is_none(), "a slow boot is not a silent agent");
        let s = tr.agent("a", no(), t(60)).unwrap();
        assert_eq!(
            (s.kind, s.detail.as_str()),
            (EventKind::AgentSilent, "guest agent did not answer for 60 s (agent not connected)")
        );
        assert!(tr.agent("a", no(), t(90)).is_none(), "once");
        assert!(tr.agent("a", Ok(()), t(100)).is_none());
        assert!(tr.agent("a", no(), t(130)).is_none(), "answered 30 s ago");
        assert!(tr.agent("a", no(), t(160)).is_some(), "silent again for 60 s");
        // A watch that starts afresh gives an agent it never saw the whole grace.
        let mut tr = Tracker::new();
        assert!(tr.agent("b", no(), t(0)).is_none());
        assert!(tr.agent("b", no(), t(59)).is_none());
        assert!(tr.agent("b", no(), t(60)).is_some());
    }

    #[test]
    fn a_desktop_known_crashed_is_not_reported_again() {
        let mut tr = Tracker::new();
        tr.already_crashed("a");
        assert!(tr.observe("a", Event::FoundOff("crashed".into()), t(1)).is_none());
        assert!(tr.has_crashed("a"));
        tr.running("a");
        assert!(tr.observe("a", Event::Crashed("panicked".into()), t(9)).is_some(), "found running since: a new crash");
    }
}
