//! The thin-client broker's commands: `vdim user ...`, `vdim pool entitle/unentitle` and
//! `vdim serve`. Kept apart from `cli.rs` so both can change without touching each other;
//! like the rest of the CLI they only parse, call the services, and print.

use super::{print, profiles_dir, Global};
use crate::broker::{self, ServeOptions};
use crate::home::Home;
use crate::hypervisor::Libvirt;
use crate::pool::Pools;
use crate::store::{Actor, Store};
use crate::users::{Sessions, Users};
use anyhow::Result;
use clap::{Args, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where `scripts/setup-console` installs noVNC.
pub const DEFAULT_NOVNC: &str = "/var/cache/vdim/console/node_modules/@novnc/novnc";

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// Add a thin-client user and print their token once (only its hash is stored)
    Add {
        name: String,
        /// May use the admin API
        #[arg(long)]
        admin: bool,
        /// Token lifetime, e.g. 90d or 12h [default: no expiry]
        #[arg(long, value_parser = humantime::parse_duration)]
        expires: Option<Duration>,
    },
    /// All users, their pools and open sessions
    List,
    /// Remove a user: their open sessions are logged off first
    Remove { name: String },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on; plain HTTP only on loopback (port 0 picks a free port)
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// TLS certificate chain (PEM)
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The URL thin clients reach the broker at [default: from --listen]
    #[arg(long)]
    pub public_url: Option<String>,
    /// noVNC directory for the HTML5 console (scripts/setup-console installs it)
    #[arg(long, env = "VDIM_NOVNC", default_value = DEFAULT_NOVNC)]
    pub novnc: PathBuf,
    /// How long a session lasts before the broker logs it off
    #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
    pub session_ttl: Duration,
    /// Host name or IP address thin clients reach this hypervisor at: the host of .vv files for
    /// pools whose displays listen on every address (--display-listen 0.0.0.0 or ::)
    #[arg(long, env = "VDIM_DISPLAY_HOST", value_name = "HOST", value_parser = broker::vv::parse_display_host)]
    pub display_host: Option<String>,
    /// CA certificate (PEM) that signed the hosts' SPICE TLS certificates, i.e. the ca-cert.pem
    /// of libvirt's spice_tls_x509_cert_dir: .vv files of TLS displays carry it
    #[arg(long, env = "VDIM_DISPLAY_CA", value_name = "FILE")]
    pub display_ca: Option<PathBuf>,
    /// Subject of the hosts' SPICE server certificate (e.g. "O=Example,CN=hv1.example") for
    /// remote-viewer to expect; without it remote-viewer checks the host name against it
    #[arg(long, requires = "display_ca", value_name = "SUBJECT", value_parser = broker::vv::parse_host_subject)]
    pub display_host_subject: Option<String>,
    /// Serve /bench/noop, a bare handler, as the benchmark's baseline
    #[arg(long, hide = true)]
    pub bench_noop: bool,
    /// How long a client may take for its TLS handshake and for each request head (also the
    /// keep-alive idle time); slower connections are closed
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// How long a thin-client or public request may take in all (503 after it; 408 when
    /// its body has not arrived)
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// Open client connections at most; at the cap the oldest connection that is not in a
    /// request makes room [default: 4096, or fewer if the open-files limit is lower]
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Also serve /metrics without a token on this plain-HTTP address (loopback or an admin
    /// network); on --listen, /metrics needs an admin token
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

fn open_store(g: &Global) -> Result<Store> {
    Ok(Store::open(Home::new(g.home.clone().unwrap_or_else(Home::default_root)))?)
}

pub fn user(g: &Global, cmd: UserCmd) -> Result<()> {
    let actor = Actor::resolve(None);
    let mut store = open_store(g)?;
    match cmd {
        UserCmd::Add { name, admin, expires } => {
            let u = Users::new(&mut store).add(&name, admin, expires, &actor)?;
            print(g.json, &u, |u| {
                format!(
                    "user '{}' added{}; their token (shown only now, keep it secret):\n{}",
                    u.user.name,
                    if u.user.admin { " as administrator" } else { "" },
                    u.token
                )
            })
        }
        UserCmd::List => {
            let l = Users::new(&mut store).list()?;
            print(g.json, &l, |l| {
                if l.is_empty() {
                    return "no users yet: 'vdim user add NAME'".into();
                }
                let mut s = format!("{:<24} {:<6} {:>8} {:<21} pools\n", "user", "admin", "sessions", "token expires");
                for u in l {
                    s += &format!(
                        "{:<24} {:<6} {:>8} {:<21} {}\n",
                        u.user.name,
                        if u.user.admin { "yes" } else { "" },
                        u.open_sessions,
                        u.user.token_expires.as_deref().unwrap_or("never"),
                        u.pools.join(",")
                    );
                }
                s.trim_end().to_string()
            })
        }
        UserCmd::Remove { name } => {
            let hv = Libvirt::connect(&g.connect)?;
            let r = Sessions::new(&mut store, &hv, profiles_dir(g)).remove_user(&name, &actor, &|_| {})?;
            print(g.json, &r, |r| {
                let mut s = format!("user '{}' removed ({} open sessions logged off)", r.user, r.sessions_closed.len());
                for d in &r.kept_desktops {
                    s += &format!(
                        "\n  {d} stays assigned to '{}' with its disk: 'vdim pool release {d}' gives it back",
                        r.user
                    );
                }
                s
            })
        }
    }
}

/// `vdim pool entitle|unentitle POOL USER`.
pub fn entitle(g: &Global, pools: &mut Pools, pool: &str, user: &str, grant: bool) -> Result<()> {
    let actor = Actor::resolve(None);
    let e = if grant {
        Users::new(pools.store).entitle(pool, user, &actor)?
    } else {
        Sessions::new(pools.store, pools.hv, profiles_dir(g)).unentitle(pool, user, &actor, &|_| {})?
    };
    print(g.json, &e, |e| match (grant, e.changed) {
        (true, true) => format!("user '{}' may now open sessions in pool '{}'", e.user, e.pool),
        (true, false) => format!("user '{}' was already entitled to pool '{}'", e.user, e.pool),
        (false, true) => format!(
            "user '{}' may no longer open sessions in pool '{}' ({} open session logged off)",
            e.user,
            e.pool,
            e.sessions_closed.len()
        ),
        (false, false) => format!("user '{}' was not entitled to pool '{}'", e.user, e.pool),
    })
}

fn read_display_ca(path: &std::path::Path) -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(broker::vv::MAX_CA_BYTES as u64 + 1).read_to_string(&mut text))
        .map_err(|e| anyhow::anyhow!("cannot read the display CA {}: {e}", path.display()))?;
    Ok(text)
}

pub fn serve(g: &Global, a: ServeArgs) -> Result<()> {
    let display_tls = match &a.display_ca {
        None => None,
        Some(path) => {
            let pem = read_display_ca(path)?;
            let ca = broker::vv::parse_display_ca(&pem)
                .map_err(|why| anyhow::anyhow!("display CA {} {why}", path.display()))?;
            Some(broker::vv::DisplayTls { ca, host_subject: a.display_host_subject.clone() })
        }
    };
    let opts = ServeOptions {
        home: Home::new(g.home.clone().unwrap_or_else(Home::default_root)),
        connect: g.connect.clone(),
        virt_type: g.virt_type.clone(),
        profiles: profiles_dir(g),
        listen: a.listen,
        tls: a.tls_cert.zip(a.tls_key),
        public_url: a.public_url,
        novnc: a.novnc,
        session_ttl: a.session_ttl,
        display_host: a.display_host,
        display_tls,
        bench_noop: a.bench_noop,
        header_timeout: a.header_timeout,
        request_timeout: a.request_timeout,
        max_connections: a.max_connections,
        metrics_listen: a.metrics_listen,
    };
    Ok(broker::serve(opts)?)
}
