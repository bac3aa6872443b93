//! Printing a command's report: pretty JSON with `--json`, else the command's own text.

use anyhow::Result;
use serde::Serialize;

pub fn print<T: Serialize>(json: bool, value: &T, text: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        let t = text(value);
        if !t.is_empty() {
            println!("{t}");
        }
    }
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `label (n): a, b, c` for a list of desktops, or nothing when it is empty.
pub fn desktops_line(label: &str, desktops: &[String]) -> String {
    if desktops.is_empty() {
        return String::new();
    }
    format!("\n  {label} ({}): {}", desktops.len(), desktops.join(", "))
}

/// One line per desktop an operation could not finish.
pub fn failures_text(failed: &[crate::fleet::Failure]) -> String {
    failed.iter().map(|f| format!("\n  FAILED {}: {}", f.desktop, f.error)).collect()
}

/// After a report was printed: the command fails when any desktop did (exit code from the
/// first failure's kind), naming each one.
pub fn fail_on(failed: &[crate::fleet::Failure]) -> Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    Err(crate::pool::PoolError::Desktops { failed: failed.to_vec() }.into())
}

/// A progress line on a terminal: `reset 7/20 desktops`, rewritten in place on stderr.
pub struct TtyProgress;

impl TtyProgress {
    /// Progress for a command: on stderr when it is a terminal and the output is not JSON.
    pub fn for_command(json: bool) -> std::sync::Arc<dyn crate::fleet::Progress + Send> {
        use std::io::IsTerminal;
        if !json && std::io::stderr().is_terminal() {
            std::sync::Arc::new(TtyProgress)
        } else {
            std::sync::Arc::new(crate::fleet::Quiet)
        }
    }
}

impl crate::fleet::Progress for TtyProgress {
    fn step(&self, what: &str, done: usize, total: usize) {
        use std::io::Write;
        let end = if done == total { "\n" } else { "" };
        let mut e = std::io::stderr().lock();
        let _ = write!(e, "\r\x1b[2K  {what} {done}/{total} desktops{end}");
        let _ = e.flush();
    }
}
