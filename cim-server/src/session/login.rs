//! The login handshake: the first frame must be a Login with a connect token for this
//! server, within the login deadline; then the session is attached in the state store and
//! the connection enters the table, replacing an older one of the same user
//! ([`login`]; [`login_or_close`] closes the connection when it fails).

use super::{
    linger, shutdown_kick,
    write::{fail, write},
    End, RecvError, Transport,
};
use crate::{
    conn::{ConnShared, Outbound},
    pb::{frame::Body, ErrorCode, Frame, KickReason},
    server::ServerState,
};
use cim_common::{
    metrics::frame_kind_index, store::AttachOutcome, time::now_ms, token::TokenError,
};
use std::sync::Arc;
use tracing::{warn, Span};

/// [`login`], closing the connection when it fails.
pub(super) async fn login_or_close<T: Transport>(
    state: &ServerState,
    transport: &mut T,
) -> Option<Arc<ConnShared>> {
    match login(state, transport).await {
        Ok(conn) => Some(conn),
        Err(end) => {
            state.metrics.login_failed(&end);
            end.log();
            transport.close(linger(state)).await;
            None
        }
    }
}

/// Waits for the Login frame and checks it. On success the connection is attached and in the
/// table (the caller must clean up); on failure nothing needs undoing.
async fn login<T: Transport>(
    state: &ServerState,
    transport: &mut T,
) -> Result<Arc<ConnShared>, End> {
    let config = &state.config;
    let first = tokio::select! {
        biased;
        () = state.cancel.cancelled() => {
            let _ = write(state, transport, &[shutdown_kick()], config.write_timeout()).await;
            return Err(End::Shutdown);
        }
        r = tokio::time::timeout(config.login_timeout(), transport.recv()) => r,
    };
    let frame = match first {
        Err(_) => {
            let msg = format!("no Login frame within {} ms", config.login_timeout_ms);
            return Err(fail(state, transport, ErrorCode::LoginTimeout, msg).await);
        }
        Ok(Ok(None)) => return Err(End::PeerClosed),
        Ok(Err(RecvError::Io(e))) => return Err(End::ReadFailed(e)),
        Ok(Err(RecvError::Protocol { code, message })) => {
            return Err(fail(state, transport, code, message).await)
        }
        Ok(Ok(Some(frame))) => frame,
    };
    state.metrics.frames_in.get(frame_kind_index(&frame)).inc();
    let token = match frame.body {
        Some(Body::Login(login)) => login.token,
        _ => {
            let msg = format!("the first frame must be a Login, got {}", frame.kind_name());
            return Err(fail(state, transport, ErrorCode::LoginRequired, msg).await);
        }
    };
    let claims = match state.signer.verify_connect(&token, now_ms()) {
        Ok(claims) => claims,
        Err(TokenError::Expired) => {
            let msg = "connect token expired: log in again".to_string();
            return Err(fail(state, transport, ErrorCode::TokenExpired, msg).await);
        }
        Err(e) => {
            let msg = format!("invalid connect token: {e}");
            return Err(fail(state, transport, ErrorCode::InvalidToken, msg).await);
        }
    };
    if claims.server_id != state.id {
        let msg = format!(
            "the token is for server {}, this is {}: log in again",
            claims.server_id, state.id
        );
        return Err(fail(state, transport, ErrorCode::WrongServer, msg).await);
    }
    Span::current().record("user_id", claims.user_id);
    match state
        .store
        .attach(
            claims.user_id,
            &claims.user_name,
            &claims.session,
            &state.id,
        )
        .await
    {
        Ok(AttachOutcome::Attached) => {}
        Ok(AttachOutcome::SessionInvalid) => {
            let msg = "login session not pending: the token was already used or the session \
                       ended; log in again"
                .to_string();
            return Err(fail(state, transport, ErrorCode::SessionInvalid, msg).await);
        }
        Err(e) => {
            warn!(error = %e, "attach failed");
            let msg = "state store unavailable, retry later".to_string();
            return Err(fail(state, transport, ErrorCode::Unavailable, msg).await);
        }
    }
    // Attached before entering the table (a replayed token must not kick the legitimate
    // connection), so a push arriving in between finds nobody here; delivery guarantees
    // (inbox replay) cover that window.
    let conn = Arc::new(ConnShared::new(
        claims.user_id,
        claims.user_name,
        claims.session,
        config.outbound_queue_frames,
    ));
    if let Some(old) = state.table.insert(conn.clone()) {
        let kick = Frame::kick(
            KickReason::Replaced,
            "a newer connection of this user took over",
        );
        old.close(Outbound::new(kick), KickReason::Replaced, true);
    }
    // A route ended this session between its attach and now (a login that replaced it).
    if state.table.entered_ended(&conn) {
        let kick = Frame::kick(
            KickReason::Replaced,
            "this account logged in again elsewhere",
        );
        conn.close(Outbound::new(kick), KickReason::Replaced, true);
    }
    // A shutdown kicks the connections in the table; one that entered after that sweep
    // sees the cancellation here (the table lock orders the two).
    if state.cancel.is_cancelled() {
        conn.close(shutdown_kick(), KickReason::ServerShutdown, true);
    }
    Ok(conn)
}
