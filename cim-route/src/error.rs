//! The one error shape of the public API, `{"error":{"code":"snake_case","message":"text"}}`,
//! and the extractors and middleware that make every failure use it: handler errors
//! ([`AppError`]), body and query rejections ([`ApiJson`], [`ApiQuery`]), and responses the
//! framework or the service stack generate on their own ([`normalize_errors`],
//! [`overloaded`]).

use axum::{
    extract::{rejection::JsonRejection, FromRequest, FromRequestParts, Query, Request},
    http::{header, request::Parts, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    BoxError, Json,
};
use cim_common::store::StoreError;
pub use cim_proto::api::ErrorCode;
use cim_proto::api::{ErrorBody, ErrorDetail};
use serde::de::DeserializeOwned;

/// A failed request: status, stable machine-readable code, human message, and (for 5xx) the
/// cause, which is logged but never sent to the client.
#[derive(Debug)]
pub struct AppError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    cause: Option<String>,
    /// Seconds for a `Retry-After` header (429 and 503 answers that know when to retry).
    retry_after: Option<u64>,
}

impl AppError {
    /// `code` is an [`ErrorCode`] or its wire string (`"name_taken"`); a string that names no
    /// code this build knows is a bug (debug builds panic, so every test catches it).
    pub fn new(status: StatusCode, code: impl Into<ErrorCode>, message: impl Into<String>) -> Self {
        let code = code.into();
        debug_assert!(
            code.known_str().is_some(),
            "{code:?} is not an ErrorCode: add it to cim_proto::api::ErrorCode"
        );
        Self {
            status,
            code,
            message: message.into(),
            cause: None,
            retry_after: None,
        }
    }

    /// 429 `code`, with `Retry-After` rounded up to whole seconds (at least 1).
    pub fn too_many(
        code: impl Into<ErrorCode>,
        message: impl Into<String>,
        wait: std::time::Duration,
    ) -> Self {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        Self {
            retry_after: Some(secs.max(1)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        }
    }

    /// Attaches the underlying cause (logged for server errors, never shown to clients).
    pub fn with_cause(mut self, cause: impl std::fmt::Display) -> Self {
        self.cause = Some(cause.to_string());
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    pub fn unauthorized(code: impl Into<ErrorCode>, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn unavailable(cause: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "a backend is unavailable, retry later",
        )
        .with_cause(cause)
    }

    pub fn internal(cause: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "internal error",
        )
        .with_cause(cause)
    }
}

impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for AppError {}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => AppError::unavailable(e),
            StoreError::Corrupt(_) | StoreError::Unsupported(_) => AppError::internal(e),
        }
    }
}

/// The JSON error response for `status`, `code`, `message`.
pub fn error_response(status: StatusCode, code: &ErrorCode, message: &str) -> Response {
    let mut resp = (
        status,
        Json(ErrorBody {
            error: ErrorDetail {
                code: code.clone(),
                message: message.to_owned(),
            },
        }),
    )
        .into_response();
    // Tell HTTP clients which scheme is expected (RFC 9110 requires it on 401).
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            match &self.cause {
                Some(cause) => tracing::error!(code = %self.code, %cause, "request failed"),
                None => {
                    tracing::warn!(code = %self.code, message = %self.message, "request failed")
                }
            }
        }
        let mut response = error_response(self.status, &self.code, &self.message);
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

/// `axum::Json` whose rejections (wrong content type, malformed JSON, wrong fields, body too
/// large) answer in the API's error shape.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> AppError {
    let status = rejection.status();
    let (status, code) = match &rejection {
        JsonRejection::MissingJsonContentType(_) => (status, ErrorCode::UnsupportedMediaType),
        JsonRejection::JsonSyntaxError(_) => (status, ErrorCode::InvalidJson),
        // Well-formed JSON of the wrong shape (missing field, wrong type): axum says 422; we
        // answer 400 like every other malformed request, so clients handle one status.
        JsonRejection::JsonDataError(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => (status, ErrorCode::PayloadTooLarge),
        _ => (status, ErrorCode::BadRequest),
    };
    // The rejection text names the offending field or position; it never echoes the body.
    AppError::new(status, code, rejection.body_text())
}

/// `axum::extract::Query` whose rejection answers 400 `bad_request` in the API's shape.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|r| AppError::bad_request(r.body_text()))
    }
}

/// Middleware (`map_response`): rewrites error responses that did not come from our handlers
/// (404 for unknown paths, 405, 413 from the body limit, the request timeout) into the JSON
/// shape, so clients parse exactly one error format.
pub async fn normalize_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return resp;
    }
    let (code, message) = match status {
        StatusCode::NOT_FOUND => (ErrorCode::NotFound, "no such endpoint"),
        StatusCode::METHOD_NOT_ALLOWED => (ErrorCode::MethodNotAllowed, "method not allowed here"),
        StatusCode::PAYLOAD_TOO_LARGE => (ErrorCode::PayloadTooLarge, "request body is too large"),
        StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => {
            (ErrorCode::Timeout, "the request took too long")
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            (ErrorCode::Unavailable, "service unavailable, retry later")
        }
        s if s.is_server_error() => (ErrorCode::Internal, "internal error"),
        _ => (ErrorCode::BadRequest, "bad request"),
    };
    let (mut parts, _) = resp.into_parts();
    let mut fresh = error_response(status, &code, message);
    // Keep informative headers such as `Allow` on a 405.
    parts.headers.remove(header::CONTENT_TYPE);
    parts.headers.remove(header::CONTENT_LENGTH);
    for (name, value) in parts.headers.iter() {
        fresh.headers_mut().insert(name.clone(), value.clone());
    }
    fresh
}

/// Error handler of the load-shedding stack: shed requests answer 503 `overloaded`.
pub async fn overloaded(err: BoxError) -> Response {
    if err.is::<tower::load_shed::error::Overloaded>() {
        tracing::warn!("request shed: concurrency limit reached");
        error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &ErrorCode::Overloaded,
            "too many requests in flight, retry later",
        )
    } else {
        AppError::internal(err).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_json(resp: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn app_error_has_the_api_shape() {
        let resp = AppError::new(StatusCode::CONFLICT, "name_taken", "taken").into_response();
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        let v = body_json(resp).await;
        assert_eq!(v["error"]["code"], "name_taken");
        assert_eq!(v["error"]["message"], "taken");
    }

    #[tokio::test]
    async fn internal_causes_are_not_sent() {
        let resp = AppError::internal("redis password is hunter2").into_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let text = body_json(resp).await.to_string();
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[tokio::test]
    async fn plain_framework_errors_become_json() {
        let plain = (StatusCode::PAYLOAD_TOO_LARGE, "length limit exceeded").into_response();
        let resp = normalize_errors(plain).await;
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body_json(resp).await["error"]["code"], "payload_too_large");
        let ok = normalize_errors(StatusCode::OK.into_response()).await;
        assert_eq!(ok.status(), StatusCode::OK);
    }
}
