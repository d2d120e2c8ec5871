//! Typed calls to the route's HTTP API. Errors carry the route's `{"error":{code,message}}`.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::time::Duration;

/// What a failed call returned.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The route answered with an error body.
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("route unreachable: {0}")]
    Transport(#[from] reqwest::Error),
}

impl RouteError {
    /// The error code (`already_logged_in`, `bad_credentials`, ...), if the route answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            RouteError::Api { code, .. } => Some(code),
            RouteError::Transport(_) => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            RouteError::Api { status, .. } => Some(*status),
            RouteError::Transport(_) => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RegisterInfo {
    pub user_id: u64,
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AssignedServer {
    pub id: String,
    pub tcp_addr: String,
    pub ws_addr: String,
}

/// Answer of a successful login.
#[derive(Debug, Clone, Deserialize)]
pub struct LoginInfo {
    pub user_id: u64,
    pub name: String,
    pub server: AssignedServer,
    pub connect_token: String,
    pub session_token: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OnlineUser {
    pub user_id: u64,
    pub name: String,
    pub server_id: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct OnlinePage {
    pub users: Vec<OnlineUser>,
    pub next: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerInfo {
    pub id: String,
    pub tcp_addr: String,
    pub ws_addr: String,
}

#[derive(Debug, Clone, Deserialize)]
struct ServerList {
    servers: Vec<ServerInfo>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PrivateSent {
    pub id: String,
    pub status: String,
    pub timestamp_ms: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GroupSent {
    pub id: String,
    pub delivered: u64,
    pub timestamp_ms: i64,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

#[derive(Serialize)]
struct Credentials<'a> {
    name: &'a str,
    password: &'a str,
}

/// Client of one route base URL (e.g. `http://127.0.0.1:8080`).
#[derive(Clone)]
pub struct RouteClient {
    base: String,
    http: reqwest::Client,
}

impl RouteClient {
    pub fn new(base_url: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("http client builds");
        Self {
            base: base_url.trim_end_matches('/').to_string(),
            http,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, RouteError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await?);
        }
        let text = resp.text().await?;
        Err(match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => RouteError::Api {
                status: status.as_u16(),
                code: b.error.code,
                message: b.error.message,
            },
            Err(_) => RouteError::Api {
                status: status.as_u16(),
                code: "http_error".into(),
                message: text,
            },
        })
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        bearer: Option<&str>,
        body: &impl Serialize,
    ) -> Result<T, RouteError> {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(body);
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        Self::decode(req.send().await?).await
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        bearer: Option<&str>,
        query: &[(&str, &str)],
    ) -> Result<T, RouteError> {
        let mut req = self.http.get(format!("{}{path}", self.base)).query(query);
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        Self::decode(req.send().await?).await
    }

    pub async fn register(&self, name: &str, password: &str) -> Result<RegisterInfo, RouteError> {
        self.post("/api/register", None, &Credentials { name, password })
            .await
    }

    pub async fn login(&self, name: &str, password: &str) -> Result<LoginInfo, RouteError> {
        self.post("/api/login", None, &Credentials { name, password })
            .await
    }

    pub async fn logout(&self, session_token: &str) -> Result<(), RouteError> {
        let _: serde_json::Value = self
            .post("/api/logout", Some(session_token), &serde_json::json!({}))
            .await?;
        Ok(())
    }

    /// One page of online users; `prefix` filters by name, `after` continues a previous page.
    pub async fn online(
        &self,
        session_token: &str,
        prefix: Option<&str>,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<OnlinePage, RouteError> {
        let limit = limit.map(|l| l.to_string());
        let mut q: Vec<(&str, &str)> = Vec::new();
        if let Some(p) = prefix {
            q.push(("prefix", p));
        }
        if let Some(a) = after {
            q.push(("after", a));
        }
        if let Some(l) = &limit {
            q.push(("limit", l));
        }
        self.get("/api/users/online", Some(session_token), &q).await
    }

    pub async fn servers(&self) -> Result<Vec<ServerInfo>, RouteError> {
        let list: ServerList = self.get("/api/servers", None, &[]).await?;
        Ok(list.servers)
    }

    pub async fn send_private(
        &self,
        session_token: &str,
        to: u64,
        body: &str,
    ) -> Result<PrivateSent, RouteError> {
        self.post(
            "/api/messages/private",
            Some(session_token),
            &serde_json::json!({"to": to, "body": body}),
        )
        .await
    }

    pub async fn send_group(
        &self,
        session_token: &str,
        body: &str,
    ) -> Result<GroupSent, RouteError> {
        self.post(
            "/api/messages/group",
            Some(session_token),
            &serde_json::json!({"body": body}),
        )
        .await
    }
}
