//! Displays off loopback: SPICE over TLS only, on a libvirt host configured for it (a test
//! host of its own with a CA and server certificate made here with openssl), reached by
//! remote-viewer through the broker's `.vv`; plaintext only with `--insecure-display`.

mod common;

use common::host::TestHost;
use common::serve::Server;
use common::viewer::{screenshot_text_pixels, Viewer, Xvfb};
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// A CA (`<name>-ca-cert.pem`, `<name>-ca-key.pem`) made with openssl in `dir`.
fn make_ca(dir: &Path, name: &str) -> std::path::PathBuf {
    let cert = dir.join(format!("{name}-ca-cert.pem"));
    let key = dir.join(format!("{name}-ca-key.pem"));
    sh(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/O=vdim test/CN={name} CA"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    );
    cert
}

/// libvirt's spice_tls_x509_cert_dir for a host at `addr`: ca-cert.pem, server-cert.pem
/// (subject `O=vdim test,CN=<addr>`, the address also as subjectAltName), server-key.pem.
fn spice_cert_dir(dir: &Path, addr: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let ca = make_ca(dir, "host");
    std::fs::copy(&ca, dir.join("ca-cert.pem")).unwrap();
    let (key, csr, cert, ext) =
        (dir.join("server-key.pem"), dir.join("server.csr"), dir.join("server-cert.pem"), dir.join("san.ext"));
    std::fs::write(&ext, format!("subjectAltName=IP:{addr}\n")).unwrap();
    sh(
        "openssl",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/O=vdim test/CN={addr}"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            csr.to_str().unwrap(),
        ],
    );
    sh(
        "openssl",
        &[
            "x509",
            "-req",
            "-days",
            "2",
            "-in",
            csr.to_str().unwrap(),
            "-CA",
            ca.to_str().unwrap(),
            "-CAkey",
            dir.join("host-ca-key.pem").to_str().unwrap(),
            "-CAcreateserial",
            "-extfile",
            ext.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ],
    );
}

/// One authenticated request to a broker; (status, body).
fn call(srv: &Server, method: &str, path: &str, token: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let r = c.request(method.parse().unwrap(), format!("{}{path}", srv.base)).bearer_auth(token);
        let resp = r.send().await.unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        (resp.status().as_u16(), resp.text().await.unwrap())
    })
}

fn add_user(env: &Env, name: &str) -> String {
    env.vdim_json(&["user", "add", name])["token"].as_str().unwrap().to_string()
}

fn vv_keys(text: &str) -> BTreeMap<String, String> {
    assert!(text.starts_with("[virt-viewer]\n"), "{text}");
    text.lines().skip(1).map(|l| l.split_once('=').unwrap()).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// `.vv` form of a PEM file: its lines joined by a literal `\n`.
fn vv_pem(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap().lines().filter(|l| !l.is_empty()).collect::<Vec<_>>().join("\\n")
}

/// TCP sockets of the host (in its namespace) on `port`, listening or established.
fn sockets(host: &TestHost, state: &str, port: u16) -> Vec<String> {
    let out = host.exec("ss", &["-H", "-t", "-n", "state", state, &format!("( sport = :{port} )")]);
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect()
}

/// The desktop's SPICE TLS port, after checking its display is TLS-only (`defaultMode='secure'`).
fn secure_spice_port(host: &TestHost, desktop: &str) -> u16 {
    let xml = String::from_utf8_lossy(&sh("virsh", &["-c", &host.uri, "dumpxml", desktop]).stdout).into_owned();
    let spice = xml.lines().find(|l| l.contains("<graphics type='spice'")).unwrap().to_string();
    assert!(spice.contains("defaultMode='secure'"), "{spice}");
    spice.split("tlsPort='").nth(1).and_then(|r| r.split('\'').next()).unwrap().parse().expect("tlsPort")
}

/// The only SPICE socket listening on the host's address is the TLS one (16509 is libvirtd).
fn assert_only_tls_port_listens(host: &TestHost, tls_port: u16) {
    let listening = String::from_utf8_lossy(&host.exec("ss", &["-H", "-l", "-t", "-n"]).stdout).into_owned();
    let on_addr: Vec<&str> = listening
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3))
        .filter(|a| a.starts_with(&format!("{}:", host.addr)) && !a.ends_with(":16509"))
        .collect();
    assert_eq!(on_addr, [format!("{}:{tls_port}", host.addr)], "{listening}");
}

#[test]
fn off_loopback_plaintext_needs_insecure_display_and_pool_show_says_so() {
    // The system libvirtd here has no SPICE TLS (qemu.conf spice_tls = 0).
    let t = LibvirtEnv::new("tlsno");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "tls-no");
    let create = |extra: &[&str]| {
        let mut a = vec!["--json", "pool", "create", &pool, "--image", "img", "--size", "1", "--profile", "test-linux"];
        a.extend_from_slice(extra);
        t.vdim(&a)
    };
    for listen in ["0.0.0.0", "192.0.2.10"] {
        let r = create(&["--display-listen", listen, "--start"]);
        r.assert_failure()
            .assert_stderr_contains(&format!("pool '{pool}' would put its SPICE displays on {listen}"))
            .assert_stderr_contains("spice_tls = 1")
            .assert_stderr_contains("--insecure-display");
    }
    assert!(t.domains().is_empty(), "nothing defined: {:?}", t.domains());
    let virsh = sh("virsh", &["-c", "qemu:///system", "list", "--all", "--name"]);
    assert!(!String::from_utf8_lossy(&virsh.stdout).contains("vdim-probe-spice-tls"), "the probe is gone");
    assert!(!t.env.home().join("desktops").join(&pool).exists(), "no overlay written");
    t.vdim(&["pool", "show", &pool]).assert_exit_code(4);
    assert_eq!(t.vdim_json(&["audit", "--pool", &pool]), serde_json::json!([]), "nothing recorded");

    // Chosen explicitly: plaintext, recorded, shown, audited.
    let r = create(&["--display-listen", "0.0.0.0", "--insecure-display", "--start"]);
    r.assert_success();
    assert_eq!(r.json()["insecure_display"], true, "{}", r.stdout());
    assert_eq!(t.vdim_json(&["pool", "show", &pool])["insecure_display"], true);
    let text = t.vdim(&["pool", "show", &pool]);
    assert!(text.assert_success().stdout().contains("displays on 0.0.0.0 (INSECURE"), "{}", text.stdout());
    assert_eq!(t.vdim_json(&["audit", "--pool", &pool])[0]["detail"]["insecure_display"], true);
    let xml =
        String::from_utf8_lossy(&sh("virsh", &["-c", "qemu:///system", "dumpxml", &format!("vdim-{pool}-001")]).stdout)
            .into_owned();
    let spice = xml.lines().find(|l| l.contains("<graphics type='spice'")).unwrap();
    assert!(!spice.contains("defaultMode") && !spice.contains("port='-1'"), "plaintext port: {spice}");

    // Loopback needs neither TLS nor the option.
    let lo = t.pool_name("lo");
    let v = t.create_pool(&lo, "img", "prod", 1, "test-linux", &[]);
    assert_eq!((v["display_listen"].as_str(), v["insecure_display"].as_bool()), (Some("127.0.0.1"), Some(false)));
    let text = t.vdim(&["pool", "show", &lo]);
    assert!(text.stdout().contains("(loopback only)"), "{}", text.stdout());
}

#[test]
fn a_tls_display_on_a_remote_host_opens_in_remote_viewer_only_with_the_right_ca() {
    let host = TestHost::start(|root, addr| {
        spice_cert_dir(&root.join("spice"), addr);
        format!("spice_tls = 1\nspice_tls_x509_cert_dir = \"{}\"\n", root.join("spice").display())
    });
    let spice_dir = host.path("spice");
    let env = Env::new();
    marker_image(&env, "img", "tls-v1");
    let vdim = |args: &[&str]| -> Value {
        let out = env
            .cmd()
            .env("VDIM_VIRT_TYPE", "qemu")
            .args(["--connect", &host.uri, "--json"])
            .args(args)
            .output()
            .unwrap();
        let r = Run { out, args: args.iter().map(|s| s.to_string()).collect() };
        r.assert_success();
        r.json()
    };
    let pool = "tls";
    let v = vdim(&[
        "pool",
        "create",
        pool,
        "--image",
        "img",
        "--size",
        "1",
        "--profile",
        "test-linux",
        "--display-listen",
        &host.addr,
        "--start",
    ]);
    assert_eq!(
        (v["display_listen"].as_str(), v["insecure_display"].as_bool()),
        (Some(host.addr.as_str()), Some(false))
    );
    let text = env.cmd().args(["--connect", &host.uri, "pool", "show", pool]).output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("(SPICE over TLS)"));
    let desktop = "vdim-tls-001";
    let tls_port = secure_spice_port(&host, desktop);
    assert_only_tls_port_listens(&host, tls_port);

    add_user(&env, "admin");
    let alice = add_user(&env, "alice");
    env.vdim(&["pool", "entitle", pool, "alice"]).assert_success();
    // A broker not given the CA refuses the .vv, saying what to configure.
    let plain = Server::start(&env, &host.uri, &[]);
    let (s, body) = call(&plain, "POST", &format!("/api/v1/pools/{pool}/sessions"), &alice);
    assert_eq!(s, 201, "{body}");
    let sess: Value = serde_json::from_str(&body).unwrap();
    let vv_path = format!("/api/v1/sessions/{}/console.vv", sess["id"].as_str().unwrap());
    let (s, body) = call(&plain, "GET", &vv_path, &alice);
    assert!(s == 503 && body.contains("--display-ca") && body.contains(desktop), "{s} {body}");
    drop(plain);

    let ca = spice_dir.join("ca-cert.pem");
    let subject = format!("O=vdim test,CN={}", host.addr);
    let srv =
        Server::start(&env, &host.uri, &["--display-ca", ca.to_str().unwrap(), "--display-host-subject", &subject]);
    let (s, vv) = call(&srv, "GET", &vv_path, &alice);
    assert_eq!(s, 200, "{vv}");
    let kv = vv_keys(&vv);
    assert_eq!(kv["host"], host.addr);
    assert_eq!(kv["tls-port"], tls_port.to_string());
    assert!(!kv.contains_key("port"), "no plaintext port: {vv}");
    assert_eq!(kv["ca"], vv_pem(&ca));
    assert_eq!(kv["host-subject"], subject);
    assert_eq!(kv["secure-channels"], "main;display;inputs;cursor;playback;record;smartcard;usbredir");

    // remote-viewer connects, over TLS (the connection is on the TLS port), and shows the guest.
    let x = Xvfb::start();
    let good = env.path("good.vv");
    std::fs::write(&good, &vv).unwrap();
    let viewer = Viewer::open(&x, &good, &env.path("rv-good.log"));
    assert!(viewer.wait_opened(60), "remote-viewer did not open the TLS display:\n{}", viewer.log());
    std::thread::sleep(Duration::from_secs(3));
    let established = sockets(&host, "established", tls_port);
    assert!(
        established.iter().any(|l| l.contains(&format!("{}:{tls_port}", host.addr)) && l.contains("10.77.")),
        "the viewer's connections are on the TLS port: {established:?}"
    );
    let shot = env.path("rv-tls.png");
    let text = screenshot_text_pixels(&x, &shot, 60);
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("display-tls-remote-viewer.png");
    std::fs::copy(&shot, &kept).unwrap();
    assert!(text > 500, "the viewer shows the guest's text console ({text} pixels): {}", kept.display());
    drop(viewer);

    // The same kind of file with another CA: the certificate is refused, nothing opens.
    let (s, vv) = call(&srv, "GET", &vv_path, &alice);
    assert_eq!(s, 200, "{vv}");
    let other = make_ca(env.dir.path(), "other");
    let forged: String = vv
        .lines()
        .map(|l| if l.starts_with("ca=") { format!("ca={}", vv_pem(&other)) } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    let bad = env.path("wrong-ca.vv");
    std::fs::write(&bad, forged + "\n").unwrap();
    let viewer = Viewer::open(&x, &bad, &env.path("rv-bad.log"));
    assert!(!viewer.wait_opened(20), "a wrong CA must not open the display:\n{}", viewer.log());
    let log = viewer.log();
    assert!(log.contains("Error in certificate chain verification"), "the viewer refused the certificate: {log}");
}
