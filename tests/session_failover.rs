//! Sessions outlive the broker that opened them: a SPICE viewer stays on its desktop when the
//! broker dies, and an HTML5 console reconnects through another broker behind the same name.
//! Real `vdim serve` processes on one home, real libvirt (qemu:///system, TCG test guest),
//! remote-viewer under Xvfb, headless Chromium with noVNC, and a TCP forwarder in the test as
//! the site's load balancer.

mod common;
use common::serve::Server;
use common::viewer::{screenshot_text_pixels, text_pixels, Xvfb};
use common::*;
use serde_json::Value;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---- harness -------------------------------------------------------------------------------

/// HTTP through reqwest on a runtime of the test's own.
struct Http {
    rt: tokio::runtime::Runtime,
    c: reqwest::Client,
    base: String,
}

impl Http {
    fn new(base: &str) -> Http {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let c = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
        Http { rt, c, base: base.to_string() }
    }

    fn call(&self, method: &str, path: &str, token: &str) -> (u16, String) {
        let r = self.c.request(method.parse().unwrap(), format!("{}{path}", self.base)).bearer_auth(token);
        self.rt.block_on(async {
            let resp = r.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            (resp.status().as_u16(), resp.text().await.unwrap())
        })
    }

    fn json(&self, method: &str, path: &str, token: &str) -> (u16, Value) {
        let (s, text) = self.call(method, path, token);
        (s, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

/// The site's load balancer: one public address, each new connection forwarded to the
/// broker it points at now; a connection whose broker goes away is closed (as a proxy does).
struct Forwarder {
    addr: String,
    target: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
}

impl Forwarder {
    fn start() -> Forwarder {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let (target, stop) = (Arc::new(Mutex::new(String::new())), Arc::new(AtomicBool::new(false)));
        let (t, s) = (target.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in l.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let to = t.lock().unwrap().clone();
                // A broker that does not answer: the client's connection is closed at once.
                let Ok(upstream) = TcpStream::connect(&to) else { continue };
                pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
                pipe(upstream, client);
            }
        });
        Forwarder { addr, target, stop }
    }

    fn point_to(&self, broker: &str) {
        *self.target.lock().unwrap() = broker.to_string();
    }
}

/// Copies `from` to `to` on a thread; when `from` ends, both sockets close.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

/// A loopback address with a port nobody listens on now.
fn free_address() -> String {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

fn broker(env: &Env, listen: &str, public: &str) -> Server {
    Server::start_on(env, "qemu:///system", listen, &["--public-url", public], "debug")
}

/// A started pool of one test-guest desktop entitled to alice; alice's token.
fn pool_of_one(t: &LibvirtEnv, label: &str) -> (String, String) {
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", label);
    t.create_pool(&pool, "img", "dev", 1, "test-linux", &["--start"]);
    let alice = t.env.vdim_json(&["user", "add", "alice"])["token"].as_str().unwrap().to_string();
    t.vdim(&["pool", "entitle", &pool, "alice"]).assert_success();
    (pool, alice)
}

fn inode(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap())
}

/// Established TCP connections to a local port (a SPICE viewer opens several channels).
fn connections_to(port: &str) -> usize {
    let out = sh("ss", &["-Htn", "state", "established", &format!("( dport = :{port} )")]);
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count()
}

/// remote-viewer on a `.vv` file, left running once its SPICE main channel opened.
fn viewer(x: &Xvfb, vv_text: &str, env: &Env, name: &str) -> (Child, std::path::PathBuf) {
    let vv = env.path(&format!("{name}.vv"));
    std::fs::write(&vv, vv_text).unwrap();
    let log = env.path(&format!("{name}.log"));
    let out = File::create(&log).unwrap();
    let mut child = Command::new("remote-viewer")
        .arg("--debug")
        .arg(&vv)
        .env("DISPLAY", &x.display)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("remote-viewer (scripts/setup-host installs virt-viewer)");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap().contains("main channel: opened") {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("remote-viewer did not connect:\n{}", std::fs::read_to_string(&log).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, log)
}

fn vv_port(vv: &str) -> String {
    vv.lines().find_map(|l| l.strip_prefix("port=")).expect("a plain SPICE port in the .vv").to_string()
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

// ---- SPICE ----------------------------------------------------------------------------------

#[test]
fn a_spice_viewer_stays_on_its_desktop_when_the_broker_dies_and_another_broker_reconnects_and_logs_it_off() {
    let t = LibvirtEnv::new("sfsp");
    let (pool, alice) = pool_of_one(&t, "sf-spice");
    let a = Server::start(&t.env, "qemu:///system", &[]);
    let http = Http::new(&a.base);
    let (s, opened) = http.json("POST", &format!("/api/v1/pools/{pool}/sessions"), &alice);
    assert_eq!(s, 201, "{opened}");
    let (id, desktop) = (opened["id"].as_str().unwrap().to_string(), opened["desktop"].as_str().unwrap().to_string());
    let overlay = t.env.home().join("desktops").join(&pool).join(format!("{desktop}.qcow2"));
    let first_overlay = inode(&overlay);
    t.wait_marker(&pool, &desktop, "sf-spice", 120);
    let (s, vv) = http.call("GET", &format!("/api/v1/sessions/{id}/console.vv"), &alice);
    assert_eq!(s, 200, "{vv}");
    let port = vv_port(&vv);
    let x = Xvfb::start();
    let (mut first, first_log) = viewer(&x, &vv, &t.env, "rv-a");
    // The other channels open after the main one.
    std::thread::sleep(Duration::from_secs(3));
    let channels = connections_to(&port);
    assert!(channels > 1, "the viewer's channels are connected");

    // The broker that opened the session dies; the viewer talks to the desktop, not to it.
    drop(http);
    a.crash();
    let crashed = Instant::now();
    while crashed.elapsed() < Duration::from_secs(10) {
        assert!(first.try_wait().unwrap().is_none(), "remote-viewer is still running");
        assert_eq!(connections_to(&port), channels, "every SPICE channel stays connected");
        std::thread::sleep(Duration::from_millis(500));
    }
    let shot = t.env.path("after-crash.png");
    let text = screenshot_text_pixels(&x, &shot, 60);
    assert!(text > 500, "the viewer still shows the guest's console ({text} text pixels)");
    let log = std::fs::read_to_string(&first_log).unwrap();
    assert!(!log.contains("main channel: closed") && !log.contains("disconnected"), "{log}");

    // Another broker on the same home: the user's session is there, reconnected.
    let b = Server::start(&t.env, "qemu:///system", &[]);
    let http = Http::new(&b.base);
    let (s, again) = http.json("POST", &format!("/api/v1/pools/{pool}/sessions"), &alice);
    assert_eq!((s, &again["id"], &again["desktop"]), (200, &opened["id"], &opened["desktop"]), "{again}");
    assert_eq!(again["reconnected"], true, "{again}");
    let (s, vv) = http.call("GET", &format!("/api/v1/sessions/{id}/console.vv"), &alice);
    assert_eq!(s, 200, "{vv}");
    // The new ticket takes the display over from the old viewer (as with one broker).
    let deadline = Instant::now() + Duration::from_secs(3);
    while connections_to(&port) > 0 {
        assert!(Instant::now() < deadline, "the first viewer was not dropped by the new ticket");
        std::thread::sleep(Duration::from_millis(100));
    }
    kill(first);
    let (second, _) = viewer(&x, &vv, &t.env, "rv-b");
    let text = screenshot_text_pixels(&x, &shot, 60);
    assert!(text > 500, "the viewer opened through the second broker shows the guest ({text} text pixels)");

    // Logoff through the second broker: the viewer is dropped and the desktop reset as usual.
    let (s, closed) = http.json("DELETE", &format!("/api/v1/sessions/{id}"), &alice);
    assert_eq!((s, closed["reset"].as_str()), (200, Some("done")), "{closed}");
    let deadline = Instant::now() + Duration::from_secs(3);
    while connections_to(&port) > 0 {
        assert!(Instant::now() < deadline, "the viewer is still connected after the logoff");
        std::thread::sleep(Duration::from_millis(100));
    }
    kill(second);
    assert_ne!(inode(&overlay), first_overlay, "a fresh overlay");
    t.wait_marker(&pool, &desktop, "sf-spice", 120);
    let (s, _) = http.json("GET", &format!("/api/v1/sessions/{id}"), &alice);
    assert_eq!(s, 404, "the session is over");
    let show = t.vdim_json(&["pool", "show", &pool]);
    assert_eq!(
        (&show["desktops"][0]["assigned_to"], &show["desktops"][0]["needs_reset"]),
        (&Value::Null, &Value::Bool(false))
    );
}

// ---- HTML5 console --------------------------------------------------------------------------

/// tests/console_reconnect.cjs under node: lines to it, JSON lines from it; killed on drop.
struct Browser {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

impl Browser {
    fn open(dir: &str, url: &str, before: &Path, after: &Path) -> Browser {
        let mut child = Command::new("node")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console_reconnect.cjs"))
            .args([url, before.to_str().unwrap(), after.to_str().unwrap()])
            .env("VDIM_CONSOLE_DIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("node");
        let (to, from) = (child.stdin.take().unwrap(), BufReader::new(child.stdout.take().unwrap()));
        Browser { child, to, from }
    }

    /// The next report, which must be of `phase`.
    #[track_caller]
    fn report(&mut self, phase: &str) -> Value {
        let mut line = String::new();
        self.from.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("console_reconnect.cjs: {e}: {line:?}"));
        assert_eq!(v["phase"], phase, "{v}");
        v
    }

    fn tell(&mut self, what: &str) {
        writeln!(self.to, "{what}").unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebSocket upgrade of a console at `addr`: the status only (101 means admitted).
fn ws_status(addr: &str, origin: &str, session: &str, console_token: &str) -> u16 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET /console/{session}/ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {origin}\r\n\
         Sec-WebSocket-Protocol: binary, vdim-console-token.{console_token}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    String::from_utf8_lossy(&head[9..12]).parse().unwrap()
}

fn states(v: &Value) -> Vec<String> {
    v["states"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

#[test]
fn an_html5_console_reconnects_through_another_broker_behind_the_same_name_and_an_ended_sessions_token_is_refused() {
    let dir = std::env::var("VDIM_CONSOLE_DIR").unwrap_or_else(|_| "/var/cache/vdim/console".into());
    assert!(
        Path::new(&dir).join("node_modules/@novnc/novnc/core/rfb.js").is_file()
            && Path::new(&dir).join("node_modules/playwright-core").is_dir(),
        "noVNC and playwright-core are missing in {dir}: run scripts/setup-console"
    );
    let t = LibvirtEnv::new("sfhc");
    let (pool, alice) = pool_of_one(&t, "sf-html5");
    let lb = Forwarder::start();
    let public = format!("http://{}", lb.addr);
    let (a_addr, b_addr) = (free_address(), free_address());
    let a = broker(&t.env, &a_addr, &public);
    lb.point_to(&a_addr);
    let http = Http::new(&public);
    let (s, opened) = http.json("POST", &format!("/api/v1/pools/{pool}/sessions"), &alice);
    assert_eq!(s, 201, "{opened}");
    let (id, desktop) = (opened["id"].as_str().unwrap(), opened["desktop"].as_str().unwrap());
    let console_url = opened["console_url"].as_str().unwrap();
    assert!(console_url.starts_with(&format!("{public}/console/")), "the public name: {console_url}");
    let console_token = console_url.split("#token=").nth(1).unwrap();
    let overlay = t.env.home().join("desktops").join(&pool).join(format!("{desktop}.qcow2"));
    let first_overlay = inode(&overlay);
    t.wait_marker(&pool, desktop, "sf-html5", 120);

    let (before, after) = (t.env.path("console-a.png"), t.env.path("console-b.png"));
    let mut page = Browser::open(&dir, console_url, &before, &after);
    let r = page.report("connected");
    assert_eq!((r["width"].as_u64(), r["height"].as_u64()), (Some(720), Some(400)), "the guest's text mode: {r}");
    let text = text_pixels(&before, 40);
    assert!(text > 1500, "the console shows the guest ({text} text pixels)");

    // Broker A dies with the console open; the load balancer sends new connections to B.
    let b = broker(&t.env, &b_addr, &public);
    a.crash();
    lb.point_to(&b_addr);
    page.tell("crashed");
    let r = page.report("reconnected");
    let seen = states(&r);
    assert!(r["error"].is_null(), "the page did not reconnect: {r}\nB's log:\n{}", b.log());
    assert_eq!(r["state"], "connected", "{r}");
    assert!(seen.iter().any(|s| s.starts_with("reconnecting: ")), "the page said it was reconnecting: {seen:?}");
    assert_eq!(
        (r["canvases"].as_u64(), r["width"].as_u64(), r["height"].as_u64()),
        (Some(1), Some(720), Some(400)),
        "{r}"
    );
    let text = text_pixels(&after, 40);
    assert!(text > 1500, "frames again, drawn by the new connection ({text} text pixels)");
    eprintln!("console reconnected through B after {} ms: {seen:?}", r["reconnectMs"]);
    assert!(b.log().contains(&format!("/console/{id}/ws")), "the console went through B");

    // Logged off (through B): the console closes for good, and B refuses the ended session's token.
    let (s, closed) = http.json("DELETE", &format!("/api/v1/sessions/{id}"), &alice);
    assert_eq!((s, closed["reset"].as_str()), (200, Some("done")), "{closed}");
    page.tell("ended");
    let r = page.report("ended");
    assert_eq!(r["state"], "disconnected", "{r}");
    let seen = states(&r);
    let last_connected = seen.iter().rposition(|s| s.starts_with("connected")).unwrap();
    assert!(
        !seen[last_connected..].iter().any(|s| s.starts_with("reconnecting")),
        "an ended session is not reconnected: {seen:?}"
    );
    assert_eq!(ws_status(&lb.addr, &public, id, console_token), 401, "an ended session's token, through the name");
    assert_eq!(ws_status(&b_addr, &public, id, console_token), 401, "an ended session's token, at B");
    assert_ne!(inode(&overlay), first_overlay, "the desktop was reset");
    t.wait_marker(&pool, desktop, "sf-html5", 120);
    let log = b.log();
    assert!(!log.contains(console_token) && !log.contains(&alice), "no secret in B's log");
}

/// A console WebSocket opened by hand, up to the proxy's RFB greeting (sent once it is logged
/// in to the display).
struct RawConsole(TcpStream);

impl RawConsole {
    fn open(addr: &str, origin: &str, session: &str, console_token: &str) -> RawConsole {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "GET /console/{session}/ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {origin}\r\n\
             Sec-WebSocket-Protocol: binary, vdim-console-token.{console_token}\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut b).unwrap(), 1, "the upgrade was closed: {}", String::from_utf8_lossy(&head));
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        let mut c = RawConsole(s);
        assert_eq!(c.frame(), Some((2, b"RFB 003.008\n".to_vec())), "the proxy's greeting");
        c
    }

    /// The next frame (opcode, payload); `None` once the connection closed.
    fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        self.0.read_exact(&mut h).ok()?;
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                self.0.read_exact(&mut l).ok()?;
                usize::from(u16::from_be_bytes(l))
            }
            127 => panic!("no frame this large in a handshake"),
            n => usize::from(n),
        };
        let mut payload = vec![0u8; len];
        self.0.read_exact(&mut payload).ok()?;
        Some((h[0] & 0x0f, payload))
    }

    /// The reason of the close frame the broker sends within `limit`.
    #[track_caller]
    fn closed_within(&mut self, limit: Duration) -> String {
        self.0.set_read_timeout(Some(limit)).unwrap();
        match self.frame() {
            Some((8, why)) => String::from_utf8_lossy(why.get(2..).unwrap_or_default()).into_owned(),
            other => panic!("no close frame within {limit:?}: {other:?}"),
        }
    }

    /// Still open: nothing arrives within `wait` (the display sends nothing before the
    /// browser's handshake).
    #[track_caller]
    fn still_open(&mut self, wait: Duration) {
        self.0.set_read_timeout(Some(wait)).unwrap();
        let mut b = [0u8; 1];
        match self.0.peek(&mut b) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            other => panic!("the console was closed: {other:?}"),
        }
    }
}

#[test]
fn a_console_opened_through_another_broker_takes_over_from_the_older_one() {
    let t = LibvirtEnv::new("sfto");
    let (pool, alice) = pool_of_one(&t, "sf-takeover");
    let public = "http://vdim.example";
    let (a_addr, b_addr) = (free_address(), free_address());
    let (a, b) = (broker(&t.env, &a_addr, public), broker(&t.env, &b_addr, public));
    let http = Http::new(&format!("http://{a_addr}"));
    let (s, opened) = http.json("POST", &format!("/api/v1/pools/{pool}/sessions"), &alice);
    assert_eq!(s, 201, "{opened}");
    let id = opened["id"].as_str().unwrap();
    let token = opened["console_url"].as_str().unwrap().split("#token=").nth(1).unwrap();
    t.wait_marker(&pool, opened["desktop"].as_str().unwrap(), "sf-takeover", 120);

    let mut on_a = RawConsole::open(&a_addr, public, id, token);
    let mut on_b = RawConsole::open(&b_addr, public, id, token);
    assert_eq!(on_a.closed_within(Duration::from_secs(3)), "another console took over", "A's console, by B's");
    on_b.still_open(Duration::from_secs(2));
    let mut again_on_a = RawConsole::open(&a_addr, public, id, token);
    assert_eq!(on_b.closed_within(Duration::from_secs(3)), "another console took over", "B's console, by A's");
    again_on_a.still_open(Duration::from_secs(2));

    // Logoff through B closes the console on A.
    let (s, closed) = Http::new(&format!("http://{b_addr}")).json("DELETE", &format!("/api/v1/sessions/{id}"), &alice);
    assert_eq!(s, 200, "{closed}");
    assert_eq!(again_on_a.closed_within(Duration::from_secs(3)), "the session ended");
    drop((a, b));
}

/// How a console opened by hand at `addr` begins: "greeting" once the proxy logged in to the
/// display, or the reason of the close frame that came instead.
fn console_start(addr: &str, origin: &str, session: &str, console_token: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /console/{session}/ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {origin}\r\n\
         Sec-WebSocket-Protocol: binary, vdim-console-token.{console_token}\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap_or(0) == 0 {
            return format!("upgrade closed: {}", String::from_utf8_lossy(&head));
        }
        head.push(b[0]);
    }
    let mut c = RawConsole(s);
    match c.frame() {
        Some((2, g)) if g == b"RFB 003.008\n" => "greeting".into(),
        Some((8, why)) => String::from_utf8_lossy(why.get(2..).unwrap_or_default()).into_owned(),
        other => format!("{other:?}"),
    }
}

#[test]
fn consoles_opened_at_once_through_two_brokers_all_log_in_to_the_display() {
    let t = LibvirtEnv::new("sfrace");
    let (pool, alice) = pool_of_one(&t, "sf-race");
    let public = "http://vdim.example";
    let (a_addr, b_addr) = (free_address(), free_address());
    let (a, b) = (broker(&t.env, &a_addr, public), broker(&t.env, &b_addr, public));
    let http = Http::new(&format!("http://{a_addr}"));
    let (s, opened) = http.json("POST", &format!("/api/v1/pools/{pool}/sessions"), &alice);
    assert_eq!(s, 201, "{opened}");
    let id = opened["id"].as_str().unwrap().to_string();
    let token = opened["console_url"].as_str().unwrap().split("#token=").nth(1).unwrap().to_string();
    t.wait_marker(&pool, opened["desktop"].as_str().unwrap(), "sf-race", 120);

    // Each broker sets a one-time ticket on the one display and logs in with it: neither
    // may lose its login to the other's ticket.
    for round in 0..5 {
        let opens: Vec<_> = (0..6)
            .map(|i| {
                let addr = if i % 2 == 0 { a_addr.clone() } else { b_addr.clone() };
                let (id, token) = (id.clone(), token.clone());
                std::thread::spawn(move || console_start(&addr, public, &id, &token))
            })
            .collect();
        let outcomes: Vec<String> = opens.into_iter().map(|h| h.join().unwrap()).collect();
        eprintln!("round {round}: {outcomes:?}");
        assert!(
            outcomes.iter().all(|o| o == "greeting" || o == "another console took over"),
            "every console logged in, or a newer one took over before it did: {outcomes:?}"
        );
        assert!(outcomes.iter().any(|o| o == "greeting"), "the newest console logged in: {outcomes:?}");
    }
    drop((a, b));
}
