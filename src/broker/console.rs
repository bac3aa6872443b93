//! The HTML5 console for browser-only thin clients (ChromeOS): a page with noVNC, and a
//! WebSocket proxy from the page to the desktop's VNC display.
//!
//! The proxy admits a connection only when its `Origin` is the broker's own (a page of
//! another site cannot drive it with the user's browser) and it carries the session's own
//! console token, in the subprotocol list (`vdim-console-token.<hex>`) so no URL, and so no
//! log line, ever holds it. The proxy then logs in to the display with a fresh one-time VNC
//! ticket that it spends right away, and closes when the session ends, when another console
//! of the same session takes over, or when either side closes.
//!
//! ```text
//!  upgrade ─► VNC gate ─► ticket ─► display login ─► browser RFB handshake ─► byte pipe
//!  └──────────── handshake timeout (10 s) ──────────────────────────────────┘
//!  └──────────── every stage: closed within 1 s of its session ending ──────────────────┘
//! ```
//! Sessions end in the catalog, by this broker or another process; one watcher checks the
//! sessions of open consoles every second and closes the consoles of those that ended, and
//! those that a newer console of their session took over: each console takes a number from
//! the catalog, so a console opened through another broker takes over too.
//!
//! Nothing a console needs is this broker's: the token is checked against the catalog and the
//! VNC ticket is made per connection, so a page whose broker died reconnects (`console.js`,
//! backing off) through any broker behind the same `--public-url`, until its session ends.

use super::error::ApiError;
use super::vnc::{self, NoAuthServer, Step, VncError};
use super::Broker;
use crate::catalog::users::Session;
use crate::users::{self, UserError};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const TOKEN_PROTOCOL_PREFIX: &str = "vdim-console-token.";
/// How often the broker checks in the catalog that the sessions of open consoles are still
/// live: another process (`vdim user remove`, `pool update --force`) may end them.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// From the upgrade until the browser finished its RFB handshake (waiting for the VNC gate,
/// the display login and the browser's handshake all count): noVNC needs milliseconds, a
/// stalled or hostile client must not keep the authenticated display connection.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// WebSocket close code sent when the session ended or another console took over.
const CLOSE_SESSION_ENDED: u16 = 4000;
/// Logins to a display at most per console: another broker's ticket may come between.
const LOGIN_ATTEMPTS: u32 = 5;
/// WebSocket close code sent when the client did not finish its handshake in time.
const CLOSE_HANDSHAKE_TIMEOUT: u16 = 4001;

const PAGE: &str = include_str!("static/console.html");
const PORTAL: &str = include_str!("static/portal.html");

#[derive(Debug, Error)]
enum ConsoleError {
    #[error(transparent)]
    Vnc(#[from] VncError),
    #[error("the browser connection failed: {0}")]
    Browser(#[from] axum::Error),
    #[error("the display connection failed: {0}")]
    Display(#[from] std::io::Error),
    #[error("the browser closed the connection during the handshake")]
    BrowserGone,
    #[error("no display ticket: {0}")]
    Ticket(String),
    #[error("the handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
}

impl crate::error::Kind for ConsoleError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            ConsoleError::Vnc(e) => e.kind(),
            ConsoleError::Ticket(_) => K::Forbidden,
            ConsoleError::BrowserGone | ConsoleError::HandshakeTimeout(_) => K::Invalid,
            ConsoleError::Browser(_) | ConsoleError::Display(_) => K::Internal,
        }
    }
}

/// Open consoles by session: the newest console's number (the catalog's) per session,
/// `ENDED` once it ended.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// One console login at a time per desktop: a VNC ticket is set and used before the next
    /// is set on that display. Per desktop, so a display that hangs holds up no other.
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    watching: AtomicBool,
}

const ENDED: u64 = u64::MAX;

/// Numbers only grow (consoles attach in any order); an ended session stays ended.
fn advance(tx: &watch::Sender<u64>, generation: u64) {
    tx.send_if_modified(|now| {
        let newer = *now != ENDED && generation.min(ENDED - 1) > *now;
        if newer {
            *now = generation.min(ENDED - 1);
        }
        newer
    });
}

impl Registry {
    /// Console number `generation` of `session`; older ones of the same session close.
    fn attach(&self, session: &str, generation: u64) -> watch::Receiver<u64> {
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let tx = m.entry(session.to_string()).or_insert_with(|| watch::channel(0).0);
        advance(tx, generation);
        tx.subscribe()
    }

    /// Console number `newest` of `session` is open, here or through another broker.
    fn newest(&self, session: &str, newest: u64) {
        if let Some(tx) = self.sessions.lock().unwrap_or_else(|p| p.into_inner()).get(session) {
            advance(tx, newest);
        }
    }

    fn detach(&self, session: &str) {
        let mut m = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(session).is_some_and(|tx| tx.receiver_count() == 0) {
            m.remove(session);
        }
    }

    /// The session ended: its consoles close.
    pub fn end(&self, session: &str) {
        let tx = self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(session);
        if let Some(tx) = tx {
            tx.send_replace(ENDED);
        }
    }

    fn gate(&self, desktop: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(desktop.to_string()).or_default().clone()
    }

    fn ids(&self) -> Vec<String> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// Starts the catalog watcher with the first console.
    fn watch(&self, b: &Arc<Broker>) {
        if !self.watching.swap(true, SeqCst) {
            tokio::spawn(watch_sessions(b.clone()));
        }
    }
}

/// Closes the consoles of sessions the catalog no longer holds open, whoever ended them, and
/// those a newer console of the same session took over, through whichever broker.
async fn watch_sessions(b: Arc<Broker>) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ids = b.consoles.ids();
        if ids.is_empty() {
            continue;
        }
        let checked = b
            .blocking(move |_, ctx| {
                let mut sessions = ctx.sessions()?;
                Ok((sessions.not_live(&ids)?, sessions.newest_consoles(&ids)?))
            })
            .await;
        match checked {
            Ok((gone, newest)) => {
                newest.iter().for_each(|(id, n)| b.consoles.newest(id, *n));
                gone.iter().for_each(|id| b.consoles.end(id));
            }
            Err(e) => tracing::warn!(error = %e.message(), "cannot check the sessions of open consoles"),
        }
    }
}

/// Resolves when the console must close: its session ended, or another console took over.
async fn superseded(changes: &mut watch::Receiver<u64>, generation: u64) -> &'static str {
    loop {
        let now = *changes.borrow_and_update();
        if now == ENDED {
            return "the session ended";
        }
        if now != generation {
            return "another console took over";
        }
        if changes.changed().await.is_err() {
            return "the session ended";
        }
    }
}

fn html(body: &'static str, b: &Broker) -> Response {
    let ws = b.public.origin.replacen("http", "ws", 1);
    let csp = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
         connect-src 'self' {ws}; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    );
    let mut r = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `/`: sign in with a token, pick a pool, open its console.
pub async fn portal(State(b): State<Arc<Broker>>) -> Response {
    html(PORTAL, &b)
}

/// `/console/{id}`: the console page. It holds no secret (the token is in the fragment), so
/// it is the same page for every session id of the right form.
pub async fn page(
    State(b): State<Arc<Broker>>,
    super::api::P(id): super::api::P<String>,
) -> Result<Response, ApiError> {
    if !users::is_session_id(&id) {
        return Err(UserError::SessionNotFound(id.escape_default().to_string()).into());
    }
    Ok(html(PAGE, &b))
}

/// `/static/{file}`: the page scripts and style, compiled in.
pub async fn asset(super::api::P(file): super::api::P<String>) -> Result<Response, ApiError> {
    let (body, kind) = match file.as_str() {
        "console.js" => (include_str!("static/console.js"), "text/javascript; charset=utf-8"),
        "portal.js" => (include_str!("static/portal.js"), "text/javascript; charset=utf-8"),
        "vdim.css" => (include_str!("static/vdim.css"), "text/css; charset=utf-8"),
        _ => {
            return Err(ApiError::NoRoute { method: "GET".into(), path: format!("/static/{}", file.escape_default()) })
        }
    };
    Ok(([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "no-cache")], body).into_response())
}

fn console_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(TOKEN_PROTOCOL_PREFIX).map(str::to_string))
}

/// `/console/{id}/ws`: Origin, then the console token, then upgrade; only then the VNC
/// gate, the display ticket and the login, all bounded by the handshake timeout.
pub async fn ws(
    State(b): State<Arc<Broker>>,
    super::api::P(id): super::api::P<String>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if origin != b.public.origin {
        return Err(ApiError::Origin {
            origin: origin.escape_default().to_string(),
            expected: b.public.origin.clone(),
        });
    }
    let denied = || UserError::ConsoleDenied(id.escape_default().to_string());
    let token = console_token(&headers).ok_or_else(denied)?;
    if !users::is_session_id(&id) || !users::is_token(&token) {
        return Err(denied().into());
    }
    let upgrade = upgrade.map_err(|r| ApiError::BadRequest(r.body_text()))?;
    // In the token-check lane: an unauthenticated client never holds a service permit.
    let session = b.checking(move |_, ctx| Ok(ctx.sessions()?.console_session(&id, &token)?)).await?;
    b.consoles.watch(&b);
    Ok(upgrade.protocols(["binary"]).on_upgrade(move |socket| async move {
        let id = session.id.clone();
        let (mut tx, mut rx) = socket.split();
        let sid = id.clone();
        let generation = match b.blocking(move |_, ctx| Ok(ctx.sessions()?.take_console(&sid)?)).await {
            Ok(Some(n)) => n,
            Ok(None) => {
                close(&mut tx, CLOSE_SESSION_ENDED, "the session ended").await;
                return;
            }
            Err(e) => {
                // Its page tries again; a session that ended meanwhile is refused then.
                close(&mut tx, 1011, "the console could not start").await;
                tracing::warn!(session = %id, error = %e.message(), "console not started");
                return;
            }
        };
        let mut changes = b.consoles.attach(&id, generation);
        b.metrics.console_connections.fetch_add(1, Relaxed);
        b.metrics.console_connections_total.fetch_add(1, Relaxed);
        // Every stage, login and handshake included, ends with the session.
        let outcome = tokio::select! {
            r = proxy(&b, &session, &mut tx, &mut rx) => r,
            why = superseded(&mut changes, generation) => Ok(Err(why)),
        };
        match outcome {
            Ok(Ok(why)) => tracing::info!(session = %id, why, "console closed"),
            Ok(Err(why)) => {
                close(&mut tx, CLOSE_SESSION_ENDED, why).await;
                tracing::info!(session = %id, why, "console closed");
            }
            Err(e) => tracing::warn!(session = %id, error = %e, "console failed"),
        }
        b.metrics.console_connections.fetch_sub(1, Relaxed);
        b.consoles.detach(&id);
    }))
}

type Tx = SplitSink<WebSocket, Message>;
type Rx = SplitStream<WebSocket>;

async fn next_binary(rx: &mut Rx) -> Result<Option<Vec<u8>>, ConsoleError> {
    loop {
        match rx.next().await {
            Some(Ok(Message::Binary(d))) => return Ok(Some(d.to_vec())),
            Some(Ok(Message::Close(_))) | None => return Ok(None),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

async fn close(tx: &mut Tx, code: u16, reason: &'static str) {
    let _ = tx.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
}

/// The address the proxy dials for a display listening on `listen`: a display on every
/// address is reached on this host's loopback of the same family.
fn local_address(listen: &str) -> &str {
    match listen.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) if ip.is_unspecified() => "127.0.0.1",
        Ok(IpAddr::V6(ip)) if ip.is_unspecified() => "::1",
        _ => listen,
    }
}

/// The console until one side closes it: `Ok(Ok(why))`. (`Ok(Err(why))` is the caller's:
/// the session ended.)
async fn proxy(
    b: &Arc<Broker>,
    session: &Session,
    tx: &mut Tx,
    rx: &mut Rx,
) -> Result<Result<&'static str, &'static str>, ConsoleError> {
    let (display, rest) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(b, session, tx, rx)).await {
        Ok(r) => r?,
        Err(_) => {
            close(tx, CLOSE_HANDSHAKE_TIMEOUT, "the console handshake took too long").await;
            return Err(ConsoleError::HandshakeTimeout(HANDSHAKE_TIMEOUT));
        }
    };
    pipe(display, rest, tx, rx).await.map(Ok)
}

/// Logs in to the display with a one-time ticket, then offers the browser a display without
/// a password. Returns the display connection and the browser's bytes already past the handshake.
async fn handshake(
    b: &Arc<Broker>,
    session: &Session,
    tx: &mut Tx,
    rx: &mut Rx,
) -> Result<(TcpStream, Vec<u8>), ConsoleError> {
    let mut attempt = 1;
    let display = loop {
        match login(b, session).await {
            Ok(display) => break display,
            // Another broker set its own ticket on this display (or spent it) between ours
            // and our login: the gate is only this broker's. Again with a fresh ticket, after
            // a random pause so two brokers fall out of step.
            Err(ConsoleError::Vnc(VncError::Refused { .. })) if attempt < LOGIN_ATTEMPTS => {
                tracing::debug!(session = %session.id, attempt, "the display refused the ticket; trying again");
                let mut r = [0u8; 1];
                getrandom::fill(&mut r).expect("the OS random source works");
                tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt) + u64::from(r[0] % 64))).await;
                attempt += 1;
            }
            Err(e) => {
                let why = match e {
                    ConsoleError::Ticket(_) => "the desktop has no console now",
                    ConsoleError::Vnc(VncError::Refused { .. }) => "the desktop's display refused the console",
                    _ => "the desktop's display could not be reached",
                };
                close(tx, 1011, why).await;
                return Err(e);
            }
        }
    };

    tx.send(Message::Binary(NoAuthServer::greeting().to_vec().into())).await?;
    let mut handshake = NoAuthServer::default();
    loop {
        let Some(data) = next_binary(rx).await? else { return Err(ConsoleError::BrowserGone) };
        match handshake.feed(&data)? {
            Step::More => {}
            Step::Send(bytes) => tx.send(Message::Binary(bytes.into())).await?,
            Step::Done { send, rest } => {
                if !send.is_empty() {
                    tx.send(Message::Binary(send.into())).await?;
                }
                return Ok((display, rest));
            }
        }
    }
}

/// One login to the session's display: a fresh one-time VNC ticket set, used, then spent.
/// One login at a time per desktop on this broker.
async fn login(b: &Arc<Broker>, session: &Session) -> Result<TcpStream, ConsoleError> {
    let gate = b.consoles.gate(&session.desktop);
    let _gate = gate.lock().await;
    let s = session.clone();
    let t = b
        .blocking(move |_, ctx| Ok(ctx.sessions()?.vnc_ticket(&s)?))
        .await
        .map_err(|e| ConsoleError::Ticket(e.message()))?;
    let port = t.endpoint.port.ok_or_else(|| std::io::Error::other("the VNC display has no TCP port"))?;
    let mut display = TcpStream::connect((local_address(&t.endpoint.listen), port)).await?;
    display.set_nodelay(true)?;
    let login = vnc::client_login(&mut display, &t.session.desktop, &t.password).await;
    // Spent: nobody else can log in with it, whether or not this login worked.
    let s = t.session.clone();
    if let Err(e) = b.blocking(move |_, ctx| Ok(ctx.sessions()?.spend_vnc_ticket(&s)?)).await {
        tracing::warn!(session = %t.session.id, error = %e.message(), "could not replace the spent VNC ticket");
    }
    login?;
    Ok(display)
}

/// Copies bytes both ways until one side closes.
async fn pipe(display: TcpStream, rest: Vec<u8>, tx: &mut Tx, rx: &mut Rx) -> Result<&'static str, ConsoleError> {
    let (mut from_display, mut to_display) = display.into_split();
    if !rest.is_empty() {
        to_display.write_all(&rest).await?;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            m = rx.next() => match m {
                Some(Ok(Message::Binary(d))) => to_display.write_all(&d).await?,
                Some(Ok(Message::Close(_))) | None => return Ok("the browser closed it"),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
            },
            n = from_display.read(&mut buf) => {
                let n = n?;
                if n == 0 {
                    close(tx, 1000, "the desktop's display closed").await;
                    return Ok("the display closed it");
                }
                tx.send(Message::Binary(buf[..n].to_vec().into())).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::local_address;

    #[test]
    fn a_display_on_every_address_is_dialled_on_loopback() {
        assert_eq!(local_address("0.0.0.0"), "127.0.0.1");
        assert_eq!(local_address("::"), "::1");
        assert_eq!(local_address("127.0.0.1"), "127.0.0.1");
        assert_eq!(local_address("192.0.2.10"), "192.0.2.10");
    }
}
