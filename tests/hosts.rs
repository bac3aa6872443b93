//! `vdim host`: libvirt hosts registered by URI (fake hosts on this machine, qemu+tcp), image
//! chains copied to them over their own libvirt connection, each copy read back and verified
//! before it counts, a corrupted copy found and replaced.

mod common;
use common::hosts::FakeHosts;
use common::*;

fn digests(env: &Env, image: &str) -> Vec<String> {
    env.vdim_json(&["image", "history", image])["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["digest"].as_str().unwrap().to_string())
        .collect()
}

fn pending(env: &Env, host: &str) -> Vec<(String, usize)> {
    env.vdim_json(&["host", "show", host])["channels"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| !c["missing"].as_array().unwrap().is_empty())
        .map(|c| (c["channel"].as_str().unwrap().to_string(), c["missing"].as_array().unwrap().len()))
        .collect()
}

#[test]
fn hosts_get_image_chains_verified_and_a_corrupted_copy_is_replaced() {
    let fake = FakeHosts::up(2);
    let env = Env::new();
    env.vdim_json(&["init"]);
    marker_image(&env, "img", "hosts-v1");
    seal_marker(&env, "img", "hosts-v2", "ok");
    let [v1, v2]: [String; 2] = digests(&env, "img").try_into().unwrap();
    let store = |i: usize| fake.hosts()[i].dir.join("vdim-layers");
    let (s0, s1) = (store(0).display().to_string(), store(1).display().to_string());
    let (u0, u1) = (fake.uris()[0].to_string(), fake.uris()[1].to_string());
    let h = env.vdim_json(&["host", "add", "hv1", &u0, "--zone", "rack-a", "--store-path", &s0]);
    assert_eq!(
        (h["name"].as_str(), h["uri"].as_str(), h["zone"].as_str()),
        (Some("hv1"), Some(u0.as_str()), Some("rack-a"))
    );
    env.vdim_json(&["host", "add", "hv2", &u1, "--store-path", &s1]);

    // Refused, changing nothing: a taken name, a taken URI, a bad name, not a URI.
    env.vdim(&["host", "add", "hv1", "qemu+tcp://10.77.250.2/system"])
        .assert_exit_code(5)
        .assert_stderr_contains("hv1");
    env.vdim(&["host", "add", "hv3", &u0, "--store-path", &s0]).assert_exit_code(5).assert_stderr_contains("hv1");
    env.vdim(&["host", "add", "HV/3", &u0]).assert_exit_code(2);
    env.vdim(&["host", "add", "hv3", "not a uri"]).assert_exit_code(2);
    env.vdim(&["host", "show", "nope"]).assert_exit_code(4);
    assert_eq!(env.vdim_json(&["host", "list"]).as_array().unwrap().len(), 2);

    // Nothing there yet: every channel's version is pending on hv1.
    assert_eq!(pending(&env, "hv1"), [("dev".to_string(), 2), ("test".to_string(), 1), ("prod".to_string(), 1)]);
    let r = env.vdim_json(&["host", "sync", "hv1"]);
    let versions = r["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2, "v1 (test, prod) and v2 (dev): {r}");
    assert!(pending(&env, "hv1").is_empty(), "every chain verified on hv1");
    for d in [&v1, &v2] {
        let local = sh("sha256sum", &[env.home().join("layers").join(format!("{d}.qcow2")).to_str().unwrap()]);
        let copy = store(0).join(format!("{d}.qcow2"));
        let remote = sh("sha256sum", &[copy.to_str().unwrap()]);
        assert_eq!(
            String::from_utf8_lossy(&local.stdout).split(' ').next(),
            String::from_utf8_lossy(&remote.stdout).split(' ').next()
        );
    }
    assert!(!store(1).join(format!("{v1}.qcow2")).exists(), "hv2 got nothing");
    assert_eq!(pending(&env, "hv2").len(), 3);
    // Again: nothing to copy, nothing sent.
    let again = env.vdim_json(&["host", "sync", "hv1"]);
    let sent: u64 = again["versions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["layers"].as_array().unwrap().iter())
        .map(|l| l["bytes_sent"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(sent, 0, "{again}");

    // A byte flipped in hv1's copy of v2: verify finds it, removes it there, and v2 is pending
    // again on hv1 until the next sync copies it afresh.
    let copy = store(0).join(format!("{v2}.qcow2"));
    qemu_io_write(&copy, 0x5a, 1 << 20, 512);
    let v = env.vdim_json(&["host", "verify", "hv1"]);
    let states: Vec<(String, String)> = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (l["digest"].as_str().unwrap().to_string(), l["state"].as_str().unwrap().to_string()))
        .collect();
    assert!(states.contains(&(v1.clone(), "verified".into())), "{v}");
    assert!(states.contains(&(v2.clone(), "corrupt".into())), "{v}");
    assert!(!copy.exists(), "the corrupt copy is gone from hv1");
    assert_eq!(pending(&env, "hv1"), [("dev".to_string(), 1)]);
    env.vdim_json(&["host", "sync", "hv1", "--image", "img", "--version", "2"]);
    assert!(pending(&env, "hv1").is_empty());
    assert!(copy.exists());

    let audit: Vec<String> = env
        .vdim_json(&["audit"])
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    for a in ["host.add", "host.sync", "host.verify"] {
        assert!(audit.contains(&a.to_string()), "{a} in {audit:?}");
    }
    // On a terminal, a copy shows how far each layer's upload and read-back have come.
    let line = format!("{} host sync hv2 --image img --version 1", env!("CARGO_BIN_EXE_vdim"));
    let out = std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("VDIM_HOME", env.home())
        .output()
        .expect("run script");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    let short = &v1[..12];
    assert!(text.contains(&format!("hv2: {short} upload")), "{text}");
    assert!(text.contains(&format!("hv2: {short} read back")), "{text}");
    assert!(text.contains("1 of 1 layers verified there"), "{text}");

    env.vdim_json(&["host", "remove", "hv2"]);
    assert_eq!(env.vdim_json(&["host", "list"]).as_array().unwrap().len(), 1);
}

#[test]
fn a_host_that_does_not_answer_is_not_added() {
    let fake = FakeHosts::up(1);
    let env = Env::new();
    env.vdim_json(&["init"]);
    fake.kill(0);
    let s = fake.hosts()[0].dir.join("vdim-layers").display().to_string();
    let r = env.vdim(&["host", "add", "hv1", fake.uris()[0], "--store-path", &s]);
    r.assert_exit_code(1).assert_stderr_contains("Cannot connect to libvirt");
    assert!(env.vdim_json(&["host", "list"]).as_array().unwrap().is_empty(), "nothing recorded");
}
