//! The config drive file, built by xorriso (Debian's `xorriso`, in its mkisofs mode) from a
//! private staging directory: ISO 9660 + Joliet + Rock Ridge, volume label `config-2`.
//!
//! The drive holds the join secret, so: staged in a fresh 0700 directory removed right after,
//! written by xorriso under umask 077 to a temporary name beside its place, then renamed over
//! the old drive (a new file, never an old one rewritten: a running desktop keeps reading the
//! drive it booted with).

use super::{IdentityError, Result};
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The label cloudbase-init (and cloud-init) look for.
pub const LABEL: &str = "config-2";
/// A drive of a few kilobytes takes xorriso well under a second.
const TIMEOUT: Duration = Duration::from_secs(60);

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> IdentityError + 'a {
    move |source| IdentityError::Io { what, path: path.display().to_string(), source }
}

/// Builds the drive at `out` (mode 0600) holding `files` (paths relative to its root).
pub fn build(desktop: &str, out: &Path, files: &[(&str, Vec<u8>)]) -> Result<()> {
    let dir = out.parent().expect("the drive has a directory");
    // Staged beside the drive, in the desktop's private run directory, never in a shared /tmp:
    // the answer file may hold the join secret. Named for the desktop, so a crash's leftover
    // goes with its other files.
    let name = out.file_name().expect("the drive has a file name").to_string_lossy();
    let staging = tempfile::Builder::new()
        .prefix(&format!("{name}.staging-"))
        .tempdir_in(dir)
        .map_err(io("create a staging directory in", dir))?;
    let root = staging.path().join("root");
    std::fs::create_dir(&root).map_err(io("create", &root))?;
    for (rel, data) in files {
        let p = root.join(rel);
        let dir = p.parent().expect("a file has a directory");
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .and_then(|mut f| std::io::Write::write_all(&mut f, data))
            .map_err(io("write", &p))?;
    }
    let tmp = dir.join(format!("{name}.tmp-{}", std::process::id()));
    let made = run_xorriso(desktop, &root, &tmp).and_then(|()| {
        // Checked, not assumed: a drive others could read would leak the join secret.
        let mode = std::fs::metadata(&tmp).map_err(io("inspect", &tmp))?.permissions().mode() & 0o777;
        if mode != 0o600 {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io("chmod", &tmp))?;
        }
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io("sync", &tmp))?;
        std::fs::rename(&tmp, out).map_err(io("replace", out))
    });
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made
}

fn run_xorriso(desktop: &str, root: &Path, out: &Path) -> Result<()> {
    let mut cmd = Command::new("xorriso");
    cmd.args(["-as", "mkisofs", "-quiet", "-V", LABEL, "-J", "-r", "-o"])
        .arg(out)
        .arg(root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: only async-signal-safe calls (umask, prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o077);
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| IdentityError::ToolMissing { desktop: desktop.into(), source })?;
    let mut err = child.stderr.take().expect("stderr piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if Instant::now() >= deadline => {
                // SAFETY: kill has no memory preconditions; the group is xorriso's own.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                break Err(format!("it took longer than {} s and was stopped", TIMEOUT.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(e.to_string()),
        }
    };
    let stderr = reader.join().unwrap_or_default();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(IdentityError::Tool { desktop: desktop.into(), stderr: format!("{s}: {}", stderr.trim()) }),
        Err(why) => Err(IdentityError::Tool { desktop: desktop.into(), stderr: why }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn extract(iso: &Path, path: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("f");
        let out = Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(iso)
            .args(["-extract", path])
            .arg(&to)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read_to_string(to).unwrap()
    }

    /// The volume descriptors from sector 16 on: (type, identifier, Joliet escape sequence).
    fn descriptors(iso: &[u8]) -> Vec<(u8, String, Vec<u8>)> {
        iso.chunks(2048)
            .skip(16)
            .take_while(|s| s[0] != 255)
            .map(|s| (s[0], String::from_utf8_lossy(&s[40..72]).trim_end().to_string(), s[88..91].to_vec()))
            .collect()
    }

    #[test]
    fn a_drive_is_a_private_config_2_iso_with_joliet_and_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("vdim-p-001.config.iso");
        let files = [
            ("openstack/latest/meta_data.json", b"{\"hostname\": \"P-001\"}".to_vec()),
            ("unattend.xml", b"<unattend/>".to_vec()),
        ];
        build("vdim-p-001", &out, &files).unwrap();
        let meta = std::fs::metadata(&out).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let d = descriptors(&std::fs::read(&out).unwrap());
        assert_eq!((d[0].0, d[0].1.as_str()), (1, LABEL), "primary volume descriptor labelled config-2");
        assert!(d.iter().any(|(t, _, esc)| *t == 2 && esc.starts_with(b"%/")), "a Joliet descriptor: {d:?}");
        assert_eq!(extract(&out, "/openstack/latest/meta_data.json"), "{\"hostname\": \"P-001\"}");
        assert_eq!(extract(&out, "/unattend.xml"), "<unattend/>");
        // Rebuilt: a new file in its place, and no staging or temporary file left anywhere.
        build("vdim-p-001", &out, &files).unwrap();
        assert_ne!(std::fs::metadata(&out).unwrap().ino(), meta.ino());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from("vdim-p-001.config.iso")]);
    }
}
