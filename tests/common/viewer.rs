//! A thin client for tests: remote-viewer on a `.vv` file under an Xvfb display of the
//! test's own, with a screenshot of what the user would see.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An Xvfb display of the test's own; killed on drop.
pub struct Xvfb {
    child: Child,
    pub display: String,
}

impl Xvfb {
    pub fn start() -> Xvfb {
        let mut n = 500 + std::process::id() % 400;
        loop {
            while Path::new(&format!("/tmp/.X11-unix/X{n}")).exists() || Path::new(&format!("/tmp/.X{n}-lock")).exists()
            {
                n += 1;
            }
            let display = format!(":{n}");
            let mut child = Command::new("Xvfb")
                .args([&display, "-screen", "0", "1024x768x24", "-nolisten", "tcp"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("Xvfb (scripts/setup-host installs xvfb)");
            let deadline = Instant::now() + Duration::from_secs(10);
            // Ours once its socket exists and it still runs (another X server may have won the number).
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                if Path::new(&format!("/tmp/.X11-unix/X{n}")).exists() {
                    std::thread::sleep(Duration::from_millis(200));
                    if child.try_wait().unwrap().is_none() {
                        return Xvfb { child, display };
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            assert!(Instant::now() < deadline, "Xvfb {display} did not start");
            n += 1;
        }
    }
}

impl Drop for Xvfb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running remote-viewer; killed on drop.
pub struct Viewer {
    child: Child,
    log: std::path::PathBuf,
}

impl Viewer {
    /// `remote-viewer --debug VV` on display `x`, its output in `log`.
    pub fn open(x: &Xvfb, vv: &Path, log: &Path) -> Viewer {
        let out = File::create(log).unwrap();
        let child = Command::new("remote-viewer")
            .arg("--debug")
            .arg(vv)
            .env("DISPLAY", &x.display)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("remote-viewer (scripts/setup-host installs virt-viewer)");
        Viewer { child, log: log.to_path_buf() }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait up to `secs` for the SPICE main channel to open: true when it did.
    pub fn wait_opened(&self, secs: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            let text = self.log();
            if text.contains("main channel: opened") {
                return true;
            }
            if text.contains("main channel: auth failure") {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Screenshot of the whole X display (PNG), and how many pixels below row `top` (under the
/// viewer's menus) look like the guest's VGA text console: light grey.
pub fn screenshot_text_pixels(x: &Xvfb, shot: &Path, top: u32) -> usize {
    super::sh("import", &["-display", &x.display, "-window", "root", shot.to_str().unwrap()]);
    text_pixels(shot, top)
}

/// Pixels of a PNG below row `top` that look like the guest's VGA text console: light grey.
pub fn text_pixels(shot: &Path, top: u32) -> usize {
    let mut dec = png::Decoder::new(File::open(shot).unwrap());
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let step = info.color_type.samples();
    buf[..info.buffer_size()]
        .chunks(step)
        .enumerate()
        .filter(|(i, _)| *i as u32 / info.width >= top)
        .filter(|(_, c)| {
            let (lo, hi) = (*c[..3].iter().min().unwrap(), *c[..3].iter().max().unwrap());
            lo > 100 && hi - lo < 24
        })
        .count()
}
