//! The serving side of internal calls (axum): the authentication check of a request
//! ([`authorize`], [`authorized`], [`unauthorized`]), the protobuf extractor and response
//! ([`Protobuf`]), and internal listeners without Nagle ([`without_nagle`]). The cim-rpc
//! upgrade is [`super::rpc::endpoint`].

use super::{AUTH_HEADER, CONTENT_TYPE, SECRET_HEADER};
use crate::secret::{Keyring, Refusal};
use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use prost::Message;

/// Whether an internal request is authenticated for `keys` ([`Keyring::check`]).
pub fn authorized(headers: &HeaderMap, keys: &Keyring) -> bool {
    authorize(headers, keys).is_ok()
}

/// Checks an internal request's headers. The refusal answers as a 401 that says why (for
/// whoever runs the calling node: a wrong secret, a clock off by minutes, legacy form refused).
pub fn authorize(headers: &HeaderMap, keys: &Keyring) -> Result<(), Refusal> {
    keys.check(
        headers.get(AUTH_HEADER).map(|v| v.as_bytes()),
        headers.get(SECRET_HEADER).map(|v| v.as_bytes()),
        crate::secret::now_secs(),
    )
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (StatusCode::UNAUTHORIZED, self.to_string()).into_response()
    }
}

/// `listener` with Nagle's algorithm off on every connection it accepts. A cim-rpc connection
/// carries small answers while others are still unacknowledged, and Nagle would hold each of
/// those back until the caller's delayed ACK (tens of milliseconds). Callers' connections
/// already have it off (`ClusterClient`).
pub fn without_nagle(
    listener: tokio::net::TcpListener,
) -> axum::serve::TapIo<tokio::net::TcpListener, fn(&mut tokio::net::TcpStream)> {
    use axum::serve::ListenerExt;
    // A named type (not `impl Listener`): axum then knows the peer address is connect info.
    fn no_delay(tcp: &mut tokio::net::TcpStream) {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot turn Nagle's algorithm off");
        }
    }
    listener.tap_io(no_delay as fn(&mut tokio::net::TcpStream))
}

/// Axum extractor and response for protobuf bodies.
pub struct Protobuf<T>(pub T);

impl<T: Message + Default, S: Send + Sync> FromRequest<S> for Protobuf<T> {
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(IntoResponse::into_response)?;
        T::decode(bytes).map(Protobuf).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("undecodable protobuf body: {e}"),
            )
                .into_response()
        })
    }
}

impl<T: Message> IntoResponse for Protobuf<T> {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, CONTENT_TYPE)],
            self.0.encode_to_vec(),
        )
            .into_response()
    }
}

/// The rejection for a call without valid authentication (see [`authorize`] for one that
/// says why).
pub fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        "missing or wrong cluster authentication",
    )
        .into_response()
}
