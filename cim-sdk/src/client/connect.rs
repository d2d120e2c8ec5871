//! Opening a connection for the background task: which of a login's server addresses to use
//! ([`server_addr`], by [`super::TlsMode`]) and connecting and logging in to it ([`open`]).

use super::{ClientError, TlsMode, CONNECT_TIMEOUT};
use crate::{
    conn::{ConnError, ConnectOptions, Connection},
    route::{LoginInfo, RouteClient},
    tls::ClientTls,
    Transport,
};
use std::time::Duration;

/// A connection the background task can run: connected and logged in.
pub(crate) struct Live {
    pub conn: Connection,
    pub server_id: String,
    pub addr: String,
    pub heartbeat: Duration,
    /// Largest frame the server accepts (0: unknown, not checked).
    pub max_frame_len: usize,
    pub since: tokio::time::Instant,
}

/// The address to connect to for `login` and whether it is a TLS one, by `mode` (see
/// [`TlsMode`]); `https_route`: the route URL is `https://`.
pub(super) fn server_addr(
    login: &LoginInfo,
    transport: Transport,
    mode: TlsMode,
    https_route: bool,
) -> Result<(&str, bool), ClientError> {
    let (plain, secure) = match transport {
        Transport::Tcp => (&login.server.tcp_addr, &login.server.tls_addr),
        Transport::WsBinary | Transport::WsJson => (&login.server.ws_addr, &login.server.wss_addr),
    };
    let secure = secure.as_deref().filter(|a| !a.is_empty());
    match (mode, secure) {
        (TlsMode::Off, _) | (TlsMode::Auto, None) => Ok((plain, false)),
        (TlsMode::Auto, Some(addr)) if https_route => Ok((addr, true)),
        (TlsMode::Auto, Some(_)) => Ok((plain, false)),
        (TlsMode::On, Some(addr)) => Ok((addr, true)),
        (TlsMode::On, None) => Err(ClientError::Connect(format!(
            "server {} offers no TLS address for {transport:?} (TLS is required)",
            login.server.id
        ))),
    }
}

/// Connects to the server `login` assigned (plain or TLS, see [`server_addr`]) and presents
/// its connect token. TLS trusts what `route` trusts.
pub(crate) async fn open(
    login: &LoginInfo,
    transport: Transport,
    mode: TlsMode,
    route: &RouteClient,
) -> Result<Live, ClientError> {
    let (addr, secure) = server_addr(login, transport, mode, route.is_https())?;
    let connect = async {
        match (secure, route.tls()) {
            (false, _) => Connection::connect(addr, transport).await,
            (true, Some(tls)) => {
                Connection::connect_tls(addr, transport, ConnectOptions::default(), tls).await
            }
            (true, None) => {
                let tls = ClientTls::new(None).map_err(|e| ConnError::Tls {
                    addr: addr.to_string(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                Connection::connect_tls(addr, transport, ConnectOptions::default(), &tls).await
            }
        }
    };
    let addr = &addr.to_string();
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| ClientError::Connect(format!("connecting to {addr} timed out")))?
        .map_err(|e| ClientError::Connect(e.to_string()))?;
    let result = conn
        .login(&login.connect_token)
        .await
        .map_err(|e| match e {
            ConnError::LoginRefused { code, message } => {
                ClientError::LoginRefused { code, message }
            }
            e => ClientError::Connect(format!("login at {addr}: {e}")),
        })?;
    // A server that states no interval still times out silent connections: ping at the
    // documented default.
    let heartbeat = match result.heartbeat_interval_ms {
        0 => Duration::from_secs(10),
        ms => Duration::from_millis(u64::from(ms)),
    };
    Ok(Live {
        conn,
        server_id: result.server_id,
        addr: addr.clone(),
        heartbeat,
        max_frame_len: usize::try_from(result.max_frame_len).unwrap_or(usize::MAX),
        since: tokio::time::Instant::now(),
    })
}
