//! Internal calls between cim processes: protobuf bodies over HTTP/1.1 keep-alive connections,
//! authenticated by the cluster secret in a header. The client side is [`ClusterClient`]; the
//! server side (axum) is [`Protobuf`] plus [`authorized`].

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use prost::Message;
use std::time::Duration;

/// Header carrying the cluster secret.
pub const SECRET_HEADER: &str = "x-cim-cluster-secret";
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// Largest internal request or response body: one client frame of the largest size a server
/// accepts (16 MiB) plus its envelope (sender, ids) must fit in a forward call, or a send near
/// that size would fail on every route as UNAVAILABLE instead of being answered by the route
/// (TOO_LONG past `max_message_len`).
pub const MAX_BODY: usize = 17 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("call to {url} failed: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("call to {url} answered {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("call to {url} answered an undecodable body: {source}")]
    Decode {
        url: String,
        #[source]
        source: prost::DecodeError,
    },
}

/// Constant-time comparison of the presented secret with ours.
pub fn authorized(headers: &HeaderMap, secret: &str) -> bool {
    use subtle::ConstantTimeEq;
    headers
        .get(SECRET_HEADER)
        .is_some_and(|v| v.as_bytes().ct_eq(secret.as_bytes()).into())
}

/// Client for internal calls (cheap to clone: one shared connection pool).
#[derive(Clone)]
pub struct ClusterClient {
    http: reqwest::Client,
    secret: String,
}

impl ClusterClient {
    /// Every call has `timeout` as its deadline.
    pub fn new(secret: &str, timeout: Duration) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .expect("http client builds");
        Self {
            http,
            secret: secret.to_string(),
        }
    }

    /// POSTs `req` to `http://{addr}{path}` and decodes the answer.
    pub async fn call<Req: Message, Resp: Message + Default>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
    ) -> Result<Resp, ClusterError> {
        let url = format!("http://{addr}{path}");
        let resp = self
            .http
            .post(&url)
            .header(SECRET_HEADER, &self.secret)
            .header(header::CONTENT_TYPE, CONTENT_TYPE)
            .body(req.encode_to_vec())
            .send()
            .await
            .map_err(|source| ClusterError::Transport {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|source| ClusterError::Transport {
                url: url.clone(),
                source,
            })?;
        if !status.is_success() {
            let body = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
            return Err(ClusterError::Status { url, status, body });
        }
        Resp::decode(body).map_err(|source| ClusterError::Decode { url, source })
    }
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

/// The rejection for a call without the right secret.
pub fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, "missing or wrong cluster secret").into_response()
}
