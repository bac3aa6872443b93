//! A real `vdim serve` for tests: on 127.0.0.1 with a port of its own, its log in the
//! test's directory, killed on drop.

use super::Env;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

pub struct Server {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    /// The line `vdim serve` prints once listening.
    pub banner: String,
    /// `http://127.0.0.1:PORT` (or https).
    pub base: String,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    log: PathBuf,
}

impl Server {
    /// `vdim --connect <connect> serve --listen 127.0.0.1:0 <extra>`, logging everything, so a
    /// test can check that no secret is ever logged.
    pub fn start(env: &Env, connect: &str, extra: &[&str]) -> Server {
        Server::start_logging(env, connect, extra, "debug")
    }

    /// The same with `VDIM_LOG=<level>` (load tests keep the log small).
    pub fn start_logging(env: &Env, connect: &str, extra: &[&str], level: &str) -> Server {
        Server::start_on(env, connect, "127.0.0.1:0", extra, level)
    }

    /// On a `listen` address the test chose: with `--public-url` the banner names the public
    /// URL (a load balancer's), not this broker's own address.
    pub fn start_on(env: &Env, connect: &str, listen: &str, extra: &[&str], level: &str) -> Server {
        Server::spawn(env, env.cmd(), connect, listen, extra, level)
    }

    /// A broker as on another machine named `host` (see [`Env::cmd_on_host`]).
    pub fn start_elsewhere(env: &Env, connect: &str, host: &str) -> Server {
        Server::spawn(env, env.cmd_on_host(host), connect, "127.0.0.1:0", &[], "debug")
    }

    fn spawn(env: &Env, mut cmd: Command, connect: &str, listen: &str, extra: &[&str], level: &str) -> Server {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = env.path(&format!("serve-{n}.log"));
        let mut child = cmd
            .env("VDIM_VIRT_TYPE", "qemu")
            .env("VDIM_LOG", level)
            .args(["--connect", connect, "serve", "--listen", listen])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start vdim serve");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        stdout.read_line(&mut banner).unwrap();
        let base = banner
            .split_whitespace()
            .find(|w| w.starts_with("http://") || w.starts_with("https://"))
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("vdim serve did not start: {banner:?}\n{}", std::fs::read_to_string(&log).unwrap_or_default())
            })
            .to_string();
        let addr = base.split("://").nth(1).unwrap().to_string();
        Server { child, _stdout: stdout, banner, base, addr, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, as an init system stops it, and waits for its exit.
    pub fn stop(mut self) {
        // SAFETY: a signal to our own child, which we have not yet waited for.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }

    /// SIGKILL, as a crash would.
    pub fn crash(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
