//! `vdim image ...`: import, edit (and the dev desktop), discard, seal, history, list,
//! verify, gc, export.

use super::global::{open, Global};
use super::output::{human_bytes, print};
use crate::dev::EditReport;
use crate::imgfmt::Format;
use crate::store::{Actor, ImportOptions};
use crate::store::{GcReport, History, ImageSummary, VerifyReport};
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Import a disk image (qcow2, raw, vmdk, vhdx, vdi) as version 1 of a new image
    Import {
        name: String,
        file: PathBuf,
        /// The file's format; refused when the file's header says otherwise
        #[arg(long)]
        format: Option<String>,
        #[arg(long, default_value = "")]
        note: String,
        #[arg(long)]
        author: Option<String>,
    },
    /// Start a dev clone: a writable draft on top of the newest version
    Edit {
        name: String,
        /// Base the draft on this version instead of the newest (e.g. to patch again after a bad version)
        #[arg(long)]
        from: Option<u32>,
        /// Boot the draft as a dev desktop and print how to reach its console
        #[arg(long)]
        start: bool,
        /// Hardware profile of the dev desktop
        #[arg(long, default_value = crate::pool::DEFAULT_PROFILE)]
        profile: String,
        #[arg(long)]
        author: Option<String>,
    },
    /// Throw the draft away
    Discard {
        name: String,
        #[arg(long)]
        author: Option<String>,
    },
    /// Seal the draft as a new immutable version (moves the dev channel)
    Seal {
        name: String,
        #[arg(long, default_value = "")]
        note: String,
        #[arg(long)]
        author: Option<String>,
        /// Shut the running dev desktop down (ACPI) and wait for it before sealing
        #[arg(long)]
        shutdown: bool,
        /// How long --shutdown waits for the guest to power off
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        shutdown_timeout: std::time::Duration,
    },
    /// Versions of an image with parentage, sizes and channels
    History { name: String },
    /// All images
    List,
    /// Re-hash and check every layer (or one image's)
    Verify { name: Option<String> },
    /// Remove layers nothing can need any more, and files left by crashes
    Gc {
        #[arg(long)]
        dry_run: bool,
    },
    /// Write one flattened, standalone qcow2 of a version
    Export { name: String, version: u32, file: PathBuf },
}

pub fn run(g: &Global, cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Import { name, file, format, note, author } => {
            let format = format.as_deref().map(Format::parse).transpose()?;
            let mut ctx = open(g)?;
            let r = ctx.store().import(
                &name,
                &file,
                &ImportOptions { format, note: &note },
                &Actor::resolve(author.as_deref()),
            )?;
            print(g.json, &r, |r| {
                format!(
                    "imported {} as image '{}' version {} ({} layer, {} virtual); channels dev, test, prod point at it",
                    file.display(),
                    r.image,
                    r.version.number,
                    human_bytes(r.version.size),
                    human_bytes(r.version.virtual_size)
                )
            })
        }
        ImageCmd::Edit { name, from, start, profile, author } => {
            let mut ctx = open(g)?;
            let actor = Actor::resolve(author.as_deref());
            let r = if start {
                ctx.dev()?.edit_and_start(&name, from, &actor, &profile)?
            } else {
                EditReport { draft: ctx.store().edit(&name, from, &actor)?, dev_desktop: None }
            };
            print(g.json, &r, edit_text)
        }
        ImageCmd::Discard { name, author } => {
            open(g)?.dev()?.discard(&name, &Actor::resolve(author.as_deref()))?;
            print(g.json, &serde_json::json!({"image": name, "discarded": true}), |_| {
                format!("draft of '{name}' discarded")
            })
        }
        ImageCmd::Seal { name, note, author, shutdown, shutdown_timeout } => {
            let actor = Actor::resolve(author.as_deref());
            let r = open(g)?.dev()?.seal(&name, &note, &actor, shutdown.then_some(shutdown_timeout))?;
            print(g.json, &r, |r| {
                format!(
                    "sealed '{}' version {} on version {} ({} delta); dev points at it",
                    r.image,
                    r.version.number,
                    r.version.parent.unwrap_or(0),
                    human_bytes(r.version.size)
                )
            })
        }
        ImageCmd::History { name } => {
            let mut ctx = open(g)?;
            let h = ctx.store().history(&name)?;
            print(g.json, &h, history_text)
        }
        ImageCmd::List => {
            let mut ctx = open(g)?;
            let l = ctx.store().list()?;
            print(g.json, &l, |l| list_text(l))
        }
        ImageCmd::Verify { name } => {
            let mut ctx = open(g)?;
            let r = ctx.store().verify(name.as_deref())?;
            print(g.json, &r, verify_text)?;
            if !r.ok {
                bail!("verify found {} problem(s)", r.problems.len());
            }
            Ok(())
        }
        ImageCmd::Gc { dry_run } => {
            let mut ctx = open(g)?;
            let r = ctx.store().gc(dry_run, &Actor::resolve(None))?;
            print(g.json, &r, gc_text)
        }
        ImageCmd::Export { name, version, file } => {
            let mut ctx = open(g)?;
            let r = ctx
                .store()
                .export(&name, version, &file, &Actor::resolve(None))
                .with_context(|| format!("exporting '{name}' version {version}"))?;
            print(g.json, &r, |r| {
                format!(
                    "exported '{}' version {} to {} ({})",
                    r.image,
                    r.version,
                    r.path.display(),
                    human_bytes(r.size)
                )
            })
        }
    }
}

fn edit_text(r: &EditReport) -> String {
    let d = &r.draft;
    let mut s = format!(
        "{} draft of '{}' on version {}: {}",
        if d.new { "new" } else { "existing" },
        d.image,
        d.base_version,
        d.draft.display()
    );
    match &r.dev_desktop {
        None => {
            s += &format!(
                "\nwrite to it (boot it with --start, or qemu-io -f qcow2), then 'vdim image seal {}'",
                d.image
            )
        }
        Some(dd) => {
            s += &format!("\ndev desktop {} is running; its consoles (tickets valid one hour):", dd.domain);
            for c in &dd.consoles {
                let scheme = if c.kind == crate::hypervisor::GraphicsKind::Spice { "spice" } else { "vnc" };
                s += &format!("\n  remote-viewer {scheme}://{}:{}   password {}", c.listen, c.port, c.password);
            }
            if let Some(log) = &dd.serial_log {
                s += &format!("\n  serial console log: {log}");
            }
            s += &format!("\npatch it, then 'vdim image seal {} --shutdown'", d.image);
        }
    }
    s
}

fn history_text(h: &History) -> String {
    let mut s = format!("image {} ({} virtual)\n", h.image, human_bytes(h.virtual_size));
    s += &format!(
        "{:>4} {:>6} {:<14} {:>10} {:<21} {:<10} {:<14} note\n",
        "ver", "parent", "digest", "delta", "created", "author", "channels"
    );
    for e in &h.versions {
        let v = &e.version;
        let chans = e.channels.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(",");
        let mut note = v.note.clone();
        if v.status != "ok" {
            note = format!("[{}] {note}", v.status);
        }
        if v.removed.is_some() {
            note = format!("[removed] {note}");
        }
        s += &format!(
            "{:>4} {:>6} {:<14} {:>10} {:<21} {:<10} {:<14} {}\n",
            v.number,
            v.parent.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            &v.digest[..12],
            human_bytes(v.size),
            v.created,
            v.author,
            chans,
            note
        );
    }
    if let Some(d) = &h.draft {
        s += &format!("draft on version {}: {}\n", d.base_version, d.path);
    }
    s.trim_end().to_string()
}

fn list_text(l: &[ImageSummary]) -> String {
    if l.is_empty() {
        return "no images yet: 'vdim image import NAME FILE'".into();
    }
    let mut s =
        format!("{:<24} {:>8} {:>6} {:>10} {:>10}  channels\n", "image", "versions", "newest", "virtual", "stored");
    for i in l {
        let chans = i.channels.iter().map(|(c, v)| format!("{c}={v}")).collect::<Vec<_>>().join(" ");
        s += &format!(
            "{:<24} {:>8} {:>6} {:>10} {:>10}  {chans}{}\n",
            i.name,
            i.versions,
            i.newest,
            human_bytes(i.virtual_size),
            human_bytes(i.stored),
            if i.draft { "  (draft open)" } else { "" }
        );
    }
    s.trim_end().to_string()
}

fn verify_text(r: &VerifyReport) -> String {
    let mut s = String::new();
    for p in &r.problems {
        let who = match (&p.image, p.version) {
            (Some(i), Some(v)) => format!("{i} v{v}"),
            (Some(i), None) => i.clone(),
            _ => "store".into(),
        };
        s += &format!("PROBLEM {who}: {} ({})\n", p.problem, p.path);
    }
    s += &format!(
        "{} layers, {} hashed: {}",
        r.layers,
        human_bytes(r.bytes_hashed),
        if r.ok { "all good" } else { "problems found" }
    );
    s
}

fn gc_text(r: &GcReport) -> String {
    let mut s = String::new();
    for i in &r.removed {
        let who = match (&i.image, i.version) {
            (Some(im), Some(v)) => format!("{im} v{v}"),
            _ => "unnamed file".into(),
        };
        s += &format!(
            "{} {who}: {} ({}, {})\n",
            if r.dry_run { "would remove" } else { "removed" },
            i.path,
            human_bytes(i.bytes),
            i.reason
        );
    }
    s += &format!(
        "{} {} in {} item(s); {} version(s) kept",
        if r.dry_run { "would free" } else { "freed" },
        human_bytes(r.bytes_freed),
        r.removed.len(),
        r.kept_versions
    );
    s
}
