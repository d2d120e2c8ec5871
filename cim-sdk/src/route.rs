//! Typed calls to the route's HTTP API. Errors carry the route's `{"error":{code,message}}`.

use crate::tls::ClientTls;
pub use cim_proto::api::{
    Added, ChannelPage, ConversationView, CreatedGroup, ErrorCode, GroupChange, GroupChatSent,
    GroupMemberView, GroupMembersPage, GroupSent, GroupView, Joined, Left, MemberPage, OnlinePage,
    OnlineUser, PrivateSent, ServerAddrs,
};
use cim_proto::api::{ChannelList, Credentials, ErrorBody, ServerList};
/// The SDK's names for the route's answers (one type each, from `cim_proto::api`).
pub use cim_proto::api::{
    ChannelView as ChannelInfo, GroupSent as ChannelSent, LoggedIn as LoginInfo,
    Member as ChannelMember, Registered as RegisterInfo, ServerAddrs as ServerInfo,
    ServerAddrs as AssignedServer,
};
use cim_proto::api::{ConversationList, GroupAnswer, GroupList, MessagePage, ReadMarkAnswer};
use serde::{de::DeserializeOwned, Serialize};
use std::time::Duration;

/// Whether `url` is an `https://` URL (scheme compared without case).
pub fn is_https(url: &str) -> bool {
    url.get(..8)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("https://"))
}

/// What a failed call returned.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The route answered with an error body.
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    /// No answer: says why in the words of the deepest cause ("Connection refused (os error
    /// 111)"), not reqwest's "error sending request for url (…)", which names the call's URL
    /// (a reconnect's logout, say) rather than what the user is waiting for.
    #[error("route unreachable: {}", root_cause(.0))]
    Transport(#[from] reqwest::Error),
}

/// The innermost error of `e`'s source chain, displayed.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

impl RouteError {
    /// The error code, if the route answered (a newer route's unknown code is
    /// [`ErrorCode::Other`]).
    pub fn error_code(&self) -> Option<&ErrorCode> {
        match self {
            RouteError::Api { code, .. } => Some(code),
            RouteError::Transport(_) => None,
        }
    }

    /// The error code as on the wire (`already_logged_in`, `bad_credentials`, ...), if the
    /// route answered.
    pub fn code(&self) -> Option<&str> {
        self.error_code().map(ErrorCode::as_str)
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            RouteError::Api { status, .. } => Some(*status),
            RouteError::Transport(_) => None,
        }
    }
}

/// Longest channel name, in characters.
pub const MAX_CHANNEL_NAME_CHARS: usize = cim_proto::ids::MAX_CHANNEL_NAME_LEN;

/// Why `name` cannot be a channel name, or `None` when it can. The route's rule: 1 to
/// [`MAX_CHANNEL_NAME_CHARS`] characters, each a Unicode letter or digit or one of `_ - .`
/// (so no spaces, `#` or `/`); names are case-sensitive. Also refused: `.` and `..`, which
/// the rule allows but no HTTP client can put in a URL path (URL parsing removes such a
/// segment, so the call would reach another endpoint).
pub fn channel_name_error(name: &str) -> Option<String> {
    let chars = name.chars().count();
    if chars == 0 {
        return Some("a channel name cannot be empty".into());
    }
    if chars > MAX_CHANNEL_NAME_CHARS {
        return Some(format!(
            "a channel name has at most {MAX_CHANNEL_NAME_CHARS} characters ({chars} given)"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Some(format!(
            "{:?} is not a channel name: {bad:?} is not allowed (letters, digits, _ - . only)",
            name
        ));
    }
    if cim_proto::ids::RESERVED_CHANNEL_NAMES.contains(&name) {
        return Some(format!(
            "{name:?} is reserved and cannot be used as a channel name"
        ));
    }
    debug_assert!(cim_proto::ids::valid_channel_name(name), "{name:?}");
    None
}

/// Whether `name` is a valid channel name (see [`channel_name_error`]).
pub fn is_channel_name(name: &str) -> bool {
    channel_name_error(name).is_none()
}

/// `s` percent-encoded for a URL path segment: ASCII letters, digits and `_ - .` stay,
/// every other byte (non-ASCII letters as UTF-8) becomes `%XX`.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn credentials(name: &str, password: &str) -> Credentials {
    Credentials {
        name: name.to_owned(),
        password: password.to_owned(),
    }
}

/// Client of one route base URL (e.g. `http://127.0.0.1:8080`, or `https://…`).
#[derive(Clone)]
pub struct RouteClient {
    base: String,
    http: reqwest::Client,
    tls: Option<ClientTls>,
}

impl RouteClient {
    /// A client of `base_url`; an `https://` URL trusts the system's roots.
    pub fn new(base_url: &str) -> Self {
        Self::with_tls(base_url, None)
    }

    /// A client of `base_url` whose HTTPS (and the TLS connections made with
    /// [`RouteClient::tls`]) trusts what `tls` trusts. `None`: the system's roots, loaded
    /// only for an `https://` URL.
    pub fn with_tls(base_url: &str, tls: Option<ClientTls>) -> Self {
        let base = base_url.trim_end_matches('/').to_string();
        let tls = tls.or_else(|| {
            is_https(&base)
                .then(|| ClientTls::new(None))
                .and_then(|made| {
                    made.map_err(|e| tracing::warn!(error = %e, "TLS setup failed"))
                        .ok()
                })
        });
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(15));
        if let Some(tls) = &tls {
            builder = builder.use_preconfigured_tls(tls.rustls_config());
        }
        Self {
            base,
            http: builder.build().expect("http client builds"),
            tls,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Whether the route is reached over HTTPS.
    pub fn is_https(&self) -> bool {
        is_https(&self.base)
    }

    /// What this client trusts, when it was given or needed (an `https://` URL).
    pub fn tls(&self) -> Option<&ClientTls> {
        self.tls.as_ref()
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
                code: ErrorCode::HttpError,
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

    /// `{base}/api/channels/{name}{suffix}`, the name percent-encoded as one path segment.
    fn channel_url(&self, name: &str, suffix: &str) -> Result<String, RouteError> {
        // Checked here too: a reserved name (`.`, `..`: removed by URL parsers) never leaves.
        if let Some(why) = channel_name_error(name) {
            return Err(RouteError::Api {
                status: 400,
                code: ErrorCode::InvalidChannel,
                message: why,
            });
        }
        Ok(format!(
            "{}/api/channels/{}{suffix}",
            self.base,
            encode_segment(name)
        ))
    }

    async fn send_json<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        bearer: &str,
    ) -> Result<T, RouteError> {
        Self::decode(req.bearer_auth(bearer).send().await?).await
    }

    pub async fn register(&self, name: &str, password: &str) -> Result<RegisterInfo, RouteError> {
        self.post("/api/register", None, &credentials(name, password))
            .await
    }

    pub async fn login(&self, name: &str, password: &str) -> Result<LoginInfo, RouteError> {
        self.post("/api/login", None, &credentials(name, password))
            .await
    }

    /// Logs in again with the session token of a previous login (no password): the route
    /// replaces that session with a new one, ending its old connection if still open.
    /// 401 when that session has ended; 404 from a route older than this call.
    pub async fn resume(&self, session_token: &str) -> Result<LoginInfo, RouteError> {
        self.post(
            "/api/login/resume",
            Some(session_token),
            &serde_json::json!({}),
        )
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

    /// Joins channel `name` as the session's user (creating it if it had no member).
    /// `joined` is false when already a member; over the per-user limit: 409
    /// `too_many_channels`; a bad name: 400 `invalid_channel` (checked before sending).
    pub async fn join_channel(
        &self,
        session_token: &str,
        name: &str,
    ) -> Result<Joined, RouteError> {
        let url = self.channel_url(name, "/join")?;
        let req = self.http.post(url).json(&serde_json::json!({}));
        self.send_json(req, session_token).await
    }

    /// Leaves channel `name`; `left` is false when the user was not a member.
    pub async fn leave_channel(&self, session_token: &str, name: &str) -> Result<Left, RouteError> {
        let url = self.channel_url(name, "/leave")?;
        let req = self.http.post(url).json(&serde_json::json!({}));
        self.send_json(req, session_token).await
    }

    /// The session user's channels with their counts, in name order.
    pub async fn my_channels(&self, session_token: &str) -> Result<Vec<ChannelInfo>, RouteError> {
        let mine: ChannelList = self
            .get("/api/channels/mine", Some(session_token), &[])
            .await?;
        Ok(mine.channels)
    }

    /// One page of all channels (those with at least one member), in name order, after the
    /// channel `after` (the previous page's `next`).
    pub async fn channels(
        &self,
        session_token: &str,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<ChannelPage, RouteError> {
        let limit = limit.map(|l| l.to_string());
        let mut q: Vec<(&str, &str)> = Vec::new();
        if let Some(a) = after {
            q.push(("after", a));
        }
        if let Some(l) = &limit {
            q.push(("limit", l));
        }
        self.get("/api/channels", Some(session_token), &q).await
    }

    /// Counts of channel `name`; 404 `unknown_channel` when it has no member.
    pub async fn channel_info(
        &self,
        session_token: &str,
        name: &str,
    ) -> Result<ChannelInfo, RouteError> {
        let url = self.channel_url(name, "")?;
        self.send_json(self.http.get(url), session_token).await
    }

    /// One page of the members of channel `name`, in user id order, with ids above `after`
    /// (the previous page's `next`).
    pub async fn channel_members(
        &self,
        session_token: &str,
        name: &str,
        after: Option<u64>,
        limit: Option<usize>,
    ) -> Result<MemberPage, RouteError> {
        let url = self.channel_url(name, "/members")?;
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(a) = after {
            q.push(("after", a.to_string()));
        }
        if let Some(l) = limit {
            q.push(("limit", l.to_string()));
        }
        self.send_json(self.http.get(url).query(&q), session_token)
            .await
    }

    /// Sends `body` to the online members of channel `name` (the sender excluded) over HTTP;
    /// 403 `not_a_member` if the session user is not a member. Not stored: members offline
    /// now never get it.
    pub async fn send_channel(
        &self,
        session_token: &str,
        name: &str,
        body: &str,
    ) -> Result<ChannelSent, RouteError> {
        let url = self.channel_url(name, "/messages")?;
        let req = self
            .http
            .post(url)
            .json(&serde_json::json!({ "body": body }));
        self.send_json(req, session_token).await
    }
}

/// Where a history page starts ([`RouteClient::history`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryFrom {
    /// The newest messages.
    Newest,
    /// The newest messages with a `log_seq` below this one (scrolling up).
    Before(u64),
    /// The oldest messages with a `log_seq` above this one (syncing forwards).
    After(u64),
}

/// `user/{id}` or `group/{id}`: a conversation in a path.
fn conversation_path(conversation: &crate::pb::Conversation) -> Result<String, RouteError> {
    match (conversation.user_id, conversation.group_id) {
        (user, 0) if user != 0 => Ok(format!("user/{user}")),
        (0, group) if group != 0 => Ok(format!("group/{group}")),
        _ => Err(RouteError::Api {
            status: 400,
            code: ErrorCode::BadRequest,
            message: "a conversation names one user or one group".into(),
        }),
    }
}

/// Stored groups and conversations (history, unread counts, read marks), as the session's
/// user. A group the user is not in answers 404 `unknown_group`, like one that does not exist.
impl RouteClient {
    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, RouteError> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req.json(&body);
        }
        self.send_json(req, token).await
    }

    /// Creates a group owned by the session's user, with `members` added at once.
    pub async fn create_group(
        &self,
        token: &str,
        name: &str,
        members: &[u64],
    ) -> Result<CreatedGroup, RouteError> {
        let body = serde_json::json!({ "name": name, "members": members });
        self.call(reqwest::Method::POST, "/api/groups", token, Some(body))
            .await
    }

    /// The session user's groups.
    pub async fn my_groups(&self, token: &str) -> Result<Vec<GroupView>, RouteError> {
        let list: GroupList = self
            .call(reqwest::Method::GET, "/api/groups", token, None)
            .await?;
        Ok(list.groups)
    }

    pub async fn group(&self, token: &str, group: u64) -> Result<GroupView, RouteError> {
        let answer: GroupAnswer = self
            .call(
                reqwest::Method::GET,
                &format!("/api/groups/{group}"),
                token,
                None,
            )
            .await?;
        Ok(answer.group)
    }

    /// A page of the group's members in user-id order, ids above `after`.
    pub async fn group_members(
        &self,
        token: &str,
        group: u64,
        after: Option<u64>,
        limit: Option<usize>,
    ) -> Result<GroupMembersPage, RouteError> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(a) = after {
            q.push(("after", a.to_string()));
        }
        if let Some(l) = limit {
            q.push(("limit", l.to_string()));
        }
        let url = format!("{}/api/groups/{group}/members", self.base);
        self.send_json(self.http.get(url).query(&q), token).await
    }

    /// Adds users (owner or admin).
    pub async fn add_group_members(
        &self,
        token: &str,
        group: u64,
        users: &[u64],
    ) -> Result<Added, RouteError> {
        let body = serde_json::json!({ "user_ids": users });
        let path = format!("/api/groups/{group}/members");
        self.call(reqwest::Method::POST, &path, token, Some(body))
            .await
    }

    /// Removes a member (owner or admin; oneself: leave).
    pub async fn remove_group_member(
        &self,
        token: &str,
        group: u64,
        user: u64,
    ) -> Result<GroupChange, RouteError> {
        let path = format!("/api/groups/{group}/members/{user}");
        self.call(reqwest::Method::DELETE, &path, token, None).await
    }

    /// Leaves the group (the owner cannot: 409 `owner_stays`, disband instead).
    pub async fn leave_group(&self, token: &str, group: u64) -> Result<GroupChange, RouteError> {
        let path = format!("/api/groups/{group}/leave");
        self.call(
            reqwest::Method::POST,
            &path,
            token,
            Some(serde_json::json!({})),
        )
        .await
    }

    /// Makes `user` an admin (`admin`) or a plain member (`member`); the owner only.
    pub async fn set_group_role(
        &self,
        token: &str,
        group: u64,
        user: u64,
        role: &str,
    ) -> Result<GroupChange, RouteError> {
        let path = format!("/api/groups/{group}/members/{user}/role");
        let body = serde_json::json!({ "role": role });
        self.call(reqwest::Method::PUT, &path, token, Some(body))
            .await
    }

    /// Renames the group (owner or admin).
    pub async fn rename_group(
        &self,
        token: &str,
        group: u64,
        name: &str,
    ) -> Result<GroupChange, RouteError> {
        let path = format!("/api/groups/{group}");
        let body = serde_json::json!({ "name": name });
        self.call(reqwest::Method::PATCH, &path, token, Some(body))
            .await
    }

    /// Disbands the group (the owner only): its last event, then no members.
    pub async fn disband_group(&self, token: &str, group: u64) -> Result<GroupChange, RouteError> {
        let path = format!("/api/groups/{group}");
        self.call(reqwest::Method::DELETE, &path, token, None).await
    }

    /// Sends `body` to the group over HTTP (members only).
    pub async fn send_group_chat(
        &self,
        token: &str,
        group: u64,
        body: &str,
    ) -> Result<GroupChatSent, RouteError> {
        let path = format!("/api/groups/{group}/messages");
        let body = serde_json::json!({ "body": body });
        self.call(reqwest::Method::POST, &path, token, Some(body))
            .await
    }

    /// The session user's conversations, newest activity first, those with activity before
    /// `before_ms` (the previous page's last `activity_ms`).
    pub async fn conversations(
        &self,
        token: &str,
        before_ms: Option<i64>,
        limit: Option<usize>,
    ) -> Result<Vec<ConversationView>, RouteError> {
        let mut q: Vec<(&str, String)> = Vec::new();
        if let Some(b) = before_ms {
            q.push(("before_ms", b.to_string()));
        }
        if let Some(l) = limit {
            q.push(("limit", l.to_string()));
        }
        let url = format!("{}/api/conversations", self.base);
        let list: ConversationList = self.send_json(self.http.get(url).query(&q), token).await?;
        Ok(list.conversations)
    }

    /// A page of a conversation's messages, oldest first.
    pub async fn history(
        &self,
        token: &str,
        conversation: &crate::pb::Conversation,
        from: HistoryFrom,
        limit: Option<usize>,
    ) -> Result<Vec<crate::pb::Message>, RouteError> {
        let mut q: Vec<(&str, String)> = Vec::new();
        match from {
            HistoryFrom::Newest => {}
            HistoryFrom::Before(seq) => q.push(("before", seq.to_string())),
            HistoryFrom::After(seq) => q.push(("after", seq.to_string())),
        }
        if let Some(l) = limit {
            q.push(("limit", l.to_string()));
        }
        let url = format!(
            "{}/api/conversations/{}/messages",
            self.base,
            conversation_path(conversation)?
        );
        let page: MessagePage = self.send_json(self.http.get(url).query(&q), token).await?;
        Ok(page.messages)
    }

    /// Marks a conversation read up to `seq`; returns the mark now (marks never move back).
    pub async fn mark_read(
        &self,
        token: &str,
        conversation: &crate::pb::Conversation,
        seq: u64,
    ) -> Result<u64, RouteError> {
        let path = format!(
            "/api/conversations/{}/read",
            conversation_path(conversation)?
        );
        let body = serde_json::json!({ "seq": seq });
        let answer: ReadMarkAnswer = self
            .call(reqwest::Method::POST, &path, token, Some(body))
            .await?;
        Ok(answer.read_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_route_is_said_once_with_its_cause() {
        // A port nobody listens on.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let route = RouteClient::new(&format!("http://{addr}"));
        let e = route.logout("token").await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, RouteError::Transport(_)), "{e:?}");
        assert_eq!(text.matches("route unreachable").count(), 1, "{text}");
        // The cause, not the URL of the call that found it.
        assert!(!text.contains("/api/logout"), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }

    #[test]
    fn channel_names_follow_the_route_rule() {
        for good in [
            "room1",
            "a",
            "news.eu-west_2",
            "频道",
            "Ünïcode",
            "٣",
            "...",
            &"x".repeat(64),
        ] {
            assert!(is_channel_name(good), "{good:?}");
        }
        let long = "é".repeat(65);
        for bad in [
            "", "a b", "#room", "a/b", "a:b", "a%b", "tab\t", "\u{7}", &long, ".", "..", "mine",
        ] {
            assert!(!is_channel_name(bad), "{bad:?}");
        }
        // The same rule as the route's.
        for name in [
            "room1", "a b", "", "频道", "#x", &long, "a.b", "...", "-", "x\u{1f}",
        ] {
            assert_eq!(
                is_channel_name(name),
                cim_proto::ids::valid_channel_name(name),
                "{name:?}"
            );
        }
        // 64 characters, not bytes.
        assert!(is_channel_name(&"é".repeat(64)));
        assert!(channel_name_error("a b").unwrap().contains("' '"));
        assert!(channel_name_error(&long).unwrap().contains("at most 64"));
        assert!(channel_name_error("").unwrap().contains("empty"));
    }

    #[test]
    fn channel_urls_hold_the_name_as_one_encoded_segment() {
        let r = RouteClient::new("http://127.0.0.1:8080/");
        assert_eq!(
            r.channel_url("room1", "/join").unwrap(),
            "http://127.0.0.1:8080/api/channels/room1/join"
        );
        let url = r.channel_url("频道", "").unwrap();
        assert_eq!(url, "http://127.0.0.1:8080/api/channels/%E9%A2%91%E9%81%93");
        // What reqwest sends is that path, unchanged.
        let parsed = reqwest::Url::parse(&url).unwrap();
        assert_eq!(parsed.path(), "/api/channels/%E9%A2%91%E9%81%93");
        let url = r.channel_url("...", "/members").unwrap();
        assert_eq!(
            reqwest::Url::parse(&url).unwrap().path(),
            "/api/channels/.../members"
        );
        // Behind a prefix.
        let r = RouteClient::new("https://lb.example/cim");
        assert_eq!(
            r.channel_url("a.b-c_D", "/leave").unwrap(),
            "https://lb.example/cim/api/channels/a.b-c_D/leave"
        );
        for bad in ["..", ".", "a/b", ""] {
            let e = r.channel_url(bad, "/join").unwrap_err();
            assert_eq!((e.code(), e.status()), (Some("invalid_channel"), Some(400)));
        }
    }

    #[test]
    fn member_cursors_are_user_ids_as_text_or_numbers() {
        let page: MemberPage = serde_json::from_str(
            r#"{"members":[{"user_id":7,"name":"alice","online":true}],"next":"7"}"#,
        )
        .unwrap();
        assert_eq!(page.next, Some(7));
        assert_eq!(page.members[0].name, "alice");
        let last: MemberPage = serde_json::from_str(r#"{"members":[],"next":null}"#).unwrap();
        assert_eq!(last.next, None);
        let number: MemberPage = serde_json::from_str(r#"{"members":[],"next":9}"#).unwrap();
        assert_eq!(number.next, Some(9));
        assert!(serde_json::from_str::<MemberPage>(r#"{"members":[],"next":"x"}"#).is_err());
    }
}
