//! `vdim host ...`: add, list, show, sync, verify, remove.

use super::global::{open, Global};
use super::output::{human_bytes, print};
use crate::hosts::{AddRequest, HostDetail, HostView};
use crate::replica::{self, HostStore};
use crate::store::Actor;
use anyhow::Result;
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// Register a libvirt host (it must answer; its layer store is made there)
    Add {
        name: String,
        /// Its libvirt URI: qemu+tls://hv2.example.com/system, qemu+ssh://root@hv2/system
        uri: String,
        #[arg(long)]
        zone: Option<String>,
        /// Desktops it may run at most
        #[arg(long)]
        max_desktops: Option<u32>,
        /// The libvirt storage pool holding its layers
        #[arg(long, default_value = replica::DEFAULT_STORAGE_POOL)]
        storage_pool: String,
        /// That pool's directory on the host (its desktops' disks go to <PATH>-desktops)
        #[arg(long, default_value = replica::DEFAULT_PATH)]
        store_path: PathBuf,
        /// Run by `sh -c` when the host stops answering (e.g. an IPMI power-off; env
        /// VDIM_HOST and VDIM_HOST_URI name it): exit 0 fences it and its desktops are made
        /// again on other hosts. Without one, only `vdim host fence --confirm` does that.
        #[arg(long, value_name = "COMMAND")]
        fence_command: Option<String>,
    },
    /// Every host with the layers it holds verified
    List,
    /// One host: whether it answers, its layers, the channel versions it still lacks
    Show { name: String },
    /// Copy image chains to the host, each copy read back and verified before it counts
    /// (every channel's version unless --image [--version] says which)
    Sync {
        name: String,
        #[arg(long)]
        image: Option<String>,
        #[arg(long, requires = "image")]
        version: Option<u32>,
    },
    /// Read back every layer recorded on the host; a copy that reads back wrong is removed there
    Verify { name: String },
    /// Forget a host (its libvirt and layer store are left as they are); refused while desktops are there
    Remove { name: String },
    /// No new desktops on the host; idle ones move to their pools' other hosts now, those in use at logoff
    Drain { name: String },
    /// The host is powered off: its sessions end, its non-persistent desktops are made again on
    /// other hosts (persistent ones wait for it). Only when it is truly off: a desktop still
    /// running there would run twice.
    Fence {
        name: String,
        /// Confirms that the host is powered off
        #[arg(long)]
        confirm: bool,
    },
    /// The host takes desktops again (after a drain, or back from being fenced: what was made
    /// elsewhere meanwhile is removed there first)
    Unfence { name: String },
    /// Probe every host once (as the broker does every 2 s); a dead host with a fence command is fenced
    Check,
    /// Remove layers from the host's store that no desktop, pool rollback window or channel there needs
    Gc {
        name: String,
        #[arg(long)]
        dry_run: bool,
    },
}

fn list_text(l: &Vec<HostView>) -> String {
    if l.is_empty() {
        return "no hosts: desktops run on the libvirt of --connect ('vdim host add NAME URI' adds one)".into();
    }
    let mut s = format!(
        "{:<16} {:<40} {:<10} {:<9} {:<8} {:>8} {:>7}\n",
        "host", "uri", "zone", "state", "liveness", "desktops", "layers"
    );
    for h in l {
        s += &format!(
            "{:<16} {:<40} {:<10} {:<9} {:<8} {:>8} {:>7}\n",
            h.host.name,
            h.host.uri,
            h.host.zone.as_deref().unwrap_or("-"),
            h.host.state,
            h.liveness,
            h.desktops,
            h.layers_verified
        );
    }
    s.trim_end().to_string()
}

fn show_text(d: &HostDetail) -> String {
    let h = &d.host;
    let mut s = format!(
        "host {} at {}: {}, {}{}, layers in storage pool {} ({})",
        h.name,
        h.uri,
        h.state,
        if d.reachable { "answering" } else { "NOT answering" },
        h.zone.as_ref().map(|z| format!(", zone {z}")).unwrap_or_default(),
        h.storage_pool,
        h.store_path
    );
    if let Some(e) = &d.error {
        s += &format!("\n  {e}");
    }
    s += &format!("\n  liveness {} (probes missed in a row: {})", d.liveness, h.missed);
    if let Some(f) = &h.fence_command {
        s += &format!("\n  fence command: {f}");
    }
    s += &format!("\n  {} desktops: {}", d.desktops.len(), or_dash(&d.desktops));
    s += &format!("\n  {} layers verified", d.layers.len());
    for c in &d.channels {
        let state = if c.missing.is_empty() {
            "verified".to_string()
        } else {
            format!("pending: {} of its layers missing ('vdim host sync {}')", c.missing.len(), h.name)
        };
        s += &format!("\n  {} {} version {}: {state}", c.image, c.channel, c.version);
    }
    s
}

fn or_dash(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

fn check_text(probes: &[crate::hosts::Probe], left: &[crate::failover::Left]) -> String {
    let mut s = String::new();
    for p in probes {
        let error = p.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default();
        s += &format!("{:<16} {:<8} missed {}{error}\n", p.host, p.liveness, p.missed);
    }
    for l in left {
        s += &left_text(l);
        s += "\n";
    }
    s.trim_end().to_string()
}

fn left_text(l: &crate::failover::Left) -> String {
    let d = &l.desktops;
    let mut s = format!("host '{}': desktops made on other hosts: {}", l.host, or_dash(&d.moved));
    if !d.at_logoff.is_empty() {
        s += &format!("\n  in use, they move at logoff: {}", d.at_logoff.join(", "));
    }
    if !d.waiting.is_empty() {
        s += &format!("\n  persistent, waiting for the host: {}", d.waiting.join(", "));
    }
    for f in &d.failed {
        s += &format!("\n  FAILED {}: {}", f.desktop, f.error);
    }
    s
}

/// Exit non-zero after the report when a desktop could not be moved.
fn fail_on_left(l: &crate::failover::Left) -> Result<()> {
    match l.desktops.failed.first() {
        Some(f) => anyhow::bail!(
            "{} desktop(s) of host '{}' were not moved (e.g. {}: {})",
            l.desktops.failed.len(),
            l.host,
            f.desktop,
            f.error
        ),
        None => Ok(()),
    }
}

/// A layer's copy on a terminal: `hv2: 4f8bf44872a4 upload 120.0 MiB of 200.0 MiB`.
fn tty_progress(host: &str, p: replica::Progress<'_>) {
    use std::io::Write;
    let step = match p.step {
        replica::Step::Upload => "upload",
        replica::Step::ReadBack => "read back",
    };
    let short = &p.layer[..p.layer.len().min(12)];
    let mut e = std::io::stderr().lock();
    let _ = write!(e, "\r\x1b[2K  {host}: {short} {step} {} of {}", human_bytes(p.done), human_bytes(p.total));
    if p.done >= p.total && p.step == replica::Step::ReadBack {
        let _ = writeln!(e);
    }
    let _ = e.flush();
}

pub fn run(g: &Global, cmd: HostCmd) -> Result<()> {
    use std::io::IsTerminal;
    let actor = Actor::resolve(None);
    let mut ctx = open(g)?;
    let on_terminal = !g.json && std::io::stderr().is_terminal();
    let mut hosts = if on_terminal { ctx.hosts().with_progress(&tty_progress) } else { ctx.hosts() };
    match cmd {
        HostCmd::Add { name, uri, zone, max_desktops, storage_pool, store_path, fence_command } => {
            let store = HostStore { storage_pool, path: store_path };
            let h = hosts.add(&AddRequest { name, uri, zone, max_desktops, store, fence_command }, &actor)?;
            print(g.json, &h, |h| {
                format!("host '{}' added: {} (layers in {} at {})", h.name, h.uri, h.storage_pool, h.store_path)
            })
        }
        HostCmd::List => {
            let l = hosts.list()?;
            print(g.json, &l, list_text)
        }
        HostCmd::Show { name } => {
            let d = hosts.show(&name)?;
            print(g.json, &d, show_text)
        }
        HostCmd::Sync { name, image, version } => {
            let r = hosts.sync(&name, image.as_deref(), version, &actor)?;
            print(g.json, &r, |r| {
                let mut s = format!("host '{}':", r.host);
                for v in &r.versions {
                    s += &format!(
                        "\n  {} version {}: {} of {} layers verified there, {} sent",
                        v.image,
                        v.version,
                        v.report.verified().len(),
                        v.report.layers.len(),
                        human_bytes(v.report.bytes_sent())
                    );
                }
                s
            })?;
            match r.versions.iter().find(|v| !v.report.complete()) {
                Some(v) => anyhow::bail!(
                    "host '{}' lacks part of {} version {}: see the report above",
                    r.host,
                    v.image,
                    v.version
                ),
                None => Ok(()),
            }
        }
        HostCmd::Verify { name } => {
            let v = hosts.verify(&name, &actor)?;
            print(g.json, &v, |v| {
                format!("host '{name}': {} of {} layers read back right", v.verified().len(), v.layers.len())
            })
        }
        HostCmd::Drain { name } => {
            let l = crate::failover::drain(&mut ctx, &name, &actor)?;
            print(g.json, &l, left_text)?;
            fail_on_left(&l)
        }
        HostCmd::Fence { name, confirm } => {
            let l = crate::failover::fence(&mut ctx, &name, confirm, "confirmed by an admin", &actor)?;
            print(g.json, &l, left_text)?;
            fail_on_left(&l)
        }
        HostCmd::Unfence { name } => {
            let removed = crate::failover::unfence(&mut ctx, &name, &actor)?;
            print(g.json, &serde_json::json!({"host": name, "state": "up", "removed": removed}), |_| {
                format!("host '{name}' is up; removed there (made elsewhere meanwhile): {}", or_dash(&removed))
            })
        }
        HostCmd::Check => {
            let (probes, left) = crate::failover::watch_round(&mut ctx, &actor)?;
            print(g.json, &serde_json::json!({"probes": probes, "fenced": left}), |_| check_text(&probes, &left))
        }
        HostCmd::Gc { name, dry_run } => {
            let r = hosts.gc(&name, dry_run, &actor)?;
            print(g.json, &r, |r| {
                format!(
                    "host '{}': {} {} layer(s) ({}), kept {}",
                    r.host,
                    if r.dry_run { "would remove" } else { "removed" },
                    r.removed.len(),
                    or_dash(&r.removed),
                    r.kept.len()
                )
            })
        }
        HostCmd::Remove { name } => {
            hosts.remove(&name, &actor)?;
            print(g.json, &serde_json::json!({"host": name, "removed": true}), |_| format!("host '{name}' removed"))
        }
    }
}
