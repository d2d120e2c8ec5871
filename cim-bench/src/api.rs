//! The route's business API as the bench uses it (`X-Api-Key`): connect-only accounts in
//! bulk, the admin connect call (a login session on a chosen server), presence and the online
//! count. Through it the bench logs its users in the way the route logs anybody in, so it
//! needs neither the cluster secret nor Redis, and cannot drift from the real login.

use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Value};
use std::time::Duration;

/// Most names per bulk request (the route's `MAX_BULK_USERS`).
pub const BULK_MAX: usize = 1000;

/// Most ids per presence request: half the route's default `max_receivers` (1000), so a
/// route configured lower still answers.
pub const PRESENCE_MAX: usize = 500;

/// Deadline of one call: above the route's request deadline (10 s by default), so the route's
/// own `timeout` answer arrives rather than ours.
const CALL_DEADLINE: Duration = Duration::from_secs(15);

/// A client of one route's business API.
#[derive(Clone)]
pub struct RouteApi {
    http: reqwest::Client,
    base: String,
    key: String,
}

/// Why a call failed: the route's error answer, or no answer.
#[derive(Debug)]
pub enum CallError {
    /// The route answered with an error (`code` from its `{"error":{"code"}}` body).
    Api {
        status: u16,
        code: String,
        message: String,
    },
    Http(reqwest::Error),
}

impl CallError {
    /// A short, stable reason for the reports (they count failures by it).
    pub fn reason(&self) -> String {
        match self {
            CallError::Api { code, .. } => format!("login: {code}"),
            CallError::Http(e) if e.is_timeout() => "login: timeout".into(),
            CallError::Http(_) => "login: route unreachable".into(),
        }
    }

    /// The route refused because the user is logged in elsewhere.
    pub fn is_logged_in_elsewhere(&self) -> bool {
        matches!(self, CallError::Api { code, .. } if code == "already_logged_in")
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Api {
                status,
                code,
                message,
            } => write!(f, "{status} {code}: {message}"),
            CallError::Http(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CallError {}

/// What the bench reads of the admin connect call's answer (the body of `/api/login`).
#[derive(Debug, Deserialize)]
pub struct Session {
    pub connect_token: String,
    pub server: SessionServer,
}

#[derive(Debug, Deserialize)]
pub struct SessionServer {
    pub id: String,
}

#[derive(Deserialize)]
struct BulkCreated {
    users: Vec<BulkUser>,
}

#[derive(Deserialize)]
struct BulkUser {
    name: String,
    user_id: u64,
}

#[derive(Deserialize)]
struct PresenceList {
    users: Vec<UserPresence>,
}

#[derive(Deserialize)]
struct UserPresence {
    online: bool,
}

#[derive(Deserialize)]
struct OnlineCount {
    online: u64,
}

impl RouteApi {
    /// A client of the route at `base` (e.g. `http://127.0.0.1:8080`) with API key `key`.
    pub fn new(base: &str, key: &str) -> anyhow::Result<Self> {
        if key.is_empty() {
            anyhow::bail!("no API key: give one of the route's api_keys with --api-key");
        }
        let http = reqwest::Client::builder()
            .timeout(CALL_DEADLINE)
            .build()
            .map_err(|e| anyhow::anyhow!("building the HTTP client: {e}"))?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            key: key.to_string(),
        })
    }

    async fn answer<T: DeserializeOwned>(req: reqwest::RequestBuilder) -> Result<T, CallError> {
        let resp = req.send().await.map_err(CallError::Http)?;
        let status = resp.status();
        if status.is_success() {
            return resp.json().await.map_err(CallError::Http);
        }
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let text = |field: &str| {
            body["error"][field]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        Err(CallError::Api {
            status: status.as_u16(),
            code: match text("code") {
                c if c.is_empty() => format!("http_{}", status.as_u16()),
                c => c,
            },
            message: text("message"),
        })
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, CallError> {
        let req = self
            .http
            .post(format!("{}{path}", self.base))
            .header("x-api-key", &self.key)
            .json(body);
        Self::answer(req).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CallError> {
        let req = self
            .http
            .get(format!("{}{path}", self.base))
            .header("x-api-key", &self.key);
        Self::answer(req).await
    }

    /// The ids of accounts `names` (in order), creating the missing ones as connect-only
    /// accounts ([`BULK_MAX`] per request).
    pub async fn bulk_users(&self, names: &[String]) -> anyhow::Result<Vec<u64>> {
        let mut ids = Vec::with_capacity(names.len());
        for chunk in names.chunks(BULK_MAX) {
            let created: BulkCreated = self
                .post("/api/admin/users/bulk", &json!({ "names": chunk }))
                .await
                .map_err(|e| anyhow::anyhow!("creating bench accounts through the route: {e}"))?;
            let answered: Vec<&str> = created.users.iter().map(|u| u.name.as_str()).collect();
            if answered != chunk {
                anyhow::bail!("the route answered other accounts than the bench asked for");
            }
            ids.extend(created.users.iter().map(|u| u.user_id));
        }
        Ok(ids)
    }

    /// A login session of user `id` on live server `server_id` (its single-use connect
    /// token expires after the route's `connect_token_ttl`, 30 s by default).
    pub async fn connect(&self, id: u64, server_id: &str) -> Result<Session, CallError> {
        self.post(
            &format!("/api/admin/users/{id}/connect"),
            &json!({ "server_id": server_id }),
        )
        .await
    }

    /// Creates a stored group owned by `owner` with `members` (the route's `max_members`
    /// bounds them) and returns its id.
    pub async fn create_group(
        &self,
        owner: u64,
        name: &str,
        members: &[u64],
    ) -> anyhow::Result<u64> {
        let created: cim_proto::api::CreatedGroup = self
            .post(
                "/api/admin/groups",
                &json!({ "name": name, "owner": owner, "members": members }),
            )
            .await
            .map_err(|e| anyhow::anyhow!("creating the bench group through the route: {e}"))?;
        Ok(created.group.id)
    }

    /// How many of `ids` are online (connected to a live server).
    pub async fn online_of(&self, ids: &[u64]) -> anyhow::Result<usize> {
        let mut online = 0;
        for chunk in ids.chunks(PRESENCE_MAX) {
            let list: Vec<String> = chunk.iter().map(u64::to_string).collect();
            let presence: PresenceList = self
                .get(&format!("/api/admin/presence?user_ids={}", list.join(",")))
                .await
                .map_err(|e| anyhow::anyhow!("asking the route who is online: {e}"))?;
            online += presence.users.iter().filter(|u| u.online).count();
        }
        Ok(online)
    }

    /// Logged-in connections on all live servers.
    pub async fn online_count(&self) -> anyhow::Result<u64> {
        let count: OnlineCount = self
            .get("/api/admin/online/count")
            .await
            .map_err(|e| anyhow::anyhow!("asking the route how many are online: {e}"))?;
        Ok(count.online)
    }
}
