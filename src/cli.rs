//! The command line: parses arguments into calls of the same service functions the HTTP
//! API uses, and prints their reports as text or `--json`.

use crate::catalog::Channel;
use crate::home::Home;
use crate::hypervisor::{Hypervisor, Libvirt};
use crate::imgfmt::Format;
use crate::pool::{self, CreateOptions, MoveReport, PoolError, Pools};
use crate::rollout::{Engine, PromoteOptions, RolloutError, RolloutReport};
use crate::store::{Actor, ImportOptions, Store};
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "vdim",
    version,
    about = "Virtual desktop image manager: versioned golden images, pools, canary rollouts, thin-client broker"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// vdim home: store, catalog, desktops [default: /var/lib/vdim as root, else $XDG_DATA_HOME/vdim]
    #[arg(long, env = "VDIM_HOME", global = true)]
    pub home: Option<PathBuf>,
    /// Print machine-readable JSON
    #[arg(long, global = true)]
    pub json: bool,
    /// libvirt connection URI
    #[arg(long = "connect", env = "VDIM_CONNECT", global = true, default_value = "qemu:///system")]
    pub connect: String,
    /// Virtualisation type for new desktops: auto (kvm where /dev/kvm exists), kvm or qemu (TCG)
    #[arg(long, env = "VDIM_VIRT_TYPE", global = true, default_value = "auto")]
    pub virt_type: String,
    /// Directory of hardware profiles [default: $VDIM_HOME/profiles]
    #[arg(long, env = "VDIM_PROFILES", global = true)]
    pub profiles: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the store and catalog under the vdim home (safe to run again)
    Init,
    /// Golden images and their versions
    #[command(subcommand)]
    Image(ImageCmd),
    /// Pools of desktops booting from one image version
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Promote a version to test or prod: a rollout in canary waves that undoes itself on a crash
    Promote {
        image: String,
        version: u32,
        #[arg(long, value_enum)]
        to: Channel,
        /// Cumulative share of each pool's desktops per wave
        #[arg(long, default_value = "1,10%,50%,100%")]
        waves: String,
        /// How long each wave's desktops must run without crash or reboot loop
        #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
        soak: std::time::Duration,
        /// Skip a promotion gate (recorded in the audit log with --reason)
        #[arg(long)]
        force: bool,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Rollouts: status, halt, resume
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// One command back: a pool to the version it ran before (pinned), or a whole channel
    /// (--image and --channel) and all its pools at once
    Rollback {
        /// The pool to roll back
        #[arg(required_unless_present = "image", conflicts_with_all = ["image", "channel"])]
        pool: Option<String>,
        /// Emergency rollback of a channel of this image
        #[arg(long, requires = "channel")]
        image: Option<String>,
        #[arg(long, value_enum, requires = "image")]
        channel: Option<Channel>,
        #[arg(long)]
        to: Option<u32>,
        /// Also move desktops in use now, and persistent pools (their system-disk changes are lost)
        #[arg(long)]
        force: bool,
    },
    /// Thin-client users and their tokens
    #[command(subcommand)]
    User(crate::cli_broker::UserCmd),
    /// Run the thin-client broker and admin API (HTTP, or HTTPS with --tls-cert)
    Serve(crate::cli_broker::ServeArgs),
    /// The append-only audit log
    Audit {
        #[arg(long)]
        image: Option<String>,
        #[arg(long)]
        pool: Option<String>,
        #[arg(long, default_value_t = 200)]
        limit: usize,
    },
}

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
        #[arg(long, default_value = "windows11")]
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

#[derive(Subcommand, Debug)]
pub enum RolloutCmd {
    /// Wave by wave: desktops moved, healthy, failed
    Status {
        image: Option<String>,
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
    /// Stop a running rollout after its current wave; keeps what moved
    Halt { image: String },
    /// Carry on a halted or interrupted rollout
    Resume { image: String },
}

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Create a pool of desktops on the version an image's channel points at
    Create {
        name: String,
        #[arg(long)]
        image: String,
        #[arg(long, value_enum, default_value = "prod")]
        channel: Channel,
        #[arg(long)]
        size: u32,
        #[arg(long, default_value = "windows11")]
        profile: String,
        /// Desktops keep their system disk across logoffs (default: wiped at logoff)
        #[arg(long)]
        persistent: bool,
        /// Boot the desktops right away
        #[arg(long)]
        start: bool,
        /// IP address the desktops' SPICE and VNC displays listen on: 127.0.0.1 (only this
        /// host), this host's address, or 0.0.0.0 / :: (every address; then give
        /// 'vdim serve --display-host'). remote-viewer on another machine needs a reachable one
        #[arg(long, value_name = "ADDR", default_value = pool::DEFAULT_DISPLAY_LISTEN, value_parser = display_listen_arg)]
        display_listen: std::net::IpAddr,
        /// Off loopback, SPICE in plaintext instead of TLS (tickets and screens readable on the
        /// network); without it such a pool needs the host's libvirt configured for SPICE TLS
        #[arg(long)]
        insecure_display: bool,
    },
    /// All pools
    List,
    /// One pool: each desktop's state, version, next version and user
    Show { name: String },
    /// Boot every desktop of the pool
    Start { name: String },
    /// Stop every desktop of the pool
    Stop {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Grow or shrink the pool (never takes a desktop from its user)
    Resize { name: String, size: u32 },
    /// Move to the version the pool's channel points at now
    Update {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Run this version and ignore promotions until unpinned
    Pin {
        name: String,
        version: u32,
        #[arg(long)]
        force: bool,
    },
    /// Follow the channel again (from the next update or promotion on)
    Unpin { name: String },
    /// Give an idle desktop to a user (what the broker does at login)
    Assign { name: String, user: String },
    /// Log a desktop's user off: wiped and moved where it is due
    Release { desktop: String },
    /// Let a thin-client user open sessions in the pool
    Entitle { name: String, user: String },
    /// Take a user's entitlement to the pool away
    Unentitle { name: String, user: String },
    /// Delete the pool's desktops, overlays and runtime files
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

/// How a pool's displays are protected, as `pool show` says it.
fn display_security(p: &crate::catalog::Pool) -> &'static str {
    if p.insecure_display {
        " (INSECURE: plaintext SPICE off loopback, --insecure-display)"
    } else if pool::display_tls(&p.display_listen, false) {
        " (SPICE over TLS)"
    } else {
        " (loopback only)"
    }
}

/// `--display-listen`: the same check as the API's, with its message.
fn display_listen_arg(s: &str) -> std::result::Result<std::net::IpAddr, String> {
    pool::parse_display_listen(s).map_err(|e| e.to_string())
}

pub(crate) fn print<T: Serialize>(json: bool, value: &T, text: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        let t = text(value);
        if !t.is_empty() {
            println!("{t}");
        }
    }
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn home(g: &Global) -> Home {
    Home::new(g.home.clone().unwrap_or_else(Home::default_root))
}

fn open_store(g: &Global) -> Result<Store> {
    let mut store = Store::open(home(g))?;
    // A rollout whose vdim was killed is found by the next command, whatever it is.
    for line in crate::rollout::recover_interrupted(&mut store)? {
        eprintln!("warning: {line}");
    }
    Ok(store)
}

fn rollout_text(r: &RolloutReport) -> String {
    let o = &r.rollout;
    let mut s = format!(
        "rollout {} of '{}' version {} to {} (from {}): {}",
        o.id, o.image, o.version, o.channel, o.from_version, o.state
    );
    if let Some(f) = &o.forced {
        s += &format!(" [forced: {f}]");
    }
    for w in &r.waves {
        s +=
            &format!("\n  wave {} ({}): {} moved, {} healthy, {} failed", w.wave, w.size, w.moved, w.healthy, w.failed);
        for d in &w.desktops {
            s += &format!("\n    {:<24} {:<9} from v{}  {}", d.desktop, d.state, d.from_version, d.detail);
        }
    }
    let rep = &o.report;
    for f in &rep.failures {
        s += &format!("\n  FAILED {} {} (at {})", f.desktop, f.how, f.at);
    }
    if !rep.failures.is_empty() {
        let or_unknown = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        s += &format!(
            "\n  crash reported by libvirt at {}; acted on {} ms later; failed desktops running the previous version {} ms after that",
            or_unknown(rep.crash_event_at.clone()),
            or_unknown(rep.event_to_verdict_ms.map(|ms| ms.to_string())),
            or_unknown(rep.restore_ms.map(|ms| ms.to_string()))
        );
    }
    if let Some(i) = &rep.interrupted {
        s += &format!("\n  interrupted: vdim pid {} died during wave {}", i.pid.unwrap_or(0), i.wave);
    }
    s
}

fn connect(g: &Global) -> Result<Box<dyn Hypervisor>> {
    Ok(Box::new(Libvirt::connect(&g.connect)?))
}

pub fn profiles_dir(g: &Global) -> PathBuf {
    g.profiles.clone().unwrap_or_else(|| home(g).root().join("profiles"))
}

fn move_text(r: &MoveReport, verb: &str) -> String {
    let p = &r.plan;
    let mut s = format!("pool '{}' {verb} from version {} to {}", p.pool, p.from, p.to);
    if let Some(pin) = p.pinned {
        s += &format!(", pinned at {pin}");
    }
    s += &format!("\n  moved now: {}", if p.now.is_empty() { "-".into() } else { p.now.join(", ") });
    if !p.at_logoff.is_empty() {
        s += &format!("\n  in use, move at logoff: {}", p.at_logoff.join(", "));
    }
    s
}

fn pool(g: &Global, cmd: PoolCmd) -> Result<()> {
    let actor = Actor::resolve(None);
    let mut store = open_store(g)?;
    let hv = connect(g)?;
    let mut pools = Pools::new(&mut store, hv.as_ref(), profiles_dir(g));
    match cmd {
        PoolCmd::Create {
            name,
            image,
            channel,
            size,
            profile,
            persistent,
            start,
            display_listen,
            insecure_display,
        } => {
            let virt = pool::parse_virt_type(&g.virt_type)?;
            let o = CreateOptions {
                name: &name,
                image: &image,
                channel,
                size,
                profile: &profile,
                persistent,
                virt,
                start,
                display_listen,
                insecure_display,
            };
            let v = pools.create(&o, &actor)?;
            print(g.json, &v, |v| {
                format!(
                    "pool '{}': {} desktops of '{}' version {} ({} channel), profile {}, {}, displays on {}{}",
                    v.pool.name,
                    v.desktops.len(),
                    v.pool.image,
                    v.pool.version,
                    v.pool.channel,
                    v.pool.profile,
                    v.pool.virt_type,
                    v.pool.display_listen,
                    display_security(&v.pool)
                )
            })
        }
        PoolCmd::List => {
            let l = pools.list()?;
            print(g.json, &l, |l| {
                if l.is_empty() {
                    return "no pools yet: 'vdim pool create NAME --image IMAGE --size N'".into();
                }
                let mut s = format!(
                    "{:<20} {:<20} {:<8} {:>7} {:>5} {:>6} {:>7}\n",
                    "pool", "image", "channel", "version", "size", "in use", "pending"
                );
                for p in l {
                    let ver = match p.pool.pinned {
                        Some(v) => format!("{v} pin"),
                        None => p.pool.version.to_string(),
                    };
                    s += &format!(
                        "{:<20} {:<20} {:<8} {:>7} {:>5} {:>6} {:>7}\n",
                        p.pool.name, p.pool.image, p.pool.channel, ver, p.pool.size, p.in_use, p.pending_moves
                    );
                }
                s.trim_end().to_string()
            })
        }
        PoolCmd::Show { name } => {
            let v = pools.show(&name)?;
            print(g.json, &v, |v| {
                let p = &v.pool;
                let mut s = format!(
                    "pool {}: image {} channel {} (at version {}), runs version {}{}, {} desktops, profile {}{}, displays on {}{}\n",
                    p.name,
                    p.image,
                    p.channel,
                    v.channel_version,
                    p.version,
                    p.pinned.map(|x| format!(" (pinned at {x})")).unwrap_or_default(),
                    p.size,
                    p.profile,
                    if p.persistent { ", persistent" } else { "" },
                    p.display_listen,
                    display_security(p)
                );
                s += &format!("{:<24} {:<22} {:>7} {:>8}  user\n", "desktop", "state", "version", "will run");
                for d in &v.desktops {
                    s += &format!(
                        "{:<24} {:<22} {:>7} {:>8}  {}\n",
                        d.name,
                        d.state,
                        d.version,
                        d.will_run,
                        d.assigned_to.as_deref().unwrap_or("-")
                    );
                }
                s.trim_end().to_string()
            })
        }
        PoolCmd::Start { name } => {
            let started = pools.start(&name, &actor)?;
            print(g.json, &serde_json::json!({"pool": name, "started": started}), |_| {
                format!("pool '{name}' running ({} desktops started)", started.len())
            })
        }
        PoolCmd::Stop { name, force } => {
            let stopped = pools.stop(&name, force, &actor)?;
            print(g.json, &serde_json::json!({"pool": name, "stopped": stopped}), |_| {
                format!("pool '{name}' stopped ({} desktops)", stopped.len())
            })
        }
        PoolCmd::Resize { name, size } => {
            let v = pools.resize(&name, size, &actor)?;
            print(g.json, &v, |v| format!("pool '{}' now has {} desktops", v.pool.name, v.desktops.len()))
        }
        PoolCmd::Update { name, force } => match pools.update(&name, force, &actor) {
            Ok(r) => print(g.json, &r, |r| move_text(r, "updated")),
            // Idempotent for scripts: being up to date is success.
            Err(PoolError::Denied(crate::rules::Denied::AlreadyThere { version, .. })) => {
                print(g.json, &serde_json::json!({"pool": name, "version": version, "moved": false}), |_| {
                    format!("pool '{name}' already runs version {version}")
                })
            }
            Err(e) => Err(e.into()),
        },
        PoolCmd::Pin { name, version, force } => {
            let r = pools.pin(&name, version, force, &actor)?;
            print(g.json, &r, |r| move_text(r, "pinned"))
        }
        PoolCmd::Unpin { name } => {
            let p = pools.unpin(&name, &actor)?;
            print(g.json, &p, |p| {
                format!(
                    "pool '{}' follows channel {} again (runs version {}; 'vdim pool update {}' moves it now)",
                    p.name, p.channel, p.version, p.name
                )
            })
        }
        PoolCmd::Assign { name, user } => {
            crate::names::validate("user", &user)?;
            let d = pools.assign(&name, &user, &actor)?;
            print(g.json, &d, |d| format!("{} assigned to {user} (version {})", d.name, d.version))
        }
        PoolCmd::Release { desktop } => {
            let r = pools.release(&desktop, &actor)?;
            print(g.json, &r, |r| {
                format!("{desktop} released{} on version {}", if r.reset { " and reset" } else { "" }, r.version)
            })
        }
        PoolCmd::Entitle { name, user } => crate::cli_broker::entitle(g, &mut pools, &name, &user, true),
        PoolCmd::Unentitle { name, user } => crate::cli_broker::entitle(g, &mut pools, &name, &user, false),
        PoolCmd::Delete { name, force } => {
            pools.delete(&name, force, &actor)?;
            print(g.json, &serde_json::json!({"pool": name, "deleted": true}), |_| format!("pool '{name}' deleted"))
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    let g = &cli.global;
    match cli.command {
        Command::Init => {
            let store = Store::init(home(g))?;
            let profiles = profiles_dir(g);
            crate::profile::install_shipped(&profiles)
                .with_context(|| format!("installing profiles into {}", profiles.display()))?;
            let root = store.home().root().display().to_string();
            print(g.json, &serde_json::json!({"home": root}), |_| format!("vdim home ready at {root}"))
        }
        Command::Image(cmd) => image(g, cmd),
        Command::Pool(cmd) => pool(g, cmd),
        Command::User(cmd) => crate::cli_broker::user(g, cmd),
        Command::Serve(args) => crate::cli_broker::serve(g, args),
        Command::Rollback { pool: Some(name), to, force, .. } => {
            let (mut store, hv) = (open_store(g)?, connect(g)?);
            let r = Pools::new(&mut store, hv.as_ref(), profiles_dir(g)).rollback(
                &name,
                to,
                force,
                &Actor::resolve(None),
            )?;
            print(g.json, &r, |r| move_text(r, "rolled back"))
        }
        Command::Rollback { pool: None, image, channel, to, force } => {
            let (image, channel) = (image.unwrap_or_default(), channel.unwrap_or(Channel::Prod));
            let (mut store, hv) = (open_store(g)?, connect(g)?);
            let pools = Pools::new(&mut store, hv.as_ref(), profiles_dir(g));
            let r = Engine::new(pools, Actor::resolve(None)).rollback_channel(&image, channel, to, force)?;
            print(g.json, &r, |r| {
                let mut s = format!("channel {channel} of '{image}' now points at version {}", r.version);
                if let Some(id) = r.stopped_rollout {
                    s += &format!("; rollout {id} stopped and {} desktop(s) moved back", r.reverted_desktops.len());
                }
                for (p, res) in &r.pools {
                    s += &format!("\n  pool {p}: {}", serde_json::to_string(res).unwrap_or_default());
                }
                s
            })
        }
        Command::Promote { image, version, to, waves, soak, force, reason } => {
            let (mut store, hv) = (open_store(g)?, connect(g)?);
            let pools = Pools::new(&mut store, hv.as_ref(), profiles_dir(g));
            let o =
                PromoteOptions { image: &image, version, to, waves: &waves, soak, force, reason: reason.as_deref() };
            match Engine::new(pools, Actor::resolve(None)).promote(&o) {
                Ok(r) => print(g.json, &r, rollout_text),
                Err(RolloutError::Failed { report, summary, .. }) => {
                    print(g.json, &*report, rollout_text)?;
                    bail!("the rollout failed and was rolled back: {summary}")
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Rollout(cmd) => {
            let (mut store, hv) = (open_store(g)?, connect(g)?);
            let pools = Pools::new(&mut store, hv.as_ref(), profiles_dir(g));
            let mut engine = Engine::new(pools, Actor::resolve(None));
            match cmd {
                RolloutCmd::Status { image, limit } => {
                    let r = engine.status(image.as_deref(), limit)?;
                    print(g.json, &r, |r| {
                        if r.is_empty() {
                            return "no rollouts".into();
                        }
                        r.iter().map(rollout_text).collect::<Vec<_>>().join("\n\n")
                    })
                }
                RolloutCmd::Halt { image } => {
                    let r = engine.halt(&image)?;
                    print(g.json, &r, |r| {
                        format!(
                            "rollout of '{}' version {} halts after wave {}",
                            r.rollout.image,
                            r.rollout.version,
                            r.rollout.wave + 1
                        )
                    })
                }
                RolloutCmd::Resume { image } => match engine.resume(&image) {
                    Ok(r) => print(g.json, &r, rollout_text),
                    Err(RolloutError::Failed { report, summary, .. }) => {
                        print(g.json, &*report, rollout_text)?;
                        bail!("the rollout failed and was rolled back: {summary}")
                    }
                    Err(e) => Err(e.into()),
                },
            }
        }
        Command::Audit { image, pool, limit } => {
            let mut store = open_store(g)?;
            let log = store.catalog().read(|tx| tx.audit_log(image.as_deref(), pool.as_deref(), limit))?;
            print(g.json, &log, |log| {
                log.iter()
                    .map(|e| {
                        let mut what = e.action.clone();
                        if let Some(i) = &e.image {
                            what += &format!(" image={i}");
                        }
                        if let Some(p) = &e.pool {
                            what += &format!(" pool={p}");
                        }
                        if let Some(v) = e.version {
                            what += &format!(" version={v}");
                        }
                        format!("{}  {:<10} {what}  {}", e.at, e.actor, e.detail)
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
        }
    }
}

fn image(g: &Global, cmd: ImageCmd) -> Result<()> {
    match cmd {
        ImageCmd::Import { name, file, format, note, author } => {
            let format = format.as_deref().map(Format::parse).transpose()?;
            let mut store = open_store(g)?;
            let r = store.import(
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
            let mut store = open_store(g)?;
            let actor = Actor::resolve(author.as_deref());
            let r = if start {
                let hv = connect(g)?;
                let profiles = profiles_dir(g);
                crate::dev::edit_and_start(
                    &mut store,
                    hv.as_ref(),
                    &profiles,
                    &name,
                    from,
                    &actor,
                    &profile,
                    &g.virt_type,
                )?
            } else {
                crate::dev::EditReport { draft: store.edit(&name, from, &actor)?, dev_desktop: None }
            };
            print(g.json, &r, |r| {
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
                            s += &format!(
                                "\n  remote-viewer {scheme}://{}:{}   password {}",
                                c.listen, c.port, c.password
                            );
                        }
                        if let Some(log) = &dd.serial_log {
                            s += &format!("\n  serial console log: {log}");
                        }
                        s += &format!("\npatch it, then 'vdim image seal {} --shutdown'", d.image);
                    }
                }
                s
            })
        }
        ImageCmd::Discard { name, author } => {
            let mut store = open_store(g)?;
            let hv = connect(g)?;
            crate::dev::remove(&mut store, hv.as_ref(), &name)?;
            store.discard(&name, &Actor::resolve(author.as_deref()))?;
            print(g.json, &serde_json::json!({"image": name, "discarded": true}), |_| {
                format!("draft of '{name}' discarded")
            })
        }
        ImageCmd::Seal { name, note, author, shutdown, shutdown_timeout } => {
            let mut store = open_store(g)?;
            let hv = connect(g)?;
            let actor = Actor::resolve(author.as_deref());
            let r =
                crate::dev::seal(&mut store, hv.as_ref(), &name, &note, &actor, shutdown.then_some(shutdown_timeout))?;
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
            let mut store = open_store(g)?;
            let h = store.history(&name)?;
            print(g.json, &h, |h| {
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
            })
        }
        ImageCmd::List => {
            let mut store = open_store(g)?;
            let l = store.list()?;
            print(g.json, &l, |l| {
                if l.is_empty() {
                    return "no images yet: 'vdim image import NAME FILE'".into();
                }
                let mut s = format!(
                    "{:<24} {:>8} {:>6} {:>10} {:>10}  channels\n",
                    "image", "versions", "newest", "virtual", "stored"
                );
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
            })
        }
        ImageCmd::Verify { name } => {
            let mut store = open_store(g)?;
            let r = store.verify(name.as_deref())?;
            print(g.json, &r, |r| {
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
            })?;
            if !r.ok {
                bail!("verify found {} problem(s)", r.problems.len());
            }
            Ok(())
        }
        ImageCmd::Gc { dry_run } => {
            let mut store = open_store(g)?;
            let r = store.gc(dry_run, &Actor::resolve(None), &pool::versions_in_use)?;
            print(g.json, &r, |r| {
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
            })
        }
        ImageCmd::Export { name, version, file } => {
            let mut store = open_store(g)?;
            let r = store
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

/// Exit code for an error: from the kind of the first error in its chain that has one.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    crate::error::exit_code(err)
}
