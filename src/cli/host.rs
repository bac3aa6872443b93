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
        /// That pool's directory on the host
        #[arg(long, default_value = replica::DEFAULT_PATH)]
        store_path: PathBuf,
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
    /// Forget a host (its libvirt and layer store are left as they are)
    Remove { name: String },
}

fn list_text(l: &Vec<HostView>) -> String {
    if l.is_empty() {
        return "no hosts: desktops run on the libvirt of --connect ('vdim host add NAME URI' adds one)".into();
    }
    let mut s = format!("{:<16} {:<44} {:<10} {:<10} {:>7}\n", "host", "uri", "zone", "state", "layers");
    for h in l {
        s += &format!(
            "{:<16} {:<44} {:<10} {:<10} {:>7}\n",
            h.host.name,
            h.host.uri,
            h.host.zone.as_deref().unwrap_or("-"),
            h.host.state,
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

pub fn run(g: &Global, cmd: HostCmd) -> Result<()> {
    let actor = Actor::resolve(None);
    let mut ctx = open(g)?;
    let mut hosts = ctx.hosts();
    match cmd {
        HostCmd::Add { name, uri, zone, max_desktops, storage_pool, store_path } => {
            let store = HostStore { storage_pool, path: store_path };
            let h = hosts.add(&AddRequest { name, uri, zone, max_desktops, store }, &actor)?;
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
        HostCmd::Remove { name } => {
            hosts.remove(&name, &actor)?;
            print(g.json, &serde_json::json!({"host": name, "removed": true}), |_| format!("host '{name}' removed"))
        }
    }
}
