//! The thin-client broker through the real `vdim serve` binary and real clients: HTTP from
//! reqwest and raw sockets, remote-viewer under Xvfb for `.vv` files, headless Chromium with
//! noVNC for the HTML5 console, a VNC handshake for the display's password. Libvirt is real:
//! qemu:///system under TCG with the test guest where a display must exist, the in-process
//! test:///default driver (inside the broker process) where only the catalog matters.

mod common;
use common::serve::Server;
use common::viewer::Xvfb;
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

    fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
        let mut r = self.c.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.header("content-type", "application/json").body(b.to_string());
        }
        self.rt.block_on(async {
            let resp = r.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            (resp.status().as_u16(), resp.text().await.unwrap())
        })
    }

    fn json(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let (s, text) = self.call(method, path, token, body.map(|b| b.to_string()).as_deref());
        (s, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    #[track_caller]
    fn ok(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Value {
        let (s, v) = self.json(method, path, Some(token), body);
        assert!((200..300).contains(&s), "{method} {path} -> {s}: {v}");
        v
    }
}

/// A raw HTTP/1.1 request (no client-side URL normalisation); returns the status and head.
fn raw(addr: &str, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

/// A WebSocket upgrade of a console: status only (101 means admitted).
fn ws_status(srv: &Server, session: &str, origin: Option<&str>, console_token: Option<&str>) -> u16 {
    let mut head = format!(
        "GET /console/{session}/ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
        srv.addr
    );
    if let Some(o) = origin {
        head += &format!("Origin: {o}\r\n");
    }
    if let Some(t) = console_token {
        head += &format!("Sec-WebSocket-Protocol: binary, vdim-console-token.{t}\r\n");
    }
    head += "\r\n";
    raw(&srv.addr, &head).0
}

fn add_user_cli(env: &Env, name: &str, admin: bool) -> String {
    let mut args = vec!["user", "add", name];
    if admin {
        args.push("--admin");
    }
    env.vdim_json(&args)["token"].as_str().unwrap().to_string()
}

fn add_user_api(http: &Http, admin: &str, name: &str) -> String {
    let (s, v) = http.json("POST", "/api/v1/admin/users", Some(admin), Some(json!({"name": name})));
    assert_eq!(s, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

/// A pool of the test-linux profile created and started inside the broker (test driver).
fn create_pool_api(http: &Http, admin: &str, name: &str, size: u32, persistent: bool) {
    let body = json!({"name": name, "image": "img", "size": size, "profile": "test-linux", "persistent": persistent, "start": true});
    let (s, v) = http.json("POST", "/api/v1/admin/pools", Some(admin), Some(body));
    assert_eq!(s, 201, "{v}");
}

/// A broker on test:///default with image "img" and an administrator.
struct TestDriverBroker {
    srv: Server,
    http: Http,
    admin: String,
    env: Env,
}

fn test_driver_broker(extra: &[&str]) -> TestDriverBroker {
    let env = Env::new();
    marker_image(&env, "img", "bk-test");
    let admin = add_user_cli(&env, "admin", true);
    let srv = Server::start(&env, "test:///default", extra);
    let http = Http::new(&srv.base);
    TestDriverBroker { srv, http, admin, env }
}

/// What an administrator sees: pools with desktops and users, sessions, users, audit size.
fn snapshot(http: &Http, admin: &str) -> Value {
    let mut pools = vec![];
    for p in http.ok("GET", "/api/v1/admin/pools", admin, None).as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        pools.push(http.ok("GET", &format!("/api/v1/admin/pools/{name}"), admin, None));
        pools.push(http.ok("GET", &format!("/api/v1/admin/pools/{name}/entitlements"), admin, None));
    }
    json!({
        "pools": pools,
        "users": http.ok("GET", "/api/v1/admin/users", admin, None),
        "sessions": http.ok("GET", "/api/v1/admin/sessions", admin, None),
        "audit": http.ok("GET", "/api/v1/admin/audit?limit=10000", admin, None).as_array().unwrap().len(),
    })
}

#[derive(Debug, PartialEq, Eq)]
enum Viewer {
    Opened,
    AuthFailed,
}

/// remote-viewer on a `.vv` file: what its SPICE main channel reported, and a screenshot of
/// the X display once the channel is open.
fn remote_viewer(x: &Xvfb, vv: &Path, log: &Path, shot: &Path) -> Viewer {
    let out = File::create(log).unwrap();
    let mut child = Command::new("remote-viewer")
        .arg("--debug")
        .arg(vv)
        .env("DISPLAY", &x.display)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("remote-viewer (scripts/setup-host installs virt-viewer)");
    let deadline = Instant::now() + Duration::from_secs(30);
    let verdict = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("main channel: opened") {
            break Some(Viewer::Opened);
        }
        if text.contains("main channel: auth failure") {
            break Some(Viewer::AuthFailed);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if verdict == Some(Viewer::Opened) {
        std::thread::sleep(Duration::from_secs(3));
        sh("import", &["-display", &x.display, "-window", "root", shot.to_str().unwrap()]);
    }
    let _ = child.kill();
    let _ = child.wait();
    verdict.unwrap_or_else(|| {
        panic!("remote-viewer said neither opened nor auth failure:\n{}", std::fs::read_to_string(log).unwrap())
    })
}

/// Pixels of a PNG as RGB, with its size.
fn png_rgb(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let mut dec = png::Decoder::new(File::open(path).unwrap());
    dec.set_transformations(png::Transformations::normalize_to_color8());
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let step = info.color_type.samples();
    assert!(info.bit_depth == png::BitDepth::Eight && step >= 3, "{info:?}");
    let px = buf[..info.buffer_size()].chunks(step).map(|c| [c[0], c[1], c[2]]).collect();
    (info.width, info.height, px)
}

/// Pixels below row `top` that look like the VGA text console's light grey text.
fn text_pixels(path: &Path, top: u32) -> usize {
    let (w, _, px) = png_rgb(path);
    px.iter()
        .enumerate()
        .filter(|(i, _)| *i as u32 / w >= top)
        .filter(|(_, p)| {
            let (lo, hi) = (*p.iter().min().unwrap(), *p.iter().max().unwrap());
            lo > 100 && hi - lo < 24
        })
        .count()
}

/// Screenshots a human may want to look at stay in target/tmp.
fn keep(path: &Path, name: &str) -> PathBuf {
    let dest = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::copy(path, &dest).unwrap();
    dest
}

/// The first bytes of a qcow2's virtual disk, read while QEMU may hold it.
fn disk_head(env: &Env, overlay: &Path) -> String {
    let out = env.path("head.raw");
    let _ = std::fs::remove_file(&out);
    sh(
        "qemu-img",
        &[
            "dd",
            "-U",
            "-f",
            "qcow2",
            "-O",
            "raw",
            "bs=512",
            "count=1",
            &format!("if={}", overlay.display()),
            &format!("of={}", out.display()),
        ],
    );
    let b = std::fs::read(&out).unwrap();
    String::from_utf8_lossy(&b[..b.iter().position(|&c| c == 0).unwrap_or(b.len())]).into_owned()
}

fn inode(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap())
}

fn virsh(args: &[&str]) -> String {
    let mut a = vec!["-c", "qemu:///system"];
    a.extend_from_slice(args);
    String::from_utf8_lossy(&sh("virsh", &a).stdout).into_owned()
}

/// A started qemu:///system pool of the test guest, entitled to "alice", with the broker.
struct QemuBroker {
    srv: Server,
    http: Http,
    alice: String,
    pool: String,
    t: LibvirtEnv,
}

fn qemu_broker(tag: &str, size: u32, label: &str) -> QemuBroker {
    let t = LibvirtEnv::new(tag);
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", label);
    let size = size.to_string();
    t.vdim_json(&["pool", "create", &pool, "--image", "img", "--size", &size, "--profile", "test-linux", "--start"]);
    let alice = add_user_cli(&t.env, "alice", false);
    t.vdim(&["pool", "entitle", &pool, "alice"]).assert_success();
    let srv = Server::start(&t.env, "qemu:///system", &[]);
    let http = Http::new(&srv.base);
    QemuBroker { srv, http, alice, pool, t }
}

/// The keys of a `.vv` file, which must open with its `[virt-viewer]` section.
fn vv_keys(text: &str) -> BTreeMap<String, String> {
    assert!(text.starts_with("[virt-viewer]\n"), "{text}");
    text.lines().skip(1).map(|l| l.split_once('=').map(|(k, v)| (k.into(), v.into())).unwrap()).collect()
}

/// Run scripts/thin-client for alice on `x` until its viewer shows the desktop, close the viewer
/// as a user would, and return the script's exit status and log.
fn thin_client_until_viewer_closed(q: &QemuBroker, x: &Xvfb) -> (std::process::ExitStatus, String) {
    let tc_log = q.t.env.path("thin-client.log");
    let out = File::create(&tc_log).unwrap();
    let mut script = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/thin-client"))
        .args([&q.srv.base, &q.pool])
        .env("VDIM_TOKEN", &q.alice)
        .env("VDIM_VIEWER", "remote-viewer --debug")
        .env("DISPLAY", &x.display)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&tc_log).unwrap().contains("main channel: opened") {
        assert!(
            Instant::now() < deadline,
            "thin-client did not open the desktop:\n{}",
            std::fs::read_to_string(&tc_log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The user closes the viewer.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", script.id())).unwrap();
    for pid in children.split_whitespace() {
        sh("kill", &[pid]);
    }
    let status = loop {
        if let Some(st) = script.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline + Duration::from_secs(30), "thin-client did not exit");
        std::thread::sleep(Duration::from_millis(200));
    };
    (status, std::fs::read_to_string(&tc_log).unwrap())
}

#[track_caller]
fn assert_no_secret_in(log: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!log.contains(s), "a secret ({}...) appears in the server log", &s[..8]);
    }
}

// ---- real libvirt, real guest ----------------------------------------------------------------

#[test]
fn entitled_user_gets_a_desktop_whose_display_takes_the_vv_ticket_and_refuses_others() {
    let q = qemu_broker("bkvv", 1, "bk-vv");
    let (http, pool) = (&q.http, q.pool.as_str());
    let bob = add_user_cli(&q.t.env, "bob", false);

    let (s, v) = http.json("POST", &format!("/api/v1/pools/{pool}/sessions"), Some(&bob), None);
    assert_eq!(s, 403, "not entitled: {v}");
    assert!(v["error"].as_str().unwrap().contains(&format!("'bob' is not entitled to pool '{pool}'")), "{v}");

    let (s, sess) = http.json("POST", &format!("/api/v1/pools/{pool}/sessions"), Some(&q.alice), None);
    assert_eq!(s, 201, "{sess}");
    let (id, desktop) = (sess["id"].as_str().unwrap(), sess["desktop"].as_str().unwrap());
    assert_eq!(desktop, format!("vdim-{pool}-001"));
    assert_eq!(sess["vv_url"], format!("{}/api/v1/sessions/{id}/console.vv", q.srv.base));
    assert!(sess["console_url"].as_str().unwrap().starts_with(&format!("{}/console/{id}#token=", q.srv.base)));
    assert!(sess["expires_at"].as_str().unwrap().ends_with('Z'));
    let (s, _) = http.json("POST", &format!("/api/v1/pools/{pool}/sessions"), Some(&bob), None);
    assert_eq!(s, 403, "still not entitled after alice got the desktop");

    // Two downloads: the second ticket replaces the first (one-time tickets).
    let vv_path = format!("/api/v1/sessions/{id}/console.vv");
    let get_vv = || {
        let req = q.http.c.get(format!("{}{vv_path}", q.srv.base)).bearer_auth(&q.alice);
        let resp = q.http.rt.block_on(async { req.send().await }).unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.headers()["content-type"], "application/x-virt-viewer");
        assert_eq!(resp.headers()["cache-control"], "no-store");
        q.http.rt.block_on(resp.text()).unwrap()
    };
    let (first, second) = (get_vv(), get_vv());
    let (a, b) = (vv_keys(&first), vv_keys(&second));
    assert_eq!(b["type"], "spice");
    assert_eq!(b["host"], "127.0.0.1");
    assert_eq!(b["delete-this-file"], "1");
    assert_eq!(b["secure-attention"], "ctrl+alt+end");
    assert_eq!(b["release-cursor"], "shift+f12");
    assert!(b["title"].contains(pool) && b["title"].contains(desktop), "{}", b["title"]);
    assert!(b["password"].len() >= 32 && b["password"].bytes().all(|c| c.is_ascii_hexdigit()), "128+ bits");
    assert_ne!(a["password"], b["password"]);
    let xml = virsh(&["dumpxml", "--security-info", desktop]);
    let spice = xml.lines().find(|l| l.contains("<graphics type='spice'")).unwrap();
    assert!(
        spice.contains(&format!("passwd='{}'", b["password"]))
            && spice.contains("passwdValidTo=")
            && spice.contains("connected='disconnect'"),
        "{spice}"
    );

    // A real SPICE client: the current ticket opens the display, the replaced one and a guess do not.
    let x = Xvfb::start();
    let write_vv = |name: &str, text: &str| {
        let p = q.t.env.path(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let old = write_vv("old.vv", &first);
    let guess = write_vv("guess.vv", &second.replace(&b["password"], &"0".repeat(48)));
    let good = write_vv("good.vv", &second);
    let shot = q.t.env.path("remote-viewer.png");
    assert_eq!(remote_viewer(&x, &old, &q.t.env.path("rv-old.log"), &shot), Viewer::AuthFailed, "the replaced ticket");
    assert_eq!(remote_viewer(&x, &guess, &q.t.env.path("rv-guess.log"), &shot), Viewer::AuthFailed, "a wrong ticket");
    assert_eq!(remote_viewer(&x, &good, &q.t.env.path("rv-good.log"), &shot), Viewer::Opened, "the .vv's ticket");
    assert!(!good.exists(), "remote-viewer deletes the .vv (delete-this-file=1)");
    let kept = keep(&shot, "broker-remote-viewer.png");
    assert!(text_pixels(&shot, 60) > 500, "the viewer shows the guest's text console: {}", kept.display());

    // The VNC display takes passwords too, never none: a wrong one is refused by QEMU itself.
    let hv = vdim::hypervisor::Libvirt::connect("qemu:///system").unwrap();
    let ep = vdim::hypervisor::Hypervisor::graphics(&hv, desktop, vdim::hypervisor::GraphicsKind::Vnc).unwrap();
    let login = http.rt.block_on(async {
        let mut s = tokio::net::TcpStream::connect((ep.listen.as_str(), ep.port.unwrap())).await.unwrap();
        vdim::broker::vnc::client_login(&mut s, desktop, "guess123").await
    });
    assert!(matches!(login, Err(vdim::broker::vnc::VncError::Refused { .. })), "{login:?}");

    // The Linux endpoint script: session, .vv, remote-viewer; logoff when the viewer closes.
    let (status, tc) = thin_client_until_viewer_closed(&q, &x);
    assert!(status.success() && tc.contains("logged off (desktop reset: done)"), "{status}: {tc}");
    assert_eq!(http.json("GET", &format!("/api/v1/sessions/{id}"), Some(&q.alice), None).0, 404, "logged off");

    assert_no_secret_in(&q.srv.log(), &[&q.alice, &bob, &b["password"], &a["password"]]);
    assert_no_secret_in(&tc, &[&q.alice]);
}

#[test]
fn a_display_on_every_address_gets_the_display_host_in_its_vv_and_without_one_a_clear_refusal() {
    let t = LibvirtEnv::new("bkdh");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "bk-dh");
    let admin = add_user_cli(&t.env, "admin", true);
    let alice = add_user_cli(&t.env, "alice", false);

    // A broker without --display-host; the pool comes through the admin API.
    let srv = Server::start(&t.env, "qemu:///system", &[]);
    let http = Http::new(&srv.base);
    let body = json!({"name": pool, "image": "img", "size": 1, "profile": "test-linux", "start": true,
                      "display_listen": "0.0.0.0", "insecure_display": true});
    let (s, v) = http.json("POST", "/api/v1/admin/pools", Some(&admin), Some(body));
    assert_eq!((s, v["display_listen"].as_str()), (201, Some("0.0.0.0")), "{v}");
    http.ok("PUT", &format!("/api/v1/admin/pools/{pool}/entitlements/alice"), &admin, None);
    let sess = http.ok("POST", &format!("/api/v1/pools/{pool}/sessions"), &alice, None);
    let (id, desktop) = (sess["id"].as_str().unwrap().to_string(), sess["desktop"].as_str().unwrap().to_string());
    let vv_path = format!("/api/v1/sessions/{id}/console.vv");
    let spice = || -> String {
        let xml = virsh(&["dumpxml", "--security-info", &desktop]);
        xml.lines().find(|l| l.contains("<graphics type='spice'")).unwrap().to_string()
    };
    let before = spice();
    assert!(before.contains("listen='0.0.0.0'"), "{before}");

    // No guess: the broker says what the administrator must do, and leaves the display alone.
    let (s, v) = http.json("GET", &vv_path, Some(&alice), None);
    assert_eq!(s, 503, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("--display-host") && msg.contains(&desktop) && msg.contains("0.0.0.0"), "{msg}");
    assert_eq!(spice(), before, "the refused request set no ticket (it would have disconnected a viewer)");
    assert!(srv.log().contains("--display-host"), "the refusal is logged for the administrator");
    drop(http);
    drop(srv);

    // The administrator names an address that reaches this host but is not 127.0.0.1: the
    // display answers there only because it listens on every address.
    let srv = Server::start(&t.env, "qemu:///system", &["--display-host", "127.0.0.2"]);
    let http = Http::new(&srv.base);
    let (s, text) = http.call("GET", &vv_path, Some(&alice), None);
    assert_eq!(s, 200, "{text}");
    assert!(text.starts_with("[virt-viewer]\n"), "{text}");
    let kv: BTreeMap<&str, &str> = text.lines().skip(1).map(|l| l.split_once('=').unwrap()).collect();
    let live = spice();
    let port = live.split(" port='").nth(1).and_then(|r| r.split('\'').next()).unwrap();
    assert_eq!((kv["host"], kv["port"]), ("127.0.0.2", port), "{text}\n{live}");
    assert!(live.contains(&format!("passwd='{}'", kv["password"])), "the .vv's ticket is on the display: {live}");

    // And a real viewer gets in through that address.
    let x = Xvfb::start();
    let vv = t.env.path("wildcard.vv");
    std::fs::write(&vv, &text).unwrap();
    let shot = t.env.path("rv-wildcard.png");
    assert_eq!(remote_viewer(&x, &vv, &t.env.path("rv-wildcard.log"), &shot), Viewer::Opened);
    assert_no_secret_in(&srv.log(), &[&alice, &admin, kv["password"]]);
}

#[test]
fn logoff_resets_the_overlay_even_across_a_broker_crash() {
    let q = qemu_broker("bkrs", 1, "bk-reset");
    let (pool, env) = (q.pool.clone(), &q.t.env);
    let open = |http: &Http| -> (String, String) {
        let (s, v) = http.json("POST", &format!("/api/v1/pools/{pool}/sessions"), Some(&q.alice), None);
        assert_eq!(s, 201, "{v}");
        (v["id"].as_str().unwrap().to_string(), v["desktop"].as_str().unwrap().to_string())
    };
    let (id, desktop) = open(&q.http);
    let overlay = env.home().join("desktops").join(&pool).join(format!("{desktop}.qcow2"));
    q.t.wait_marker(&pool, &desktop, "bk-reset", 120);

    // The user leaves data on the system disk (written while the desktop is stopped).
    let scribble = |label: &str| {
        virsh(&["destroy", &desktop]);
        qemu_io_write(&overlay, 0x5a, 8 << 20, 64 << 10);
        assert!(qemu_io_read_pattern(&overlay, 0x5a, 8 << 20, 64 << 10), "{label}: the write is there");
        inode(&overlay)
    };
    let before = scribble("logoff");
    let (s, v) = q.http.json("DELETE", &format!("/api/v1/sessions/{id}"), Some(&q.alice), None);
    assert_eq!((s, v["reset"].as_str()), (200, Some("done")), "{v}");
    assert_ne!(inode(&overlay), before, "a new overlay file");
    assert!(!qemu_io_read_pattern(&overlay, 0x5a, 8 << 20, 64 << 10), "the user's data is gone");
    assert!(disk_head(env, &overlay).starts_with("VDIM-TEST bk-reset health=ok"), "the version's marker is intact");
    q.t.wait_marker(&pool, &desktop, "bk-reset", 120);
    let (s, _) = q.http.json("GET", &format!("/api/v1/sessions/{id}"), Some(&q.alice), None);
    assert_eq!(s, 404, "the session is over");

    // A crash between "session ended" and the reset: the desktop is not handed out, and the
    // next broker finishes the logoff when it starts.
    let (id, desktop2) = open(&q.http);
    assert_eq!(desktop2, desktop, "the one desktop, clean again");
    let before = scribble("crash");
    let QemuBroker { srv, http, alice, t, .. } = q;
    drop(http);
    srv.crash();
    let mut cat = vdim::catalog::Catalog::open(&t.env.home().join("catalog.db"), false).unwrap();
    assert!(cat.write(|tx| tx.end_session(&id)).unwrap(), "session ended, then the crash");
    drop(cat);
    let show = t.vdim_json(&["pool", "show", &pool]);
    assert_eq!(show["desktops"][0]["assigned_to"], "alice", "not handed out before its reset");
    let srv = Server::start(&t.env, "qemu:///system", &[]);
    let http = Http::new(&srv.base);
    assert_ne!(inode(&overlay), before, "healed at start");
    assert!(!qemu_io_read_pattern(&overlay, 0x5a, 8 << 20, 64 << 10));
    assert!(disk_head(&t.env, &overlay).starts_with("VDIM-TEST bk-reset health=ok"));
    let show = t.vdim_json(&["pool", "show", &pool]);
    assert_eq!(show["desktops"][0]["assigned_to"], Value::Null);
    assert_eq!(show["desktops"][0]["needs_reset"], false);
    let (s, v) = http.json("POST", &format!("/api/v1/pools/{pool}/sessions"), Some(&alice), None);
    assert_eq!(s, 201, "the healed desktop is available: {v}");
    drop((srv, http));
    drop(t);
}

#[test]
fn html5_console_in_headless_chromium_shows_the_guest_screen_and_closes_at_logoff() {
    let dir = std::env::var("VDIM_CONSOLE_DIR").unwrap_or_else(|_| "/var/cache/vdim/console".into());
    assert!(
        Path::new(&dir).join("node_modules/@novnc/novnc/core/rfb.js").is_file()
            && Path::new(&dir).join("node_modules/playwright-core").is_dir(),
        "noVNC and playwright-core are missing in {dir}: run scripts/setup-console"
    );
    let q = qemu_broker("bkhc", 1, "bk-html5");
    let (s, sess) = q.http.json("POST", &format!("/api/v1/pools/{}/sessions", q.pool), Some(&q.alice), None);
    assert_eq!(s, 201, "{sess}");
    let (id, desktop) = (sess["id"].as_str().unwrap(), sess["desktop"].as_str().unwrap());
    let console_url = sess["console_url"].as_str().unwrap();
    let console_token = console_url.split("#token=").nth(1).unwrap();
    q.t.wait_marker(&q.pool, desktop, "bk-html5", 120);

    // Another site's page cannot use the console, nor can a request without the token.
    assert_eq!(ws_status(&q.srv, id, Some("http://evil.example"), Some(console_token)), 403);
    assert_eq!(ws_status(&q.srv, id, None, Some(console_token)), 403);
    assert_eq!(ws_status(&q.srv, id, Some(&q.srv.base), None), 401);
    assert_eq!(ws_status(&q.srv, id, Some(&q.srv.base), Some(&"0".repeat(64))), 401);

    let shot = q.t.env.path("console.png");
    let out = Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console.cjs"))
        .args([console_url, shot.to_str().unwrap(), &format!("{}/api/v1/sessions/{id}", q.srv.base)])
        .env("VDIM_CONSOLE_DIR", &dir)
        .env("VDIM_TOKEN", &q.alice)
        .output()
        .expect("node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "console.cjs failed: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let r: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(r["connected"], true, "noVNC did not connect: {r}\n{}", q.srv.log());
    assert_eq!((r["width"].as_u64(), r["height"].as_u64()), (Some(720), Some(400)), "the guest's VGA text mode: {r}");
    assert!(!r["urlAfterConnect"].as_str().unwrap().contains("token="), "the page drops the token from its URL: {r}");
    let kept = keep(&shot, "broker-console.png");
    let text = text_pixels(&shot, 40);
    assert!(text > 1500, "the screenshot shows the guest console's text ({text} text pixels): {}", kept.display());
    assert_eq!(r["logoffStatus"], 200, "{r}");
    assert_eq!(r["afterLogoff"], "disconnected", "the console closes when the session ends: {r}");
    assert_eq!(ws_status(&q.srv, id, Some(&q.srv.base), Some(console_token)), 401, "an ended session's token is dead");
    let log = q.srv.log();
    assert!(log.contains("console closed") && log.contains("the session ended"), "{log}");
    assert_no_secret_in(&log, &[&q.alice, console_token]);
}

// ---- test:///default: the catalog side --------------------------------------------------------

/// One endpoint of the authorization matrix: method, path, body, and the status for each
/// caller [no token, owner/entitled user, other user, admin]; 0 = not tried.
type MatrixRow = (&'static str, String, Option<String>, [u16; 4]);

/// Every endpoint, in an order where each row's effect is what the next rows expect: `sid` is
/// alice's session on `mp`, `tid` bob's on `mq`; `mx` is created, changed and deleted here.
fn endpoint_matrix(sid: &str, tid: &str) -> Vec<MatrixRow> {
    let create = json!({"name": "mx", "image": "img", "size": 1, "profile": "test-linux"}).to_string();
    vec![
        ("GET", "/healthz".into(), None, [200, 200, 200, 200]),
        ("GET", "/metrics".into(), None, [401, 403, 403, 200]),
        ("GET", "/".into(), None, [200, 200, 200, 200]),
        ("GET", "/static/console.js".into(), None, [200, 200, 200, 200]),
        ("GET", format!("/console/{sid}"), None, [200, 200, 200, 200]),
        ("GET", "/api/v1/pools".into(), None, [401, 200, 200, 200]),
        ("POST", "/api/v1/pools/mp/sessions".into(), None, [401, 200, 403, 403]),
        ("GET", "/api/v1/sessions".into(), None, [401, 200, 200, 200]),
        ("GET", format!("/api/v1/sessions/{sid}"), None, [401, 200, 404, 404]),
        // 503 for the owner: authorised, but the test driver runs no display to ticket.
        ("GET", format!("/api/v1/sessions/{sid}/console.vv"), None, [401, 503, 404, 404]),
        ("DELETE", format!("/api/v1/sessions/{sid}"), None, [401, 0, 404, 404]),
        ("GET", "/api/v1/admin/images".into(), None, [401, 403, 403, 200]),
        ("GET", "/api/v1/admin/images/img".into(), None, [401, 403, 403, 200]),
        ("GET", "/api/v1/admin/pools".into(), None, [401, 403, 403, 200]),
        ("GET", "/api/v1/admin/pools/mp".into(), None, [401, 403, 403, 200]),
        ("GET", "/api/v1/admin/pools/mp/entitlements".into(), None, [401, 403, 403, 200]),
        ("GET", "/api/v1/admin/users".into(), None, [401, 403, 403, 200]),
        ("GET", "/api/v1/admin/sessions".into(), None, [401, 403, 403, 200]),
        ("GET", "/api/v1/admin/audit".into(), None, [401, 403, 403, 200]),
        ("GET", "/api/v1/admin/rollouts?image=img".into(), None, [401, 403, 403, 200]),
        // Authorised, refused by the promotion rules: test already runs version 1.
        (
            "POST",
            "/api/v1/admin/images/img/promote".into(),
            Some(r#"{"version": 1, "to": "test"}"#.into()),
            [401, 403, 403, 409],
        ),
        ("POST", "/api/v1/admin/images/img/rollout/halt".into(), None, [401, 403, 403, 409]),
        ("POST", "/api/v1/admin/images/img/rollout/resume".into(), None, [401, 403, 403, 409]),
        (
            "POST",
            "/api/v1/admin/images/img/rollback".into(),
            Some(r#"{"channel": "prod"}"#.into()),
            [401, 403, 403, 409],
        ),
        ("POST", "/api/v1/admin/pools".into(), Some(create), [401, 403, 403, 201]),
        ("POST", "/api/v1/admin/pools/mx/start".into(), None, [401, 403, 403, 200]),
        ("POST", "/api/v1/admin/pools/mx/resize".into(), Some(r#"{"size": 2}"#.into()), [401, 403, 403, 200]),
        ("POST", "/api/v1/admin/pools/mx/update".into(), None, [401, 403, 403, 409]),
        ("POST", "/api/v1/admin/pools/mx/rollback".into(), None, [401, 403, 403, 409]),
        ("POST", "/api/v1/admin/pools/mx/pin".into(), Some(r#"{"version": 1}"#.into()), [401, 403, 403, 200]),
        ("POST", "/api/v1/admin/pools/mx/unpin".into(), None, [401, 403, 403, 200]),
        ("POST", "/api/v1/admin/pools/mx/stop".into(), None, [401, 403, 403, 200]),
        ("PUT", "/api/v1/admin/pools/mx/entitlements/bob".into(), None, [401, 403, 403, 200]),
        ("DELETE", "/api/v1/admin/pools/mx/entitlements/bob".into(), None, [401, 403, 403, 200]),
        ("POST", "/api/v1/admin/users".into(), Some(r#"{"name": "carol"}"#.into()), [401, 403, 403, 201]),
        ("DELETE", "/api/v1/admin/users/carol".into(), None, [401, 403, 403, 200]),
        ("DELETE", "/api/v1/admin/pools/mx?force=true".into(), None, [401, 403, 403, 200]),
        // bob is not an administrator even for his own session.
        ("DELETE", format!("/api/v1/admin/sessions/{tid}"), None, [401, 403, 403, 200]),
    ]
}

#[test]
fn authorization_matrix_every_endpoint_by_every_kind_of_caller() {
    let t = test_driver_broker(&[]);
    let (http, admin) = (&t.http, t.admin.as_str());
    create_pool_api(http, admin, "mp", 4, false);
    create_pool_api(http, admin, "mq", 2, false);
    let alice = add_user_api(http, admin, "alice");
    let bob = add_user_api(http, admin, "bob");
    http.ok("PUT", "/api/v1/admin/pools/mp/entitlements/alice", admin, None);
    http.ok("PUT", "/api/v1/admin/pools/mq/entitlements/bob", admin, None);
    let (_, s) = http.json("POST", "/api/v1/pools/mp/sessions", Some(&alice), None);
    let sid = s["id"].as_str().unwrap().to_string();
    let (_, t2) = http.json("POST", "/api/v1/pools/mq/sessions", Some(&bob), None);
    let tid = t2["id"].as_str().unwrap().to_string();
    let bob_console = t2["console_url"].as_str().unwrap().split("#token=").nth(1).unwrap().to_string();
    let alice_first = s["console_url"].as_str().unwrap().split("#token=").nth(1).unwrap().to_string();
    let mut console_tokens = vec![bob_console.clone(), alice_first.clone()];

    let rows = endpoint_matrix(&sid, &tid);
    let callers = [None, Some(alice.as_str()), Some(bob.as_str()), Some(admin)];
    for (method, path, body, want) in &rows {
        let before = snapshot(http, admin);
        for (who, (caller, want)) in callers.iter().zip(want).enumerate().take(3) {
            if *want == 0 {
                continue;
            }
            let (got, text) = http.call(method, path, *caller, body.as_deref());
            assert_eq!(got, *want, "{method} {path} as caller #{who}: {text}");
            if who == 1 && method == &"POST" && path.ends_with("/sessions") {
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["id"], sid.as_str(), "the owner reconnects to her session");
                console_tokens.push(v["console_url"].as_str().unwrap().split("#token=").nth(1).unwrap().into());
            }
        }
        if want[..3].iter().all(|&w| w == 0 || w >= 400) {
            assert_eq!(snapshot(http, admin), before, "refused {method} {path} changed something");
        }
        let (got, text) = http.call(method, path, callers[3], body.as_deref());
        assert_eq!(got, want[3], "{method} {path} as admin: {text}");
    }
    assert_eq!(http.json("GET", "/api/v1/admin/pools/mx", Some(admin), None).0, 404, "deleted by the admin row");
    let (_, bobs) = http.json("GET", "/api/v1/sessions", Some(&bob), None);
    assert!(!bobs.to_string().contains(&sid), "bob never sees alice's session: {bobs}");

    // The console WebSocket: Origin, then the session's own console token; nothing else opens it.
    let alice_console = console_tokens.last().unwrap().clone();
    let base = t.srv.base.clone();
    assert_eq!(ws_status(&t.srv, &sid, Some(&base), None), 401, "no token");
    assert_eq!(
        ws_status(&t.srv, &sid, Some(&base), Some(&alice_console)),
        503,
        "owner: admitted, no display on test:///"
    );
    assert_ne!(alice_console, alice_first);
    assert_eq!(ws_status(&t.srv, &sid, Some(&base), Some(&alice_first)), 401, "replaced by the reconnect");
    assert_eq!(ws_status(&t.srv, &sid, Some(&base), Some(&bob_console)), 401, "another session's token");
    assert_eq!(ws_status(&t.srv, &sid, Some(&base), Some(admin)), 401, "a bearer token is not a console token");
    assert_eq!(ws_status(&t.srv, &sid, Some("http://evil.example"), Some(&alice_console)), 403, "foreign origin");

    // Last: the owner logs off, once.
    assert_eq!(http.call("DELETE", &format!("/api/v1/sessions/{sid}"), Some(&alice), None).0, 200);
    assert_eq!(http.call("DELETE", &format!("/api/v1/sessions/{sid}"), Some(&alice), None).0, 404);
    let mut secrets = vec![alice.as_str(), bob.as_str(), admin];
    secrets.extend(console_tokens.iter().map(String::as_str));
    assert_no_secret_in(&t.srv.log(), &secrets);
}

#[test]
fn five_hundred_concurrent_session_requests_on_twenty_desktops() {
    let t = test_driver_broker(&[]);
    let (http, admin) = (&t.http, t.admin.as_str());
    create_pool_api(http, admin, "rush", 20, false);
    let tokens: Vec<String> = (0..500).map(|i| add_user_api(http, admin, &format!("u{i:03}"))).collect();
    for i in 0..500 {
        http.ok("PUT", &format!("/api/v1/admin/pools/rush/entitlements/u{i:03}"), admin, None);
    }
    let url = format!("{}/api/v1/pools/rush/sessions", t.srv.base);
    let results: Vec<(u16, Value)> = http.rt.block_on(async {
        let all = tokens.iter().map(|tok| {
            let (c, url) = (http.c.clone(), url.clone());
            async move {
                let r = c.post(url).bearer_auth(tok).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        });
        futures_util::future::join_all(all).await
    });
    let created: Vec<&Value> = results.iter().filter(|(s, _)| *s == 201).map(|(_, v)| v).collect();
    let exhausted: Vec<&Value> = results.iter().filter(|(s, _)| *s == 503).map(|(_, v)| v).collect();
    let other: Vec<&(u16, Value)> = results.iter().filter(|(s, _)| *s != 201 && *s != 503).collect();
    assert_eq!((created.len(), exhausted.len()), (20, 480), "unexpected: {other:?}");
    let desktops: BTreeSet<&str> = created.iter().map(|v| v["desktop"].as_str().unwrap()).collect();
    assert_eq!(desktops.len(), 20, "no desktop twice");
    assert!(
        exhausted.iter().all(|v| v["error"].as_str().unwrap().contains("pool 'rush' is exhausted")),
        "{:?}",
        exhausted[0]
    );
    // The catalog agrees: 20 desktops, 20 different users, 20 open sessions.
    let show = http.ok("GET", "/api/v1/admin/pools/rush", admin, None);
    let users: BTreeSet<&str> =
        show["desktops"].as_array().unwrap().iter().map(|d| d["assigned_to"].as_str().unwrap()).collect();
    assert_eq!(users.len(), 20);
    assert_eq!(http.ok("GET", "/api/v1/admin/sessions", admin, None).as_array().unwrap().len(), 20);
    let metrics = http.call("GET", "/metrics", Some(admin), None).1;
    for line in
        ["vdim_sessions_open 20", "vdim_pool_exhausted_total 480", "vdim_desktops{pool=\"rush\",state=\"in_use\"} 20"]
    {
        assert!(metrics.lines().any(|l| l == line), "{line} not in\n{metrics}");
    }

    // One user hammering: one session, the other answers reconnect to it.
    let lone = add_user_api(http, admin, "lone");
    create_pool_api(http, admin, "solo", 3, false);
    http.ok("PUT", "/api/v1/admin/pools/solo/entitlements/lone", admin, None);
    let url = format!("{}/api/v1/pools/solo/sessions", t.srv.base);
    let same: Vec<(u16, Value)> = http.rt.block_on(async {
        let all = (0..20).map(|_| {
            let (c, url, tok) = (http.c.clone(), url.clone(), lone.clone());
            async move {
                let r = c.post(url).bearer_auth(tok).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        });
        futures_util::future::join_all(all).await
    });
    assert_eq!(same.iter().filter(|(s, _)| *s == 201).count(), 1, "{same:?}");
    assert_eq!(same.iter().filter(|(s, _)| *s == 200).count(), 19, "{same:?}");
    let ids: BTreeSet<&str> = same.iter().map(|(_, v)| v["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 1, "all the same session");
}

#[test]
fn hostile_requests_get_the_right_status_and_change_nothing() {
    let t = test_driver_broker(&[]);
    let (http, admin) = (&t.http, t.admin.as_str());
    create_pool_api(http, admin, "hp", 2, false);
    let alice = add_user_api(http, admin, "alice");
    let bob = add_user_api(http, admin, "bob");
    http.ok("PUT", "/api/v1/admin/pools/hp/entitlements/alice", admin, None);
    http.ok("PUT", "/api/v1/admin/pools/hp/entitlements/bob", admin, None);
    let bob_session = http.ok("POST", "/api/v1/pools/hp/sessions", &bob, None)["id"].as_str().unwrap().to_string();
    let (_, v) = http.json("POST", "/api/v1/admin/users", Some(admin), Some(json!({"name": "brief", "expires": "1s"})));
    let brief = v["token"].as_str().unwrap().to_string();
    let before = snapshot(http, admin);

    let big = format!(r#"{{"name": "big", "image": "img", "size": 1, "profile": "{}"}}"#, "x".repeat(20_000));
    let bodies: Vec<(&str, &str, String, u16)> = vec![
        ("POST", "/api/v1/admin/pools", big, 413),
        ("POST", "/api/v1/admin/pools", "{".into(), 400),
        ("POST", "/api/v1/admin/pools", "[1, 2]".into(), 400),
        ("POST", "/api/v1/admin/pools", r#"{"name": "x", "image": "img", "size": "many"}"#.into(), 400),
        ("POST", "/api/v1/admin/pools", r#"{"name": "x", "image": "img", "size": 1, "evil": true}"#.into(), 400),
        ("POST", "/api/v1/admin/pools", r#"{"name": "../x", "image": "img", "size": 1}"#.into(), 400),
        ("POST", "/api/v1/admin/pools", r#"{"name": "x", "image": "img", "size": 100000}"#.into(), 400),
        (
            "POST",
            "/api/v1/admin/pools",
            r#"{"name": "x", "image": "img", "size": 1, "profile": "test-linux", "display_listen": "1.2.3.4'/>"}"#
                .into(),
            400,
        ),
        (
            "POST",
            "/api/v1/admin/pools",
            r#"{"name": "x", "image": "img", "size": 1, "profile": "test-linux", "display_listen": "localhost"}"#
                .into(),
            400,
        ),
        (
            "POST",
            "/api/v1/admin/pools",
            r#"{"name": "x", "image": "nosuch", "size": 1, "profile": "test-linux"}"#.into(),
            404,
        ),
        ("POST", "/api/v1/admin/users", r#"{"name": "Bad\nName"}"#.into(), 400),
        ("POST", "/api/v1/admin/users", r#"{"name": "alice"}"#.into(), 409),
        ("POST", "/api/v1/admin/pools/hp/resize", r#"{"size": -1}"#.into(), 400),
    ];
    for (method, path, body, want) in &bodies {
        let (got, text) = http.call(method, path, Some(admin), Some(body));
        assert_eq!(got, *want, "{method} {path} {}: {text}", &body[..body.len().min(60)]);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("errors are JSON: {text}"));
        assert_eq!(v["status"], *want);
    }

    // Path tricks, sent raw so no client normalises them.
    let get = |path: &str, token: &str| {
        raw(
            &t.srv.addr,
            &format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"),
        )
        .0
    };
    for (path, want) in [
        ("/api/v1/sessions/..%2f..%2fadmin%2fusers", 404),
        ("/api/v1/sessions/../admin/users", 404),
        ("/api/v1/sessions/%2e%2e/console.vv", 404),
        ("/api/v1/admin/../pools", 404),
        ("/api/v1/pools/..%2f..%2fetc/sessions", 405),
        ("/novnc/../../../../etc/passwd", 404),
        ("/novnc/..%2f..%2f..%2f..%2fetc%2fpasswd", 404),
        ("/static/..%2fmod.rs", 404),
        ("/console/..%2f..%2fetc", 404),
        (&format!("/api/v1/sessions/{bob_session}"), 404),
        (&format!("/api/v1/sessions/{bob_session}/console.vv"), 404),
    ] {
        assert_eq!(get(path, &alice), want, "GET {path} as alice");
    }
    let post = |path: &str| {
        raw(&t.srv.addr, &format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")).0
    };
    assert_eq!(post("/api/v1/pools/..%2f..%2fetc/sessions"), 400);
    assert_eq!(post("/api/v1/pools/nosuch/sessions"), 404);
    let delete = raw(&t.srv.addr, &format!("DELETE /api/v1/sessions/{bob_session} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nConnection: close\r\n\r\n")).0;
    assert_eq!(delete, 404, "alice cannot log bob off");

    // Token tricks.
    for bad in [
        format!("Bearer {alice}x"),
        format!("Bearer {}", &alice[..63]),
        format!("Basic {alice}"),
        "Bearer".into(),
        format!("Bearer {}", alice.to_uppercase()),
    ] {
        let (s, _) = raw(
            &t.srv.addr,
            &format!("GET /api/v1/pools HTTP/1.1\r\nHost: x\r\nAuthorization: {bad}\r\nConnection: close\r\n\r\n"),
        );
        assert_eq!(s, 401, "{bad}");
    }
    std::thread::sleep(Duration::from_millis(1500));
    let (s, v) = http.json("GET", "/api/v1/pools", Some(&brief), None);
    assert_eq!(s, 401, "expired token: {v}");
    assert!(v["error"].as_str().unwrap().contains("expired"), "{v}");

    assert_eq!(snapshot(http, admin), before, "hostile requests changed something");
    let (s, _) = http.json("GET", &format!("/api/v1/sessions/{bob_session}"), Some(&bob), None);
    assert_eq!(s, 200, "bob's session is untouched");
}

#[test]
fn the_admin_api_gives_a_pool_an_identity_with_the_join_credentials_only_as_a_path_on_the_host() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let t = test_driver_broker(&[]);
    let (http, admin) = (&t.http, t.admin.as_str());
    let core = vdim::pool::random_secret(12);
    let cred = t.env.path("join.cred");
    std::fs::write(&cred, format!("username=svc-join\npassword=api-{core}\n")).unwrap();
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
    let body = |extra: Value| {
        let mut b = json!({"name": "idp", "image": "img", "size": 1, "profile": "test-linux", "start": true,
                           "identity": true, "hostname_pattern": "API-{n}", "join_domain": "corp.example.com"});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };
    // The secret is never part of a request; a relative path means nothing on the broker's host.
    for (extra, status) in [
        (json!({"join_credentials": cred, "join_password": format!("api-{core}")}), 400),
        (json!({"join_credentials": "join.cred"}), 400),
        (json!({"join_credentials": cred, "hostname_pattern": "API_{n}"}), 400),
    ] {
        let (s, v) = http.json("POST", "/api/v1/admin/pools", Some(admin), Some(body(extra.clone())));
        assert_eq!(s, status, "{extra}: {v}");
        assert_eq!(http.json("GET", "/api/v1/admin/pools/idp", Some(admin), None).0, 404, "{extra}: nothing made");
    }
    let (s, v) = http.json("POST", "/api/v1/admin/pools", Some(admin), Some(body(json!({"join_credentials": cred}))));
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["desktops"][0]["hostname"], "API-001");
    assert_eq!(v["identity"]["join"]["credentials"], cred.to_str().unwrap());
    let drive = t.env.home().join("run/idp/vdim-idp-001.config.iso");
    let iso = std::fs::read(&drive).unwrap();
    assert!(iso.windows(core.len()).any(|w| w == core.as_bytes()), "the drive carries the secret");
    let ino = std::fs::metadata(&drive).unwrap().ino();

    // A logoff through the broker resets the desktop: its drive is built again.
    let alice = add_user_api(http, admin, "alice");
    http.ok("PUT", "/api/v1/admin/pools/idp/entitlements/alice", admin, None);
    let sess = http.ok("POST", "/api/v1/pools/idp/sessions", &alice, None);
    http.ok("DELETE", &format!("/api/v1/sessions/{}", sess["id"].as_str().unwrap()), &alice, None);
    assert_ne!(std::fs::metadata(&drive).unwrap().ino(), ino, "a new drive at the reset");
    assert_eq!(std::fs::metadata(&drive).unwrap().mode() & 0o777, 0o600);
    let show = http.ok("GET", "/api/v1/admin/pools/idp", admin, None);
    let audit = http.ok("GET", "/api/v1/admin/audit", admin, None);
    for (what, text) in
        [("response", v.to_string()), ("show", show.to_string()), ("audit", audit.to_string()), ("log", t.srv.log())]
    {
        assert!(!text.contains(&core), "the join secret is in the broker's {what}");
    }
}

/// The broker runs as root: through the API, user data comes only from the home's
/// `user-data/` directory, so a token cannot copy a host file (a key, the catalog) into guests.
#[test]
fn the_admin_api_takes_user_data_only_from_the_homes_user_data_directory() {
    let t = test_driver_broker(&[]);
    let (http, admin) = (&t.http, t.admin.as_str());
    let secret = format!("host-only-{}", vdim::pool::random_secret(8));
    let outside = t.env.path("host-secret.txt");
    std::fs::write(&outside, &secret).unwrap();
    let dir = t.env.home().join("user-data");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ud.txt"), "#ps1\nWrite-Host vdim-user-data\n").unwrap();
    let body = |user_data: &str| {
        json!({"name": "ud", "image": "img", "size": 1, "profile": "test-linux",
               "identity": true, "user_data": user_data})
    };
    let sneaky = format!("{}/../host-secret.txt", dir.display());
    for path in [outside.to_str().unwrap(), sneaky.as_str(), "ud.txt"] {
        let (s, v) = http.json("POST", "/api/v1/admin/pools", Some(admin), Some(body(path)));
        assert_eq!(s, 400, "{path}: {v}");
        assert!(v["error"].as_str().unwrap().contains("user-data"), "{v}");
        assert_eq!(http.json("GET", "/api/v1/admin/pools/ud", Some(admin), None).0, 404, "{path}: nothing made");
    }
    let inside = dir.join("ud.txt");
    let (s, v) = http.json("POST", "/api/v1/admin/pools", Some(admin), Some(body(inside.to_str().unwrap())));
    assert_eq!(s, 201, "{v}");
    let iso = std::fs::read(t.env.home().join("run/ud/vdim-ud-001.config.iso")).unwrap();
    let line = b"Write-Host vdim-user-data";
    assert!(iso.windows(line.len()).any(|w| w == line), "the user data is on the drive");
    assert!(!iso.windows(secret.len()).any(|w| w == secret.as_bytes()));
}

#[test]
fn persistent_pool_gives_each_user_their_own_desktop_back() {
    let t = test_driver_broker(&[]);
    let (http, admin) = (&t.http, t.admin.as_str());
    create_pool_api(http, admin, "own", 2, true);
    let alice = add_user_api(http, admin, "alice");
    let bob = add_user_api(http, admin, "bob");
    for u in ["alice", "bob"] {
        http.ok("PUT", &format!("/api/v1/admin/pools/own/entitlements/{u}"), admin, None);
    }
    let a1 = http.ok("POST", "/api/v1/pools/own/sessions", &alice, None);
    let closed = http.ok("DELETE", &format!("/api/v1/sessions/{}", a1["id"].as_str().unwrap()), &alice, None);
    assert_eq!(closed["reset"], "kept", "a persistent desktop keeps its disk: {closed}");
    let b1 = http.ok("POST", "/api/v1/pools/own/sessions", &bob, None);
    assert_ne!(b1["desktop"], a1["desktop"], "alice's desktop stays hers");
    let a2 = http.ok("POST", "/api/v1/pools/own/sessions", &alice, None);
    assert_eq!(a2["desktop"], a1["desktop"], "alice gets her own desktop back");
    assert_ne!(a2["id"], a1["id"]);
}

#[test]
fn logoff_moves_a_desktop_that_an_update_marked_for_a_new_version() {
    let t = test_driver_broker(&[]);
    let (http, admin) = (&t.http, t.admin.as_str());
    let body =
        json!({"name": "mv", "image": "img", "channel": "dev", "size": 2, "profile": "test-linux", "start": true});
    assert_eq!(http.json("POST", "/api/v1/admin/pools", Some(admin), Some(body)).0, 201);
    let alice = add_user_api(http, admin, "alice");
    http.ok("PUT", "/api/v1/admin/pools/mv/entitlements/alice", admin, None);
    let s = http.ok("POST", "/api/v1/pools/mv/sessions", &alice, None);
    let desktop = s["desktop"].as_str().unwrap().to_string();
    seal_marker(&t.env, "img", "bk-v2", "ok");
    let r = http.ok("POST", "/api/v1/admin/pools/mv/update", admin, None);
    assert_eq!(r["at_logoff"], json!([desktop]), "in use: moves at logoff: {r}");
    let d = |show: &Value| {
        show["desktops"].as_array().unwrap().iter().find(|d| d["name"] == desktop.as_str()).unwrap().clone()
    };
    let before = d(&http.ok("GET", "/api/v1/admin/pools/mv", admin, None));
    assert_eq!((before["version"].as_u64(), before["will_run"].as_u64()), (Some(1), Some(2)));
    http.ok("DELETE", &format!("/api/v1/sessions/{}", s["id"].as_str().unwrap()), &alice, None);
    let after = d(&http.ok("GET", "/api/v1/admin/pools/mv", admin, None));
    assert_eq!((after["version"].as_u64(), after["will_run"].as_u64()), (Some(2), Some(2)), "{after}");
    assert_eq!(after["assigned_to"], Value::Null);
}

#[test]
fn sessions_expire_and_are_logged_off_by_the_broker() {
    let t = test_driver_broker(&["--session-ttl", "2s"]);
    let (http, admin) = (&t.http, t.admin.as_str());
    create_pool_api(http, admin, "ttl", 1, false);
    let alice = add_user_api(http, admin, "alice");
    http.ok("PUT", "/api/v1/admin/pools/ttl/entitlements/alice", admin, None);
    let s = http.ok("POST", "/api/v1/pools/ttl/sessions", &alice, None);
    let id = s["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let show = http.ok("GET", "/api/v1/admin/pools/ttl", admin, None);
        // Logged off, and wiped: only then can it be given again.
        if show["desktops"][0]["assigned_to"].is_null() && show["desktops"][0]["needs_reset"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "the expired session was not logged off: {show}");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(http.json("GET", &format!("/api/v1/sessions/{id}"), Some(&alice), None).0, 404);
    let audit = http.ok("GET", "/api/v1/admin/audit?pool=ttl", admin, None);
    assert!(audit.as_array().unwrap().iter().any(|e| e["action"] == "session.expire"), "{audit}");
    let metrics = http.call("GET", "/metrics", Some(admin), None).1;
    assert!(metrics.contains("vdim_sessions_reaped_total 1"), "{metrics}");
    let again = http.ok("POST", "/api/v1/pools/ttl/sessions", &alice, None);
    assert_ne!(again["id"].as_str().unwrap(), id);
}

#[test]
fn display_host_is_refused_unless_a_plain_host_name_or_address() {
    let env = Env::new();
    // --listen off loopback without TLS: a value that got through would still not start a
    // server (the test fails on the message, it does not hang).
    for bad in ["evil\nproxy=http://attacker", "host name", "[::1]", "0.0.0.0", "-h", "h/x"] {
        let arg = format!("--display-host={bad}");
        let r = env.vdim(&["--connect", "test:///default", "serve", "--listen", "0.0.0.0:0", &arg]);
        r.assert_failure().assert_stderr_contains("display host");
        let out = env
            .cmd()
            .env("VDIM_DISPLAY_HOST", bad)
            .args(["--connect", "test:///default", "serve", "--listen", "0.0.0.0:0"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("display host"), "VDIM_DISPLAY_HOST={bad:?}: {err}");
    }
}

#[test]
fn plain_http_only_on_loopback_and_tls_with_a_certificate() {
    let env = Env::new();
    let r = env.vdim(&["--connect", "test:///default", "serve", "--listen", "0.0.0.0:0"]);
    r.assert_failure().assert_stderr_contains("only loopback addresses may go without TLS");

    let (cert, key) = (env.path("cert.pem"), env.path("key.pem"));
    sh(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=vdim-test",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    );
    let missing = env.vdim(&[
        "--connect",
        "test:///default",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        "/nonexistent.pem",
    ]);
    missing.assert_failure().assert_stderr_contains("/nonexistent.pem");

    let srv = Server::start(
        &env,
        "test:///default",
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
    );
    assert!(srv.base.starts_with("https://127.0.0.1:"), "{}", srv.base);
    let curl = |extra: &[&str]| {
        let mut a = vec!["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10"];
        a.extend_from_slice(extra);
        let out = Command::new("curl").args(&a).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl(&["--cacert", cert.to_str().unwrap(), &format!("{}/healthz", srv.base)]), "200");
    assert_eq!(curl(&[&format!("{}/healthz", srv.base)]), "000", "an unknown certificate is not trusted");
    assert_eq!(curl(&[&format!("http://{}/healthz", srv.addr)]), "000", "no plain HTTP on the TLS port");
}

// ---- consoles end with their session ---------------------------------------------------------

/// A console WebSocket driven by hand, as a stalled or hostile client would: frames are read
/// and written raw, so the test sees exactly when the broker closes it.
struct RawConsole {
    s: TcpStream,
}

impl RawConsole {
    /// Upgrades with the console token and waits for the proxy's RFB greeting, which it only
    /// sends once it is logged in to the desktop's VNC display.
    fn open(srv: &Server, session: &str, console_token: &str) -> RawConsole {
        let mut s = TcpStream::connect(&srv.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!(
            "GET /console/{session}/ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {}\r\n\
             Sec-WebSocket-Protocol: binary, vdim-console-token.{console_token}\r\n\r\n",
            srv.addr, srv.base
        );
        s.write_all(head.as_bytes()).unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut b).unwrap(), 1, "the broker closed the upgrade: {}", String::from_utf8_lossy(&got));
            got.push(b[0]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        let mut c = RawConsole { s };
        assert_eq!(c.frame(), Some((2, b"RFB 003.008\n".to_vec())), "the proxy's greeting");
        c
    }

    /// The next frame (opcode, payload); `None` when the connection closed.
    fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut h = [0u8; 2];
        if let Err(e) = self.s.read_exact(&mut h) {
            assert!(
                !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
                "the console is still open"
            );
            return None;
        }
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                self.s.read_exact(&mut l).ok()?;
                u64::from(u16::from_be_bytes(l))
            }
            127 => {
                let mut l = [0u8; 8];
                self.s.read_exact(&mut l).ok()?;
                u64::from_be_bytes(l)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload).ok()?;
        Some((h[0] & 0x0f, payload))
    }

    /// A binary frame, masked as clients must.
    fn send(&mut self, data: &[u8]) {
        assert!(data.len() < 126);
        let mask = [0x12u8, 0x34, 0x56, 0x78];
        let mut f = vec![0x82, 0x80 | data.len() as u8];
        f.extend_from_slice(&mask);
        f.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.s.write_all(&f).unwrap();
    }

    /// The browser's side of RFB 3.8 up to the display's ServerInit: a working console.
    fn handshake(&mut self) {
        self.send(b"RFB 003.008\n");
        assert_eq!(self.frame(), Some((2, vec![1, 1])), "security type None offered");
        self.send(&[1]);
        assert_eq!(self.frame(), Some((2, vec![0, 0, 0, 0])), "security result ok");
        self.send(&[1]);
        let mut init = vec![];
        while init.len() < 24 {
            let (op, data) = self.frame().expect("ServerInit");
            assert_eq!(op, 2);
            init.extend(data);
        }
        let (w, h) = (u16::from_be_bytes([init[0], init[1]]), u16::from_be_bytes([init[2], init[3]]));
        assert!(w > 0 && h > 0, "the display's ServerInit: {init:?}");
    }

    /// Waits until the broker closes the console, at most `limit` after `since`; returns when.
    #[track_caller]
    fn closed_within(&mut self, since: Instant, limit: Duration, what: &str) -> Duration {
        loop {
            let left = limit.checked_sub(since.elapsed()).unwrap_or_default().max(Duration::from_millis(1));
            self.s.set_read_timeout(Some(left)).unwrap();
            let mut h = [0u8; 1];
            match self.s.peek(&mut h) {
                Ok(0) => break,
                Ok(_) => match self.frame() {
                    None => break,
                    Some((8, why)) => {
                        eprintln!(
                            "{what}: close frame {:?}",
                            String::from_utf8_lossy(why.get(2..).unwrap_or_default())
                        );
                        break;
                    }
                    Some(_) => {}
                },
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    panic!("{what}: the console was still open {:?} later", since.elapsed())
                }
                Err(_) => break,
            }
        }
        eprintln!("{what}: console closed after {:?}", since.elapsed());
        since.elapsed()
    }
}

/// VNC clients QEMU has on a desktop's display (the proxy's login is one).
fn vnc_clients(desktop: &str) -> usize {
    virsh(&["qemu-monitor-command", "--hmp", desktop, "info vnc"]).lines().filter(|l| l.contains("Client:")).count()
}

/// QEMU drops the proxy's VNC connection soon after the proxy closes it.
#[track_caller]
fn assert_no_vnc_client(desktop: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while vnc_clients(desktop) > 0 {
        assert!(Instant::now() < deadline, "{what}: the display still has a VNC client");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A session of `token`'s user in `pool` (retrying while its last logoff finishes) and its
/// console token.
fn open_session(http: &Http, pool: &str, token: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (s, v) = http.json("POST", &format!("/api/v1/pools/{pool}/sessions"), Some(token), None);
        if s == 201 {
            let ct = v["console_url"].as_str().unwrap().split("#token=").nth(1).unwrap().to_string();
            return (v["id"].as_str().unwrap().to_string(), ct);
        }
        assert!(s == 409 && Instant::now() < deadline, "{s}: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A `vdim` command started in the background, so the test can watch the console meanwhile.
fn vdim_in_background(t: &LibvirtEnv, args: &[&str]) -> Child {
    t.env.cmd().env("VDIM_VIRT_TYPE", "qemu").args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

#[track_caller]
fn assert_succeeded(c: Child) {
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn every_way_a_session_ends_closes_its_console_within_3_s_at_every_stage() {
    let t = LibvirtEnv::new("bkend");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "bk-end");
    // Persistent: logoff keeps the desktop running, so nothing but the broker closes the console.
    t.create_pool(&pool, "img", "dev", 1, "test-linux", &["--persistent", "--start"]);
    let desktop = format!("vdim-{pool}-001");
    let mut alice = add_user_cli(&t.env, "alice", false);
    let admin = add_user_cli(&t.env, "admin", true);
    t.vdim(&["pool", "entitle", &pool, "alice"]).assert_success();
    let srv = Server::start(&t.env, "qemu:///system", &[]);
    let http = Http::new(&srv.base);
    let limit = Duration::from_secs(3);
    // The console watcher and the reaper are separate loops of a second each: the catalog
    // records the end within the same limit as the console closes.
    let gone = |id: &str, what: &str| {
        let mut cat = vdim::catalog::Catalog::open(&t.env.home().join("catalog.db"), false).unwrap();
        let deadline = Instant::now() + limit;
        while cat.read(|tx| tx.session(id)).unwrap().is_some_and(|r| r.ended.is_none()) {
            assert!(Instant::now() < deadline, "{what}: the session is ended in the catalog within {limit:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // Logoff while the browser never sent its RFB greeting: the proxy is logged in to the
    // display already, and must not keep that connection.
    let (id, ct) = open_session(&http, &pool, &alice);
    let mut c = RawConsole::open(&srv, &id, &ct);
    assert_eq!(vnc_clients(&desktop), 1, "the proxy holds an authenticated VNC connection");
    let t0 = Instant::now();
    let closed = http.ok("DELETE", &format!("/api/v1/sessions/{id}"), &alice, None);
    assert_eq!(closed["reset"], "kept", "{closed}");
    c.closed_within(t0, limit, "logoff before the RFB greeting");
    assert_no_vnc_client(&desktop, "logoff");

    // Nobody logs off, the client just never answers: the handshake timeout closes it.
    let (id, ct) = open_session(&http, &pool, &alice);
    let t0 = Instant::now();
    let mut c = RawConsole::open(&srv, &id, &ct);
    let took = c.closed_within(t0, Duration::from_secs(15), "a silent client");
    assert!(took >= Duration::from_secs(5), "closed by the handshake timeout, not at once: {took:?}");
    assert_no_vnc_client(&desktop, "handshake timeout");

    // Expiry, with the client stalled in the middle of its handshake.
    let mut c = RawConsole::open(&srv, &id, &ct);
    c.send(b"RFB 003.008\n");
    assert_eq!(c.frame(), Some((2, vec![1, 1])));
    t.env.expire_session_now(&id);
    c.closed_within(Instant::now(), limit, "expiry mid-handshake");
    assert_no_vnc_client(&desktop, "expiry");
    gone(&id, "expiry");

    // The user removed by the CLI (another process) while the console works.
    let (id, ct) = open_session(&http, &pool, &alice);
    let mut c = RawConsole::open(&srv, &id, &ct);
    c.handshake();
    let t0 = Instant::now();
    assert_succeeded(vdim_in_background(&t, &["user", "remove", "alice"]));
    c.closed_within(t0, limit, "user removed");
    assert_no_vnc_client(&desktop, "user removed");
    gone(&id, "user removed");
    alice = add_user_cli(&t.env, "alice", false);
    t.vdim(&["pool", "entitle", &pool, "alice"]).assert_success();

    // The entitlement removed by the CLI, before the RFB greeting.
    let (id, ct) = open_session(&http, &pool, &alice);
    let mut c = RawConsole::open(&srv, &id, &ct);
    let t0 = Instant::now();
    assert_succeeded(vdim_in_background(&t, &["pool", "unentitle", &pool, "alice"]));
    c.closed_within(t0, limit, "entitlement removed");
    assert_no_vnc_client(&desktop, "entitlement removed");
    gone(&id, "entitlement removed");
    let (s, _) = http.json("POST", &format!("/api/v1/pools/{pool}/sessions"), Some(&alice), None);
    assert_eq!(s, 403, "no longer entitled");
    t.vdim(&["pool", "entitle", &pool, "alice"]).assert_success();

    // The same through the admin API, while the console works.
    let (id, ct) = open_session(&http, &pool, &alice);
    let mut c = RawConsole::open(&srv, &id, &ct);
    c.handshake();
    let t0 = Instant::now();
    let e = http.ok("DELETE", &format!("/api/v1/admin/pools/{pool}/entitlements/alice"), &admin, None);
    assert_eq!(e["sessions_closed"], json!([id]), "{e}");
    c.closed_within(t0, limit, "entitlement removed by the API");
    gone(&id, "entitlement removed by the API");
    t.vdim(&["pool", "entitle", &pool, "alice"]).assert_success();

    // The desktop moved to a new version by 'pool update --force', before the RFB greeting.
    seal_marker(&t.env, "img", "bk-end-v2", "ok");
    let (id, ct) = open_session(&http, &pool, &alice);
    let mut c = RawConsole::open(&srv, &id, &ct);
    let t0 = Instant::now();
    let update = vdim_in_background(&t, &["pool", "update", &pool, "--force"]);
    c.closed_within(t0, limit, "desktop moved");
    assert_succeeded(update);
    gone(&id, "desktop moved");
    let show = t.vdim_json(&["pool", "show", &pool]);
    let d = &show["desktops"][0];
    assert_eq!(
        (d["version"].as_u64(), d["needs_reset"].as_bool(), d["assigned_to"].as_str()),
        (Some(2), Some(false), Some("alice")),
        "moved now, and still alice's own desktop: {show}"
    );
    t.wait_marker(&pool, &desktop, "bk-end-v2", 120);

    // The pool deleted, before the RFB greeting.
    let (id, ct) = open_session(&http, &pool, &alice);
    let mut c = RawConsole::open(&srv, &id, &ct);
    let t0 = Instant::now();
    let delete = vdim_in_background(&t, &["pool", "delete", &pool, "--force"]);
    c.closed_within(t0, limit, "pool deleted");
    assert_succeeded(delete);
    gone(&id, "pool deleted");
    assert!(t.domains().is_empty());
    assert_no_secret_in(&srv.log(), &[&alice, &admin, &ct]);
}

/// Established TCP connections to a local port (a SPICE viewer opens several channels).
fn connections_to(port: &str) -> usize {
    let out = sh("ss", &["-Htn", "state", "established", &format!("( dport = :{port} )")]);
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count()
}

/// remote-viewer left running on a `.vv` file until it says its main channel opened.
fn viewer_connected(x: &Xvfb, vv_text: &str, env: &Env, name: &str) -> (Child, String) {
    let vv = env.path(&format!("{name}.vv"));
    std::fs::write(&vv, vv_text).unwrap();
    let log = env.path(&format!("{name}.log"));
    let out = File::create(&log).unwrap();
    let child = Command::new("remote-viewer")
        .arg("--debug")
        .arg(&vv)
        .env("DISPLAY", &x.display)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap().contains("main channel: opened") {
        assert!(
            Instant::now() < deadline,
            "remote-viewer did not connect:\n{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (child, std::fs::read_to_string(&log).unwrap())
}

#[test]
fn a_spice_viewer_is_dropped_within_3_s_of_logoff_or_expiry_on_a_kept_desktop_and_its_ticket_dies() {
    let t = LibvirtEnv::new("bksp");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "bk-spice");
    t.create_pool(&pool, "img", "dev", 1, "test-linux", &["--persistent", "--start"]);
    let alice = add_user_cli(&t.env, "alice", false);
    t.vdim(&["pool", "entitle", &pool, "alice"]).assert_success();
    let srv = Server::start(&t.env, "qemu:///system", &[]);
    let http = Http::new(&srv.base);
    let x = Xvfb::start();
    let vv = |id: &str| {
        let (s, text) = http.call("GET", &format!("/api/v1/sessions/{id}/console.vv"), Some(&alice), None);
        assert_eq!(s, 200, "{text}");
        let port = text.lines().find_map(|l| l.strip_prefix("port=")).unwrap().to_string();
        (text, port)
    };
    let dropped_within = |viewer: &mut Child, port: &str, since: Instant, what: &str| {
        while connections_to(port) > 0 {
            assert!(since.elapsed() < Duration::from_secs(3), "{what}: the viewer is still connected");
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{what}: viewer dropped after {:?}", since.elapsed());
        let _ = viewer.kill();
        let _ = viewer.wait();
    };

    for (round, end) in ["logoff", "expiry"].into_iter().enumerate() {
        let (id, _) = open_session(&http, &pool, &alice);
        let (text, port) = vv(&id);
        let (mut viewer, _) = viewer_connected(&x, &text, &t.env, &format!("rv-{end}"));
        assert!(connections_to(&port) > 0, "{end}: the viewer's channels are connected");
        let t0 = Instant::now();
        if round == 0 {
            let closed = http.ok("DELETE", &format!("/api/v1/sessions/{id}"), &alice, None);
            assert_eq!(closed["reset"], "kept", "{closed}");
        } else {
            t.env.expire_session_now(&id);
        }
        dropped_within(&mut viewer, &port, t0, end);
        // Its ticket was replaced: the same .vv no longer opens the display.
        let again = t.env.path(&format!("again-{end}.vv"));
        std::fs::write(&again, &text).unwrap();
        let shot = t.env.path("rv.png");
        assert_eq!(
            remote_viewer(&x, &again, &t.env.path(&format!("rv-again-{end}.log")), &shot),
            Viewer::AuthFailed,
            "{end}: the ended session's ticket"
        );
    }
    let show = t.vdim_json(&["pool", "show", &pool]);
    assert!(
        show["desktops"][0]["state"].as_str().unwrap().starts_with("running"),
        "kept desktops keep running: {show}"
    );
    assert_eq!(show["desktops"][0]["assigned_to"], "alice", "and stay the user's own: {show}");
}

/// A desktop's QEMU stopped (SIGSTOP) so its display and monitor never answer; resumed on drop.
struct Frozen(String);

impl Frozen {
    fn new(desktop: &str) -> Frozen {
        let pid = std::fs::read_to_string(format!("/var/run/libvirt/qemu/{desktop}.pid")).unwrap();
        let pid = pid.trim().to_string();
        sh("kill", &["-STOP", &pid]);
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0]).status();
    }
}

#[test]
fn a_display_that_never_answers_delays_no_token_check_and_its_console_times_out() {
    let t = LibvirtEnv::new("bkfz");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "bk-frozen");
    t.create_pool(&pool, "img", "dev", 1, "test-linux", &["--start"]);
    let alice = add_user_cli(&t.env, "alice", false);
    t.vdim(&["pool", "entitle", &pool, "alice"]).assert_success();
    let srv = Server::start(&t.env, "qemu:///system", &[]);
    let http = Http::new(&srv.base);
    let (id, ct) = open_session(&http, &pool, &alice);
    let desktop = format!("vdim-{pool}-001");

    // The console starts its login on a display (and monitor) that never answers.
    let frozen = Frozen::new(&desktop);
    let mut stuck = TcpStream::connect(&srv.addr).unwrap();
    let head = format!(
        "GET /console/{id}/ws HTTP/1.1\r\nHost: {0}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: {1}\r\n\
         Sec-WebSocket-Protocol: binary, vdim-console-token.{ct}\r\n\r\n",
        srv.addr, srv.base
    );
    stuck.write_all(head.as_bytes()).unwrap();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_millis(500));

    // Meanwhile wrong tokens are refused at once: the login in progress gates no token check.
    for token in ["0".repeat(64), "not-a-token".into()] {
        let t1 = Instant::now();
        assert_eq!(ws_status(&srv, &id, Some(&srv.base), Some(&token)), 401);
        assert!(t1.elapsed() < Duration::from_secs(1), "the token check waited {:?}", t1.elapsed());
    }

    // And the stuck console is given up by the handshake timeout.
    stuck.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let (mut got, mut buf) = (vec![], [0u8; 4096]);
    // Until EOF or a close frame right after the 101 head (a read timeout is 15 s: too late).
    while !got.windows(5).any(|w| w[..4] == *b"\r\n\r\n" && w[4] == 0x88) {
        match stuck.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(13)).contains(&took),
        "closed by the handshake timeout, not after {took:?}: {text}"
    );
    drop(frozen);
    assert_no_secret_in(&srv.log(), &[&alice, &ct]);
}

/// Leaves a rollout of `image` as a vdim killed mid-rollout does: running, owned by a process
/// that is gone.
fn leave_interrupted_rollout(env: &Env, image: &str) {
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id() as i64;
    gone.wait().unwrap();
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let mut cat = env.catalog();
    cat.write(|tx| {
        tx.sql()
            .execute(
                "INSERT INTO rollouts (image_id, version, channel, from_version, state, waves, soak_ms, actor, owner_pid, created, updated)
                 SELECT id, 1, 'prod', 1, 'running', '1,100%', 30000, 'test', ?2, ?3, ?3 FROM images WHERE name = ?1",
                vdim::params![image, pid, now],
            )
            .map_err(vdim::catalog::CatalogError::from)
    })
    .unwrap();
}

#[test]
fn an_interrupted_rollout_is_adopted_by_a_leading_broker_and_halted_by_a_command_without_one() {
    let env = Env::new();
    marker_image(&env, "img", "bk-int1");
    marker_image(&env, "img2", "bk-int2");
    let admin = add_user_cli(&env, "admin", true);
    let adopted = |http: &Http, image: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = http.ok("GET", "/api/v1/admin/rollouts", &admin, None);
            let r = v.as_array().unwrap().iter().find(|r| r["image"] == image).unwrap_or_else(|| panic!("{v}")).clone();
            assert_ne!(r["state"], "halted", "{image}: a leading broker adopts, it does not halt: {r}");
            if r["state"] == "succeeded" {
                break;
            }
            assert!(Instant::now() < deadline, "{image}: not adopted: {r}");
            std::thread::sleep(Duration::from_millis(200));
        }
        let audit = http.ok("GET", &format!("/api/v1/admin/audit?image={image}"), &admin, None);
        let e = audit.as_array().unwrap().iter().find(|e| e["action"] == "rollout.adopted").cloned();
        let e = e.unwrap_or_else(|| panic!("{image}: no rollout.adopted in {audit}"));
        assert!(e["detail"]["from_pid"].is_i64() && e["detail"]["by"].is_string(), "{e}");
    };
    // Died before the broker started: the broker, leading, carries it on.
    leave_interrupted_rollout(&env, "img");
    let srv = Server::start(&env, "test:///default", &[]);
    let http = Http::new(&srv.base);
    adopted(&http, "img");
    // Died while the broker runs: the same, and the admin API's status halts nothing.
    leave_interrupted_rollout(&env, "img2");
    adopted(&http, "img2");
    srv.stop();
    // Without a broker, any command finds it and halts it, as on a single machine.
    leave_interrupted_rollout(&env, "img");
    env.vdim(&["image", "list"]).assert_success().assert_stderr_contains("was interrupted in wave 1");
    let v = env.vdim_json(&["rollout", "status", "img", "--limit", "1"]);
    assert_eq!(v[0]["state"], "halted", "{v}");
    assert!(v[0]["report"]["interrupted"]["pid"].is_i64(), "{v}");
}
