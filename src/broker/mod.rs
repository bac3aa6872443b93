//! The thin-client broker, `vdim serve`: an axum server on tokio that turns HTTP requests
//! into calls of the same services the CLI uses (`users::Users`, `users::Sessions`,
//! `pool::Pools`, `store::Store`), and maps their errors to status codes in one place
//! ([`error`]). Those services are synchronous (SQLite, libvirt), so each call runs on
//! tokio's blocking pool with a catalog connection taken from a small pool of them.
//!
//! ```text
//!  thin client ─HTTP(S)─► router ─► token → user ─► service call (blocking pool) ─► JSON / .vv
//!  browser ─WS(S)─► /console/{id}/ws ─► Origin + console token ─► VNC login ─► byte pipe
//!  reaper (every second) ─► expire sessions, cut their displays off, finish logoffs, close consoles
//!  fleet watch (rounds of 0.5 s, leader only) ─► crashes recorded, circuit breaker, incidents ─► --webhook
//!  lease (every 2 s) ─► leader? reaper, heal on election, host watch, rollouts adopted
//! ```
//! Several brokers may serve one catalog: every one serves every request (assignment is one
//! catalog transaction), and only the holder of the leader lease runs the background duties
//! ([`leadership`]); `/healthz` and the `vdim_broker_leader` metric say whether this one does.
//! Plain HTTP is only served on loopback; anything else needs `--tls-cert` and `--tls-key`.
//!
//! Under abuse: connections are accepted by [`listener`] (header timeout, a connection cap
//! that evicts waiting connections first). Service calls run in two lanes of the blocking
//! pool: token checks and anonymous reads in a small lane of their own, so that a flood of
//! bad tokens or health checks waits only behind itself; service calls take a permit only
//! after the token was checked. Thin-client and public routes end after `--request-timeout`
//! (503), and a body that does not arrive by then gets 408. Errors that could carry host
//! detail reach thin clients as a short message with an error id; the log has the detail
//! under that id, and the admin API keeps it in the body. `/metrics` needs an admin token on
//! the main listener, or none on `--metrics-listen`.
//! Nothing secret is logged: tokens travel in headers (`Authorization`,
//! `Sec-WebSocket-Protocol`) or URL fragments, and only methods, paths and statuses are logged.

pub mod api;
mod console;
pub mod error;
mod leadership;
pub mod listener;
mod metrics;
mod tls;
pub mod vnc;
pub mod vv;

use crate::context::{Connector, Context, ContextError, Settings};
use crate::store::Actor;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use error::ApiError;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::Semaphore;

/// JSON request bodies are small; anything larger is refused with 413.
pub const BODY_LIMIT: usize = 16 * 1024;
/// Catalog connections (and so concurrent service calls) per broker.
const CATALOG_CONNECTIONS: usize = 8;
/// Catalog connections for token checks and anonymous reads, apart from service calls.
const CHECK_CONNECTIONS: usize = 4;
/// File descriptors kept for everything but client sockets (catalog, libvirt, consoles' VNC).
const RESERVED_FILES: u64 = 256;
/// The accept queue's length (nginx uses 511; the kernel caps it at somaxconn).
const LISTEN_BACKLOG: u32 = 1024;
/// Connections at most on `--metrics-listen`.
const METRICS_CONNECTIONS: usize = 64;

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error("refusing to serve plain HTTP on {0}: only loopback addresses may go without TLS; give --tls-cert and --tls-key")]
    Insecure(SocketAddr),
    #[error("--public-url {0:?} must be http:// or https:// and a host, without path, query or fragment")]
    PublicUrl(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Context(#[from] ContextError),
    #[error("cannot finish interrupted logoffs at start: {0}")]
    Heal(String),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error("--max-connections {max} needs {need} open files but the hard limit (ulimit -Hn) is {limit}: lower it or raise the limit")]
    NoFile { max: usize, need: u64, limit: u64 },
    #[error("cannot raise the open-files limit to {need}: {source}")]
    RaiseNoFile { need: u64, source: std::io::Error },
    #[error("{what} must be more than zero")]
    Zero { what: &'static str },
    #[error(transparent)]
    Webhook(#[from] crate::watch::webhook::WebhookError),
}

impl crate::error::Kind for BrokerError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            BrokerError::Tls(e) => e.kind(),
            BrokerError::Context(e) => e.kind(),
            BrokerError::Webhook(e) => e.kind(),
            BrokerError::Insecure(_)
            | BrokerError::PublicUrl(_)
            | BrokerError::NoFile { .. }
            | BrokerError::Zero { .. } => K::Invalid,
            BrokerError::Bind { source, .. } => K::of_io(source),
            BrokerError::Heal(_)
            | BrokerError::Runtime(_)
            | BrokerError::Serve(_)
            | BrokerError::RaiseNoFile { .. } => K::Internal,
        }
    }
}

/// What `vdim serve` was asked to do.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Home, libvirt URI, virt type and profiles, as every command has them.
    pub settings: Settings,
    pub listen: SocketAddr,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub public_url: Option<String>,
    pub novnc: PathBuf,
    pub session_ttl: Duration,
    /// The host `.vv` files name for displays listening on every address (checked with
    /// [`vv::parse_display_host`]); without it such a display gets no `.vv`.
    pub display_host: Option<String>,
    /// `--display-ca` (and `--display-host-subject`): what `.vv` files of TLS displays carry.
    pub display_tls: Option<vv::DisplayTls>,
    /// Adds `/bench/noop`, a bare handler outside every layer, as the benchmark's baseline.
    pub bench_noop: bool,
    /// How long a client may take for the TLS handshake and for each request head.
    pub header_timeout: Duration,
    /// How long a thin-client or public request may take in all.
    pub request_timeout: Duration,
    /// Open connections at most; `None`: 4096, or fewer when the open-files limit is lower.
    pub max_connections: Option<usize>,
    /// A second, plain-HTTP listener serving only `/metrics`, without a token.
    pub metrics_listen: Option<SocketAddr>,
    /// `--webhook`: where the fleet watch posts incidents opened and resolved.
    pub webhook: Option<crate::watch::webhook::Webhook>,
}

/// The broker's own address as browsers and thin clients see it.
#[derive(Debug, Clone)]
pub struct Public {
    /// `https://broker.example:8443`, no trailing slash: URLs in responses start with it.
    pub base: String,
    /// What a browser sends as `Origin` for pages of this broker.
    pub origin: String,
    /// The host name or address alone.
    pub host: String,
    pub tls: bool,
}

impl Public {
    pub fn parse(url: &str) -> Result<Public, BrokerError> {
        let bad = || BrokerError::PublicUrl(url.to_string());
        let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
        let scheme = scheme.to_ascii_lowercase();
        let tls = match scheme.as_str() {
            "https" => true,
            "http" => false,
            _ => return Err(bad()),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest).to_ascii_lowercase();
        if authority.is_empty()
            || authority.chars().any(|c| c.is_control() || c.is_whitespace() || "/?#@\\\"'<>".contains(c))
        {
            return Err(bad());
        }
        let default_port = if tls { ":443" } else { ":80" };
        let authority = authority.strip_suffix(default_port).unwrap_or(&authority).to_string();
        let host = if let Some(v6) = authority.strip_prefix('[') {
            v6.split(']').next().unwrap_or_default().to_string()
        } else {
            authority.split(':').next().unwrap_or_default().to_string()
        };
        if host.is_empty() {
            return Err(bad());
        }
        let origin = format!("{scheme}://{authority}");
        Ok(Public { base: origin.clone(), origin, host, tls })
    }
}

/// Catalog connections (contexts) for the blocking pool: taken for one service call, then
/// put back.
struct Contexts {
    connector: Connector,
    idle: Mutex<Vec<Context>>,
    /// Service calls, taken only once the caller is known.
    permits: Semaphore,
    /// Token checks and anonymous reads.
    check_permits: Semaphore,
}

impl Contexts {
    fn take(&self) -> Result<Context, ApiError> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match pooled {
            Some(s) => Ok(s),
            None => {
                let mut s = self.connector.open()?;
                s.catalog().retry_busy_soon()?;
                Ok(s)
            }
        }
    }
    fn put(&self, mut s: Context) {
        // A PostgreSQL connection the server closed is dropped; the next call opens another.
        if s.catalog().is_broken() {
            return;
        }
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    }
}

/// The broker's shared state.
pub struct Broker {
    pub(crate) public: Public,
    pub(crate) session_ttl: Duration,
    /// `--display-host`: where thin clients reach displays that listen on every address.
    pub(crate) display_host: Option<String>,
    /// `--display-ca`: the CA (and subject) of hosts' SPICE TLS certificates.
    pub(crate) display_tls: Option<vv::DisplayTls>,
    pub(crate) consoles: console::Registry,
    pub(crate) metrics: metrics::Metrics,
    /// Session opens take turns (first come, first served) instead of racing for SQLite's
    /// write lock: same outcome, no retry sleeps in the tail.
    pub(crate) open_gate: tokio::sync::Mutex<()>,
    /// `--request-timeout`: thin-client and public routes.
    pub(crate) request_timeout: Duration,
    /// The main listener's connections.
    pub(crate) connections: Arc<listener::Connections>,
    /// Whether this broker holds the leader lease now.
    pub(crate) leadership: crate::leader::Leadership,
    adopted: leadership::Adopted,
    contexts: Contexts,
}

impl Broker {
    /// Runs a synchronous service call on the blocking pool with a catalog connection; for
    /// callers already authenticated (or the broker itself).
    pub(crate) async fn blocking<T, F>(self: &Arc<Self>, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Broker, &mut Context) -> Result<T, ApiError> + Send + 'static,
    {
        self.run_blocking(&self.contexts.permits, f).await
    }

    /// Like [`Broker::blocking`], in the lane for token checks and anonymous reads: what an
    /// unauthenticated client can make the broker do never waits for, or delays, a service
    /// call.
    pub(crate) async fn checking<T, F>(self: &Arc<Self>, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Broker, &mut Context) -> Result<T, ApiError> + Send + 'static,
    {
        self.run_blocking(&self.contexts.check_permits, f).await
    }

    async fn run_blocking<T, F>(self: &Arc<Self>, permits: &Semaphore, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Broker, &mut Context) -> Result<T, ApiError> + Send + 'static,
    {
        let _permit = permits.acquire().await.map_err(|e| ApiError::Internal(e.to_string()))?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut ctx = me.contexts.take()?;
            let out = f(&me, &mut ctx);
            me.contexts.put(ctx);
            out
        })
        .await
        .map_err(|e| ApiError::Internal(format!("service call panicked or was cancelled: {e}")))?
    }
}

/// Runs the broker until SIGINT or SIGTERM.
pub fn serve(opts: ServeOptions) -> Result<(), BrokerError> {
    if opts.tls.is_none() && !opts.listen.ip().is_loopback() {
        return Err(BrokerError::Insecure(opts.listen));
    }
    for (what, d) in [("--header-timeout", opts.header_timeout), ("--request-timeout", opts.request_timeout)] {
        if d.is_zero() {
            return Err(BrokerError::Zero { what });
        }
    }
    if opts.max_connections == Some(0) {
        return Err(BrokerError::Zero { what: "--max-connections" });
    }
    let max_connections = raise_open_files(opts.max_connections)?;
    let tls = opts.tls.as_ref().map(|(c, k)| tls::server_config(c, k)).transpose()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(BrokerError::Runtime)?;
    let out = rt.block_on(run(opts, tls, max_connections));
    rt.shutdown_timeout(Duration::from_secs(5));
    out
}

/// The number of client connections to allow: the soft open-files limit is raised (like
/// nginx's `worker_rlimit_nofile`) to cover them plus [`RESERVED_FILES`].
fn raise_open_files(max: Option<usize>) -> Result<usize, BrokerError> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the rlimit we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(BrokerError::RaiseNoFile { need: 0, source: std::io::Error::last_os_error() });
    }
    let hard = r.rlim_max;
    let max = match max {
        Some(m) => m,
        None => 4096.min(hard.saturating_sub(RESERVED_FILES).max(16) as usize),
    };
    let need = max as u64 + RESERVED_FILES;
    if need > hard {
        return Err(BrokerError::NoFile { max, need, limit: hard });
    }
    if r.rlim_cur < need {
        r.rlim_cur = need;
        // SAFETY: setrlimit reads the rlimit we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(BrokerError::RaiseNoFile { need, source: std::io::Error::last_os_error() });
        }
    }
    Ok(max)
}

async fn run(
    opts: ServeOptions,
    tls: Option<Arc<rustls::ServerConfig>>,
    max_connections: usize,
) -> Result<(), BrokerError> {
    let bind = |addr: SocketAddr| move |source| BrokerError::Bind { addr, source };
    let listener = listen(opts.listen).map_err(bind(opts.listen))?;
    let local = listener.local_addr().map_err(bind(opts.listen))?;
    let metrics_listener = opts.metrics_listen.map(|a| listen(a).map_err(bind(a))).transpose()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let public = Public::parse(&opts.public_url.clone().unwrap_or_else(|| format!("{scheme}://{local}")))?;
    // A home without a catalog or an unreachable libvirt fails the start. Rollouts whose
    // driver is gone are not halted here: the leader adopts them.
    // Catalog connections block (PostgreSQL's too): opened off the async threads.
    let settings = opts.settings.clone();
    let (ctx, standing, lease_ctx, started) = tokio::task::spawn_blocking(move || open_serving(settings))
        .await
        .map_err(|e| BrokerError::Heal(format!("opening the catalog panicked: {e}")))??;
    let broker = Arc::new(Broker {
        public,
        session_ttl: opts.session_ttl,
        display_host: opts.display_host.clone(),
        display_tls: opts.display_tls.clone(),
        consoles: console::Registry::default(),
        metrics: metrics::Metrics::default(),
        open_gate: tokio::sync::Mutex::new(()),
        request_timeout: opts.request_timeout,
        connections: listener::Connections::new(max_connections),
        leadership: Default::default(),
        adopted: Default::default(),
        contexts: Contexts {
            connector: ctx.connector(),
            idle: Mutex::new(vec![ctx]),
            permits: Semaphore::new(CATALOG_CONNECTIONS),
            check_permits: Semaphore::new(CHECK_CONNECTIONS),
        },
    });
    if broker.display_host.is_none() {
        let wildcard = broker
            .blocking(|_, ctx| {
                Ok(ctx
                    .catalog()
                    .read(|tx| tx.pools())?
                    .into_iter()
                    .filter(|p| is_wildcard(&p.display_listen))
                    .map(|p| p.name)
                    .collect::<Vec<_>>())
            })
            .await
            .unwrap_or_default();
        if !wildcard.is_empty() {
            tracing::warn!(pools = ?wildcard, "these pools' displays listen on every address: remote-viewer gets no .vv for them until 'vdim serve' has --display-host");
        }
    }
    if broker.display_tls.is_none() {
        let tls = broker
            .blocking(|_, ctx| {
                Ok(ctx
                    .catalog()
                    .read(|tx| tx.pools())?
                    .into_iter()
                    .filter(|p| crate::pool::display_tls(&p.display_listen, p.insecure_display))
                    .map(|p| p.name)
                    .collect::<Vec<_>>())
            })
            .await
            .unwrap_or_default();
        if !tls.is_empty() {
            tracing::warn!(pools = ?tls, "these pools' displays are SPICE over TLS: remote-viewer gets no .vv for them until 'vdim serve' has --display-ca");
        }
    }
    if !opts.novnc.join("core/rfb.js").is_file() {
        tracing::warn!(dir = %opts.novnc.display(), "noVNC not found: the HTML5 console will not load (run scripts/setup-console, or pass --novnc)");
    }
    if let crate::leader::Standing::Leader { term, .. } = standing {
        broker.leadership.led(started, term);
        tracing::warn!(term, broker = crate::leader::me(), "this broker leads now");
    }
    tokio::spawn(leadership::lead(broker.clone(), lease_ctx));
    tokio::spawn(reaper(broker.clone()));
    tokio::spawn(host_watch(broker.clone()));
    start_fleet_watch(&broker, opts.webhook.clone())?;
    let app = router(broker.clone(), &opts);
    let metrics_addr = metrics_listener.as_ref().map(|l| l.local_addr()).transpose().map_err(BrokerError::Serve)?;
    let metrics_note = metrics_addr.map(|a| format!(", metrics http://{a}/metrics")).unwrap_or_default();
    println!(
        "vdim serve: listening on {} (API {}/api/v1, console {}/console/SESSION{metrics_note})",
        broker.public.base, broker.public.base, broker.public.base
    );
    let _ = std::io::stdout().flush();
    let limits = listener::Limits { header_timeout: opts.header_timeout, max_connections };
    if let Some(l) = metrics_listener {
        let app = metrics_router(broker.clone());
        let limits = listener::Limits { max_connections: METRICS_CONNECTIONS, ..limits };
        tokio::spawn(listener::serve(l, None, app, limits, listener::Connections::new(METRICS_CONNECTIONS)));
    }
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::select! {
        _ = listener::serve(listener, acceptor, app, limits, broker.connections.clone()) => {}
        _ = shutdown_signal() => {}
    }
    // Another broker takes over at its next tick instead of waiting out the lease.
    broker.leadership.lost();
    let _ = broker.blocking(|_, ctx| Ok(crate::leader::step_down(ctx.catalog(), crate::leader::me())?)).await;
    Ok(())
}

/// The broker's first context (the catalog, libvirt), its first try for the lead, and the
/// context the lease is kept on.
fn open_serving(
    settings: crate::context::Settings,
) -> Result<(Context, crate::leader::Standing, Context, Instant), BrokerError> {
    let mut ctx = Context::open_serving(settings)?;
    ctx.hypervisor()?;
    let started = Instant::now();
    let standing = leadership::first(&mut ctx)?;
    let lease_ctx = ctx.connector().open()?;
    Ok((ctx, standing, lease_ctx, started))
}

/// A listening socket with a deep accept queue (the kernel's default 128 overflows under a
/// burst of connections, and clients then wait for SYN retries).
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

fn is_wildcard(listen: &str) -> bool {
    listen.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Ends expired sessions and finishes interrupted logoffs, then closes their consoles.
async fn reaper(b: Arc<Broker>) {
    // Every second: an expired session's displays are cut off within the console bound (3 s).
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !b.leadership.leads() {
            continue;
        }
        // Counted as each session ends, before its desktop is reset: whoever sees the desktop
        // free sees the count too.
        let ended = |b: &Broker, s: &str| {
            b.metrics.sessions_ended_by_reaper.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            b.consoles.end(s);
        };
        let reaped =
            b.blocking(move |b, ctx| Ok(ctx.sessions()?.reap(&Actor("broker".into()), &|s| ended(b, s))?)).await;
        if let Err(e) = reaped {
            tracing::warn!(error = %e.message(), "reaping sessions failed");
        }
    }
}

/// Probes every registered host every 2 s; a dead host with a fence command is fenced and
/// its desktops made again elsewhere ([`crate::failover::watch_round`]).
async fn host_watch(b: Arc<Broker>) {
    let mut tick = tokio::time::interval(HOST_PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !b.leadership.leads() {
            continue;
        }
        let round = b
            .blocking(move |_, ctx| {
                if ctx.catalog().read(|tx| tx.hosts())?.is_empty() {
                    return Ok(vec![]);
                }
                Ok(crate::failover::watch_round(ctx, &Actor("broker".into()))?.1)
            })
            .await;
        match round {
            Ok(left) => {
                for l in left {
                    tracing::warn!(host = %l.host, moved = ?l.desktops.moved, failed = l.desktops.failed.len(),
                        waiting = ?l.desktops.waiting, "host fenced: its desktops were made again on other hosts");
                }
            }
            Err(e) => tracing::warn!(error = %e.message(), "host watch round failed"),
        }
    }
}

/// How long a round of the fleet watch waits for events before it checks states again.
const WATCH_WAIT: Duration = Duration::from_millis(500);

/// The fleet watch, telling `webhook` of incidents.
fn start_fleet_watch(b: &Arc<Broker>, webhook: Option<crate::watch::webhook::Webhook>) -> Result<(), BrokerError> {
    let notify: crate::watch::Notify = match webhook {
        Some(w) => w.start(&tokio::runtime::Handle::current())?,
        None => Box::new(|_| {}),
    };
    tokio::spawn(fleet_watch(b.clone(), crate::watch::Watch::new(notify)));
    Ok(())
}

/// The fleet watch ([`crate::watch`]): one round after another, each waiting for events,
/// while this broker leads.
async fn fleet_watch(b: Arc<Broker>, watch: crate::watch::Watch) {
    let watch = Arc::new(Mutex::new(watch));
    loop {
        if !b.leadership.leads() {
            tokio::time::sleep(WATCH_WAIT).await;
            continue;
        }
        let w = watch.clone();
        let round = b
            .blocking(move |_, ctx| {
                let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                Ok(w.round(ctx, WATCH_WAIT)?)
            })
            .await;
        if let Err(e) = round {
            tracing::warn!(error = %e.message(), "fleet watch round failed");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// How often the broker probes the registered hosts.
const HOST_PROBE_INTERVAL: Duration = Duration::from_secs(2);

fn router(b: Arc<Broker>, opts: &ServeOptions) -> Router {
    let thin_client: Router<Arc<Broker>> = Router::new()
        .route("/api/v1/pools", get(api::pools))
        .route("/api/v1/pools/{pool}/sessions", post(api::open_session))
        .route("/api/v1/sessions", get(api::my_sessions))
        .route("/api/v1/sessions/{id}", get(api::my_session).delete(api::close_session))
        .route("/api/v1/sessions/{id}/console.vv", get(api::console_vv));
    let admin = Router::new()
        .route("/api/v1/admin/images", get(api::admin_images))
        .route("/api/v1/admin/images/{image}", get(api::admin_image))
        .route("/api/v1/admin/pools", get(api::admin_pools).post(api::admin_create_pool))
        .route("/api/v1/admin/pools/{pool}", get(api::admin_pool).delete(api::admin_delete_pool))
        .route("/api/v1/admin/pools/{pool}/start", post(api::admin_start_pool))
        .route("/api/v1/admin/pools/{pool}/stop", post(api::admin_stop_pool))
        .route("/api/v1/admin/pools/{pool}/resize", post(api::admin_resize_pool))
        .route("/api/v1/admin/pools/{pool}/update", post(api::admin_update_pool))
        .route("/api/v1/admin/pools/{pool}/pin", post(api::admin_pin_pool))
        .route("/api/v1/admin/pools/{pool}/unpin", post(api::admin_unpin_pool))
        .route("/api/v1/admin/pools/{pool}/rollback", post(api::admin_rollback_pool))
        .route("/api/v1/admin/pools/{pool}/entitlements", get(api::admin_entitlements))
        .route("/api/v1/admin/pools/{pool}/entitlements/{user}", put(api::admin_entitle).delete(api::admin_unentitle))
        .route("/api/v1/admin/users", get(api::admin_users).post(api::admin_add_user))
        .route("/api/v1/admin/users/{user}", delete(api::admin_remove_user))
        .route("/api/v1/admin/sessions", get(api::admin_sessions))
        .route("/api/v1/admin/sessions/{id}", delete(api::admin_close_session))
        .route("/api/v1/admin/audit", get(api::admin_audit))
        .route("/api/v1/admin/rollouts", get(api::admin_rollouts))
        .route("/api/v1/admin/images/{image}/promote", post(api::admin_promote))
        .route("/api/v1/admin/images/{image}/rollout/halt", post(api::admin_halt_rollout))
        .route("/api/v1/admin/images/{image}/rollout/resume", post(api::admin_resume_rollout))
        .route("/api/v1/admin/images/{image}/rollback", post(api::admin_rollback_channel))
        .route("/api/v1/admin/incidents", get(api::admin_incidents))
        .route("/api/v1/admin/incidents/{id}", get(api::admin_incident))
        .route("/api/v1/admin/incidents/{id}/ack", post(api::admin_ack_incident))
        .route("/api/v1/admin/watch/policies", get(api::admin_watch_policies))
        .route("/api/v1/admin/watch/policies/{channel}", put(api::admin_set_watch_policy))
        .route("/metrics", get(metrics))
        // Administrators keep the detail of internal errors in the body.
        .route_layer(middleware::map_response(error::with_detail));
    let consoles = Router::new()
        .route("/", get(console::portal))
        .route("/static/{file}", get(console::asset))
        .route("/favicon.ico", get(|| async { axum::http::StatusCode::NO_CONTENT }))
        .route("/console/{id}", get(console::page))
        .route("/console/{id}/ws", get(console::ws))
        .nest_service("/novnc", tower_http::services::ServeDir::new(&opts.novnc));
    let public = Router::new()
        .merge(thin_client)
        .merge(consoles)
        .route("/healthz", get(healthz))
        .route_layer(middleware::from_fn(request_timeout));
    let mut app = Router::new()
        .merge(public)
        .merge(admin)
        .fallback(no_route)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(b.clone(), deadline))
        .layer(middleware::from_fn_with_state(b.clone(), observe));
    if opts.bench_noop {
        // Added after the layers: the bare axum baseline the benchmark compares against.
        app = app.route("/bench/noop", get(|| async { "ok" }));
    }
    app.with_state(b)
}

/// Counts responses by status and logs method, path and status (never headers or queries:
/// that is where tokens travel).
async fn observe(State(b): State<Arc<Broker>>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let t = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    b.metrics.count_response(status);
    tracing::info!(%method, %path, status, ms = t.elapsed().as_secs_f64() * 1e3, "request");
    resp
}

/// When the request must be answered by: `--request-timeout` from its head. Body reads
/// ([`api::JsonBody`]) stop there on every route.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline(pub tokio::time::Instant);

async fn deadline(State(b): State<Arc<Broker>>, mut req: Request, next: Next) -> Response {
    req.extensions_mut().insert(Deadline(tokio::time::Instant::now() + b.request_timeout));
    next.run(req).await
}

/// Thin-client and public routes end at their [`Deadline`]. Admin routes run on (creating a
/// pool of many desktops takes its time): their callers are authenticated administrators.
async fn request_timeout(req: Request, next: Next) -> Response {
    let Some(Deadline(at)) = req.extensions().get::<Deadline>().copied() else { return next.run(req).await };
    let started = tokio::time::Instant::now();
    match tokio::time::timeout_at(at, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::Timeout { after: at - started }.into_response(),
    }
}

async fn no_route(req: Request) -> ApiError {
    ApiError::NoRoute { method: req.method().to_string(), path: req.uri().path().escape_default().to_string() }
}

async fn healthz(State(b): State<Arc<Broker>>) -> Result<Response, ApiError> {
    let open = b.checking(|_, ctx| Ok(ctx.catalog().read(|tx| tx.open_session_count())?)).await?;
    let term = b.leadership.term();
    Ok(axum::Json(serde_json::json!({"status": "ok", "sessions_open": open, "leader": term.is_some(), "term": term}))
        .into_response())
}

/// `/metrics` on the main listener: administrators only.
async fn metrics(State(b): State<Arc<Broker>>, _a: api::Admin) -> Result<Response, ApiError> {
    scrape(&b).await
}

/// The `--metrics-listen` listener: `/metrics` without a token, nothing else.
fn metrics_router(b: Arc<Broker>) -> Router {
    Router::new()
        .route("/metrics", get(|State(b): State<Arc<Broker>>| async move { scrape(&b).await }))
        .fallback(no_route)
        .with_state(b)
}

async fn scrape(b: &Arc<Broker>) -> Result<Response, ApiError> {
    let (open, evicted, refused) = (
        b.connections.open() as u64,
        b.connections.evicted.load(std::sync::atomic::Ordering::Relaxed),
        b.connections.refused.load(std::sync::atomic::Ordering::Relaxed),
    );
    let facts = b
        .checking(move |_, ctx| {
            Ok(ctx.catalog().read(|tx| -> Result<_, crate::catalog::CatalogError> {
                Ok(metrics::Facts {
                    open_sessions: tx.open_session_count()?,
                    desktops: tx.desktop_counts()?,
                    rollouts: tx.rollout_state_counts()?,
                    crashes: tx.crash_counts()?,
                    by_version: tx.desktops_by_version()?,
                    incidents: tx.incident_state_counts()?,
                    connections_open: open,
                    connections_evicted: evicted,
                    connections_refused: refused,
                    leader: false,
                })
            })?)
        })
        .await?;
    let facts = metrics::Facts { leader: b.leadership.leads(), ..facts };
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], b.metrics.render(&facts)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_url_gives_the_browser_origin() {
        let p = Public::parse("https://Broker.example:443/").unwrap();
        assert_eq!((p.origin.as_str(), p.host.as_str(), p.tls), ("https://broker.example", "broker.example", true));
        let p = Public::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((p.base.as_str(), p.host.as_str()), ("http://127.0.0.1:8080", "127.0.0.1"));
        let p = Public::parse("https://[::1]:8443").unwrap();
        assert_eq!(p.host, "::1");
        for bad in ["ftp://x", "https://", "https://x/path", "https://x?q", "https://u@x", "http://x\n", "x"] {
            assert!(Public::parse(bad).is_err(), "{bad}");
        }
    }
}
