//! Accounts and login sessions: register, login (single-login slot, server assignment,
//! tokens), logout.
//!
//! - `POST /api/register` `{"name","password"}` → 201 `{"user_id","name"}`
//! - `POST /api/login` `{"name","password"}` → 200 `{"user_id","name","server":{..},
//!   "connect_token","session_token"}`
//! - `POST /api/login/resume` (bearer) → 200, as login: a new session replacing the caller's
//! - `POST /api/logout` (bearer) → 200 `{"ok":true}`

use crate::{
    api::openapi::ErrorBody,
    auth::{AuthUser, Resumable},
    config::LoginConflict,
    error::{ApiJson, AppError},
    password::PasswordError,
    state::{is_live, live_server, AppState},
    throttle::{ClientIp, Throttled},
};
use axum::{extract::State, http::StatusCode, Json};
use cim_common::{
    cluster::ClusterError,
    ids,
    pb::{
        cluster::{KickRequest, KickResponse, PresenceRequest, PresenceResponse},
        Kick, KickReason,
    },
    registry::{Members, ServiceInfo},
    store::ClaimOutcome,
    time::now_ms,
    token::{ConnectClaims, SessionClaims},
};
pub use cim_proto::api::{Credentials, LoggedIn, OkBody, Registered, ServerAddrs};

/// Path of the connection servers' kick endpoint.
pub const KICK_PATH: &str = "/internal/kick";
/// Path of the connection servers' presence endpoint.
pub const PRESENCE_PATH: &str = "/internal/presence";

/// Characters that are syntax in the terminal client (`;` separates, `@` addresses, `#` and
/// `|` are reserved), so names cannot contain them.
const RESERVED_NAME_CHARS: [char; 4] = [';', '@', '#', '|'];

/// Why a name is not acceptable, or `Ok`.
pub fn validate_name(name: &str, max_len: usize) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("name must not be empty".into());
    }
    if name.chars().count() > max_len {
        return Err(format!("name must be at most {max_len} characters"));
    }
    if name.chars().any(char::is_whitespace) {
        return Err("name must not contain whitespace".into());
    }
    if name.chars().any(char::is_control) {
        return Err("name must not contain control characters".into());
    }
    if let Some(c) = name.chars().find(|c| RESERVED_NAME_CHARS.contains(c)) {
        return Err(format!("name must not contain {c:?} (one of ; @ # |)"));
    }
    Ok(())
}

/// Why a password is not acceptable (its length, in characters), or `Ok`.
pub fn validate_password(password: &str, min_len: usize, max_len: usize) -> Result<(), String> {
    let len = password.chars().count();
    if len < min_len || len > max_len {
        return Err(format!(
            "password must be {min_len} to {max_len} characters long"
        ));
    }
    Ok(())
}

/// Register an account.
///
/// Creates an account with a unique name. The password is stored as an Argon2id hash.
#[utoipa::path(
    post,
    path = "/api/register",
    tag = "accounts",
    request_body = Credentials,
    responses(
        (status = 201, description = "Registered", body = Registered),
        (status = 400, description = "`invalid_name`, `invalid_password`, `invalid_json` or `bad_request`", body = ErrorBody),
        (status = 409, description = "`name_taken`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`", body = ErrorBody),
        (status = 429, description = "`busy`: too many password checks at once; see `Retry-After`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn register(
    State(state): State<AppState>,
    ApiJson(creds): ApiJson<Credentials>,
) -> Result<(StatusCode, Json<Registered>), AppError> {
    let config = state.config();
    validate_name(&creds.name, config.max_name_len)
        .map_err(|m| AppError::new(StatusCode::BAD_REQUEST, "invalid_name", m))?;
    validate_password(
        &creds.password,
        config.min_password_len,
        config.max_password_len,
    )
    .map_err(|m| AppError::new(StatusCode::BAD_REQUEST, "invalid_password", m))?;
    let taken = || {
        AppError::new(
            StatusCode::CONFLICT,
            "name_taken",
            format!("the name {:?} is already taken", creds.name),
        )
    };
    // Cheap check first, so a taken name costs no hash; create_user settles races.
    if state.store().user_by_name(&creds.name).await?.is_some() {
        return Err(taken());
    }
    let hash = state
        .passwords()
        .hash(creds.password.clone())
        .await
        .map_err(password_error)?;
    let Some(user_id) = state.store().create_user(&creds.name, &hash).await? else {
        return Err(taken());
    };
    tracing::info!(user_id, name = %creds.name, "registered");
    Ok((
        StatusCode::CREATED,
        Json(Registered {
            user_id,
            name: creds.name,
        }),
    ))
}

/// The public addresses of a registered server (an empty TLS address: none offered). A
/// function, not a `From`: both types are other crates'.
pub fn server_addrs(s: &ServiceInfo) -> ServerAddrs {
    let given = |a: &String| (!a.is_empty()).then(|| a.clone());
    ServerAddrs {
        id: s.id.clone(),
        tcp_addr: s.tcp_addr.clone(),
        ws_addr: s.ws_addr.clone(),
        tls_addr: given(&s.tls_addr),
        wss_addr: given(&s.wss_addr),
    }
}

fn bad_credentials() -> AppError {
    AppError::unauthorized("bad_credentials", "wrong name or password")
}

/// Log in.
///
/// Takes the user's single-login slot, assigns a connection server (round robin over the live
/// ones) and returns a single-use, short-lived `connect_token` for the first frame to that
/// server plus a `session_token`, the bearer token of this API for the login session. A user
/// already logged in elsewhere gets 409 until that session ends.
#[utoipa::path(
    post,
    path = "/api/login",
    tag = "accounts",
    request_body = Credentials,
    responses(
        (status = 200, description = "Logged in: connect to `server` with `connect_token`", body = LoggedIn),
        (status = 400, description = "`invalid_json` or `bad_request`", body = ErrorBody),
        (status = 401, description = "`bad_credentials`: wrong name or password", body = ErrorBody),
        (status = 409, description = "`already_logged_in`: the user is logged in elsewhere", body = ErrorBody),
        (status = 429, description = "`rate_limited` (too many logins from this address, or failures of this name) or `busy` (too many password checks at once); see `Retry-After`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`", body = ErrorBody),
        (status = 503, description = "`no_server` (no connection server is live), `unavailable`, `overloaded` or `timeout`", body = ErrorBody),
    )
)]
pub async fn login(
    State(state): State<AppState>,
    ClientIp(addr): ClientIp,
    ApiJson(creds): ApiJson<Credentials>,
) -> Result<Json<LoggedIn>, AppError> {
    let result = check_and_open(&state, addr, creds).await;
    state.metrics().login(&result);
    result.map(Json)
}

/// Resume a login session.
///
/// A client that still has its session token (a reloaded web page, an app that lost its
/// connection) logs in again without the password: the session is replaced by a new one on a
/// freshly assigned server, its old connection, if still open, is kicked (REPLACED), and the
/// answer is a login's. The old session token stops working. A session that has ended
/// (logged out, disconnected past the heartbeat timeout, replaced by another device) gets
/// 401 `session_ended`: log in with the password.
#[utoipa::path(
    post,
    path = "/api/login/resume",
    tag = "accounts",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Logged in again: connect to `server` with `connect_token`", body = LoggedIn),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`: log in with the password", body = ErrorBody),
        (status = 409, description = "`already_logged_in`: another login took the slot at the same moment", body = ErrorBody),
        (status = 503, description = "`no_server`, `unavailable` (the old connection's server did not answer), `overloaded` or `timeout`", body = ErrorBody),
    )
)]
pub async fn resume(
    State(state): State<AppState>,
    Resumable(caller): Resumable,
) -> Result<Json<LoggedIn>, AppError> {
    let result = resume_session(&state, caller).await;
    state.metrics().login(&result);
    result.map(Json)
}

/// [`login`]'s work: the credentials, then [`open_session`].
async fn check_and_open(
    state: &AppState,
    addr: Option<std::net::IpAddr>,
    creds: Credentials,
) -> Result<LoggedIn, AppError> {
    let config = state.config();
    // Refused before any hashing (see `crate::throttle`).
    state
        .throttle()
        .admit(addr, &creds.name)
        .map_err(|throttled| match throttled {
            Throttled::Address(wait) => AppError::too_many(
                "rate_limited",
                "too many logins from your address: retry later",
                wait,
            ),
            Throttled::Name(wait) => AppError::too_many(
                "rate_limited",
                format!("too many failed logins of {}: retry later", creds.name),
                wait,
            ),
        })?;
    // No stored password is this long; refuse before hashing an attacker-chosen amount of
    // data. (The length of the attempt says nothing about whether the account exists.)
    if creds.password.chars().count() > config.max_password_len {
        return Err(bad_credentials());
    }
    // A name no account can have skips the lookup but still pays for a (dummy) verification,
    // so the response time does not tell registered names apart.
    let user = match validate_name(&creds.name, config.max_name_len) {
        Ok(()) => state.store().user_by_name(&creds.name).await?,
        Err(_) => None,
    };
    let ok = state
        .passwords()
        .verify(
            creds.password,
            user.as_ref().map(|u| u.password_hash.clone()),
        )
        .await
        .map_err(password_error)?;
    let user = match user {
        Some(user) if ok => user,
        _ => {
            state.throttle().failed(&creds.name);
            return Err(bad_credentials());
        }
    };
    open_session(state, user.id, user.name, None).await
}

/// A hashing failure as an answer: shed work is 429 `busy` (retry in a second), the rest
/// an internal error.
pub(crate) fn password_error(e: PasswordError) -> AppError {
    match e {
        PasswordError::Busy => AppError::too_many(
            "busy",
            "too many logins at once: retry in a second",
            std::time::Duration::from_secs(1),
        ),
        e => AppError::internal(e),
    }
}

/// Starts a login session of an authenticated user: takes the single-login slot, assigns a
/// server, signs the tokens. Shared by `login` and the business API's connect call (a
/// backend that authenticated the user itself). A user connected elsewhere is refused or
/// replaced as `login_conflict` says. `server` (the business API's choice) names the live
/// server to assign instead of the round robin's.
pub(crate) async fn open_session(
    state: &AppState,
    user_id: u64,
    user_name: String,
    server: Option<&str>,
) -> Result<LoggedIn, AppError> {
    let user = UserRef {
        id: user_id,
        name: user_name,
    };
    start_session(state, user, None, server).await
}

/// [`open_session`] for whoever holds a session token of `caller.session` (checked by
/// [`Resumable`]): a reconnecting client (a reloaded web page, the SDK after a network
/// change) gets a new session at once without the password. Its own old connection, if its
/// slot still holds it, is ended whatever `login_conflict` says; a slot held by another
/// device is treated as for any login.
async fn resume_session(state: &AppState, caller: AuthUser) -> Result<LoggedIn, AppError> {
    let user = UserRef {
        id: caller.user_id,
        name: caller.user_name,
    };
    start_session(state, user, Some(caller.session), None).await
}

/// Takes the slot for a new session (see [`take_slot`]) and signs its tokens, for server
/// `chosen` (400 unless it is live) or the assigner's pick.
async fn start_session(
    state: &AppState,
    user: UserRef,
    resumed: Option<String>,
    chosen: Option<&str>,
) -> Result<LoggedIn, AppError> {
    let config = state.config();
    let servers = state.servers();
    let server = match chosen {
        Some(id) => live_server(&servers, id).cloned().ok_or_else(|| {
            AppError::bad_request(format!("server {id:?} is not a live connection server"))
        })?,
        None => state.pick_server(&servers).await.ok_or_else(|| {
            AppError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_server",
                "no connection server is available, retry later",
            )
        })?,
    };
    let session = ids::session_id();
    take_slot(state, &servers, &user, &session, resumed.as_deref()).await?;

    // One login session per user: the tokens of earlier ones can no longer resume (a
    // replaced device reloading its page must not take the account back).
    let generation = state
        .store()
        .next_generation(user.id, config.session_token_ttl())
        .await?;
    let now = now_ms();
    let connect_exp =
        now.saturating_add(i64::try_from(config.connect_token_ttl_ms).unwrap_or(i64::MAX));
    let session_ttl_ms = config.session_token_ttl().as_millis();
    let session_exp = now.saturating_add(i64::try_from(session_ttl_ms).unwrap_or(i64::MAX));
    let connect_token = state.signer().sign_connect(&ConnectClaims {
        user_id: user.id,
        user_name: user.name.clone(),
        server_id: server.id.clone(),
        session: session.clone(),
        exp_ms: connect_exp,
    });
    let session_token = state.signer().sign_session(&SessionClaims {
        user_id: user.id,
        user_name: user.name.clone(),
        session,
        exp_ms: session_exp,
        generation,
    });
    tracing::info!(user_id = user.id, server = %server.id, resumed = resumed.is_some(), "logged in");
    Ok(LoggedIn {
        user_id: user.id,
        name: user.name,
        server: server_addrs(&server),
        connect_token,
        session_token,
        heartbeat_hint_ms: None,
    })
}

/// Takes the user's single-login slot for `session`, pending.
///
/// A free slot, a pending one (nobody connected with it) and one attached to a server that is
/// not live are simply taken ([`StateStore::claim_login`]). A slot attached to a live server
/// is a connection that may be open; it is taken over only after that connection is known to
/// be ended, so that a user never has two: the caller resumes that very session, or
/// `login_conflict = "replace"`, or (with `"refuse"`) its server says it does not hold the
/// user (a stale slot after a crash). The old connection is kicked (REPLACED) first; a server
/// that refuses connections holds nothing. A server that cannot be asked in time (slow, or
/// unreachable without a refusal) may still hold it: 503 `unavailable`, retry.
///
/// [`StateStore::claim_login`]: cim_common::store::StateStore::claim_login
async fn take_slot(
    state: &AppState,
    servers: &Members,
    user: &UserRef,
    session: &str,
    resumed: Option<&str>,
) -> Result<(), AppError> {
    let ttl = state.config().connect_token_ttl();
    let live = |s: &str| is_live(servers, s);
    let claim = || state.store().claim_login(user.id, session, ttl, &live);
    let (held, holder) = match claim().await? {
        ClaimOutcome::Claimed => return Ok(()),
        ClaimOutcome::Contended => return Err(already_logged_in(user, None)),
        ClaimOutcome::Held { session, server } => (session, server),
    };
    let replace =
        resumed == Some(held.as_str()) || state.config().login_conflict == LoginConflict::Replace;
    // The registry may have dropped the server since the claim read it: then it holds nothing.
    if let Some(server) = live_server(servers, &holder) {
        if !replace {
            match holds_user(state, server, user.id).await {
                Reach::Answered(true) => return Err(already_logged_in(user, Some(&holder))),
                Reach::Answered(false) => {
                    tracing::info!(user_id = user.id, server = %holder, "login slot was stale: taken over");
                }
                Reach::Gone => {
                    tracing::info!(user_id = user.id, server = %holder, "the slot's server refuses connections: taken over");
                }
                Reach::Unknown(e) => return Err(holder_unreachable(&holder, &e)),
            }
        }
        if let Reach::Unknown(e) = end_connection(state, server, user.id, &held).await {
            return Err(holder_unreachable(&holder, &e));
        }
    }
    if state
        .store()
        .take_over_login(user.id, &held, session, ttl)
        .await?
    {
        return Ok(());
    }
    // The slot changed meanwhile: the kicked connection's detach freed it (take it), or
    // another login was faster (it wins).
    match claim().await? {
        ClaimOutcome::Claimed => Ok(()),
        ClaimOutcome::Held { server, .. } => Err(already_logged_in(user, Some(&server))),
        ClaimOutcome::Contended => Err(already_logged_in(user, None)),
    }
}

/// 409: `user` is connected to server `held_on`, or (`None`) another login took the slot
/// while this one ran.
fn already_logged_in(user: &UserRef, held_on: Option<&str>) -> AppError {
    let detail = match held_on {
        Some(server) => format!("connected to server {server}"),
        None => "another login took the slot at the same moment".to_string(),
    };
    AppError::new(
        StatusCode::CONFLICT,
        "already_logged_in",
        format!(
            "{} is already logged in elsewhere ({detail}); the login frees when that session \
             disconnects or logs out, or at the latest within the heartbeat timeout",
            user.name
        ),
    )
}

fn holder_unreachable(server: &str, error: &ClusterError) -> AppError {
    tracing::warn!(server, %error, "the server holding a login did not answer");
    AppError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        format!(
            "the server holding this user's other connection ({server}) did not answer, so \
             it may still be open; retry shortly"
        ),
    )
}

/// The user a session is opened for.
struct UserRef {
    id: u64,
    name: String,
}

/// What asking a server told.
enum Reach<T> {
    Answered(T),
    /// It refused the connection: no process listens there, so it holds nothing.
    Gone,
    /// No answer in time, or an error: it may be alive and hold anything.
    Unknown(ClusterError),
}

impl<T> Reach<T> {
    fn of(result: Result<T, ClusterError>) -> Self {
        match result {
            Ok(answer) => Self::Answered(answer),
            Err(e) if e.is_refused() => Self::Gone,
            Err(e) => Self::Unknown(e),
        }
    }

    fn map<U>(self, f: impl FnOnce(T) -> U) -> Reach<U> {
        match self {
            Self::Answered(t) => Reach::Answered(f(t)),
            Self::Gone => Reach::Gone,
            Self::Unknown(e) => Reach::Unknown(e),
        }
    }
}

/// Whether `server` has a logged-in connection of `user_id`. A server that advertises no
/// internal address cannot be asked: trust the slot.
async fn holds_user(state: &AppState, server: &ServiceInfo, user_id: u64) -> Reach<bool> {
    if server.internal_addr.is_empty() {
        return Reach::Answered(true);
    }
    let req = PresenceRequest {
        user_ids: vec![user_id],
    };
    Reach::of(
        state
            .cluster()
            .call::<_, PresenceResponse>(&server.internal_addr, PRESENCE_PATH, &req)
            .await,
    )
    .map(|resp| resp.connected.iter().any(|c| c.user_id == user_id))
}

/// Kicks the connection of login session `session` of `user_id` off `server` (REPLACED),
/// before its slot is given to a new login. `Answered` once the server has closed it or
/// does not have it (the server then refuses it should its attach still be on the way).
async fn end_connection(
    state: &AppState,
    server: &ServiceInfo,
    user_id: u64,
    session: &str,
) -> Reach<()> {
    if server.internal_addr.is_empty() {
        return Reach::Unknown(ClusterError::Rpc {
            url: server.id.clone(),
            reason: "the server advertises no internal address".into(),
        });
    }
    let req = KickRequest {
        user_ids: vec![user_id],
        kick: Some(Kick {
            reason: KickReason::Replaced as i32,
            message: "this account logged in again elsewhere".into(),
        }),
        session: session.to_string(),
    };
    Reach::of(
        state
            .cluster()
            .call::<_, KickResponse>(&server.internal_addr, KICK_PATH, &req)
            .await,
    )
    .map(|_| ())
}

/// Log out.
///
/// Ends the caller's login session: frees the single-login slot, invalidates the session token
/// (for every call, and for resuming: with every earlier one of the user) and closes the
/// session's connection (best effort).
#[utoipa::path(
    post,
    path = "/api/logout",
    tag = "accounts",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Logged out", body = OkBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn logout(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<Json<OkBody>, AppError> {
    // First, so that no resume gets in between: this session token and every earlier one
    // stop resuming.
    state
        .store()
        .next_generation(user.user_id, state.config().session_token_ttl())
        .await?;
    let attached = state
        .store()
        .release_login(user.user_id, &user.session)
        .await?;
    tracing::info!(user_id = user.user_id, "logged out");
    // The slot is free now; close the connection too so the session really ends. Best
    // effort: if the kick fails, the connection's heartbeat ends it, and its detach is a
    // no-op on the slot we already released.
    let servers = state.servers();
    if let Some(server) = attached.as_deref().and_then(|id| live_server(&servers, id)) {
        let req = KickRequest {
            user_ids: vec![user.user_id],
            kick: Some(Kick {
                reason: KickReason::LoggedOut as i32,
                message: "logged out".into(),
            }),
            session: user.session.clone(),
        };
        if server.internal_addr.is_empty() {
            tracing::warn!(server = %server.id, "cannot kick: server advertises no internal address");
        } else if let Err(e) = state
            .cluster()
            .call::<_, KickResponse>(&server.internal_addr, KICK_PATH, &req)
            .await
        {
            tracing::warn!(server = %server.id, user_id = user.user_id, error = %e, "kick after logout failed");
        }
    }
    Ok(Json(OkBody { ok: true }))
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(validate_name("alice", 32), Ok(()));
        assert_eq!(validate_name("Ålice_2.0-ü", 32), Ok(()));
        assert_eq!(
            validate_name(&"é".repeat(32), 32),
            Ok(()),
            "counted in characters"
        );
        for bad in [
            "",
            "   ",
            "a b",
            " alice",
            "alice\t",
            "a\u{1f}b",
            "a\u{7f}",
            "a;b",
            "a@b",
            "#a",
            "a|b",
            "a\u{3000}b",
        ] {
            assert!(validate_name(bad, 32).is_err(), "{bad:?} must be rejected");
        }
        assert!(validate_name(&"a".repeat(33), 32).is_err());
    }

    #[test]
    fn passwords() {
        assert!(validate_password("12345", 6, 256).is_err());
        assert_eq!(validate_password("123456", 6, 256), Ok(()));
        assert_eq!(validate_password(&"ü".repeat(256), 6, 256), Ok(()));
        assert!(validate_password(&"a".repeat(257), 6, 256).is_err());
    }
}
