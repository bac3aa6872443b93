//! `vdim backup DIR [--layers]` and `vdim restore DIR`.

use super::global::{open, Global};
use super::output::{fail_on, failures_text, human_bytes, print};
use crate::backup::{self, BackupReport, RestoreReport};
use crate::store::Actor;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Directory to write the backup to (made 0700 if missing; a backup already there is updated)
    dir: PathBuf,
    /// Copy the layers too (only those the directory lacks or holds damaged)
    #[arg(long)]
    layers: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// A directory `vdim backup` wrote
    dir: PathBuf,
}

fn counts_text(c: &crate::catalog::Counts) -> String {
    let n = |n: u64, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    format!("{}, {}, {}, {}", n(c.images, "image"), n(c.versions, "version"), n(c.pools, "pool"), n(c.users, "user"))
}

fn not_included_text(items: &[&str]) -> String {
    format!("\n  not in a backup: {}", items.join("; "))
}

fn backup_text(r: &BackupReport) -> String {
    let mut s = format!(
        "backup of the catalog written to {}: {}\n  catalog: {}, SHA-256 {}",
        r.dir.display(),
        counts_text(&r.counts),
        human_bytes(r.catalog_bytes),
        r.catalog_sha256
    );
    s += &format!("\n  layers: {} named ({})", r.layers, human_bytes(r.layer_bytes));
    if r.with_layers {
        s += &format!(
            "; {} copied ({}), {} already there, {} replaced (damaged)",
            r.layers_copied,
            human_bytes(r.bytes_copied),
            r.layers_present,
            r.layers_replaced
        );
    } else {
        s += "; not copied (without --layers a restore finds them in its home's layers/)";
    }
    s += &format!("\n  profiles: {}\n  manifest: {} (written last)", r.profiles, r.manifest.display());
    s + &not_included_text(r.not_included)
}

fn restore_text(r: &RestoreReport) -> String {
    let a = &r.after;
    let mut s = format!(
        "restored {} onto {} (backup of {} by vdim {}): {}",
        r.from.display(),
        r.home.display(),
        r.backup_created,
        r.backup_vdim_version,
        counts_text(&r.counts)
    );
    s += &format!(
        "\n  layers: {} verified ({} copied from the backup, {}; {} already in the home)",
        r.layers,
        r.layers_copied,
        human_bytes(r.bytes_copied),
        r.layers_in_home
    );
    if !r.profiles_restored.is_empty() {
        s += &format!("\n  profiles restored: {}", r.profiles_restored.join(", "));
    }
    if !r.profiles_kept.is_empty() {
        s += &format!("\n  profiles the home had, kept as they are: {}", r.profiles_kept.join(", "));
    }
    s += &format!(
        "\n  sessions ended: {}; desktops to be made afresh on their version: {}",
        a.sessions_ended, a.desktops_reset
    );
    if !a.persistent_desktops.is_empty() {
        s += &format!(
            "\n  persistent desktops start afresh (their disks are not in a backup): {}",
            a.persistent_desktops.join(", ")
        );
    }
    if !a.drafts_dropped.is_empty() {
        s += &format!("\n  drafts dropped (not in a backup): {}", a.drafts_dropped.join(", "));
    }
    for o in &r.started {
        s += &format!("\n  pool '{}' started: {} desktops", o.pool, o.desktops.len());
        s += &failures_text(&o.failed);
    }
    for n in &r.not_started {
        s += &format!("\n  pool '{}' NOT started: {}", n.pool, n.error);
    }
    let stopped: Vec<&String> = a.pools.iter().filter(|p| !a.running_pools.contains(p)).collect();
    if !stopped.is_empty() {
        let names: Vec<&str> = stopped.iter().map(|p| p.as_str()).collect();
        s += &format!("\n  stopped pools, made afresh at their next command: {}", names.join(", "));
    }
    s + &not_included_text(r.not_included)
}

pub fn backup(g: &Global, a: BackupArgs) -> Result<()> {
    let actor = Actor::resolve(None);
    let mut ctx = open(g)?;
    let r = backup::backup(&mut ctx, &a.dir, a.layers, &actor)?;
    print(g.json, &r, backup_text)
}

pub fn restore(g: &Global, a: RestoreArgs) -> Result<()> {
    let actor = Actor::resolve(None);
    let mut r = backup::restore(&g.settings(), &a.dir, &actor)?;
    // Opening the restored home halts the rollouts whose vdim stayed on the old machine.
    let mut ctx = open(g)?;
    backup::boot(&mut ctx, &mut r, &actor);
    print(g.json, &r, restore_text)?;
    let failed: Vec<_> = r.started.iter().flat_map(|o| o.failed.clone()).collect();
    fail_on(&failed)?;
    match r.not_started.first() {
        Some(n) => anyhow::bail!(
            "the home is restored, but pool '{}' was not started ({}): 'vdim pool start {}' once that is fixed",
            n.pool,
            n.error,
            n.pool
        ),
        None => Ok(()),
    }
}
