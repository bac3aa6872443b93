//! Thin-client users, their entitlements to pools, and their sessions on pool desktops: the
//! one service the broker's HTTP API and the `vdim user` / `vdim pool entitle` commands call.
//!
//! A session ties together a user (known by a bearer token), an entitlement, a desktop
//! assignment and console tickets; this module changes them in step:
//!
//! ```text
//!  open ─► [one catalog transaction: entitled? pool running? the user's open session
//!           (reconnect) or an idle desktop (own desktop in a persistent pool) + session row]
//!  .vv ──► SPICE ticket: fresh 192-bit secret on the display, valid 120 s
//!  console ► VNC ticket: 8 characters derived from a fresh secret, used once by the proxy
//!  close / expiry / user removed / entitlement removed
//!        ─► [session ended] ─► displays cut off ─► Pools::release (fresh overlay, due moves) ─► [released]
//!  broker start, every reap ─► finish ended-but-unreleased sessions, end stale ones
//! ```
//!
//! Whoever ends a session cuts its displays off at once: fresh unknown SPICE and VNC
//! passwords, SPICE with `connected='disconnect'`, so a viewer still on a desktop that is
//! kept (persistent pools) is dropped and the session's last ticket no longer opens it. The
//! broker's console proxies watch the catalog, so a session ended by another process (the
//! CLI) closes its consoles too.
//!
//! Secrets: user tokens (256 bits) and console tokens (256 bits) are stored only as SHA-256
//! hashes and compared in constant time. Display tickets are never stored: the broker sets
//! them on the display and hands them out at once.
//!
//! VNC limitation: VNC authentication uses at most 8 password characters (DES). The VNC
//! password is 8 characters from a 64-symbol alphabet (48 bits) derived from a 192-bit ticket.
//! It is only ever used by the broker's own console proxy (the browser never sees it), valid
//! 120 s, and replaced by an unknown random one right after the proxy authenticated. The VNC
//! display listens where the pool's displays do: loopback unless the pool was created with
//! `--display-listen`. SPICE tickets carry the full 192 bits.

use crate::catalog::users::{NewSession, Session, User};
use crate::catalog::{Audit, Catalog, CatalogError, Tx};
use crate::hypervisor::{GraphicsEndpoint, GraphicsKind, HypervisorError, VNC_PASSWORD_MAX};
use crate::names::{self, NameError};
use crate::pool::{PoolError, Pools};
use crate::rules::Release;
use crate::store::Actor;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use thiserror::Error;

/// How long a display ticket (console password) is valid.
pub const TICKET_TTL: Duration = Duration::from_secs(120);
/// Bytes of randomness in a user token and a console token.
const TOKEN_BYTES: usize = 32;
/// Bytes of randomness in a session id.
const SESSION_ID_BYTES: usize = 16;
/// Bytes of randomness in a display ticket (48 hex characters: within SPICE's 60).
const TICKET_BYTES: usize = 24;

#[derive(Debug, Error)]
pub enum UserError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("no user named '{0}' (see 'vdim user list')")]
    NotFound(String),
    #[error("user '{0}' already exists; remove it first to give it a new token")]
    Exists(String),
    #[error("no valid token: send 'Authorization: Bearer <token>' with the token 'vdim user add' printed")]
    Unauthenticated,
    #[error("the token of user '{user}' expired at {at}; an administrator issues a new one")]
    TokenExpired { user: String, at: String },
    #[error("user '{user}' is not an administrator")]
    NotAdmin { user: String },
    #[error(
        "user '{user}' is not entitled to pool '{pool}' (an administrator runs 'vdim pool entitle {pool} {user}')"
    )]
    NotEntitled { user: String, pool: String },
    #[error("no open session '{0}'")]
    SessionNotFound(String),
    #[error("console token refused for session '{0}'")]
    ConsoleDenied(String),
    #[error("pool '{0}' is not running; an administrator starts it with 'vdim pool start {0}'")]
    PoolStopped(String),
    #[error("desktop '{desktop}' of session '{session}' is still being logged off; try again in a moment")]
    LoggingOff { desktop: String, session: String },
    #[error("desktop '{desktop}' of session '{session}' has no console now: {source}")]
    NoConsole { desktop: String, session: String, source: HypervisorError },
    #[error("the time {0:?} in the catalog is not RFC 3339")]
    BadTime(String),
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

impl crate::error::Kind for UserError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        match self {
            UserError::Name(e) => e.kind(),
            UserError::Catalog(e) => e.kind(),
            UserError::Pool(e) => e.kind(),
            UserError::NotFound(_) | UserError::SessionNotFound(_) => K::NotFound,
            UserError::Exists(_) | UserError::LoggingOff { .. } => K::Conflict,
            // The broker answers the first three with 401 (credentials, not permission).
            UserError::Unauthenticated
            | UserError::TokenExpired { .. }
            | UserError::ConsoleDenied(_)
            | UserError::NotAdmin { .. }
            | UserError::NotEntitled { .. } => K::Forbidden,
            UserError::PoolStopped(_) | UserError::NoConsole { .. } => K::Exhausted,
            UserError::BadTime(_) | UserError::Random(_) => K::Internal,
        }
    }
}

pub type Result<T> = std::result::Result<T, UserError>;

// ---- secrets -------------------------------------------------------------------------------

fn random_hex(bytes: usize) -> Result<String> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(|e| UserError::Random(e.to_string()))?;
    Ok(hex::encode(b))
}

/// SHA-256 (hex) of a token: the only form in which tokens are stored.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Equal, in time independent of where the inputs differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A session id as the broker makes them: 32 lowercase hex digits. Anything else (path
/// tricks included) names no session.
pub fn is_session_id(s: &str) -> bool {
    is_hex(s, SESSION_ID_BYTES * 2)
}

/// A token as `user add` and session open make them: 64 lowercase hex digits.
pub fn is_token(s: &str) -> bool {
    is_hex(s, TOKEN_BYTES * 2)
}

/// A one-time display ticket.
pub struct Ticket {
    secret: String,
}

impl Ticket {
    pub fn new() -> Result<Ticket> {
        Ok(Ticket { secret: random_hex(TICKET_BYTES)? })
    }
    /// The SPICE password: the whole 192-bit secret.
    pub fn spice_password(&self) -> &str {
        &self.secret
    }
    /// The VNC password: [`VNC_PASSWORD_MAX`] characters (VNC's limit) derived from the secret.
    pub fn vnc_password(&self) -> String {
        const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let d = Sha256::digest(format!("vdim vnc password\0{}", self.secret).as_bytes());
        d.iter().take(VNC_PASSWORD_MAX).map(|b| ALPHABET[usize::from(b % 64)] as char).collect()
    }
}

/// The session's desktop is still assigned to its user.
fn holds(tx: &Tx, s: &Session) -> Result<bool> {
    Ok(tx.desktop(&s.desktop)?.is_some_and(|d| d.assigned_to.as_deref() == Some(s.user.as_str())))
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn parse_time(s: &str) -> Result<SystemTime> {
    humantime::parse_rfc3339(s).map_err(|_| UserError::BadTime(s.to_string()))
}

// ---- users and entitlements ------------------------------------------------------------------

/// A new user and their token, shown this once.
#[derive(Debug, Serialize)]
pub struct NewUser {
    #[serde(flatten)]
    pub user: User,
    pub token: String,
}

#[derive(Debug, Serialize)]
pub struct UserView {
    #[serde(flatten)]
    pub user: User,
    pub pools: Vec<String>,
    pub open_sessions: usize,
}

#[derive(Debug, Serialize)]
pub struct Entitlement {
    pub pool: String,
    pub user: String,
    /// `false` when it already was (entitle) or was not (unentitle) there.
    pub changed: bool,
    /// Sessions of the user in the pool that unentitle logged off.
    pub sessions_closed: Vec<String>,
}

/// A pool as an entitled user sees it.
#[derive(Debug, Serialize)]
pub struct PoolOffer {
    pub name: String,
    pub image: String,
    pub version: u32,
    pub persistent: bool,
    pub running: bool,
    /// Idle, clean desktops now.
    pub available: usize,
}

/// Users and entitlements: catalog only, no hypervisor.
pub struct Users<'a> {
    catalog: &'a mut Catalog,
}

impl<'a> Users<'a> {
    pub fn new(catalog: &'a mut Catalog) -> Users<'a> {
        Users { catalog }
    }

    fn catalog(&mut self) -> &mut Catalog {
        self.catalog
    }

    /// Adds a user and returns their token (256 random bits); only its hash is stored.
    pub fn add(&mut self, name: &str, admin: bool, expires_in: Option<Duration>, actor: &Actor) -> Result<NewUser> {
        names::validate("user", name)?;
        let token = random_hex(TOKEN_BYTES)?;
        let hash = token_hash(&token);
        let expires = expires_in.map(|d| rfc3339(SystemTime::now() + d));
        let user = self.catalog().write(|tx| -> Result<User> {
            if tx.user(name)?.is_some() {
                return Err(UserError::Exists(name.to_string()));
            }
            let user = tx.insert_user(name, admin, &hash, expires.as_deref())?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "user.add",
                detail: json!({"user": name, "admin": admin, "token_expires": expires}),
                ..Default::default()
            })?;
            Ok(user)
        })?;
        Ok(NewUser { user, token })
    }

    pub fn list(&mut self) -> Result<Vec<UserView>> {
        self.catalog().read(|tx| -> Result<_> {
            let mut out = vec![];
            for user in tx.users()? {
                out.push(UserView {
                    pools: tx.entitled_pool_names(user.id)?,
                    open_sessions: tx.open_sessions(Some(user.id))?.len(),
                    user,
                });
            }
            Ok(out)
        })
    }

    /// The user holding `token`, if it is valid now.
    pub fn authenticate(&mut self, token: &str) -> Result<User> {
        if !is_token(token) {
            return Err(UserError::Unauthenticated);
        }
        let hash = token_hash(token);
        let found = self.catalog().read(|tx| tx.user_by_token_hash(&hash))?;
        let Some((user, stored)) = found else { return Err(UserError::Unauthenticated) };
        if !ct_eq(stored.as_bytes(), hash.as_bytes()) {
            return Err(UserError::Unauthenticated);
        }
        if let Some(at) = &user.token_expires {
            if parse_time(at)? <= SystemTime::now() {
                return Err(UserError::TokenExpired { user: user.name.clone(), at: at.clone() });
            }
        }
        Ok(user)
    }

    pub fn entitle(&mut self, pool: &str, user: &str, actor: &Actor) -> Result<Entitlement> {
        self.change_entitlement(pool, user, true, actor)
    }

    /// Removes the entitlement only; [`Sessions::unentitle`] also logs the user's session off.
    fn unentitle(&mut self, pool: &str, user: &str, actor: &Actor) -> Result<Entitlement> {
        self.change_entitlement(pool, user, false, actor)
    }

    fn change_entitlement(&mut self, pool: &str, user: &str, grant: bool, actor: &Actor) -> Result<Entitlement> {
        names::validate("pool", pool)?;
        names::validate("user", user)?;
        self.catalog().write(|tx| -> Result<Entitlement> {
            let p = tx.pool(pool)?.ok_or_else(|| PoolError::NotFound(pool.to_string()))?;
            let u = tx.user(user)?.ok_or_else(|| UserError::NotFound(user.to_string()))?;
            let changed = if grant { tx.entitle(p.id, u.id)? } else { tx.unentitle(p.id, u.id)? };
            if changed {
                tx.audit(Audit {
                    actor: &actor.0,
                    action: if grant { "pool.entitle" } else { "pool.unentitle" },
                    pool: Some(pool),
                    image: Some(&p.image),
                    detail: json!({"user": user}),
                    ..Default::default()
                })?;
            }
            Ok(Entitlement { pool: pool.to_string(), user: user.to_string(), changed, sessions_closed: vec![] })
        })
    }

    pub fn entitlements(&mut self, pool: &str) -> Result<Vec<String>> {
        names::validate("pool", pool)?;
        self.catalog().read(|tx| -> Result<_> {
            let p = tx.pool(pool)?.ok_or_else(|| PoolError::NotFound(pool.to_string()))?;
            Ok(tx.entitled_user_names(p.id)?)
        })
    }

    /// The pools `user` may open sessions in.
    pub fn pools_of(&mut self, user: &User) -> Result<Vec<PoolOffer>> {
        self.catalog().read(|tx| -> Result<_> {
            let mut out = vec![];
            for name in tx.entitled_pool_names(user.id)? {
                let Some(p) = tx.pool(&name)? else { continue };
                let available = tx.desktops(p.id)?.iter().filter(|d| d.assigned_to.is_none() && !d.needs_reset).count();
                out.push(PoolOffer {
                    name: p.name,
                    image: p.image,
                    version: p.version,
                    persistent: p.persistent,
                    running: p.running,
                    available,
                });
            }
            Ok(out)
        })
    }
}

// ---- sessions ------------------------------------------------------------------------------

/// A session opened (or reconnected to) for its user, with its console token, shown this once.
#[derive(Debug)]
pub struct Opened {
    pub session: Session,
    pub console_token: String,
    /// The user already had an open session in the pool: the same desktop, a new console token.
    pub reconnected: bool,
}

#[derive(Debug, Serialize)]
pub struct Closed {
    pub id: String,
    pub desktop: String,
    /// "done": wiped (and moved where due) before anyone else can get it; "kept": the user's
    /// own desktop in a persistent pool; "pending": the reset failed now and is retried (the
    /// desktop is not handed out before); "none": the desktop was given back without the broker.
    pub reset: &'static str,
}

/// What a `.vv` file needs.
#[derive(Debug)]
pub struct SpiceTicket {
    pub session: Session,
    pub endpoint: GraphicsEndpoint,
    pub password: String,
    pub valid_to: SystemTime,
}

/// What the console proxy needs to log in to the desktop's VNC display itself.
#[derive(Debug)]
pub struct VncTicket {
    pub session: Session,
    pub endpoint: GraphicsEndpoint,
    pub password: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Reaped {
    /// Sessions that ended now (expired, or their desktop was given back without the broker).
    pub ended: Vec<String>,
    /// Sessions whose logoff was completed now.
    pub finished: Vec<String>,
    /// Logoffs that failed and will be retried.
    pub failed: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RemovedUser {
    pub user: String,
    pub sessions_closed: Vec<String>,
    /// Desktops of persistent pools still assigned to the removed name (with their disks):
    /// 'vdim pool release' gives them back.
    pub kept_desktops: Vec<String>,
}

/// Logoffs (release + reset) run one batch at a time in a process, so a session is never
/// released twice (by a DELETE and the reaper at once).
static FINISHING: Mutex<()> = Mutex::new(());

/// Where a logoff stands after its first step.
enum Finish {
    /// Released before (by another logoff).
    Already,
    /// Nothing to reset: kept (persistent, up to date) or not this user's any more.
    Nothing(&'static str),
    /// Released: its reset (when due) is in the batch.
    Released { desktop: String, pool: String, persistent: bool, reset: bool },
}

/// The reaper leaves a logoff begun by another process (`vdim user remove`) to that process
/// for this long, so the two never release the same desktop at once.
const FINISH_GRACE: Duration = Duration::from_secs(60);

/// Thin-client sessions: they take, release and cut off pools' desktops.
pub struct Sessions<'a> {
    pools: Pools<'a>,
}

impl<'a> Sessions<'a> {
    pub fn new(pools: Pools<'a>) -> Sessions<'a> {
        Sessions { pools }
    }

    fn catalog(&mut self) -> &mut Catalog {
        self.pools.catalog
    }

    /// Opens a session for `user` in `pool`: the user's open session there (reconnect), the
    /// user's own desktop (persistent pool), or the next idle clean desktop; all in one
    /// catalog transaction, so no desktop is ever in two sessions.
    pub fn open(&mut self, user: &User, pool: &str, ttl: Duration) -> Result<Opened> {
        names::validate("pool", pool)?;
        let id = random_hex(SESSION_ID_BYTES)?;
        let console_token = random_hex(TOKEN_BYTES)?;
        let hash = token_hash(&console_token);
        let now = SystemTime::now();
        let (now_s, expires) = (rfc3339(now), rfc3339(now + ttl));
        let actor = format!("user:{}", user.name);
        let hand_out = self.pools.hand_out();
        self.catalog().write(|tx| -> Result<Opened> {
            let p = tx.pool(pool)?.ok_or_else(|| PoolError::NotFound(pool.to_string()))?;
            if !tx.is_entitled(p.id, user.id)? {
                return Err(UserError::NotEntitled { user: user.name.clone(), pool: pool.to_string() });
            }
            if !p.running {
                return Err(UserError::PoolStopped(pool.to_string()));
            }
            let mine = |d: &crate::catalog::Desktop| d.assigned_to.as_deref() == Some(user.name.as_str());
            if let Some(s) = tx.open_session_of(user.id, pool)? {
                if s.expires_at > now_s && tx.desktop(&s.desktop)?.is_some_and(|d| mine(&d)) {
                    tx.set_console_token_hash(&s.id, &hash)?;
                    tx.audit(Audit {
                        actor: &actor,
                        action: "session.reconnect",
                        pool: Some(pool),
                        image: Some(&p.image),
                        detail: json!({"session": s.id, "desktop": s.desktop}),
                        ..Default::default()
                    })?;
                    return Ok(Opened { session: s, console_token, reconnected: true });
                }
                // Expired, or its desktop was given back without the broker: the reaper
                // finishes its logoff; the user gets a session of their own now.
                tx.end_session(&s.id)?;
            }
            let own = if p.persistent { tx.desktops(p.id)?.into_iter().find(|d| mine(d)) } else { None };
            let desktop = match own {
                Some(d) => {
                    let logging_off = tx.unreleased_sessions()?.into_iter().find(|s| s.desktop == d.name);
                    if let Some(s) = logging_off {
                        return Err(UserError::LoggingOff { desktop: d.name, session: s.id });
                    }
                    if d.needs_reset {
                        // Moved by a forced update, which ended its last session: being reset now.
                        let last = tx.last_session_on(&d.name)?.map(|s| s.id).unwrap_or_default();
                        return Err(UserError::LoggingOff { desktop: d.name, session: last });
                    }
                    // Handed out before (and ejected then); again in case it was not.
                    hand_out.eject(&p, &d)?;
                    d
                }
                None => hand_out.idle(tx, &p, &user.name)?,
            };
            tx.end_stale_sessions_on(&desktop.name)?;
            tx.insert_session(&NewSession {
                id: &id,
                user_id: user.id,
                pool,
                desktop: &desktop.name,
                expires_at: &expires,
                console_token_hash: &hash,
            })?;
            tx.audit(Audit {
                actor: &actor,
                action: "session.open",
                pool: Some(pool),
                image: Some(&p.image),
                version: Some(desktop.version),
                detail: json!({"session": id, "desktop": desktop.name}),
            })?;
            let session = tx.session(&id)?.ok_or_else(|| UserError::SessionNotFound(id.clone()))?;
            Ok(Opened { session, console_token, reconnected: false })
        })
    }

    /// An open, unexpired session; `caller` (when given) must own it. Another user's session
    /// is reported exactly like a missing one.
    pub fn get(&mut self, caller: Option<&User>, id: &str) -> Result<Session> {
        let not_found = || UserError::SessionNotFound(id.escape_default().to_string());
        if !is_session_id(id) {
            return Err(not_found());
        }
        let s = self.catalog().read(|tx| tx.session(id))?.ok_or_else(not_found)?;
        if s.ended.is_some()
            || caller.is_some_and(|u| u.id != s.user_id)
            || parse_time(&s.expires_at)? <= SystemTime::now()
        {
            return Err(not_found());
        }
        Ok(s)
    }

    /// Open sessions, all (admin) or the caller's.
    pub fn list(&mut self, caller: Option<&User>) -> Result<Vec<Session>> {
        let uid = caller.map(|u| u.id);
        Ok(self.catalog().read(|tx| tx.open_sessions(uid))?)
    }

    /// The session's desktop is still its user's: a ticket may be set on its display.
    fn check_holds(&mut self, s: &Session) -> Result<()> {
        let d = self.catalog().read(|tx| tx.desktop(&s.desktop))?;
        if d.is_some_and(|d| d.assigned_to.as_deref() == Some(s.user.as_str())) {
            Ok(())
        } else {
            Err(UserError::SessionNotFound(s.id.clone()))
        }
    }

    fn set_ticket(&mut self, s: &Session, kind: GraphicsKind, password: &str) -> Result<GraphicsEndpoint> {
        let endpoint = self
            .pools
            .hv_of(&s.desktop)?
            .set_graphics_password(&s.desktop, kind, password, SystemTime::now() + TICKET_TTL)
            .map_err(|source| UserError::NoConsole { desktop: s.desktop.clone(), session: s.id.clone(), source })?;
        Ok(self.pools.reachable_display(&s.desktop, endpoint)?)
    }

    /// Where the session's SPICE display listens now, its ticket untouched: checked before a
    /// new ticket would disconnect a viewer already on it.
    pub fn spice_display(&mut self, caller: &User, id: &str) -> Result<(Session, GraphicsEndpoint)> {
        let session = self.get(Some(caller), id)?;
        self.check_holds(&session)?;
        match self.pools.hv_of(&session.desktop)?.graphics(&session.desktop, GraphicsKind::Spice) {
            Ok(endpoint) => {
                let endpoint = self.pools.reachable_display(&session.desktop, endpoint)?;
                Ok((session, endpoint))
            }
            Err(source) => Err(UserError::NoConsole { desktop: session.desktop, session: session.id, source }),
        }
    }

    /// A fresh SPICE ticket on the session's desktop (clients holding an older one are
    /// disconnected), for a `.vv` file.
    pub fn spice_ticket(&mut self, caller: &User, id: &str) -> Result<SpiceTicket> {
        let session = self.get(Some(caller), id)?;
        self.check_holds(&session)?;
        let ticket = Ticket::new()?;
        let valid_to = SystemTime::now() + TICKET_TTL;
        let endpoint = self.set_ticket(&session, GraphicsKind::Spice, ticket.spice_password())?;
        Ok(SpiceTicket { session, endpoint, password: ticket.spice_password().to_string(), valid_to })
    }

    /// Checks a console token (unknown session and wrong token look the same) and that the
    /// session's desktop has a VNC display; sets nothing.
    pub fn console_session(&mut self, id: &str, console_token: &str) -> Result<Session> {
        let denied = || UserError::ConsoleDenied(id.escape_default().to_string());
        if !is_session_id(id) || !is_token(console_token) {
            return Err(denied());
        }
        let session = self.get(None, id).map_err(|_| denied())?;
        if !ct_eq(token_hash(console_token).as_bytes(), session.console_token_hash.as_bytes()) {
            return Err(denied());
        }
        self.check_holds(&session)?;
        if let Err(source) = self.pools.hv_of(&session.desktop)?.graphics(&session.desktop, GraphicsKind::Vnc) {
            return Err(UserError::NoConsole { desktop: session.desktop, session: session.id, source });
        }
        Ok(session)
    }

    /// A fresh VNC ticket for the proxy of a session whose console token was checked.
    pub fn vnc_ticket(&mut self, s: &Session) -> Result<VncTicket> {
        let session = self.get(None, &s.id)?;
        self.check_holds(&session)?;
        let password = Ticket::new()?.vnc_password();
        let endpoint = self.set_ticket(&session, GraphicsKind::Vnc, &password)?;
        Ok(VncTicket { session, endpoint, password })
    }

    /// A new console of session `id`, its token checked: its number, above that of every
    /// older console of the session on any broker (those close); `None` once the session ended.
    pub fn take_console(&mut self, id: &str) -> Result<Option<u64>> {
        let n = self.catalog().write(|tx| tx.take_console(id))?;
        Ok(n.map(i64::unsigned_abs))
    }

    /// The number of the newest console of each session of `ids` that still exists.
    pub fn newest_consoles(&mut self, ids: &[String]) -> Result<Vec<(String, u64)>> {
        self.catalog().read(|tx| -> Result<_> {
            let mut out = vec![];
            for id in ids {
                if let Some(n) = tx.current_console(id)? {
                    out.push((id.clone(), n.unsigned_abs()));
                }
            }
            Ok(out)
        })
    }

    /// Sessions among `ids` that a console may no longer show: ended, expired, gone, or
    /// their desktop no longer their user's.
    pub fn not_live(&mut self, ids: &[String]) -> Result<Vec<String>> {
        let now = rfc3339(SystemTime::now());
        self.catalog().read(|tx| -> Result<_> {
            let mut out = vec![];
            for id in ids {
                let live = match tx.session(id)? {
                    Some(s) if s.ended.is_none() && s.expires_at > now => holds(tx, &s)?,
                    _ => false,
                };
                if !live {
                    out.push(id.clone());
                }
            }
            Ok(out)
        })
    }

    /// Cuts an ended session's displays off: unknown passwords on both, SPICE viewers
    /// disconnected. A desktop that is not running has nothing to cut.
    fn cut_off(&mut self, s: &Session) {
        for kind in [GraphicsKind::Spice, GraphicsKind::Vnc] {
            let rotated = Ticket::new().and_then(|t| {
                let password = if kind == GraphicsKind::Vnc { t.vnc_password() } else { t.spice_password().into() };
                let hv = self.pools.hv_of(&s.desktop)?;
                hv.set_graphics_password(&s.desktop, kind, &password, SystemTime::now()).map_err(|source| {
                    UserError::NoConsole { desktop: s.desktop.clone(), session: s.id.clone(), source }
                })
            });
            if let Err(e) = rotated {
                tracing::debug!(session = %s.id, desktop = %s.desktop, error = %e, "display not cut off");
            }
        }
    }

    /// Replaces the VNC ticket by an unknown one: after the proxy logged in, nobody else can.
    pub fn spend_vnc_ticket(&mut self, s: &Session) -> Result<()> {
        let password = Ticket::new()?.vnc_password();
        self.set_ticket(s, GraphicsKind::Vnc, &password).map(|_| ())
    }

    /// Logoff: the session ends now, then its desktop is released (a non-persistent one wiped
    /// and moved where due) before anyone else can get it. `caller` (when given) must own it.
    /// `ended` runs between the two (the broker closes the session's consoles there).
    pub fn close(&mut self, caller: Option<&User>, id: &str, actor: &Actor, ended: &dyn Fn(&str)) -> Result<Closed> {
        let not_found = || UserError::SessionNotFound(id.escape_default().to_string());
        if !is_session_id(id) {
            return Err(not_found());
        }
        let s = self.catalog().write(|tx| -> Result<Session> {
            let s = tx.session(id)?.ok_or_else(not_found)?;
            if s.ended.is_some() || caller.is_some_and(|u| u.id != s.user_id) || !tx.end_session(id)? {
                return Err(not_found());
            }
            tx.audit(Audit {
                actor: &actor.0,
                action: "session.close",
                pool: Some(&s.pool),
                detail: json!({"session": s.id, "desktop": s.desktop, "user": s.user}),
                ..Default::default()
            })?;
            Ok(s)
        })?;
        ended(&s.id);
        self.cut_off(&s);
        let reset = match self.finish(&s, actor) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(session = %s.id, desktop = %s.desktop, error = %e, "logoff not finished; retried by the reaper");
                "pending"
            }
        };
        Ok(Closed { id: s.id, desktop: s.desktop, reset })
    }

    /// Completes the logoff of an ended session, once.
    fn finish(&mut self, s: &Session, actor: &Actor) -> Result<&'static str> {
        self.finish_all(std::slice::from_ref(s), actor).pop().expect("one outcome per session")
    }

    /// Completes the logoffs of ended sessions, once each: every release recorded first, then
    /// all their desktops reset in one batch (the end of a shift logs hundreds off at once),
    /// then each session marked released. One whose reset failed stays unreleased: the
    /// reaper retries it. Outcomes in the sessions' order.
    fn finish_all(&mut self, sessions: &[Session], actor: &Actor) -> Vec<Result<&'static str>> {
        let _one_at_a_time = FINISHING.lock().unwrap_or_else(|p| p.into_inner());
        let mut steps: Vec<Result<Finish>> = sessions.iter().map(|s| self.release_of(s, actor)).collect();
        let mut pools: Vec<String> = steps
            .iter()
            .filter_map(|st| match st {
                Ok(Finish::Released { pool, .. }) => Some(pool.clone()),
                _ => None,
            })
            .collect();
        pools.sort();
        pools.dedup();
        let mut failed = match self.pools.heal_many(&pools) {
            Ok(done) => done.failed,
            Err(e) => {
                // Nothing was reset: every released desktop's logoff is retried.
                let failure = crate::fleet::Failure::new("", &e);
                for st in steps.iter_mut().filter(|st| matches!(st, Ok(Finish::Released { .. }))) {
                    let Ok(Finish::Released { desktop, .. }) = st else { continue };
                    let f = crate::fleet::Failure { desktop: desktop.clone(), ..failure.clone() };
                    *st = Err(PoolError::Desktops { failed: vec![f] }.into());
                }
                vec![]
            }
        };
        sessions
            .iter()
            .zip(steps)
            .map(|(s, st)| {
                let outcome = match st? {
                    Finish::Already => return Ok("done"),
                    Finish::Nothing(outcome) => outcome,
                    Finish::Released { desktop, persistent, reset, .. } => {
                        if let Some(i) = failed.iter().position(|(d, _)| *d == desktop) {
                            return Err(failed.swap_remove(i).1.into());
                        }
                        if persistent {
                            // Moved to its new version (wiped): still this user's own desktop.
                            let user = s.user.clone();
                            self.catalog().write(|tx| -> Result<()> {
                                let d = tx.desktop(&desktop)?;
                                if let Some(d) = d.filter(|d| d.assigned_to.is_none() && !d.needs_reset) {
                                    tx.assign(d.id, &user)?;
                                }
                                Ok(())
                            })?;
                        }
                        if reset {
                            "done"
                        } else {
                            "kept"
                        }
                    }
                };
                self.catalog().write(|tx| tx.mark_released(&s.id))?;
                Ok(outcome)
            })
            .collect()
    }

    /// A logoff's first step: what its desktop needs, the release recorded when it needs one.
    fn release_of(&mut self, s: &Session, actor: &Actor) -> Result<Finish> {
        let (current, desktop, pool, other) = self.catalog().read(|tx| -> Result<_> {
            Ok((tx.session(&s.id)?, tx.desktop(&s.desktop)?, tx.pool(&s.pool)?, tx.open_session_on(&s.desktop)?))
        })?;
        if current.is_none_or(|c| c.released.is_some()) {
            return Ok(Finish::Already);
        }
        match (desktop, pool) {
            (Some(d), Some(p)) if d.assigned_to.as_deref() == Some(s.user.as_str()) && other.is_none() => {
                if p.persistent && d.target.is_none() && !d.needs_reset {
                    return Ok(Finish::Nothing("kept"));
                }
                let (pool, r): (String, Release) = self.pools.release_recorded(&d.name, actor)?;
                Ok(Finish::Released {
                    desktop: d.name,
                    pool,
                    persistent: p.persistent,
                    reset: r.reset || d.needs_reset,
                })
            }
            _ => Ok(Finish::Nothing("none")),
        }
    }

    /// Ends expired sessions and sessions whose desktop was given back without the broker,
    /// cuts their displays off, and completes their logoffs and every logoff left unfinished
    /// (a failed reset, or one another process began over [`FINISH_GRACE`] ago and did not
    /// complete). `ended` runs for each session ended now, before its desktop is reset. Only
    /// reads the catalog when nothing is due, so the broker runs it every second.
    pub fn reap(&mut self, actor: &Actor, ended: &dyn Fn(&str)) -> Result<Reaped> {
        self.reap_older_than(actor, ended, FINISH_GRACE)
    }

    fn reap_older_than(&mut self, actor: &Actor, ended: &dyn Fn(&str), grace: Duration) -> Result<Reaped> {
        let now = rfc3339(SystemTime::now());
        let due = self.catalog().read(|tx| -> Result<(Vec<Session>, Vec<Session>)> {
            let mut given_back = vec![];
            for s in tx.open_sessions(None)? {
                if !holds(tx, &s)? {
                    given_back.push(s);
                }
            }
            Ok((tx.expired_sessions(&now)?, given_back))
        })?;
        let ended_now = if due.0.is_empty() && due.1.is_empty() {
            vec![]
        } else {
            self.catalog().write(|tx| -> Result<Vec<(Session, bool)>> {
                let mut done = vec![];
                for s in due.0 {
                    if tx.end_session(&s.id)? {
                        tx.audit(Audit {
                            actor: &actor.0,
                            action: "session.expire",
                            pool: Some(&s.pool),
                            detail: json!({"session": s.id, "desktop": s.desktop, "user": s.user}),
                            ..Default::default()
                        })?;
                        done.push((s, true));
                    }
                }
                for s in due.1 {
                    if !holds(tx, &s)? && tx.end_session(&s.id)? {
                        tx.mark_released(&s.id)?;
                        // Given back: unless it went to someone else, nobody may stay on its display.
                        let cut = tx.desktop(&s.desktop)?.is_some_and(|d| d.assigned_to.is_none());
                        done.push((s, cut));
                    }
                }
                Ok(done)
            })?
        };
        for (s, cut) in &ended_now {
            ended(&s.id);
            if *cut {
                self.cut_off(s);
            }
        }
        let ended_now: Vec<Session> = ended_now.into_iter().map(|(s, _)| s).collect();
        let mut out = Reaped { ended: ended_now.iter().map(|s| s.id.clone()).collect(), ..Default::default() };
        let before = rfc3339(SystemTime::now() - grace);
        let mine = |s: &Session| out.ended.contains(&s.id) || s.ended.as_deref().is_some_and(|e| e <= before.as_str());
        let todo: Vec<Session> = self.catalog().read(|tx| tx.unreleased_sessions())?.into_iter().filter(mine).collect();
        let outcomes = self.finish_all(&todo, actor);
        for (s, r) in todo.into_iter().zip(outcomes) {
            match r {
                Ok(_) => out.finished.push(s.id),
                Err(e) => {
                    tracing::warn!(session = %s.id, desktop = %s.desktop, error = %e, "logoff failed; retrying later");
                    out.failed.push(s.id);
                }
            }
        }
        Ok(out)
    }

    /// At broker start: complete interrupted logoffs, then every pool's pending resets.
    pub fn heal(&mut self, actor: &Actor) -> Result<Reaped> {
        let reaped = self.reap_older_than(actor, &|_| {}, Duration::ZERO)?;
        match self.pools.heal_all() {
            Ok((_, failed)) => {
                for f in failed {
                    tracing::warn!(desktop = %f.desktop, error = %f.error, "desktop not reset; the next command retries");
                }
            }
            Err(e) => tracing::warn!(error = %crate::error::message(&e), "pools not healed"),
        }
        Ok(reaped)
    }

    /// Removes `user`'s entitlement to `pool` and logs off their session there at once.
    pub fn unentitle(&mut self, pool: &str, user: &str, actor: &Actor, ended: &dyn Fn(&str)) -> Result<Entitlement> {
        let mut e = Users::new(self.pools.catalog).unentitle(pool, user, actor)?;
        let open = self.catalog().read(|tx| -> Result<Option<Session>> {
            match tx.user(user)? {
                Some(u) => Ok(tx.open_session_of(u.id, pool)?),
                None => Ok(None),
            }
        })?;
        if let Some(s) = open {
            match self.close(None, &s.id, actor, ended) {
                Ok(c) => e.sessions_closed.push(c.id),
                Err(UserError::SessionNotFound(_)) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(e)
    }

    /// Removes a user: their open sessions are logged off first, then the user, their
    /// entitlements and session history go (the audit log keeps it).
    pub fn remove_user(&mut self, name: &str, actor: &Actor, ended: &dyn Fn(&str)) -> Result<RemovedUser> {
        names::validate("user", name)?;
        let (user, open) = self.catalog().read(|tx| -> Result<_> {
            let u = tx.user(name)?.ok_or_else(|| UserError::NotFound(name.to_string()))?;
            let open = tx.open_sessions(Some(u.id))?;
            Ok((u, open))
        })?;
        let mut closed = vec![];
        for s in open {
            match self.close(None, &s.id, actor, ended) {
                Ok(c) => closed.push(c.id),
                Err(UserError::SessionNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        for s in self.catalog().read(|tx| tx.unreleased_sessions())?.into_iter().filter(|s| s.user_id == user.id) {
            self.finish(&s, actor)?;
        }
        let kept = self.catalog().write(|tx| -> Result<Vec<String>> {
            let mut kept = vec![];
            for p in tx.pools()? {
                kept.extend(
                    tx.desktops(p.id)?.into_iter().filter(|d| d.assigned_to.as_deref() == Some(name)).map(|d| d.name),
                );
            }
            tx.delete_user(user.id)?;
            tx.audit(Audit {
                actor: &actor.0,
                action: "user.remove",
                detail: json!({"user": name, "sessions_closed": closed, "kept_desktops": kept}),
                ..Default::default()
            })?;
            Ok(kept)
        })?;
        Ok(RemovedUser { user: name.to_string(), sessions_closed: closed, kept_desktops: kept })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_ids_and_tickets_are_long_random_and_distinct() {
        let a = random_hex(TOKEN_BYTES).unwrap();
        assert!(is_token(&a) && a.len() * 4 >= 128);
        assert_ne!(a, random_hex(TOKEN_BYTES).unwrap());
        let id = random_hex(SESSION_ID_BYTES).unwrap();
        assert!(is_session_id(&id) && id.len() * 4 >= 128);
        let t = Ticket::new().unwrap();
        assert!(t.spice_password().len() * 4 >= 128 && t.spice_password().len() <= 60);
        assert_eq!(t.vnc_password().chars().count(), VNC_PASSWORD_MAX);
        assert_eq!(t.vnc_password(), t.vnc_password(), "derived, so the same for one ticket");
        assert_ne!(t.vnc_password(), Ticket::new().unwrap().vnc_password());
    }

    #[test]
    fn session_ids_and_tokens_refuse_path_tricks() {
        for bad in ["../..", "..%2f..", "", &"A".repeat(32), &format!("{}/", "a".repeat(31)), &"a".repeat(33)] {
            assert!(!is_session_id(bad), "{bad}");
        }
        assert!(!is_token(&"g".repeat(64)));
    }

    #[test]
    fn constant_time_equality_is_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert_eq!(token_hash("x").len(), 64);
    }
}
