//! The JSON API: thin-client endpoints for any user, `/api/v1/admin/...` for administrators.
//! Every handler authenticates first (so a request without a valid token learns nothing),
//! parses its input, calls one service function on the blocking pool, and returns its
//! report; errors become statuses in `error` only. The token is checked in the broker's
//! checking lane ([`Broker::checking`], after a syntax check that needs no catalog); a
//! service call's permit is taken only after that.

use super::error::ApiError;
use super::vv::{self, VvFile};
use super::{Broker, Deadline, Public, BODY_LIMIT};
use crate::catalog::users::{Session, User};
use crate::catalog::Channel;
use crate::pool::{self, CreateRequest};
use crate::rollout::{Engine, PromoteRequest};
use crate::store::Actor;
use crate::users::UserError;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

type B = State<Arc<Broker>>;
type ApiResult<T> = Result<T, ApiError>;

// ---- extractors ------------------------------------------------------------------------------

/// The user whose bearer token came with the request.
pub struct Caller(pub User);

impl FromRequestParts<Arc<Broker>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, b: &Arc<Broker>) -> ApiResult<Self> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim().to_string())
            .filter(|t| crate::users::is_token(t))
            .ok_or(UserError::Unauthenticated)?;
        let user = b.checking(move |_, ctx| Ok(ctx.users().authenticate(&token)?)).await?;
        Ok(Caller(user))
    }
}

/// A caller who is an administrator.
pub struct Admin(pub User);

impl Admin {
    fn actor(&self) -> Actor {
        Actor(format!("api:{}", self.0.name))
    }
}

impl FromRequestParts<Arc<Broker>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, b: &Arc<Broker>) -> ApiResult<Self> {
        let Caller(user) = Caller::from_request_parts(parts, b).await?;
        if !user.admin {
            return Err(UserError::NotAdmin { user: user.name }.into());
        }
        Ok(Admin(user))
    }
}

/// Path parameters, with a JSON error on bad percent-encoding.
pub struct P<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for P<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &S) -> ApiResult<Self> {
        Path::<T>::from_request_parts(parts, s)
            .await
            .map(|Path(t)| P(t))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// Query parameters, with a JSON error on unknown or malformed ones.
pub struct Q<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &S) -> ApiResult<Self> {
        Query::<T>::from_request_parts(parts, s)
            .await
            .map(|Query(t)| Q(t))
            .map_err(|e| ApiError::BadRequest(e.body_text()))
    }
}

/// A JSON body (an empty one reads as `{}`): 413 above [`BODY_LIMIT`], 400 when malformed
/// or carrying unknown fields, 408 when it has not arrived by the request's [`Deadline`].
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, s: &S) -> ApiResult<Self> {
        let deadline = req.extensions().get::<Deadline>().copied();
        let read = Bytes::from_request(req, s);
        let read = match deadline {
            Some(Deadline(at)) => tokio::time::timeout_at(at, read).await.map_err(|_| ApiError::BodyTimeout)?,
            None => read.await,
        };
        let bytes = read.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge { limit: BODY_LIMIT }
            } else {
                ApiError::BadRequest(r.body_text())
            }
        })?;
        let parsed = if bytes.iter().all(u8::is_ascii_whitespace) {
            serde_json::from_str("{}")
        } else {
            serde_json::from_slice(&bytes)
        };
        parsed.map(JsonBody).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
    }
}

// ---- thin-client endpoints -----------------------------------------------------------------

/// A session as its user sees it; `console_url` carries the console token in its fragment,
/// which browsers never send to a server.
#[derive(Debug, Serialize)]
pub struct SessionOut {
    pub id: String,
    pub pool: String,
    pub desktop: String,
    pub vv_url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_url: Option<String>,
    pub expires_at: String,
    pub reconnected: bool,
}

fn session_out(public: &Public, s: &Session, console_token: Option<&str>, reconnected: bool) -> SessionOut {
    SessionOut {
        vv_url: format!("{}/api/v1/sessions/{}/console.vv", public.base, s.id),
        console_url: console_token.map(|t| format!("{}/console/{}#token={t}", public.base, s.id)),
        id: s.id.clone(),
        pool: s.pool.clone(),
        desktop: s.desktop.clone(),
        expires_at: s.expires_at.clone(),
        reconnected,
    }
}

pub async fn pools(State(b): B, Caller(u): Caller) -> ApiResult<Response> {
    let offers = b.blocking(move |_, ctx| Ok(ctx.users().pools_of(&u)?)).await?;
    Ok(Json(offers).into_response())
}

pub async fn open_session(State(b): B, Caller(u): Caller, P(pool): P<String>) -> ApiResult<Response> {
    let ttl = b.session_ttl;
    let r = {
        let _turn = b.open_gate.lock().await;
        b.blocking(move |_, ctx| Ok(ctx.sessions()?.open(&u, &pool, ttl)?)).await
    };
    let opened = match r {
        Ok(o) => o,
        Err(e) => {
            if matches!(&e, ApiError::User(UserError::Pool(pool::PoolError::Exhausted { .. }))) {
                b.metrics.pool_exhausted.fetch_add(1, Relaxed);
            }
            return Err(e);
        }
    };
    let (status, counter) = if opened.reconnected {
        (StatusCode::OK, &b.metrics.sessions_reconnected)
    } else {
        (StatusCode::CREATED, &b.metrics.sessions_opened)
    };
    counter.fetch_add(1, Relaxed);
    let out = session_out(&b.public, &opened.session, Some(&opened.console_token), opened.reconnected);
    Ok((status, [(header::CACHE_CONTROL, "no-store")], Json(out)).into_response())
}

pub async fn my_sessions(State(b): B, Caller(u): Caller) -> ApiResult<Response> {
    let list = b.blocking(move |_, ctx| Ok(ctx.sessions()?.list(Some(&u))?)).await?;
    let out: Vec<SessionOut> = list.iter().map(|s| session_out(&b.public, s, None, false)).collect();
    Ok(Json(out).into_response())
}

pub async fn my_session(State(b): B, Caller(u): Caller, P(id): P<String>) -> ApiResult<Response> {
    let s = b.blocking(move |_, ctx| Ok(ctx.sessions()?.get(Some(&u), &id)?)).await?;
    Ok(Json(session_out(&b.public, &s, None, false)).into_response())
}

pub async fn close_session(State(b): B, Caller(u): Caller, P(id): P<String>) -> ApiResult<Response> {
    let actor = Actor(format!("user:{}", u.name));
    let closed =
        b.blocking(move |b, ctx| Ok(ctx.sessions()?.close(Some(&u), &id, &actor, &|s| b.consoles.end(s))?)).await?;
    b.metrics.sessions_closed.fetch_add(1, Relaxed);
    Ok(Json(closed).into_response())
}

/// The `.vv` file: the host is the display's own address, or `--display-host` for a display
/// on every address ([`vv::client_host`]).
pub async fn console_vv(State(b): B, Caller(u): Caller, P(id): P<String>) -> ApiResult<Response> {
    let t = b
        .blocking(move |b, ctx| {
            let mut sessions = ctx.sessions()?;
            // A display the thin client could not be pointed at fails before a new ticket
            // disconnects a viewer already on it.
            let (session, endpoint) = sessions.spice_display(&u, &id)?;
            if let Err(e) = vv::client_host(&session.desktop, &endpoint.listen, b.display_host.as_deref()) {
                tracing::warn!(desktop = %session.desktop, listen = %endpoint.listen, "refused a .vv: the display is on every address and 'vdim serve' has no --display-host");
                return Err(e.into());
            }
            if endpoint.port.is_none() && b.display_tls.is_none() {
                tracing::warn!(desktop = %session.desktop, "refused a .vv: the display is TLS-only and 'vdim serve' has no --display-ca");
                return Err(vv::VvError::NoDisplayCa { desktop: session.desktop.clone() }.into());
            }
            Ok(sessions.spice_ticket(&u, &id)?)
        })
        .await?;
    let file = VvFile {
        pool: &t.session.pool,
        desktop: &t.session.desktop,
        host: vv::client_host(&t.session.desktop, &t.endpoint.listen, b.display_host.as_deref())?,
        port: t.endpoint.port,
        tls_port: t.endpoint.tls_port,
        password: &t.password,
        tls: b.display_tls.as_ref(),
    }
    .render()
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let disposition = HeaderValue::from_str(&format!("attachment; filename=\"{}.vv\"", t.session.desktop))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(vv::CONTENT_TYPE)),
            (header::CONTENT_DISPOSITION, disposition),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        file,
    )
        .into_response())
}

// ---- admin: images, pools, rollback, audit --------------------------------------------------

pub async fn admin_images(State(b): B, _a: Admin) -> ApiResult<Response> {
    Ok(Json(b.blocking(|_, ctx| Ok(ctx.store().list()?)).await?).into_response())
}

pub async fn admin_image(State(b): B, _a: Admin, P(image): P<String>) -> ApiResult<Response> {
    Ok(Json(b.blocking(move |_, ctx| Ok(ctx.store().history(&image)?)).await?).into_response())
}

pub async fn admin_pools(State(b): B, _a: Admin) -> ApiResult<Response> {
    Ok(Json(b.blocking(|_, ctx| Ok(ctx.pools()?.list()?)).await?).into_response())
}

pub async fn admin_pool(State(b): B, _a: Admin, P(name): P<String>) -> ApiResult<Response> {
    Ok(Json(b.blocking(move |_, ctx| Ok(ctx.pools()?.show(&name)?)).await?).into_response())
}

pub async fn admin_create_pool(State(b): B, a: Admin, JsonBody(c): JsonBody<CreateRequest>) -> ApiResult<Response> {
    let actor = a.actor();
    let view = b
        .blocking(move |_, ctx| {
            if let Some(u) = &c.user_data {
                user_data_in_home(u, &ctx.home().user_data())?;
            }
            let virt = pool::parse_virt_type(&ctx.settings().virt_type)?;
            Ok(ctx.pools()?.create(&c.options(virt)?, &actor)?)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// The admin API reads user data only from the home's `user-data/` directory (the CLI, run by
/// the host's own admin, may name any file): the broker runs as root, and a token must not be
/// a way to copy `/root/.ssh/id_rsa` onto a guest's drive.
fn user_data_in_home(path: &std::path::Path, dir: &std::path::Path) -> ApiResult<()> {
    let plain_name = path.file_name().is_some()
        && path.components().all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)));
    if plain_name && path.parent() == Some(dir) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "user data for a pool made through the API must be a file directly in {}, not {}",
            dir.display(),
            path.display()
        )))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Force {
    #[serde(default)]
    force: bool,
}

pub async fn admin_delete_pool(State(b): B, a: Admin, P(name): P<String>, Q(f): Q<Force>) -> ApiResult<Response> {
    let actor = a.actor();
    let n = name.clone();
    b.blocking(move |_, ctx| Ok(ctx.pools()?.delete(&n, f.force, &actor)?)).await?;
    Ok(Json(serde_json::json!({"pool": name, "deleted": true})).into_response())
}

pub async fn admin_start_pool(State(b): B, a: Admin, P(name): P<String>) -> ApiResult<Response> {
    let actor = a.actor();
    let n = name.clone();
    let r = b.blocking(move |_, ctx| all_done(ctx.pools()?.start(&n, &actor)?)).await?;
    Ok(Json(serde_json::json!({"pool": name, "started": r.desktops})).into_response())
}

pub async fn admin_stop_pool(
    State(b): B,
    a: Admin,
    P(name): P<String>,
    JsonBody(f): JsonBody<Force>,
) -> ApiResult<Response> {
    let actor = a.actor();
    let n = name.clone();
    let r = b.blocking(move |_, ctx| all_done(ctx.pools()?.stop(&n, f.force, &actor)?)).await?;
    Ok(Json(serde_json::json!({"pool": name, "stopped": r.desktops})).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resize {
    size: u32,
}

pub async fn admin_resize_pool(
    State(b): B,
    a: Admin,
    P(name): P<String>,
    JsonBody(r): JsonBody<Resize>,
) -> ApiResult<Response> {
    let actor = a.actor();
    Ok(Json(b.blocking(move |_, ctx| Ok(ctx.pools()?.resize(&name, r.size, &actor)?)).await?).into_response())
}

pub async fn admin_update_pool(
    State(b): B,
    a: Admin,
    P(name): P<String>,
    JsonBody(f): JsonBody<Force>,
) -> ApiResult<Response> {
    let actor = a.actor();
    Ok(Json(b.blocking(move |_, ctx| all_done(ctx.pools()?.update(&name, f.force, &actor)?)).await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    version: u32,
    #[serde(default)]
    force: bool,
}

pub async fn admin_pin_pool(
    State(b): B,
    a: Admin,
    P(name): P<String>,
    JsonBody(p): JsonBody<Pin>,
) -> ApiResult<Response> {
    let actor = a.actor();
    Ok(Json(b.blocking(move |_, ctx| all_done(ctx.pools()?.pin(&name, p.version, p.force, &actor)?)).await?)
        .into_response())
}

pub async fn admin_unpin_pool(State(b): B, a: Admin, P(name): P<String>) -> ApiResult<Response> {
    let actor = a.actor();
    Ok(Json(b.blocking(move |_, ctx| Ok(ctx.pools()?.unpin(&name, &actor)?)).await?).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    #[serde(default)]
    to: Option<u32>,
    #[serde(default)]
    force: bool,
}

pub async fn admin_rollback_pool(
    State(b): B,
    a: Admin,
    P(name): P<String>,
    JsonBody(r): JsonBody<Rollback>,
) -> ApiResult<Response> {
    let actor = a.actor();
    Ok(Json(b.blocking(move |_, ctx| all_done(ctx.pools()?.rollback(&name, r.to, r.force, &actor)?)).await?)
        .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    image: Option<String>,
    pool: Option<String>,
    limit: Option<usize>,
}

pub async fn admin_audit(State(b): B, _a: Admin, Q(q): Q<AuditQuery>) -> ApiResult<Response> {
    let limit = q.limit.unwrap_or(crate::catalog::DEFAULT_AUDIT_LIMIT).min(10_000);
    let log = b
        .blocking(move |_, ctx| {
            Ok(ctx.catalog().read(|tx| tx.audit_log(q.image.as_deref(), q.pool.as_deref(), limit))?)
        })
        .await?;
    Ok(Json(log).into_response())
}

// ---- admin: users, entitlements, sessions ---------------------------------------------------

pub async fn admin_entitlements(State(b): B, _a: Admin, P(pool): P<String>) -> ApiResult<Response> {
    let users = b.blocking(move |_, ctx| Ok(ctx.users().entitlements(&pool)?)).await?;
    Ok(Json(users).into_response())
}

pub async fn admin_entitle(State(b): B, a: Admin, P((pool, user)): P<(String, String)>) -> ApiResult<Response> {
    let actor = a.actor();
    let e = b.blocking(move |_, ctx| Ok(ctx.users().entitle(&pool, &user, &actor)?)).await?;
    Ok(Json(e).into_response())
}

pub async fn admin_unentitle(State(b): B, a: Admin, P((pool, user)): P<(String, String)>) -> ApiResult<Response> {
    let actor = a.actor();
    let e =
        b.blocking(move |b, ctx| Ok(ctx.sessions()?.unentitle(&pool, &user, &actor, &|s| b.consoles.end(s))?)).await?;
    Ok(Json(e).into_response())
}

pub async fn admin_users(State(b): B, _a: Admin) -> ApiResult<Response> {
    Ok(Json(b.blocking(|_, ctx| Ok(ctx.users().list()?)).await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddUser {
    name: String,
    #[serde(default)]
    admin: bool,
    /// Token lifetime, e.g. "90d"; none: no expiry.
    #[serde(default)]
    expires: Option<String>,
}

pub async fn admin_add_user(State(b): B, a: Admin, JsonBody(u): JsonBody<AddUser>) -> ApiResult<Response> {
    let actor = a.actor();
    let expires: Option<Duration> = u
        .expires
        .as_deref()
        .map(humantime::parse_duration)
        .transpose()
        .map_err(|e| ApiError::BadRequest(format!("expires: {e}")))?;
    let new = b.blocking(move |_, ctx| Ok(ctx.users().add(&u.name, u.admin, expires, &actor)?)).await?;
    Ok((StatusCode::CREATED, [(header::CACHE_CONTROL, "no-store")], Json(new)).into_response())
}

pub async fn admin_remove_user(State(b): B, a: Admin, P(name): P<String>) -> ApiResult<Response> {
    let actor = a.actor();
    let r = b.blocking(move |b, ctx| Ok(ctx.sessions()?.remove_user(&name, &actor, &|s| b.consoles.end(s))?)).await?;
    Ok(Json(r).into_response())
}

pub async fn admin_sessions(State(b): B, _a: Admin) -> ApiResult<Response> {
    Ok(Json(b.blocking(|_, ctx| Ok(ctx.sessions()?.list(None)?)).await?).into_response())
}

pub async fn admin_close_session(State(b): B, a: Admin, P(id): P<String>) -> ApiResult<Response> {
    let actor = a.actor();
    let closed =
        b.blocking(move |b, ctx| Ok(ctx.sessions()?.close(None, &id, &actor, &|s| b.consoles.end(s))?)).await?;
    b.metrics.sessions_closed.fetch_add(1, Relaxed);
    Ok(Json(closed).into_response())
}

// ---- admin: rollouts -------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutQuery {
    image: Option<String>,
    limit: Option<usize>,
}

pub async fn admin_rollouts(State(b): B, a: Admin, Q(q): Q<RolloutQuery>) -> ApiResult<Response> {
    let actor = a.actor();
    let limit = q.limit.unwrap_or(20).min(1000);
    let r = b.blocking(move |_, ctx| Ok(ctx.engine(actor)?.status(q.image.as_deref(), limit)?)).await?;
    Ok(Json(r).into_response())
}

fn parse_channel(s: &str) -> ApiResult<Channel> {
    Channel::parse(s).ok_or_else(|| {
        ApiError::BadRequest(format!("channel {:?} is not one of dev, test, prod", s.escape_default().to_string()))
    })
}

/// How long a promote or resume request waits for its rollout before answering 202: a
/// rollout runs its waves and soaks for minutes, in the broker, after the answer.
const ROLLOUT_ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Runs a rollout (promote or resume) on the blocking pool. It answers with the result when
/// the rollout ends or is refused within [`ROLLOUT_ANSWER_WAIT`], else 202 with its status so far.
async fn run_rollout<F>(b: Arc<Broker>, image: String, actor: Actor, run: F) -> ApiResult<Response>
where
    F: FnOnce(&mut Engine) -> Result<crate::rollout::RolloutReport, crate::rollout::RolloutError> + Send + 'static,
{
    let task = {
        let b = b.clone();
        tokio::spawn(async move { b.blocking(move |_, ctx| Ok(run(&mut ctx.engine(actor)?)?)).await })
    };
    match tokio::time::timeout(ROLLOUT_ANSWER_WAIT, task).await {
        Ok(joined) => {
            let report = joined.map_err(|e| ApiError::Internal(e.to_string()))??;
            Ok(Json(report).into_response())
        }
        Err(_) => {
            let status = b
                .blocking(move |_, ctx| {
                    Ok(ctx.engine(Actor("api".into()))?.status(Some(&image), 1)?.into_iter().next())
                })
                .await?;
            Ok((StatusCode::ACCEPTED, Json(status)).into_response())
        }
    }
}

pub async fn admin_promote(
    State(b): B,
    a: Admin,
    P(image): P<String>,
    JsonBody(p): JsonBody<PromoteRequest>,
) -> ApiResult<Response> {
    let (img, actor) = (image.clone(), a.actor());
    run_rollout(b, image, actor, move |e| e.promote(&p.options(&img))).await
}

pub async fn admin_resume_rollout(State(b): B, a: Admin, P(image): P<String>) -> ApiResult<Response> {
    let (img, actor) = (image.clone(), a.actor());
    run_rollout(b, image, actor, move |e| e.resume(&img)).await
}

pub async fn admin_halt_rollout(State(b): B, a: Admin, P(image): P<String>) -> ApiResult<Response> {
    let actor = a.actor();
    Ok(Json(b.blocking(move |_, ctx| Ok(ctx.engine(actor)?.halt(&image)?)).await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRollback {
    channel: String,
    #[serde(default)]
    to: Option<u32>,
    #[serde(default)]
    force: bool,
}

pub async fn admin_rollback_channel(
    State(b): B,
    a: Admin,
    P(image): P<String>,
    JsonBody(r): JsonBody<ChannelRollback>,
) -> ApiResult<Response> {
    let channel = parse_channel(&r.channel)?;
    let actor = a.actor();
    let out = b
        .blocking(move |_, ctx| all_done(ctx.engine(actor)?.rollback_channel(&image, channel, r.to, r.force)?))
        .await?;
    Ok(Json(out).into_response())
}

/// A report of an operation on many desktops, or, when any desktop failed, the error naming
/// each one (its kind decides the status; the others went on, as `pool show` tells).
fn all_done<T: Failed>(report: T) -> ApiResult<T> {
    let failed = report.failed();
    if failed.is_empty() {
        return Ok(report);
    }
    Err(crate::pool::PoolError::Desktops { failed }.into())
}

/// Reports that list desktops an operation could not finish.
trait Failed {
    fn failed(&self) -> Vec<crate::fleet::Failure>;
}

impl Failed for crate::pool::PoolOutcome {
    fn failed(&self) -> Vec<crate::fleet::Failure> {
        self.failed.clone()
    }
}

impl Failed for crate::pool::MoveReport {
    fn failed(&self) -> Vec<crate::fleet::Failure> {
        self.failed.clone()
    }
}

impl Failed for crate::rollout::ChannelRollback {
    fn failed(&self) -> Vec<crate::fleet::Failure> {
        self.pools
            .values()
            .flat_map(|p| match p {
                crate::rollout::PoolRollback::Moved { failed, .. } => failed.clone(),
                crate::rollout::PoolRollback::Error { .. } => vec![],
            })
            .collect()
    }
}

// ---- admin: the fleet watch and its incidents -------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncidentQuery {
    limit: Option<usize>,
}

pub async fn admin_incidents(State(b): B, _a: Admin, Q(q): Q<IncidentQuery>) -> ApiResult<Response> {
    let limit = q.limit.unwrap_or(50).min(1000);
    let all = b.blocking(move |_, ctx| Ok(crate::incident::list(ctx.catalog(), limit)?)).await?;
    Ok(Json(all).into_response())
}

pub async fn admin_incident(State(b): B, _a: Admin, P(id): P<i64>) -> ApiResult<Response> {
    let review = b.blocking(move |_, ctx| Ok(crate::incident::review(ctx.catalog(), id)?)).await?;
    Ok(Json(review).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    note: String,
}

pub async fn admin_ack_incident(
    State(b): B,
    a: Admin,
    P(id): P<i64>,
    JsonBody(ack): JsonBody<Ack>,
) -> ApiResult<Response> {
    let actor = a.actor();
    let i = b.blocking(move |_, ctx| Ok(crate::incident::ack(ctx.catalog(), id, &ack.note, &actor)?)).await?;
    Ok(Json(i).into_response())
}

pub async fn admin_watch_policies(State(b): B, _a: Admin) -> ApiResult<Response> {
    let all = b
        .blocking(move |_, ctx| {
            Ok(ctx
                .catalog()
                .read(|tx| Channel::ALL.iter().map(|c| tx.watch_policy(*c)).collect::<Result<Vec<_>, _>>())?)
        })
        .await?;
    Ok(Json(all).into_response())
}

pub async fn admin_set_watch_policy(
    State(b): B,
    a: Admin,
    P(channel): P<String>,
    JsonBody(change): JsonBody<crate::watch::PolicyChange>,
) -> ApiResult<Response> {
    let channel = parse_channel(&channel)?;
    let actor = a.actor();
    let p = b.blocking(move |_, ctx| Ok(crate::watch::set_policy(ctx.catalog(), channel, &change, &actor)?)).await?;
    Ok(Json(p).into_response())
}
