//! Acting on many desktops at once: a bounded set of worker threads runs one step per
//! desktop, each desktop's outcome is kept apart (one failure never stops the others), and
//! progress is reported as desktops finish.
//!
//! The bound is the hypervisor's ([`crate::hypervisor::Hypervisor::parallel`]): how many calls
//! one libvirt host serves for vdim at once. QEMU's exit after a destroy and a guest's start
//! take seconds each under load; one after another they made a fleet's rollback take minutes.

use crate::error::{ErrorKind, Kind};
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Desktops finished so far in a long operation, for a progress line.
pub trait Progress: Sync {
    /// `done` of `total` desktops finished `what` (e.g. "started", "reset").
    fn step(&self, what: &str, done: usize, total: usize);
}

/// No progress shown: the default outside a terminal, and in tests.
pub struct Quiet;

impl Progress for Quiet {
    fn step(&self, _: &str, _: usize, _: usize) {}
}

/// One desktop an operation could not finish, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    pub desktop: String,
    /// The error's message, naming the desktop and what failed.
    pub error: String,
    /// What kind of failure, for exit codes and HTTP statuses.
    #[serde(skip)]
    pub kind: ErrorKind,
}

impl Failure {
    pub fn new<E: Kind + std::error::Error + 'static>(desktop: &str, e: &E) -> Failure {
        Failure { desktop: desktop.to_string(), error: crate::error::message(e), kind: e.kind() }
    }
}

/// Runs `step` for every item on at most `parallel` threads, returning the outcomes in the
/// items' order. Progress is reported under `what` as each item finishes.
pub fn run<T, R, F>(parallel: usize, items: &[T], what: &str, progress: &dyn Progress, step: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync,
{
    let total = items.len();
    let workers = parallel.max(1).min(total);
    if workers <= 1 {
        return items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let r = step(item);
                progress.step(what, i + 1, total);
                r
            })
            .collect();
    }
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..total).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { break };
                let r = step(item);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
                progress.step(what, done.fetch_add(1, Ordering::Relaxed) + 1, total);
            });
        }
    });
    results.into_inner().unwrap_or_else(|e| e.into_inner()).into_iter().map(|r| r.expect("every item ran")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Count(AtomicUsize, Mutex<Vec<(usize, usize)>>);
    impl Progress for Count {
        fn step(&self, _: &str, done: usize, total: usize) {
            self.0.fetch_add(1, Ordering::Relaxed);
            self.1.lock().unwrap().push((done, total));
        }
    }

    #[test]
    fn items_run_at_once_up_to_the_bound_and_results_keep_their_order() {
        let items: Vec<u32> = (0..12).collect();
        let running = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let out = run(4, &items, "x", &Quiet, |i| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
            running.fetch_sub(1, Ordering::SeqCst);
            i * 2
        });
        assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        assert_eq!(peak.load(Ordering::SeqCst), 4, "never more than the bound, and the bound reached");
    }

    #[test]
    fn a_bound_of_one_runs_in_order_on_the_caller_thread() {
        let me = std::thread::current().id();
        let seen = Mutex::new(vec![]);
        run(1, &[1, 2, 3], "x", &Quiet, |i| {
            assert_eq!(std::thread::current().id(), me);
            seen.lock().unwrap().push(*i);
        });
        assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn progress_counts_every_item_up_to_the_total() {
        let p = Count(AtomicUsize::new(0), Mutex::new(vec![]));
        run(3, &[0u8; 7], "x", &p, |_| ());
        assert_eq!(p.0.load(Ordering::SeqCst), 7);
        let mut steps = p.1.lock().unwrap().clone();
        steps.sort();
        assert_eq!(steps, (1..=7).map(|d| (d, 7)).collect::<Vec<_>>());
    }
}
