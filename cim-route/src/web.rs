//! The web chat client: three static files (`cim-route/web/`) compiled into the binary and
//! served at `/`, `/app.js` and `/style.css`. No build step, no framework: the page talks to
//! this route's HTTP API on its own origin and to the assigned server's WebSocket (`/ws`,
//! proto3 JSON text frames) on that server's port.
//!
//! Every answer carries `Cache-Control: no-cache` (a new route version is picked up at once)
//! and a strict Content-Security-Policy: scripts and styles only from this origin (no inline
//! code, so injected markup cannot run), connections to this origin and to servers' WebSocket
//! ports elsewhere.

use crate::state::AppState;
use axum::{
    http::{header, HeaderValue},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};

const INDEX_HTML: &str = include_str!("../web/index.html");
const APP_JS: &str = include_str!("../web/app.js");
const STYLE_CSS: &str = include_str!("../web/style.css");

/// The Content-Security-Policy of every file of the page.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; \
     connect-src 'self' ws: wss: http: https:; img-src 'self' data:; style-src 'self'; \
     script-src 'self'";

/// `GET /`, `/index.html`, `/app.js`, `/style.css`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/app.js", get(app_js))
        .route("/style.css", get(style_css))
}

async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    file("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    file("text/css; charset=utf-8", STYLE_CSS)
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::state_with;
    use axum::{body::Body, http::Request, http::StatusCode};
    use cim_common::store::MemoryStore;
    use std::sync::Arc;
    use tower::ServiceExt;

    /// GETs `path` from the public API with its whole service stack, as the route serves it.
    async fn get(path: &str) -> (StatusCode, axum::http::HeaderMap, String) {
        let (state, _servers) = state_with(Arc::new(MemoryStore::new()), vec![], |_| {});
        let app = crate::api::app(state);
        let resp = app
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn serves_the_three_files_with_their_types_and_the_csp() {
        for (path, content_type, marker) in [
            ("/", "text/html; charset=utf-8", "<!doctype html>"),
            ("/index.html", "text/html; charset=utf-8", "<!doctype html>"),
            (
                "/app.js",
                "text/javascript; charset=utf-8",
                "\"use strict\"",
            ),
            ("/style.css", "text/css; charset=utf-8", "@media"),
        ] {
            let (status, headers, body) = get(path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(headers[header::CONTENT_TYPE], content_type, "{path}");
            assert_eq!(headers[header::CACHE_CONTROL], "no-cache", "{path}");
            assert_eq!(
                headers[header::CONTENT_SECURITY_POLICY],
                "default-src 'self'; connect-src 'self' ws: wss: http: https:; \
                 img-src 'self' data:; style-src 'self'; script-src 'self'",
                "{path}"
            );
            assert!(body.to_lowercase().contains(marker), "{path}: {body:.200}");
        }
    }

    #[tokio::test]
    async fn the_page_loads_only_its_own_files() {
        let (_, _, html) = get("/").await;
        assert!(html.contains(r#"<script src="/app.js""#), "{html:.400}");
        assert!(html.contains(r#"href="/style.css""#), "{html:.400}");
        // The CSP forbids inline code: the page must not rely on any.
        assert!(!html.contains("<script>"), "inline script");
        assert!(!html.contains("<style"), "inline style");
        assert!(!html.contains(" style="), "inline style attribute");
        assert!(!html.contains(" onclick="), "inline handler");
    }
}
