//! Pause points that let a test interleave two real vdim processes deterministically, and one
//! failure a test can inject into a real libvirt call.
//!
//! With `VDIM_TEST_PAUSE_BEFORE=<step>` and `VDIM_TEST_PAUSE_FILE=<path>` in its environment,
//! a command reaching `step` creates `<path>` and waits until the test removes it (at most
//! 60 s). Without those variables `pause` returns at once; vdim never sets them itself.
//! Release builds (what `scripts/demo` and a site run) ignore them: only the debug binary
//! the tests drive can be paused.

use std::path::Path;
use std::time::{Duration, Instant};

/// Steps where a command has read its facts and not yet written what it decided.
pub const POOL_SHRINK: &str = "pool-shrink";
pub const POOL_STOP: &str = "pool-stop";
pub const POOL_DELETE: &str = "pool-delete";
pub const SEAL_COPY: &str = "seal-copy";
pub const ROLLOUT_WAVE: &str = "rollout-wave";

pub fn pause(step: &str) {
    if !cfg!(debug_assertions) || std::env::var_os("VDIM_TEST_PAUSE_BEFORE").is_none_or(|s| s != step) {
        return;
    }
    let Some(file) = std::env::var_os("VDIM_TEST_PAUSE_FILE") else { return };
    let file = Path::new(&file);
    if std::fs::write(file, std::process::id().to_string()).is_err() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// With `VDIM_TEST_FAIL=<op>:<domain>` in the environment of a debug build, the libvirt call
/// `op` (e.g. `destroy`) on that domain fails as a libvirt error would: libvirt offers no way
/// to make a destroy fail on demand, and a test must show that one desktop's failure does not
/// stop the others. Release builds ignore it.
pub fn fails(op: &str, domain: &str) -> bool {
    cfg!(debug_assertions) && std::env::var("VDIM_TEST_FAIL").is_ok_and(|v| v.split_once(':') == Some((op, domain)))
}
