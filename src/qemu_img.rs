//! The few qemu-img calls vdim makes, behind one seam, always bounded.
//!
//! qemu-img parses untrusted images, so every call states the format (`-f`/`-F`, never a
//! probe), runs under an address-space and CPU-time limit and a wall-clock timeout
//! (OpenStack CVE-2015-5162: a crafted image made qemu-img eat all memory). An import's
//! convert also runs under RLIMIT_FSIZE at the size `measure` predicted, so an expansion
//! bomb cannot write past what was checked to fit.

use indicatif::ProgressBar;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum QemuImgError {
    #[error("cannot run qemu-img (is qemu-utils installed? scripts/setup-host installs it)")]
    Spawn(#[source] std::io::Error),
    #[error("qemu-img {op} of {path} failed: {stderr}")]
    Failed { op: &'static str, path: String, stderr: String },
    #[error("qemu-img {op} of {path} took longer than {secs} s and was stopped")]
    Timeout { op: &'static str, path: String, secs: u64 },
    #[error("qemu-img {op} of {path} gave output vdim cannot read: {why}")]
    Output { op: &'static str, path: String, why: String },
}

impl crate::error::Kind for QemuImgError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        // Untrusted input is refused by imgfmt before qemu-img runs; what fails here is the tool.
        match self {
            QemuImgError::Spawn(_)
            | QemuImgError::Failed { .. }
            | QemuImgError::Timeout { .. }
            | QemuImgError::Output { .. } => K::Internal,
        }
    }
}

/// Resource bounds for one qemu-img run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub address_space: u64,
    pub cpu_seconds: u64,
    pub timeout: Duration,
    /// RLIMIT_FSIZE: the largest file qemu-img may write (none: unlimited).
    pub output_bytes: Option<u64>,
}

/// For header-only work (info, check of a layer, rebase -u). The address space bounds what a
/// hostile header can make qemu-img allocate (QEMU caps its own tables well below it), with
/// room for its I/O thread pool on a busy host: up to 64 workers of 8 MiB stack each.
pub const INSPECT: Limits =
    Limits { address_space: 2 << 30, cpu_seconds: 60, timeout: Duration::from_secs(120), output_bytes: None };
/// For copying data (convert): large images take long, but never forever.
pub const COPY: Limits = Limits {
    address_space: 4 << 30,
    cpu_seconds: 4 * 3600,
    timeout: Duration::from_secs(6 * 3600),
    output_bytes: None,
};

struct Run {
    stdout: String,
    stderr: String,
    status: std::process::ExitStatus,
}

/// `VDIM_QEMU_IMG_TIMEOUT` (seconds) caps every call's wall-clock time below its default.
fn effective(limits: Limits) -> Limits {
    match std::env::var("VDIM_QEMU_IMG_TIMEOUT").ok().and_then(|v| v.parse::<u64>().ok()) {
        Some(secs) if secs > 0 => Limits { timeout: limits.timeout.min(Duration::from_secs(secs)), ..limits },
        _ => limits,
    }
}

fn run(
    op: &'static str,
    path: &Path,
    args: &[&std::ffi::OsStr],
    limits: Limits,
    progress: Option<&ProgressBar>,
) -> Result<Run, QemuImgError> {
    let limits = effective(limits);
    let mut cmd = Command::new("qemu-img");
    // Its own process group: a timeout kills everything it started, not just the first pid.
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    // glibc reserves 64 MiB of address space per malloc arena, up to 8 per core: under
    // RLIMIT_AS a check whose thread pool grows on a busy host failed to start threads
    // (qemu_thread_create: EAGAIN). Two arenas are plenty for qemu-img.
    cmd.env("MALLOC_ARENA_MAX", "2");
    let Limits { address_space, cpu_seconds, output_bytes, .. } = limits;
    // SAFETY: only async-signal-safe calls (setrlimit, prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // A killed vdim takes its qemu-img along instead of leaving it writing.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            let set = |res, v: u64| {
                let lim = libc::rlimit { rlim_cur: v, rlim_max: v };
                if libc::setrlimit(res, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            set(libc::RLIMIT_AS, address_space)?;
            set(libc::RLIMIT_CPU, cpu_seconds)?;
            set(libc::RLIMIT_CORE, 0)?;
            if let Some(max) = output_bytes {
                set(libc::RLIMIT_FSIZE, max)?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(QemuImgError::Spawn)?;
    let mut out = child.stdout.take().expect("stdout piped");
    let mut err = child.stderr.take().expect("stderr piped");
    let pb = progress.cloned();
    let out_thread = std::thread::spawn(move || {
        // qemu-img -p writes "    (12.34/100%)\r": keep the bar moving, keep the rest.
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if let Some(pb) = &pb {
                if let Some(pct) = last_percent(&all) {
                    pb.set_position(pct as u64);
                }
            }
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limits.timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() >= deadline => {
                // SAFETY: kill(2) on the child's own process group; no memory is involved.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.kill();
                let _ = child.wait();
                return Err(QemuImgError::Timeout {
                    op,
                    path: path.display().to_string(),
                    secs: limits.timeout.as_secs(),
                });
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(QemuImgError::Spawn(e)),
        }
    };
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    Ok(Run { stdout, stderr, status })
}

fn last_percent(out: &[u8]) -> Option<f64> {
    let s = String::from_utf8_lossy(out);
    let seg = s.rsplit('(').next()?;
    seg.split('/').next()?.trim().parse().ok()
}

fn failed(op: &'static str, path: &Path, r: &Run) -> QemuImgError {
    let mut stderr = r.stderr.trim().to_string();
    if stderr.is_empty() {
        stderr = match r.status.signal_name() {
            Some("SIGXFSZ") => {
                "killed by SIGXFSZ (vdim capped its output at the size qemu-img measure predicted)".to_string()
            }
            Some(sig) => format!("killed by {sig} (resource limit reached?)"),
            None => format!("exit status {}", r.status),
        };
    }
    // RLIMIT_FSIZE: qemu-img ignores SIGXFSZ and reports EFBIG.
    if stderr.contains("File too large") {
        stderr.push_str(" (vdim capped its output at the size qemu-img measure predicted)");
    }
    QemuImgError::Failed { op, path: path.display().to_string(), stderr }
}

trait SignalName {
    fn signal_name(&self) -> Option<&'static str>;
}
impl SignalName for std::process::ExitStatus {
    fn signal_name(&self) -> Option<&'static str> {
        use std::os::unix::process::ExitStatusExt;
        match self.signal()? {
            libc::SIGKILL => Some("SIGKILL"),
            libc::SIGXCPU => Some("SIGXCPU"),
            libc::SIGSEGV => Some("SIGSEGV"),
            libc::SIGXFSZ => Some("SIGXFSZ"),
            libc::SIGABRT => Some("SIGABRT"),
            _ => Some("a signal"),
        }
    }
}

/// `qemu-img info --output=json` of one image, without opening its backing chain.
pub fn info(path: &Path, format: &str) -> Result<serde_json::Value, QemuImgError> {
    let args: Vec<&std::ffi::OsStr> = vec![
        "info".as_ref(),
        "-U".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        path.as_os_str(),
    ];
    let r = run("info", path, &args, INSPECT, None)?;
    if !r.status.success() {
        return Err(failed("info", path, &r));
    }
    serde_json::from_str(&r.stdout).map_err(|e| QemuImgError::Output {
        op: "info",
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// Bytes a standalone qcow2 converted from `path` needs (`qemu-img measure`, "required").
pub fn measure_qcow2(path: &Path, format: &str) -> Result<u64, QemuImgError> {
    let args: Vec<&std::ffi::OsStr> = vec![
        "measure".as_ref(),
        "--output=json".as_ref(),
        "-f".as_ref(),
        format.as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        "-o".as_ref(),
        "compat=1.1".as_ref(),
        path.as_os_str(),
    ];
    let r = run("measure", path, &args, INSPECT, None)?;
    if !r.status.success() {
        return Err(failed("measure", path, &r));
    }
    let output = |why: String| QemuImgError::Output { op: "measure", path: path.display().to_string(), why };
    let v: serde_json::Value = serde_json::from_str(&r.stdout).map_err(|e| output(e.to_string()))?;
    v.get("required").and_then(serde_json::Value::as_u64).ok_or_else(|| output("no \"required\" size".into()))
}

/// Convert `src` (format stated) into a standalone qcow2 at `dst` (must not exist), writing
/// at most `max_output` bytes when given.
pub fn convert_to_qcow2(
    src: &Path,
    src_format: &str,
    dst: &Path,
    max_output: Option<u64>,
    progress: Option<&ProgressBar>,
) -> Result<(), QemuImgError> {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "convert".as_ref(),
        "-U".as_ref(),
        "-f".as_ref(),
        src_format.as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        "-o".as_ref(),
        "compat=1.1".as_ref(),
    ];
    if progress.is_some() {
        args.push("-p".as_ref());
    }
    args.push(src.as_os_str());
    args.push(dst.as_os_str());
    let r = run("convert", src, &args, Limits { output_bytes: max_output, ..COPY }, progress)?;
    if !r.status.success() {
        return Err(failed("convert", src, &r));
    }
    Ok(())
}

/// `qemu-img check` of a qcow2 (and, through it, that its backing chain opens).
/// Returns the problems qemu-img reports; empty when the image is clean.
pub fn check(path: &Path) -> Result<Vec<String>, QemuImgError> {
    let args: Vec<&std::ffi::OsStr> =
        vec!["check".as_ref(), "-U".as_ref(), "-f".as_ref(), "qcow2".as_ref(), path.as_os_str()];
    let r = run("check", path, &args, INSPECT, None)?;
    if r.status.success() {
        return Ok(vec![]);
    }
    let mut lines: Vec<String> = r
        .stderr
        .lines()
        .chain(r.stdout.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("No errors"))
        .map(String::from)
        .collect();
    if lines.is_empty() {
        lines.push(format!("qemu-img check exited with {}", r.status));
    }
    lines.truncate(5);
    Ok(lines)
}
