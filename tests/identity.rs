//! Per-desktop identity on the real libvirt daemon (TCG): the config drive each desktop of a
//! pool with `--identity` boots with, read by the test guest, and the domain-join secret that
//! must be on those drives and nowhere else.

mod common;
use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Every `GUEST-...:` line wanted on a desktop's serial console, waiting up to `secs`.
fn wait_lines(t: &LibvirtEnv, pool: &str, desktop: &str, want: &[String], secs: u64) {
    let log = t.env.home().join("run").join(pool).join(format!("{desktop}.serial.log"));
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let text = std::fs::read(&log).map(|b| String::from_utf8_lossy(&b).replace('\r', "")).unwrap_or_default();
        if want.iter().all(|w| text.lines().any(|l| l == w)) {
            return;
        }
        assert!(Instant::now() < deadline, "{desktop}: no {want:?} within {secs} s:\n{text}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A file of an ISO, read with xorriso (outside the vdim home).
fn extract(iso: &Path, path: &str, to: &Path) -> String {
    let _ = std::fs::remove_file(to);
    let out = Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(iso)
        .args(["-extract", path])
        .arg(to)
        .output()
        .unwrap();
    assert!(out.status.success(), "xorriso -extract {path}: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(to).unwrap()
}

/// The volume id of an ISO as xorriso reports it.
fn volume_id(iso: &Path) -> String {
    let out = Command::new("xorriso").args(["-indev"]).arg(iso).arg("-pvd_info").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines().find_map(|l| l.strip_prefix("Volume Id    : ")).unwrap_or_default().trim().to_string()
}

/// One value of an XML file (any namespace) as xmllint reads it, after `--noout` passed.
fn xml_value(file: &Path, element: &str) -> String {
    sh("xmllint", &["--noout", file.to_str().unwrap()]);
    let xpath = format!("string(//*[local-name()='{element}'])");
    let out = sh("xmllint", &["--xpath", &xpath, file.to_str().unwrap()]);
    let v = String::from_utf8_lossy(&out.stdout).into_owned();
    v.strip_suffix('\n').unwrap_or(&v).to_string()
}

/// The media file of a domain's CD-ROM: in its live XML, in its persistent one.
fn cdrom_media(domain: &str) -> [Option<PathBuf>; 2] {
    [&[][..], &["--inactive"][..]].map(|extra| {
        let args = [&["-c", "qemu:///system", "dumpxml", domain][..], extra].concat();
        let xml = String::from_utf8_lossy(&sh("virsh", &args).stdout).into_owned();
        let start = xml.find("device='cdrom'").expect("a CD-ROM");
        let disk = &xml[start..start + xml[start..].find("</disk>").unwrap()];
        let file = disk.split("<source file='").nth(1)?;
        Some(PathBuf::from(&file[..file.find('\'').unwrap()]))
    })
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// No file under `dir` but the drives (`*.iso`) holds any of `secrets`.
fn assert_not_in_files(dir: &Path, secrets: &[&str]) {
    for f in files_under(dir) {
        if f.extension().is_some_and(|e| e == "iso") {
            continue;
        }
        let bytes = std::fs::read(&f).unwrap();
        for secret in secrets {
            assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret is in {f:?}");
        }
    }
}

fn write_private(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Each desktop's guest boots from its config-2 drive and reports the hostname given for it.
fn wait_booted_with_hostnames(t: &LibvirtEnv, pool: &str, desktops: &[String], hostnames: &[&str]) {
    for (d, host) in desktops.iter().zip(hostnames) {
        let want = [
            "GUEST-CONFIG-DRIVE: config-2".to_string(),
            format!("GUEST-HOSTNAME: {host}"),
            format!("GUEST-COMPUTERNAME: {host}"),
            "GUEST: healthy".to_string(),
        ];
        wait_lines(t, pool, d, &want, 120);
    }
}

#[test]
fn each_desktop_boots_with_its_own_hostname_and_the_join_secret_is_only_on_the_drives() {
    let t = LibvirtEnv::new("ident");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "ident-v1");
    // A distinctive core (to grep for) inside characters that need escaping in XML.
    let core = vdim::pool::random_secret(12);
    let password = format!("Pw<&\"'>{core}");
    let cred = t.env.path("join.cred");
    write_private(&cred, &format!("username=svc-vdi-join\npassword={password}\n"), 0o600);
    let cred_arg = cred.to_str().unwrap();
    let mut outputs = vec![];
    let mut run = |args: &[&str]| {
        let r = t.vdim(args);
        r.assert_success();
        outputs.push(r.stdout() + &r.stderr());
        r
    };

    let created = run(&[
        "--json",
        "pool",
        "create",
        &pool,
        "--image",
        "img",
        "--channel",
        "prod",
        "--size",
        "2",
        "--profile",
        "test-linux",
        "--start",
        "--identity",
        "--hostname-pattern",
        "FIN-{n}",
        "--join-domain",
        "corp.example.com",
        "--join-ou",
        "OU=VDI,DC=corp,DC=example,DC=com",
        "--join-credentials",
        cred_arg,
    ])
    .json();
    assert_eq!(created["identity"]["join"]["credentials"], cred_arg, "the catalog keeps the path");

    // Two different names from the pattern, as the guest reads them from its drive.
    let desktops = [format!("vdim-{pool}-001"), format!("vdim-{pool}-002")];
    wait_booted_with_hostnames(&t, &pool, &desktops, &["FIN-001", "FIN-002"]);
    let show = run(&["--json", "pool", "show", &pool]).json();
    let hosts: Vec<&str> =
        show["desktops"].as_array().unwrap().iter().map(|d| d["hostname"].as_str().unwrap()).collect();
    assert_eq!(hosts, ["FIN-001", "FIN-002"]);
    let text = run(&["pool", "show", &pool]).stdout();
    assert!(text.contains("FIN-001") && text.contains("FIN-002") && text.contains("corp.example.com"), "{text}");

    // The drive: root-only, labelled config-2, with the answer file carrying the secret.
    let run_dir = t.env.home().join("run").join(&pool);
    let drive = |d: &str| run_dir.join(format!("{d}.config.iso"));
    let x = t.env.path("extracted");
    let d1 = drive(&desktops[0]);
    let meta = std::fs::metadata(&d1).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "drive mode");
    assert_eq!(volume_id(&d1), "config-2");
    let unattend = |iso: &Path| {
        extract(iso, "/unattend.xml", &x);
        (xml_value(&x, "Password"), xml_value(&x, "ComputerName"), xml_value(&x, "MachineObjectOU"))
    };
    assert_eq!(unattend(&d1), (password.clone(), "FIN-001".into(), "OU=VDI,DC=corp,DC=example,DC=com".into()));
    assert_eq!(extract(&d1, "/autounattend.xml", &x), extract(&d1, "/unattend.xml", &x));
    let meta_data: serde_json::Value =
        serde_json::from_str(&extract(&d1, "/openstack/latest/meta_data.json", &x)).unwrap();
    assert_eq!(meta_data["hostname"], "FIN-001");
    let uuid = meta_data["uuid"].as_str().unwrap().to_string();
    let dumpxml = sh("virsh", &["-c", "qemu:///system", "dumpxml", &desktops[0]]);
    assert!(String::from_utf8_lossy(&dumpxml.stdout).contains(&format!("<uuid>{uuid}</uuid>")), "uuid = domain's");

    // Handed to a user, the drive with the join secret is empty (live and defined); a
    // non-persistent desktop's reset (logoff) builds it again: a new file, same files.
    let before = (extract(&d1, "/unattend.xml", &x), extract(&d1, "/openstack/latest/meta_data.json", &x));
    assert_eq!(run(&["--json", "pool", "assign", &pool, "alice"]).json()["name"], desktops[0].as_str());
    let idle = Some(drive(&desktops[1]));
    assert_eq!(cdrom_media(&desktops[0]), [None, None], "(live, persistent) after assign");
    assert_eq!(cdrom_media(&desktops[1]), [idle.clone(), idle], "the idle desktop keeps its drive");
    run(&["pool", "release", &desktops[0]]);
    assert_eq!(cdrom_media(&desktops[0]), [Some(d1.clone()), Some(d1.clone())], "defined and booted with it again");
    assert_ne!(std::fs::metadata(&d1).unwrap().ino(), meta.ino(), "a new drive file");
    assert_eq!(std::fs::metadata(&d1).unwrap().mode() & 0o777, 0o600);
    let after = (extract(&d1, "/unattend.xml", &x), extract(&d1, "/openstack/latest/meta_data.json", &x));
    assert_eq!(before, after, "same identity after the reset");
    // The credentials file is read at every build: a rotated password reaches the next reset.
    let core2 = vdim::pool::random_secret(12);
    write_private(&cred, &format!("username=svc-vdi-join\npassword=rotated-{core2}\n"), 0o600);
    assert_eq!(run(&["--json", "pool", "assign", &pool, "bob"]).json()["name"], desktops[0].as_str());
    run(&["pool", "release", &desktops[0]]);
    assert_eq!(unattend(&d1).0, format!("rotated-{core2}"));
    assert_eq!(unattend(&drive(&desktops[1])).0, password, "the other desktop keeps its drive until its own reset");

    // Nowhere else: every file of the vdim home but the drives, the audit log, every output.
    run(&["--json", "audit", "--pool", &pool]);
    run(&["audit", "--pool", &pool]);
    std::fs::remove_file(&x).unwrap();
    assert_not_in_files(&t.env.home(), &[&core, &core2]);
    for o in &outputs {
        assert!(!o.contains(&core) && !o.contains(&core2), "the secret is in an output:\n{o}");
    }
    let dumpxml =
        String::from_utf8_lossy(&sh("virsh", &["-c", "qemu:///system", "dumpxml", &desktops[0]]).stdout).into_owned();
    assert!(!dumpxml.contains(&core) && dumpxml.contains("config.iso"), "libvirt has the path, not the secret");

    // The drives go with their desktops.
    t.vdim(&["pool", "delete", &pool]).assert_success();
    assert!(!drive(&desktops[0]).exists() && !drive(&desktops[1]).exists());
}

#[test]
fn a_bad_hostname_pattern_or_credentials_file_is_refused_and_nothing_is_made() {
    let t = LibvirtEnv::new("identbad");
    let pool = t.pool_name("p");
    marker_image(&t.env, "img", "identbad-v1");
    let open_cred = t.env.path("open.cred");
    write_private(&open_cred, "username=svc\npassword=SECRETPW\n", 0o644);
    let good_cred = t.env.path("good.cred");
    write_private(&good_cred, "username=svc\npassword=SECRETPW\n", 0o600);
    let missing = t.env.path("missing.cred");
    let (open, good, missing) =
        (open_cred.to_str().unwrap(), good_cred.to_str().unwrap(), missing.to_str().unwrap().to_string());
    let join = |cred: &str| {
        vec!["--join-domain".to_string(), "corp.example.com".into(), "--join-credentials".into(), cred.into()]
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--identity".into(), "--hostname-pattern".into(), "FINANCE-DESK-{n}".into()], "1 to 15 characters"),
        (vec!["--identity".into(), "--hostname-pattern".into(), "FIN_{n}".into()], "only letters, digits and '-'"),
        (vec!["--identity".into(), "--hostname-pattern".into(), "FIN".into()], "exactly once"),
        // The default pattern <pool>-{n} is too long for this pool's name.
        ([vec!["--identity".into()], join(good)].concat(), "hostname pattern"),
        (
            [vec!["--identity".into(), "--hostname-pattern".into(), "F-{n}".into()], join(&missing)].concat(),
            "does not exist",
        ),
        (
            [vec!["--identity".into(), "--hostname-pattern".into(), "F-{n}".into()], join(open)].concat(),
            "accessible by others",
        ),
        // Flags of an identity without --identity, a join without its credentials file.
        (vec!["--hostname-pattern".into(), "F-{n}".into()], "--identity"),
        (vec!["--identity".into(), "--join-domain".into(), "corp.example.com".into()], "--join-credentials"),
    ];
    for (extra, why) in cases {
        let mut args = vec!["pool", "create", &pool, "--image", "img", "--size", "2", "--profile", "test-linux"];
        args.extend(extra.iter().map(String::as_str));
        let r = t.vdim(&args);
        r.assert_exit_code(2).assert_stderr_contains(why);
        assert!(!r.stderr().contains("SECRETPW"), "{}", r.stderr());
        assert_eq!(t.vdim_json(&["pool", "list"]), serde_json::json!([]), "{extra:?}");
        assert!(t.domains().is_empty(), "{extra:?}: {:?}", t.domains());
        for dir in ["desktops", "run"] {
            assert!(!t.env.home().join(dir).join(&pool).exists(), "{extra:?} left {dir}/{pool}");
        }
    }
    // The same pool with a good identity is made.
    let ok = t.vdim(&[
        "pool",
        "create",
        &pool,
        "--image",
        "img",
        "--size",
        "1",
        "--profile",
        "test-linux",
        "--identity",
        "--hostname-pattern",
        "F-{n}",
        "--join-domain",
        "corp.example.com",
        "--join-credentials",
        good,
    ]);
    ok.assert_success();
    assert_eq!(t.domains().len(), 1);
}
