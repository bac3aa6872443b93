//! `vdim pool ...`: create, list, show, start, stop, resize, update, pin, unpin, assign,
//! release, entitle, unentitle, delete.

use super::global::{open, Global};
use super::output::{desktops_line, fail_on, failures_text, print};
use crate::catalog::Channel;
use crate::pool::{self, CreateRequest, MoveReport, PoolError, PoolSummary, PoolView};
use crate::store::Actor;
use anyhow::Result;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand, Debug)]
pub enum PoolCmd {
    /// Create a pool of desktops on the version an image's channel points at
    Create(Box<CreateArgs>),
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

#[derive(Args, Debug)]
pub struct CreateArgs {
    name: String,
    #[arg(long)]
    image: String,
    #[arg(long, value_enum, default_value_t = pool::DEFAULT_CHANNEL)]
    channel: Channel,
    #[arg(long)]
    size: u32,
    #[arg(long, default_value = pool::DEFAULT_PROFILE)]
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
    /// Give each desktop its own identity: a read-only config drive (config-2) with its
    /// hostname for cloudbase-init and an answer file (unattend.xml) for Windows Setup
    #[arg(long)]
    identity: bool,
    /// Computer names, {n} the desktop's number (FIN-{n}: FIN-001, FIN-002...); at most 15
    /// characters of letters, digits and '-' (NetBIOS). Default: <pool>-{n}
    #[arg(long, value_name = "PATTERN", requires = "identity")]
    hostname_pattern: Option<String>,
    /// Join each desktop to this Active Directory domain in the specialize pass
    #[arg(long, value_name = "DOMAIN", requires_all = ["identity", "join_credentials"])]
    join_domain: Option<String>,
    /// The OU the computer accounts go to (e.g. 'OU=VDI,DC=corp,DC=example,DC=com')
    #[arg(long, value_name = "DN", requires = "join_domain")]
    join_ou: Option<String>,
    /// File with the joining account (username=, password=, optional domain=), mode 600;
    /// read again at every desktop reset, its contents never stored by vdim
    #[arg(long, value_name = "FILE", requires = "join_domain")]
    join_credentials: Option<PathBuf>,
    /// File put on each config drive as OpenStack user data (for cloudbase-init)
    #[arg(long, value_name = "FILE", requires = "identity")]
    user_data: Option<PathBuf>,
    /// Registered hosts its desktops spread over (comma-separated); default: the libvirt of --connect
    #[arg(long, value_delimiter = ',', value_name = "HOST,...")]
    hosts: Vec<String>,
    /// Every registered host of this zone
    #[arg(long)]
    zone: Option<String>,
}

impl From<CreateArgs> for CreateRequest {
    fn from(a: CreateArgs) -> CreateRequest {
        let CreateArgs {
            name,
            image,
            channel,
            size,
            profile,
            persistent,
            start,
            display_listen,
            insecure_display,
            identity,
            hostname_pattern,
            join_domain,
            join_ou,
            join_credentials,
            user_data,
            hosts,
            zone,
        } = a;
        // Files are read again later (at every reset) from wherever vdim runs: keep them absolute.
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        CreateRequest {
            name,
            image,
            channel,
            size,
            profile,
            persistent,
            start,
            display_listen,
            insecure_display,
            identity,
            hostname_pattern,
            join_domain,
            join_ou,
            join_credentials: join_credentials.map(absolute),
            user_data: user_data.map(absolute),
            hosts,
            zone,
        }
    }
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

pub fn move_text(r: &MoveReport, verb: &str) -> String {
    let p = &r.plan;
    let mut s = format!("pool '{}' {verb} from version {} to {}", p.pool, p.from, p.to);
    if let Some(pin) = p.pinned {
        s += &format!(", pinned at {pin}");
    }
    s += &format!("\n  moved now: {}", if p.now.is_empty() { "-".into() } else { p.now.join(", ") });
    if !p.at_logoff.is_empty() {
        s += &format!("\n  in use, move at logoff: {}", p.at_logoff.join(", "));
    }
    s += &desktops_line("booted", &r.started);
    s + &failures_text(&r.failed)
}

fn list_text(l: &Vec<PoolSummary>) -> String {
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
}

fn show_text(v: &PoolView) -> String {
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
    if let Some(id) = &p.identity {
        s += &identity_text(id);
    }
    if !v.hosts.is_empty() {
        s += &format!("hosts: {}\n", v.hosts.join(", "));
    }
    for (host, version) in &v.pending {
        s += &format!("version {version} pending on host {host} (not verified there: 'vdim host sync {host}')\n");
    }
    s += &format!(
        "{:<24} {:<12} {:<16} {:<22} {:>7} {:>8}  user\n",
        "desktop", "host", "hostname", "state", "version", "will run"
    );
    for d in &v.desktops {
        s += &format!(
            "{:<24} {:<12} {:<16} {:<22} {:>7} {:>8}  {}\n",
            d.name,
            d.host.as_deref().unwrap_or("-"),
            d.hostname.as_deref().unwrap_or("-"),
            d.state,
            d.version,
            d.will_run,
            d.assigned_to.as_deref().unwrap_or("-")
        );
    }
    s.trim_end().to_string()
}

/// A pool's identity line in `pool show`: paths and names, never a secret.
fn identity_text(id: &crate::identity::Identity) -> String {
    let mut s = format!("identity: hostnames {}", id.hostname_pattern);
    if let Some(j) = &id.join {
        s += &format!(", joins {}", j.domain);
        if let Some(ou) = &j.ou {
            s += &format!(" in {ou}");
        }
        s += &format!(" (credentials from {})", j.credentials.display());
    }
    if let Some(u) = &id.user_data {
        s += &format!(", user data from {}", u.display());
    }
    s + "\n"
}

pub fn run(g: &Global, cmd: PoolCmd) -> Result<()> {
    let actor = Actor::resolve(None);
    let mut ctx = open(g)?;
    let mut pools = match cmd {
        PoolCmd::Entitle { name, user } => return super::user::entitle(g, &mut ctx, &name, &user, true),
        PoolCmd::Unentitle { name, user } => return super::user::entitle(g, &mut ctx, &name, &user, false),
        _ => ctx.pools()?,
    };
    match cmd {
        PoolCmd::Create(args) => {
            let virt = pool::parse_virt_type(&g.virt_type)?;
            let v = pools.create(&CreateRequest::from(*args).options(virt)?, &actor)?;
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
            print(g.json, &l, list_text)
        }
        PoolCmd::Show { name } => {
            let v = pools.show(&name)?;
            print(g.json, &v, show_text)
        }
        PoolCmd::Start { name } => {
            let r = pools.start(&name, &actor)?;
            print(g.json, &serde_json::json!({"pool": name, "started": r.desktops, "failed": r.failed}), |_| {
                format!("pool '{name}' running ({} desktops started)", r.desktops.len())
                    + &desktops_line("started", &r.desktops)
                    + &failures_text(&r.failed)
            })?;
            fail_on(&r.failed)
        }
        PoolCmd::Stop { name, force } => {
            let r = pools.stop(&name, force, &actor)?;
            print(g.json, &serde_json::json!({"pool": name, "stopped": r.desktops, "failed": r.failed}), |_| {
                format!("pool '{name}' stopped ({} desktops)", r.desktops.len())
                    + &desktops_line("stopped", &r.desktops)
                    + &failures_text(&r.failed)
            })?;
            fail_on(&r.failed)
        }
        PoolCmd::Resize { name, size } => {
            let v = pools.resize(&name, size, &actor)?;
            print(g.json, &v, |v| format!("pool '{}' now has {} desktops", v.pool.name, v.desktops.len()))
        }
        PoolCmd::Update { name, force } => match pools.update(&name, force, &actor) {
            Ok(r) => print(g.json, &r, |r| move_text(r, "updated")).and_then(|()| fail_on(&r.failed)),
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
            print(g.json, &r, |r| move_text(r, "pinned"))?;
            fail_on(&r.failed)
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
        PoolCmd::Entitle { .. } | PoolCmd::Unentitle { .. } => unreachable!("handled above"),
        PoolCmd::Delete { name, force } => {
            pools.delete(&name, force, &actor)?;
            print(g.json, &serde_json::json!({"pool": name, "deleted": true}), |_| format!("pool '{name}' deleted"))
        }
    }
}
