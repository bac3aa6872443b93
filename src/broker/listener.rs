//! The broker's accept loop: TCP (and TLS) connections served as HTTP/1.1 by hyper, with the
//! limits that keep slow or idle clients (slowloris) from taking the broker away from its users.
//!
//! The design is the one nginx and HAProxy use, fitted to one process:
//!
//! - **Accept never waits.** The loop only accepts and spawns; a connection costs a task and
//!   a socket until it has sent a complete request head.
//! - **A head must arrive in time.** `--header-timeout` bounds the TLS handshake and then each
//!   request head, from the first byte wanted to the last header line (hyper's
//!   `header_read_timeout`; it also runs while a keep-alive connection waits for its next
//!   request). Dripping a header line now and then does not extend it. Such a connection is
//!   closed when it expires.
//! - **A generous cap that slow clients cannot fill.** At most `--max-connections` sockets are
//!   open. When a new connection arrives at the cap, the oldest connection that is *waiting*
//!   (no request in flight: still sending its head, or idle between requests) is closed to make
//!   room, as nginx drains reusable keep-alive connections when it runs out. Only when every
//!   connection is busy with a request or a console is the newcomer refused. So an attacker's
//!   half-sent requests are always the first to go, and a user's request, which arrives whole
//!   within milliseconds, is never turned away because of them.
//! - **The rest comes after authentication.** The whole-request timeout, body deadline and the
//!   blocking-pool lanes are in [`super`] and [`super::api`].
//!
//! ```text
//!  accept ─► admit (cap: evict oldest waiting, else refuse) ─► TLS handshake ≤ header timeout
//!         ─► HTTP/1.1: head ≤ header timeout ─► router (busy until the response body is sent)
//!         ─► upgrade (console WebSocket): counted until closed, never evicted
//! ```

use axum::Router;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tower::ServiceExt;

/// Connection limits (`vdim serve --header-timeout`, `--max-connections`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub max_connections: usize,
}

/// The open connections of one listener, oldest first.
pub struct Connections {
    max: usize,
    table: Mutex<Table>,
    pub evicted: AtomicU64,
    pub refused: AtomicU64,
}

#[derive(Default)]
struct Table {
    next: u64,
    open: BTreeMap<u64, Arc<Conn>>,
}

#[derive(Default)]
struct Conn {
    /// Requests whose response has not been sent in full.
    in_flight: AtomicUsize,
    /// Handed to an upgrade (a console WebSocket) or finished: never evicted.
    handed_over: AtomicBool,
    close: Notify,
}

impl Conn {
    fn waiting(&self) -> bool {
        self.in_flight.load(Relaxed) == 0 && !self.handed_over.load(Relaxed)
    }
}

/// A connection's place in the table; freed when its socket is dropped.
struct Slot {
    id: u64,
    conns: Arc<Connections>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.lock().open.remove(&self.id);
    }
}

impl Connections {
    pub fn new(max: usize) -> Arc<Connections> {
        Arc::new(Connections { max, table: Mutex::default(), evicted: AtomicU64::new(0), refused: AtomicU64::new(0) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn open(&self) -> usize {
        self.lock().open.len()
    }

    /// A place for a new connection: at the cap, the oldest waiting one is closed for it.
    fn admit(self: &Arc<Self>) -> Option<(Arc<Conn>, Slot)> {
        let mut t = self.lock();
        if t.open.len() >= self.max {
            let Some(oldest) = t.open.iter().find(|(_, c)| c.waiting()).map(|(id, _)| *id) else {
                self.refused.fetch_add(1, Relaxed);
                return None;
            };
            if let Some(c) = t.open.remove(&oldest) {
                c.close.notify_one();
            }
            self.evicted.fetch_add(1, Relaxed);
        }
        let id = t.next;
        t.next += 1;
        let conn = Arc::new(Conn::default());
        t.open.insert(id, conn.clone());
        Some((conn, Slot { id, conns: self.clone() }))
    }
}

/// Accepts until the future is dropped.
pub async fn serve(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    limits: Limits,
    conns: Arc<Connections>,
) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors and the like: the backlog waits meanwhile.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some((conn, slot)) = conns.admit() else {
            tracing::debug!("connection refused: every connection is busy");
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, tls.clone(), app.clone(), limits, conn, slot));
    }
}

async fn connection(
    stream: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    limits: Limits,
    conn: Arc<Conn>,
    slot: Slot,
) {
    let work = async {
        match tls {
            Some(acceptor) => match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(s)) => http(Counted { io: s, _slot: slot }, app, limits, conn.clone()).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake timed out"),
            },
            None => http(Counted { io: stream, _slot: slot }, app, limits, conn.clone()).await,
        }
    };
    tokio::select! {
        _ = work => {}
        _ = conn.close.notified() => tracing::debug!("closed a waiting connection to make room"),
    }
    conn.handed_over.store(true, Relaxed);
}

async fn http<S>(io: Counted<S>, app: Router, limits: Limits, conn: Arc<Conn>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let busy = Busy::new(conn.clone());
        let app = app.clone();
        async move {
            let resp = app.oneshot(req.map(axum::body::Body::new)).await?;
            Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked { body, _busy: busy }))
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "connection ended");
    }
}

/// Marks its connection busy while a request is answered.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(c: Arc<Conn>) -> Busy {
        c.in_flight.fetch_add(1, Relaxed);
        Busy(c)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// A response body that keeps its connection busy until it is sent.
struct Tracked {
    body: axum::body::Body,
    _busy: Busy,
}

impl Body for Tracked {
    type Data = <axum::body::Body as Body>::Data;
    type Error = <axum::body::Body as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A socket that holds its place in the table for as long as it is open, also after an
/// upgrade hands it to a console WebSocket.
struct Counted<S> {
    io: S,
    _slot: Slot,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_oldest_waiting_connection_makes_room_and_busy_ones_stay() {
        let conns = Connections::new(2);
        let (a, _sa) = conns.admit().unwrap();
        let (b, _sb) = conns.admit().unwrap();
        let _busy_a = Busy::new(a.clone());
        let (c, _sc) = conns.admit().expect("b is waiting: it makes room");
        assert_eq!(conns.evicted.load(Relaxed), 1);
        assert!(conns.lock().open.values().all(|x| !Arc::ptr_eq(x, &b)), "b was evicted, not busy a");
        assert_eq!(conns.open(), 2);
        let _busy_c = Busy::new(c.clone());
        assert!(conns.admit().is_none(), "everyone busy: refused");
        assert_eq!(conns.refused.load(Relaxed), 1);
    }

    #[test]
    fn a_dropped_socket_frees_its_place() {
        let conns = Connections::new(1);
        let (_a, sa) = conns.admit().unwrap();
        drop(sa);
        assert_eq!(conns.open(), 0);
    }
}
