//! The broker under abuse, through the real `vdim serve` on 127.0.0.1: a thousand slow or
//! idle connections (slowloris), errors that must not tell a thin client about host paths
//! or libvirt, and `/metrics` kept for administrators or a listener of its own.

mod common;
use common::serve::Server;
use common::*;
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// HTTP through reqwest on a runtime of the test's own; a fresh client (no pooled
/// connection) per `Http`.
struct Http {
    rt: tokio::runtime::Runtime,
    c: reqwest::Client,
    base: String,
}

impl Http {
    fn new(base: &str) -> Http {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        Http { rt, c, base: base.to_string() }
    }

    fn call(&self, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
        let mut r = self.c.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        self.rt.block_on(async {
            let resp = r.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            (resp.status().as_u16(), resp.text().await.unwrap())
        })
    }

    fn json(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let mut r = self.c.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let (s, text) = self.rt.block_on(async {
            let resp = r.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
            (resp.status().as_u16(), resp.text().await.unwrap())
        });
        (s, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    #[track_caller]
    fn ok(&self, method: &str, path: &str, token: &str, body: Option<Value>) -> Value {
        let (s, v) = self.json(method, path, Some(token), body);
        assert!((200..300).contains(&s), "{method} {path} -> {s}: {v}");
        v
    }
}

fn add_user(env: &Env, name: &str, admin: bool) -> String {
    let mut args = vec!["user", "add", name];
    if admin {
        args.push("--admin");
    }
    env.vdim_json(&args)["token"].as_str().unwrap().to_string()
}

/// Enough open files for a thousand sockets in this process.
fn raise_nofile(want: u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_cur < want {
            r.rlim_cur = want.min(r.rlim_max);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
        }
        assert!(r.rlim_cur >= want, "RLIMIT_NOFILE hard limit {} is below {want}", r.rlim_max);
    }
}

/// Has the server closed this socket? Waits until `deadline` for EOF or a reset.
fn closed_by_server(mut s: &TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            // A 408 or 400 answer before the close is fine: read on to the close.
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

#[test]
fn a_thousand_slow_connections_neither_starve_a_session_open_nor_stay_open() {
    const SLOW: usize = 1000;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
    raise_nofile(4 * SLOW as u64);
    let env = Env::new();
    marker_image(&env, "img", "abuse-slow");
    let admin = add_user(&env, "admin", true);
    let alice = add_user(&env, "alice", false);
    // A cap below the number of attackers: the slow ones must not be what fills it.
    let srv =
        Server::start_logging(&env, "test:///default", &["--header-timeout", "3s", "--max-connections", "400"], "info");
    let setup = Http::new(&srv.base);
    let body = json!({"name": "slow", "image": "img", "size": 2, "profile": "test-linux", "start": true});
    setup.ok("POST", "/api/v1/admin/pools", &admin, Some(body));
    setup.ok("PUT", "/api/v1/admin/pools/slow/entitlements/alice", &admin, None);
    drop(setup);

    // Slowloris: a third send nothing, a third half a request line, a third a request whose
    // headers never end, dripped a line every 500 ms.
    let mut socks = Vec::with_capacity(SLOW);
    let mut drip = Vec::new();
    for i in 0..SLOW {
        let mut s = TcpStream::connect(&srv.addr).unwrap_or_else(|e| panic!("connection {i}: {e}"));
        match i % 3 {
            0 => {}
            1 => s.write_all(b"POST /api/v1/pools/slow/sess").unwrap(),
            _ => {
                s.write_all(b"POST /api/v1/pools/slow/sessions HTTP/1.1\r\nHost: x\r\n").unwrap();
                drip.push(s.try_clone().unwrap());
            }
        }
        socks.push(s);
    }
    let last_opened = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let dripper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for s in &mut drip {
                    let _ = s.write_all(b"X-Slow: 1\r\n");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };

    // A real user on a fresh connection still gets a session at once.
    let user = Http::new(&srv.base);
    let t = Instant::now();
    let (status, v) = user.json("POST", "/api/v1/pools/slow/sessions", Some(&alice), None);
    let took = t.elapsed();
    assert_eq!(status, 201, "{v}");
    assert!(took < Duration::from_secs(1), "the session open took {took:?} behind {SLOW} slow connections");
    eprintln!("session open behind {SLOW} slow connections: {:.1} ms", took.as_secs_f64() * 1e3);
    // The cap was reached and the slow connections, not the users, made room.
    let metrics = user.call("GET", "/metrics", Some(&admin)).1;
    let counter = |name: &str| -> u64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("{name}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let (evicted, refused) = (counter("vdim_connections_evicted_total"), counter("vdim_connections_refused_total"));
    eprintln!("evicted {evicted}, refused {refused}");
    assert!(evicted >= 600 && refused == 0, "evicted {evicted}, refused {refused}");

    // Every slow connection is closed by the server within the header timeout (+ slack).
    let deadline = last_opened + HEADER_TIMEOUT + Duration::from_secs(2);
    let open: Vec<usize> =
        socks.iter().enumerate().filter(|(_, s)| !closed_by_server(s, deadline)).map(|(i, _)| i).collect();
    stop.store(true, Ordering::Relaxed);
    dripper.join().unwrap();
    assert!(
        open.is_empty(),
        "{} of {SLOW} slow connections still open after the header timeout: {:?}",
        open.len(),
        &open[..open.len().min(10)]
    );
    // Still serving afterwards.
    let (status, _) = user.json("GET", "/api/v1/sessions", Some(&alice), None);
    assert_eq!(status, 200);
}

#[test]
fn metrics_need_an_admin_token_or_the_metrics_listener() {
    let env = Env::new();
    marker_image(&env, "img", "abuse-metrics");
    let admin = add_user(&env, "admin", true);
    let alice = add_user(&env, "alice", false);
    let srv = Server::start_logging(&env, "test:///default", &["--metrics-listen", "127.0.0.1:0"], "info");
    let http = Http::new(&srv.base);

    let (s, body) = http.call("GET", "/metrics", None);
    assert_eq!(s, 401, "anonymous: {body}");
    assert!(!body.contains("vdim_"), "{body}");
    let (s, body) = http.call("GET", "/metrics", Some(&alice));
    assert_eq!(s, 403, "thin client: {body}");
    assert!(!body.contains("vdim_"), "{body}");
    let (s, body) = http.call("GET", "/metrics", Some(&admin));
    assert_eq!(s, 200, "admin: {body}");
    assert!(body.lines().any(|l| l == "vdim_sessions_open 0"), "{body}");

    // The metrics listener serves them without a token, and nothing else.
    let metrics_url = srv
        .banner
        .split(|c: char| c.is_whitespace() || c == ',' || c == ')')
        .find(|w| w.starts_with("http://") && w.ends_with("/metrics"))
        .unwrap_or_else(|| panic!("no metrics URL in {:?}", srv.banner))
        .to_string();
    let metrics_base = metrics_url.trim_end_matches("/metrics");
    assert_ne!(metrics_base, srv.base);
    let m = Http::new(metrics_base);
    let (s, body) = m.call("GET", "/metrics", None);
    assert_eq!(s, 200, "{body}");
    assert!(body.contains("# TYPE vdim_sessions_open gauge"), "{body}");
    assert!(body.lines().any(|l| l.starts_with("vdim_http_responses_total{code=\"401\"}")), "{body}");
    let (s, _) = m.call("GET", "/api/v1/admin/users", Some(&admin));
    assert_eq!(s, 404, "the metrics listener serves only /metrics");
    let (s, _) = http.call("GET", "/metrics", None);
    assert_eq!(s, 401, "the main listener still refuses anonymous scrapes");
}

/// A unix-socket proxy in front of libvirtd that the test can cut, as a libvirtd restart would.
struct LibvirtProxy {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<Vec<UnixStream>>>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl LibvirtProxy {
    fn start(path: &Path) -> LibvirtProxy {
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let streams: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let accept = {
            let (stop, streams) = (stop.clone(), streams.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((client, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    client.set_nonblocking(false).unwrap();
                    let daemon = UnixStream::connect("/var/run/libvirt/libvirt-sock").unwrap();
                    let mut all = streams.lock().unwrap();
                    for (mut from, mut to) in [
                        (client.try_clone().unwrap(), daemon.try_clone().unwrap()),
                        (daemon.try_clone().unwrap(), client.try_clone().unwrap()),
                    ] {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut to);
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                    all.extend([client, daemon]);
                }
            })
        };
        LibvirtProxy { path: path.to_path_buf(), stop, streams, accept: Some(accept) }
    }

    fn cut(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            t.join().unwrap();
        }
        let _ = std::fs::remove_file(&self.path);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for LibvirtProxy {
    fn drop(&mut self) {
        self.cut();
    }
}

#[test]
fn thin_clients_get_an_error_id_without_host_paths_or_libvirt_text_and_the_log_has_the_detail() {
    let t = LibvirtEnv::new("abuerr");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "abuse-err");
    t.create_pool(&pool, "img", "prod", 1, "test-linux", &["--start"]);
    let admin = add_user(&t.env, "admin", true);
    let alice = add_user(&t.env, "alice", false);
    t.vdim(&["pool", "entitle", &pool, "alice"]).assert_success();
    let sock = t.env.path("libvirt.sock");
    let mut proxy = LibvirtProxy::start(&sock);
    let srv = Server::start_logging(&t.env, &format!("qemu+unix:///system?socket={}", sock.display()), &[], "info");
    let http = Http::new(&srv.base);
    let (s, sess) = http.json("POST", &format!("/api/v1/pools/{pool}/sessions"), Some(&alice), None);
    assert_eq!(s, 201, "{sess}");
    let (id, desktop) = (sess["id"].as_str().unwrap().to_string(), sess["desktop"].as_str().unwrap().to_string());

    // libvirtd goes away under the broker: the .vv needs it.
    proxy.cut();
    let (s, body) = http.call("GET", &format!("/api/v1/sessions/{id}/console.vv"), Some(&alice));
    assert!(s >= 500, "{s} {body}");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    let home = t.env.dir.path().to_str().unwrap();
    assert!(!body.contains(home), "a host path reached the thin client: {body}");
    assert!(!body.to_lowercase().contains("libvirt"), "libvirt's words reached the thin client: {body}");
    let message = v["error"].as_str().unwrap();
    assert!(message.contains(&desktop) && message.contains("contact your administrator"), "{message}");
    let error_id = v["error_id"].as_str().unwrap_or_else(|| panic!("no error_id: {body}"));
    assert!(message.contains(error_id), "{message}");

    // The log has the detail under the same id.
    let log = srv.log();
    let line = log.lines().find(|l| l.contains(error_id)).unwrap_or_else(|| panic!("no {error_id} in\n{log}"));
    assert!(line.to_lowercase().contains("libvirt") && line.contains(&desktop), "{line}");

    // An administrator's API keeps the detail in the body.
    let (s, v) =
        http.json("POST", &format!("/api/v1/admin/pools/{pool}/stop"), Some(&admin), Some(json!({"force": true})));
    assert!(s >= 500, "{s} {v}");
    assert!(v["error"].as_str().unwrap().to_lowercase().contains("libvirt"), "{v}");
    assert!(v["error_id"].is_string(), "{v}");
}

#[test]
fn a_request_body_that_does_not_arrive_in_time_gets_408_and_changes_nothing() {
    let env = Env::new();
    let admin = add_user(&env, "admin", true);
    let srv = Server::start_logging(&env, "test:///default", &["--request-timeout", "2s"], "info");
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    let t = Instant::now();
    write!(
        s,
        "POST /api/v1/admin/users HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n\
         Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{{\"name\":"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let took = t.elapsed();
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 408"), "{head:?} after {took:?}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(6), "{took:?}");
    let users = Http::new(&srv.base).ok("GET", "/api/v1/admin/users", &admin, None);
    assert_eq!(users.as_array().unwrap().len(), 1, "{users}");
}

#[test]
fn tls_handshakes_that_never_finish_are_closed_by_the_header_timeout() {
    let env = Env::new();
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
    let srv = Server::start_logging(
        &env,
        "test:///default",
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap(), "--header-timeout", "2s"],
        "info",
    );
    // Half of them say nothing, half start a ClientHello (a TLS record header) and stop.
    let socks: Vec<TcpStream> = (0..100)
        .map(|i| {
            let mut s = TcpStream::connect(&srv.addr).unwrap();
            if i % 2 == 1 {
                s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).unwrap();
            }
            s
        })
        .collect();
    let opened = Instant::now();
    let t = Instant::now();
    let out = std::process::Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--cacert"])
        .arg(&cert)
        .arg(format!("{}/healthz", srv.base))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{}", String::from_utf8_lossy(&out.stderr));
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let deadline = opened + Duration::from_secs(4);
    let open = socks.iter().filter(|s| !closed_by_server(s, deadline)).count();
    assert_eq!(open, 0, "{open} of 100 stalled TLS handshakes still open after the header timeout");
}

#[test]
fn serve_refuses_limits_it_cannot_keep() {
    let env = Env::new();
    let serve = |extra: &[&str]| {
        let mut a = vec!["--connect", "test:///default", "serve", "--listen", "127.0.0.1:0"];
        a.extend_from_slice(extra);
        env.vdim(&a)
    };
    serve(&["--max-connections", "0"])
        .assert_failure()
        .assert_stderr_contains("--max-connections must be more than zero");
    serve(&["--header-timeout", "0s"])
        .assert_failure()
        .assert_stderr_contains("--header-timeout must be more than zero");
    serve(&["--request-timeout", "0s"])
        .assert_failure()
        .assert_stderr_contains("--request-timeout must be more than zero");
    serve(&["--max-connections", "1000000000"]).assert_failure().assert_stderr_contains(
        "--max-connections 1000000000 needs 1000000256 open files but the hard limit (ulimit -Hn)",
    );
}
