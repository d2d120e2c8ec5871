//! Stored groups (persistent group chats with members and roles), for clients acting as
//! themselves (bearer) and for backends (API key, `/api/admin/groups...`). Both call the same
//! function per operation, with the acting [`Actor`]; the backend may do what an owner may.
//!
//! User endpoints (bearer):
//! - `POST /api/groups` `{"name","members"?:[ids]}` → 201 `{"group","added"}`
//! - `GET /api/groups` → `{"groups":[..]}` (the caller's)
//! - `GET /api/groups/{id}` → `{"group"}`; `PATCH` `{"name"}` (owner, admin) → `{"group_id","seq"}`;
//!   `DELETE` (owner: disband) → `{"group_id","seq"}`
//! - `GET /api/groups/{id}/members?after=&limit=` → `{"members":[{"user_id","name","role",
//!   "joined_seq"}],"next"}`
//! - `POST /api/groups/{id}/members` `{"user_ids"}` (owner, admin) → `{"added","already",
//!   "too_many_groups","group_full","seq"}`
//! - `DELETE /api/groups/{id}/members/{user}` (owner, admin; oneself: leave) and
//!   `POST /api/groups/{id}/leave` → `{"group_id","seq"}`
//! - `PUT /api/groups/{id}/members/{user}/role` `{"role":"admin"|"member"}` (owner)
//! - `POST /api/groups/{id}/messages` `{"body","message_id"?}` → `{"id","delivered",
//!   "timestamp_ms","repeat","log_seq"}`
//!
//! Errors: 404 `unknown_group` for a group that does not exist or that the caller is not
//! in; 404 `not_found` for a user who is not a member; 404 `unknown_user` (naming the ids)
//! for ids that are no accounts; 403 `forbidden` when the caller's role does not allow the
//! change; 409 `group_full` / `too_many_groups` for the limits (`groups.max_members`,
//! `groups.max_groups`) and `owner_stays` for the owner's place (the owner neither leaves,
//! nor is removed, nor changes role: they disband).
//!
//! Invariants:
//! - a group is never revealed to a non-member: every user call on a group the caller is not a
//!   member of answers 404 `unknown_group`, exactly as for a group that does not exist;
//! - who may do what is checked here; the limits ([`crate::config::GroupsConfig`]) are
//!   checked by the store, atomically with the change;
//! - every change appends its GROUP_EVENT, built by [`group_event`] only, and after the store
//!   took it the stored event is pushed live ([`push_event`]); a failed push loses nothing
//!   (members catch up from the log at their next connection).

use crate::{
    api::{channels::PageQuery, messages::route_one, openapi::ErrorBody, presence::parse_limit},
    auth::{ApiKey, AuthUser},
    error::{ApiJson, ApiQuery, AppError, ErrorCode},
    routing::{self, Outgoing, SYSTEM_SENDER_NAME},
    state::AppState,
};
use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use cim_common::{
    pb::{GroupEvent, GroupEventType, Message, MessageKind, Send},
    store::{
        chat::{MAX_GROUP_NAME_LEN, MAX_MEMBERS_PAGE},
        AddOutcome, Changed, GroupInfo, Role,
    },
    time::now_ms,
};
use cim_proto::api::{
    Added, CreatedGroup, GroupAnswer, GroupChange, GroupChatSent, GroupList, GroupMemberView,
    GroupMembersPage, GroupView,
};
use futures_util::{stream, StreamExt};
use serde::Deserialize;
use std::collections::HashSet;
use utoipa::ToSchema;

/// Store lookups (names, memberships) of one request in flight at once.
const LOOKUPS: usize = 32;
/// Names an event's text lists before it says "and N others".
const NAMES_IN_TEXT: usize = 10;

/// Who makes a change: a user (bearer) or the backend (API key, sender 0 in events).
#[derive(Debug, Clone)]
pub struct Actor {
    pub user_id: u64,
    pub name: String,
    /// The business API: may do what an owner may, in any group.
    pub backend: bool,
}

impl Actor {
    pub fn user(user: AuthUser) -> Self {
        Self {
            user_id: user.user_id,
            name: user.user_name,
            backend: false,
        }
    }

    pub fn backend() -> Self {
        Self {
            user_id: 0,
            name: SYSTEM_SENDER_NAME.into(),
            backend: true,
        }
    }
}

// ---- errors ----

/// 404 for a group that does not exist *and* for one the caller is not a member of.
pub fn no_group(group: u64) -> AppError {
    AppError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownGroup,
        format!("no group {group}"),
    )
}

fn not_member(group: u64, user: u64) -> AppError {
    AppError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        format!("user {user} is not a member of group {group}"),
    )
}

/// A member whose role does not allow the change.
fn forbidden(message: impl Into<String>) -> AppError {
    AppError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message)
}

/// A change the group's state does not allow: a limit, or the owner's place.
fn conflict(code: ErrorCode, message: impl Into<String>) -> AppError {
    AppError::new(StatusCode::CONFLICT, code, message)
}

// ---- JSON (the answers' types are `cim_proto::api`'s, shared with the SDK) ----

pub(crate) fn group_view(g: GroupInfo) -> GroupView {
    GroupView {
        id: g.id,
        name: g.name,
        owner: g.owner,
        created_ms: g.created_ms,
        members: g.members,
        top: g.top,
        version: g.version,
    }
}

fn added(o: AddOutcome) -> Added {
    Added {
        added: o.added,
        already: o.already,
        too_many_groups: o.too_many_groups,
        group_full: o.group_full,
        seq: o.seq,
    }
}

#[derive(Deserialize, ToSchema)]
pub struct NewGroup {
    /// 1 to 128 bytes (trimmed), no control characters.
    #[serde(default)]
    #[schema(required = true)]
    pub name: String,
    /// Users to add at once (the caller is the owner).
    #[serde(default)]
    pub members: Vec<u64>,
}

#[derive(Deserialize, ToSchema)]
pub struct AdminNewGroup {
    /// 1 to 128 bytes (trimmed), no control characters.
    #[serde(default)]
    #[schema(required = true)]
    pub name: String,
    /// The owner's user id.
    #[serde(default)]
    #[schema(required = true)]
    pub owner: u64,
    /// Users to add at once.
    #[serde(default)]
    pub members: Vec<u64>,
}

#[derive(Deserialize, ToSchema)]
pub struct UserIds {
    #[serde(default)]
    #[schema(required = true)]
    pub user_ids: Vec<u64>,
}

#[derive(Deserialize, ToSchema)]
pub struct RoleBody {
    /// `admin` or `member`.
    #[serde(default)]
    #[schema(required = true, example = "admin")]
    pub role: String,
}

#[derive(Deserialize, ToSchema)]
pub struct Rename {
    /// 1 to 128 bytes (trimmed), no control characters.
    #[serde(default)]
    #[schema(required = true)]
    pub name: String,
}

#[derive(Deserialize, ToSchema)]
pub struct GroupMessage {
    /// Missing counts as empty, answered 400 like an empty one.
    #[serde(default)]
    #[schema(required = true)]
    pub body: String,
    /// Message id chosen by the caller (1-64 of `[0-9A-Za-z_-]`): a retry is stored once.
    #[serde(default, alias = "id")]
    pub message_id: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct AdminGroupMessage {
    /// Missing counts as empty, answered 400 like an empty one.
    #[serde(default)]
    #[schema(required = true)]
    pub body: String,
    /// As this member; absent or 0: as the system (sender 0).
    #[serde(default)]
    pub sender_id: Option<u64>,
    /// Message id chosen by the caller (1-64 of `[0-9A-Za-z_-]`): a retry is stored once.
    #[serde(default, alias = "id")]
    pub message_id: Option<String>,
}

// ---- shared steps ----

/// A group name: trimmed, 1 to [`MAX_GROUP_NAME_LEN`] bytes, no control characters.
pub fn group_name(raw: &str) -> Result<String, AppError> {
    let name = raw.trim();
    if name.is_empty() || name.len() > MAX_GROUP_NAME_LEN || name.chars().any(char::is_control) {
        return Err(AppError::bad_request(format!(
            "a group name is 1 to {MAX_GROUP_NAME_LEN} bytes without control characters"
        )));
    }
    Ok(name.to_string())
}

/// The GROUP_EVENT message of a change (the one place such a message is built). The store
/// gives it its `log_seq` (and, for CREATED, the group's id).
pub fn group_event(
    actor: &Actor,
    group: u64,
    kind: GroupEventType,
    user_ids: Vec<u64>,
    name: &str,
    role: Option<Role>,
    body: String,
) -> Message {
    Message {
        id: cim_proto::ids::message_id(),
        sender_id: actor.user_id,
        sender_name: actor.name.clone(),
        kind: MessageKind::GroupEvent as i32,
        group_id: group,
        timestamp_ms: now_ms(),
        body,
        group_event: Some(GroupEvent {
            r#type: kind as i32,
            user_ids,
            name: name.to_string(),
            role: role.map(|r| r.as_str().to_string()).unwrap_or_default(),
        }),
        ..Default::default()
    }
}

/// Pushes a stored event to the members online. Version 0: the servers follow membership
/// from the event itself.
async fn push_event(state: &AppState, event: Message) {
    routing::push_group(state, &state.servers(), &[(event, 0)]).await;
}

/// The caller's role in `group`; the backend counts as owner of any group that exists. A
/// non-member gets [`no_group`].
async fn role_in(state: &AppState, actor: &Actor, group: u64) -> Result<Role, AppError> {
    if actor.backend {
        return match state.store().group_info(group).await? {
            Some(_) => Ok(Role::Owner),
            None => Err(no_group(group)),
        };
    }
    match state.store().group_member(group, actor.user_id).await? {
        Some(m) => Ok(m.role),
        None => Err(no_group(group)),
    }
}

/// User names of `ids` (`None`: no such account), in order.
async fn names_of(state: &AppState, ids: &[u64]) -> Result<Vec<Option<String>>, AppError> {
    let store = state.store();
    let names: Vec<_> = stream::iter(ids.iter().copied())
        .map(|id| async move { store.user_name(id).await })
        .buffered(LOOKUPS)
        .collect()
        .await;
    Ok(names.into_iter().collect::<Result<_, _>>()?)
}

/// The names of `ids`, which must all be accounts: 404 `unknown_user` naming those that are not.
async fn existing_names(state: &AppState, ids: &[u64]) -> Result<Vec<String>, AppError> {
    let names = names_of(state, ids).await?;
    let unknown: Vec<String> = ids
        .iter()
        .zip(&names)
        .filter(|(_, n)| n.is_none())
        .map(|(id, _)| id.to_string())
        .collect();
    if !unknown.is_empty() {
        return Err(AppError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::UnknownUser,
            format!("no users with ids {}", unknown.join(", ")),
        ));
    }
    Ok(names.into_iter().flatten().collect())
}

/// The name of one user who must exist (404 `unknown_user`).
pub(crate) async fn existing_user(state: &AppState, id: u64) -> Result<String, AppError> {
    Ok(existing_names(state, &[id]).await?.remove(0))
}

/// `ids` without duplicates (first occurrence kept) and without `except`: 1 to `max` user
/// ids, none 0.
fn user_ids(ids: Vec<u64>, except: Option<u64>, max: usize) -> Result<Vec<u64>, AppError> {
    if ids.contains(&0) {
        return Err(AppError::bad_request("user ids must not be 0"));
    }
    let mut seen = HashSet::with_capacity(ids.len());
    let ids: Vec<u64> = ids
        .into_iter()
        .filter(|id| Some(*id) != except && seen.insert(*id))
        .collect();
    if ids.len() > max {
        return Err(AppError::bad_request(format!(
            "at most {max} users can be added at once (a group's member limit)"
        )));
    }
    Ok(ids)
}

/// "bob, carol and 3 others".
fn name_list(names: &[String]) -> String {
    let shown = names.len().min(NAMES_IN_TEXT);
    let mut text = names[..shown].join(", ");
    if names.len() > shown {
        text.push_str(&format!(" and {} others", names.len() - shown));
    }
    text
}

fn at_least_admin(role: Role, what: &str) -> Result<(), AppError> {
    if role >= Role::Admin {
        Ok(())
    } else {
        Err(forbidden(format!("only the owner or an admin may {what}")))
    }
}

/// Adds `users` (checked, existing, named `names` in the event's text) to `group`.
async fn add_checked(
    state: &AppState,
    actor: &Actor,
    group: u64,
    users: &[u64],
    names: &[String],
) -> Result<Added, AppError> {
    let limits = state.config().groups.limits();
    let body = format!("{} added {}", actor.name, name_list(names));
    let mut event = group_event(
        actor,
        group,
        GroupEventType::Joined,
        users.to_vec(),
        "",
        None,
        body,
    );
    let outcome = state
        .store()
        .group_add(group, users, &mut event, limits)
        .await?;
    if outcome.no_group {
        return Err(no_group(group));
    }
    if outcome.group_full {
        return Err(conflict(
            ErrorCode::GroupFull,
            format!(
                "group {group} would have more than {} members: nobody was added",
                limits.max_members
            ),
        ));
    }
    if outcome.seq != 0 {
        push_event(state, event).await;
    }
    Ok(added(outcome))
}

// ---- operations (one per change or read, shared by both APIs) ----

/// Creates a group owned by `owner` (the caller, or the backend's choice) with `members`.
pub async fn create_group(
    state: &AppState,
    actor: &Actor,
    owner: u64,
    name: &str,
    members: Vec<u64>,
) -> Result<CreatedGroup, AppError> {
    let name = group_name(name)?;
    let limits = state.config().groups.limits();
    let members = user_ids(members, Some(owner), limits.max_members.saturating_sub(1))?;
    // Every id is checked before anything is created: a typo creates nothing.
    let names = existing_names(state, &members).await?;
    let body = format!("{} created the group {name}", actor.name);
    let mut event = group_event(
        actor,
        0,
        GroupEventType::Created,
        vec![owner],
        &name,
        None,
        body,
    );
    let Some(info) = state
        .store()
        .group_create(owner, &name, &mut event, limits)
        .await?
    else {
        return Err(conflict(
            ErrorCode::TooManyGroups,
            format!(
                "user {owner} is a member of {} groups already: leave one first",
                limits.max_groups
            ),
        ));
    };
    // The route cannot know the id before the store made it.
    if event.group_id == 0 {
        event.group_id = info.id;
    }
    push_event(state, event).await;
    tracing::debug!(group = info.id, owner, "group created");
    if members.is_empty() {
        return Ok(CreatedGroup {
            group: group_view(info),
            added: None,
        });
    }
    let added = add_checked(state, actor, info.id, &members, &names).await?;
    let group = state.store().group_info(info.id).await?.unwrap_or(info);
    Ok(CreatedGroup {
        group: group_view(group),
        added: Some(added),
    })
}

/// Adds members (owner, admin, backend).
pub async fn add_members(
    state: &AppState,
    actor: &Actor,
    group: u64,
    users: Vec<u64>,
) -> Result<Added, AppError> {
    let max = state.config().groups.max_members;
    let users = user_ids(users, None, max)?;
    if users.is_empty() {
        return Err(AppError::bad_request(
            "`user_ids` must list 1 or more users",
        ));
    }
    at_least_admin(role_in(state, actor, group).await?, "add members")?;
    let names = existing_names(state, &users).await?;
    // The event's text names those who are not members yet (the store decides who joins).
    let store = state.store();
    let memberships: Vec<_> = stream::iter(users.iter().copied())
        .map(|id| async move { store.group_member(group, id).await })
        .buffered(LOOKUPS)
        .collect()
        .await;
    let mut fresh = Vec::new();
    for (name, member) in names.iter().zip(memberships) {
        if member?.is_none() {
            fresh.push(name.clone());
        }
    }
    let named = if fresh.is_empty() { &names } else { &fresh };
    add_checked(state, actor, group, &users, named).await
}

/// Removes a member (owner, admin, backend); a user removing themself leaves.
pub async fn remove_member(
    state: &AppState,
    actor: &Actor,
    group: u64,
    target: u64,
) -> Result<GroupChange, AppError> {
    if !actor.backend && target == actor.user_id {
        return leave_group(state, actor, group).await;
    }
    let role = role_in(state, actor, group).await?;
    at_least_admin(role, "remove members")?;
    let member = state
        .store()
        .group_member(group, target)
        .await?
        .ok_or_else(|| not_member(group, target))?;
    if role == Role::Admin && member.role >= Role::Admin {
        return Err(forbidden("an admin cannot remove an admin or the owner"));
    }
    if member.role == Role::Owner {
        return Err(conflict(
            ErrorCode::OwnerStays,
            "the owner cannot be removed: disband the group instead",
        ));
    }
    let name = names_of(state, &[target])
        .await?
        .remove(0)
        .unwrap_or_else(|| format!("user {target}"));
    let body = format!("{} removed {name}", actor.name);
    let mut event = group_event(
        actor,
        group,
        GroupEventType::Removed,
        vec![target],
        "",
        None,
        body,
    );
    let seq = state
        .store()
        .group_remove(group, &[target], &mut event)
        .await?;
    if seq == 0 {
        return Err(not_member(group, target));
    }
    push_event(state, event).await;
    Ok(GroupChange {
        group_id: group,
        seq,
    })
}

/// The caller leaves (not the owner: they disband).
pub async fn leave_group(
    state: &AppState,
    actor: &Actor,
    group: u64,
) -> Result<GroupChange, AppError> {
    let member = state
        .store()
        .group_member(group, actor.user_id)
        .await?
        .ok_or_else(|| no_group(group))?;
    if member.role == Role::Owner {
        return Err(conflict(
            ErrorCode::OwnerStays,
            format!("the owner cannot leave the group: disband it (DELETE /api/groups/{group})"),
        ));
    }
    let body = format!("{} left", actor.name);
    let mut event = group_event(
        actor,
        group,
        GroupEventType::Left,
        vec![actor.user_id],
        "",
        None,
        body,
    );
    let seq = state
        .store()
        .group_remove(group, &[actor.user_id], &mut event)
        .await?;
    if seq == 0 {
        return Err(no_group(group));
    }
    push_event(state, event).await;
    Ok(GroupChange {
        group_id: group,
        seq,
    })
}

/// Makes a member an admin or a member again (owner, backend).
pub async fn set_role(
    state: &AppState,
    actor: &Actor,
    group: u64,
    target: u64,
    role: &str,
) -> Result<GroupChange, AppError> {
    let role = match Role::parse(role.trim()) {
        Some(r @ (Role::Admin | Role::Member)) => r,
        _ => {
            return Err(AppError::bad_request(
                "role must be \"admin\" or \"member\"",
            ))
        }
    };
    if role_in(state, actor, group).await? != Role::Owner {
        return Err(forbidden("only the owner may change roles"));
    }
    let member = state
        .store()
        .group_member(group, target)
        .await?
        .ok_or_else(|| not_member(group, target))?;
    if member.role == Role::Owner {
        return Err(conflict(
            ErrorCode::OwnerStays,
            "the owner's role cannot change",
        ));
    }
    let name = names_of(state, &[target])
        .await?
        .remove(0)
        .unwrap_or_else(|| format!("user {target}"));
    let what = match role {
        Role::Admin => "an admin",
        _ => "a member",
    };
    let body = format!("{} made {name} {what}", actor.name);
    let mut event = group_event(
        actor,
        group,
        GroupEventType::Role,
        vec![target],
        "",
        Some(role),
        body,
    );
    let changed = state
        .store()
        .group_set_role(group, target, role, &mut event)
        .await?;
    done(state, group, changed, event, Some(target)).await
}

/// Renames the group (owner, admin, backend).
pub async fn rename_group(
    state: &AppState,
    actor: &Actor,
    group: u64,
    name: &str,
) -> Result<GroupChange, AppError> {
    let name = group_name(name)?;
    at_least_admin(role_in(state, actor, group).await?, "rename the group")?;
    let body = format!("{} renamed the group to {name}", actor.name);
    let mut event = group_event(
        actor,
        group,
        GroupEventType::Renamed,
        Vec::new(),
        &name,
        None,
        body,
    );
    let changed = state.store().group_rename(group, &name, &mut event).await?;
    done(state, group, changed, event, None).await
}

/// Ends the group (owner, backend).
pub async fn disband_group(
    state: &AppState,
    actor: &Actor,
    group: u64,
) -> Result<GroupChange, AppError> {
    if role_in(state, actor, group).await? != Role::Owner {
        return Err(forbidden("only the owner may disband the group"));
    }
    let body = format!("{} disbanded the group", actor.name);
    let mut event = group_event(
        actor,
        group,
        GroupEventType::Disbanded,
        Vec::new(),
        "",
        None,
        body,
    );
    let changed = state.store().group_disband(group, &mut event).await?;
    let change = done(state, group, changed, event, None).await?;
    tracing::debug!(group, "group disbanded");
    Ok(change)
}

/// The answer of a [`Changed`], pushing the event when it was appended.
async fn done(
    state: &AppState,
    group: u64,
    changed: Changed,
    event: Message,
    target: Option<u64>,
) -> Result<GroupChange, AppError> {
    match changed {
        Changed::Done(seq) => {
            push_event(state, event).await;
            Ok(GroupChange {
                group_id: group,
                seq,
            })
        }
        Changed::NoGroup => Err(no_group(group)),
        Changed::NotMember => Err(match target {
            Some(user) => not_member(group, user),
            None => no_group(group),
        }),
    }
}

/// A group's description (members and the backend).
pub async fn group_info(
    state: &AppState,
    actor: &Actor,
    group: u64,
) -> Result<GroupAnswer, AppError> {
    role_in(state, actor, group).await?;
    let info = state
        .store()
        .group_info(group)
        .await?
        .ok_or_else(|| no_group(group))?;
    Ok(GroupAnswer {
        group: group_view(info),
    })
}

/// A page of a group's members (members and the backend).
pub async fn group_members(
    state: &AppState,
    actor: &Actor,
    group: u64,
    q: PageQuery,
) -> Result<GroupMembersPage, AppError> {
    let limit = parse_limit(
        q.limit.as_deref(),
        MAX_MEMBERS_PAGE.min(state.config().online_page_max),
    )?;
    let after = match q.after.as_deref().filter(|a| !a.is_empty()) {
        None => 0,
        Some(a) => a
            .parse::<u64>()
            .map_err(|_| AppError::bad_request("invalid cursor in `after`"))?,
    };
    role_in(state, actor, group).await?;
    let page = state.store().group_members(group, after, limit).await?;
    let ids: Vec<u64> = page.iter().map(|m| m.user_id).collect();
    let names = names_of(state, &ids).await?;
    let next = (page.len() >= limit)
        .then(|| page.last().map(|m| m.user_id.to_string()))
        .flatten();
    let members = page
        .into_iter()
        .zip(names)
        .map(|(m, name)| GroupMemberView {
            user_id: m.user_id,
            // Accounts are never deleted; an empty name would be a store inconsistency.
            name: name.unwrap_or_default(),
            role: m.role.as_str().to_string(),
            joined_seq: m.joined_seq,
        })
        .collect();
    Ok(GroupMembersPage { members, next })
}

/// The groups `user` is a member of (at most `groups.max_groups`).
pub async fn groups_of(state: &AppState, user: u64) -> Result<GroupList, AppError> {
    let mut ids = state.store().user_groups(user).await?;
    ids.truncate(state.config().groups.max_groups);
    let store = state.store();
    let infos: Vec<_> = stream::iter(ids)
        .map(|id| async move { store.group_info(id).await })
        .buffered(LOOKUPS)
        .collect()
        .await;
    let mut groups = Vec::with_capacity(infos.len());
    for info in infos {
        // A group disbanded between the two reads is simply not listed.
        if let Some(info) = info? {
            groups.push(group_view(info));
        }
    }
    Ok(GroupList { groups })
}

/// Sends a GROUP_CHAT message through the routing every send takes. `sender` is the user
/// (`Outgoing::from_user`) or the backend's item (system or a named member).
pub async fn send_to_group(
    state: &AppState,
    group: u64,
    item: Outgoing,
) -> Result<GroupChatSent, AppError> {
    // Answer a non-member (or a missing group) like any other group call, before routing:
    // routing would say "forbidden" and reveal that the group exists.
    let known = if item.backend {
        state.store().group_info(group).await?.is_some()
    } else {
        state
            .store()
            .group_member(group, item.sender_id)
            .await?
            .is_some()
    };
    if !known {
        return Err(no_group(group));
    }
    let result = route_one(state, item).await?;
    Ok(GroupChatSent {
        id: result.message_id,
        delivered: result.delivered,
        timestamp_ms: result.timestamp_ms,
        repeat: result.repeat,
        log_seq: result.log_seq,
    })
}

fn group_send(group: u64, body: String, message_id: Option<String>) -> Send {
    Send {
        kind: MessageKind::GroupChat as i32,
        group_id: group,
        body,
        message_id: message_id.unwrap_or_default(),
        ..Default::default()
    }
}

// ---- user endpoints (bearer) ----

/// Create a group.
///
/// The caller is its owner; `members` are added at once (every id must be a user: 404
/// otherwise, and nothing is created). `added` tells who was added.
#[utoipa::path(
    post,
    path = "/api/groups",
    operation_id = "groups_create",
    tag = "groups",
    security(("bearer" = [])),
    request_body = NewGroup,
    responses(
        (status = 201, description = "Created", body = CreatedGroup),
        (status = 400, description = "`bad_request` (bad name, too many members, id 0) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 404, description = "`unknown_user`: a member id is no user", body = ErrorBody),
        (status = 409, description = "`too_many_groups`: the caller is in as many groups as allowed", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    ApiJson(req): ApiJson<NewGroup>,
) -> Result<(StatusCode, Json<CreatedGroup>), AppError> {
    let owner = user.user_id;
    let created = create_group(&state, &Actor::user(user), owner, &req.name, req.members).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// List the caller's groups.
///
/// Every stored group the caller is a member of, ascending by id.
#[utoipa::path(
    get,
    path = "/api/groups",
    operation_id = "groups_mine",
    tag = "groups",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's groups", body = GroupList),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn mine(
    State(state): State<AppState>,
    user: AuthUser,
) -> Result<Json<GroupList>, AppError> {
    Ok(Json(groups_of(&state, user.user_id).await?))
}

/// Describe a group.
///
/// Members only: any other caller gets 404, as for a group that does not exist.
#[utoipa::path(
    get,
    path = "/api/groups/{id}",
    operation_id = "groups_info",
    tag = "groups",
    security(("bearer" = [])),
    params(("id" = u64, Path, description = "Group id"),),
    responses(
        (status = 200, description = "The group", body = GroupAnswer),
        (status = 400, description = "`bad_request`: bad id", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 404, description = "`unknown_group`: no such group, or the caller is not a member", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn info(
    State(state): State<AppState>,
    user: AuthUser,
    Path(group): Path<u64>,
) -> Result<Json<GroupAnswer>, AppError> {
    Ok(Json(group_info(&state, &Actor::user(user), group).await?))
}

/// List a group's members.
///
/// Members only. One page in user-id order, each with their role and the seq of the event
/// that made them a member.
#[utoipa::path(
    get,
    path = "/api/groups/{id}/members",
    operation_id = "groups_members",
    tag = "groups",
    security(("bearer" = [])),
    params(("id" = u64, Path, description = "Group id"), PageQuery),
    responses(
        (status = 200, description = "A page of members", body = GroupMembersPage),
        (status = 400, description = "`bad_request`: bad id, `limit` or cursor", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 404, description = "`unknown_group`: no such group, or the caller is not a member", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn members(
    State(state): State<AppState>,
    user: AuthUser,
    Path(group): Path<u64>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<GroupMembersPage>, AppError> {
    Ok(Json(
        group_members(&state, &Actor::user(user), group, q).await?,
    ))
}

/// Add members.
///
/// The owner or an admin. Answers who was added, who was a member already and who is in
/// too many groups; the JOINED event lists those added.
#[utoipa::path(
    post,
    path = "/api/groups/{id}/members",
    operation_id = "groups_add",
    tag = "groups",
    security(("bearer" = [])),
    params(("id" = u64, Path, description = "Group id"),),
    request_body = UserIds,
    responses(
        (status = 200, description = "The outcome", body = Added),
        (status = 400, description = "`bad_request` (no ids, id 0, too many) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the caller is neither the owner nor an admin", body = ErrorBody),
        (status = 404, description = "`unknown_group` (no such group, or not a member) or `unknown_user` (the message names the ids)", body = ErrorBody),
        (status = 409, description = "`group_full`: the group would pass its member limit", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn add(
    State(state): State<AppState>,
    user: AuthUser,
    Path(group): Path<u64>,
    ApiJson(req): ApiJson<UserIds>,
) -> Result<Json<Added>, AppError> {
    Ok(Json(
        add_members(&state, &Actor::user(user), group, req.user_ids).await?,
    ))
}

/// Remove a member.
///
/// The owner or an admin (an admin cannot remove an admin or the owner). Removing oneself
/// is leaving.
#[utoipa::path(
    delete,
    path = "/api/groups/{id}/members/{user}",
    operation_id = "groups_remove",
    tag = "groups",
    security(("bearer" = [])),
    params(
        ("id" = u64, Path, description = "Group id"),
        ("user" = u64, Path, description = "User id of the member"),
    ),
    responses(
        (status = 200, description = "Removed; `seq` of the REMOVED (or LEFT) event", body = GroupChange),
        (status = 400, description = "`bad_request`: bad id", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the caller's role does not allow it", body = ErrorBody),
        (status = 404, description = "`unknown_group` (no such group, or the caller is not a member) or `not_found` (the user is not a member)", body = ErrorBody),
        (status = 409, description = "`owner_stays`: the owner cannot be removed (or leave)", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn remove(
    State(state): State<AppState>,
    user: AuthUser,
    Path((group, target)): Path<(u64, u64)>,
) -> Result<Json<GroupChange>, AppError> {
    Ok(Json(
        remove_member(&state, &Actor::user(user), group, target).await?,
    ))
}

/// Leave a group.
///
/// Any member but the owner, who disbands the group instead (409).
#[utoipa::path(
    post,
    path = "/api/groups/{id}/leave",
    operation_id = "groups_leave",
    tag = "groups",
    security(("bearer" = [])),
    params(("id" = u64, Path, description = "Group id"),),
    responses(
        (status = 200, description = "Left; `seq` of the LEFT event", body = GroupChange),
        (status = 400, description = "`bad_request`: bad id", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 404, description = "`unknown_group`: no such group, or the caller is not a member", body = ErrorBody),
        (status = 409, description = "`owner_stays`: the owner cannot leave; disband the group", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn leave(
    State(state): State<AppState>,
    user: AuthUser,
    Path(group): Path<u64>,
) -> Result<Json<GroupChange>, AppError> {
    Ok(Json(leave_group(&state, &Actor::user(user), group).await?))
}

/// Set a member's role.
///
/// The owner only: `admin` or `member` (the owner's own role does not change).
#[utoipa::path(
    put,
    path = "/api/groups/{id}/members/{user}/role",
    operation_id = "groups_role",
    tag = "groups",
    security(("bearer" = [])),
    params(
        ("id" = u64, Path, description = "Group id"),
        ("user" = u64, Path, description = "User id of the member"),
    ),
    request_body = RoleBody,
    responses(
        (status = 200, description = "Changed; `seq` of the ROLE event", body = GroupChange),
        (status = 400, description = "`bad_request` (bad id or role) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the caller is not the owner", body = ErrorBody),
        (status = 404, description = "`unknown_group` (no such group, or the caller is not a member) or `not_found` (the user is not a member)", body = ErrorBody),
        (status = 409, description = "`owner_stays`: the owner's role cannot change", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn role(
    State(state): State<AppState>,
    user: AuthUser,
    Path((group, target)): Path<(u64, u64)>,
    ApiJson(req): ApiJson<RoleBody>,
) -> Result<Json<GroupChange>, AppError> {
    Ok(Json(
        set_role(&state, &Actor::user(user), group, target, &req.role).await?,
    ))
}

/// Rename a group.
///
/// The owner or an admin.
#[utoipa::path(
    patch,
    path = "/api/groups/{id}",
    operation_id = "groups_rename",
    tag = "groups",
    security(("bearer" = [])),
    params(("id" = u64, Path, description = "Group id"),),
    request_body = Rename,
    responses(
        (status = 200, description = "Renamed; `seq` of the RENAMED event", body = GroupChange),
        (status = 400, description = "`bad_request` (bad id or name) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the caller is neither the owner nor an admin", body = ErrorBody),
        (status = 404, description = "`unknown_group`: no such group, or the caller is not a member", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn rename(
    State(state): State<AppState>,
    user: AuthUser,
    Path(group): Path<u64>,
    ApiJson(req): ApiJson<Rename>,
) -> Result<Json<GroupChange>, AppError> {
    Ok(Json(
        rename_group(&state, &Actor::user(user), group, &req.name).await?,
    ))
}

/// Disband a group.
///
/// The owner only. The DISBANDED event is the group's last message; every member leaves.
#[utoipa::path(
    delete,
    path = "/api/groups/{id}",
    operation_id = "groups_disband",
    tag = "groups",
    security(("bearer" = [])),
    params(("id" = u64, Path, description = "Group id"),),
    responses(
        (status = 200, description = "Disbanded; `seq` of the DISBANDED event", body = GroupChange),
        (status = 400, description = "`bad_request`: bad id", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 403, description = "`forbidden`: the caller is not the owner", body = ErrorBody),
        (status = 404, description = "`unknown_group`: no such group, or the caller is not a member", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn disband(
    State(state): State<AppState>,
    user: AuthUser,
    Path(group): Path<u64>,
) -> Result<Json<GroupChange>, AppError> {
    Ok(Json(
        disband_group(&state, &Actor::user(user), group).await?,
    ))
}

/// Send a message to a group.
///
/// Members only. Stored once in the group's log (`log_seq`), pushed to the members online;
/// the others catch up at their next connection. A retry with the same `message_id` is
/// stored once and answered with `repeat`.
#[utoipa::path(
    post,
    path = "/api/groups/{id}/messages",
    operation_id = "groups_send",
    tag = "groups",
    security(("bearer" = [])),
    params(("id" = u64, Path, description = "Group id"),),
    request_body = GroupMessage,
    responses(
        (status = 200, description = "Stored and pushed", body = GroupChatSent),
        (status = 400, description = "`bad_request` (empty body, bad id) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`, `token_expired` or `session_ended`", body = ErrorBody),
        (status = 403, description = "`not_a_member`: the caller left while the message was routed", body = ErrorBody),
        (status = 404, description = "`unknown_group`: no such group, or the caller is not a member", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn send(
    State(state): State<AppState>,
    user: AuthUser,
    Path(group): Path<u64>,
    ApiJson(req): ApiJson<GroupMessage>,
) -> Result<Json<GroupChatSent>, AppError> {
    let item = Outgoing::from_user(
        user.user_id,
        user.user_name,
        group_send(group, req.body, req.message_id),
    );
    Ok(Json(send_to_group(&state, group, item).await?))
}

// ---- business API (X-Api-Key) ----

/// Create a group for a user.
///
/// The business API's create: `owner` (who must exist) owns it; the events name the system
/// as who made the change.
#[utoipa::path(
    post,
    path = "/api/admin/groups",
    operation_id = "admin_groups_create",
    tag = "admin",
    security(("api_key" = [])),
    request_body = AdminNewGroup,
    responses(
        (status = 201, description = "Created", body = CreatedGroup),
        (status = 400, description = "`bad_request` (bad name, no owner, too many members) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_user`: the owner or a member is no user", body = ErrorBody),
        (status = 409, description = "`too_many_groups`: the owner is in as many groups as allowed", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn admin_create(
    State(state): State<AppState>,
    _key: ApiKey,
    ApiJson(req): ApiJson<AdminNewGroup>,
) -> Result<(StatusCode, Json<CreatedGroup>), AppError> {
    if req.owner == 0 {
        return Err(AppError::bad_request("`owner` must be a user id"));
    }
    group_name(&req.name)?;
    existing_user(&state, req.owner).await?;
    let created =
        create_group(&state, &Actor::backend(), req.owner, &req.name, req.members).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Describe any group.
///
/// The business API's view of a group.
#[utoipa::path(
    get,
    path = "/api/admin/groups/{id}",
    operation_id = "admin_groups_info",
    tag = "admin",
    security(("api_key" = [])),
    params(("id" = u64, Path, description = "Group id"),),
    responses(
        (status = 200, description = "The group", body = GroupAnswer),
        (status = 400, description = "`bad_request`: bad id", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_group`: no such group", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn admin_info(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(group): Path<u64>,
) -> Result<Json<GroupAnswer>, AppError> {
    Ok(Json(group_info(&state, &Actor::backend(), group).await?))
}

/// List any group's members.
///
/// The business API's members page.
#[utoipa::path(
    get,
    path = "/api/admin/groups/{id}/members",
    operation_id = "admin_groups_members",
    tag = "admin",
    security(("api_key" = [])),
    params(("id" = u64, Path, description = "Group id"), PageQuery),
    responses(
        (status = 200, description = "A page of members", body = GroupMembersPage),
        (status = 400, description = "`bad_request`: bad id, `limit` or cursor", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_group`: no such group", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn admin_members(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(group): Path<u64>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<GroupMembersPage>, AppError> {
    Ok(Json(
        group_members(&state, &Actor::backend(), group, q).await?,
    ))
}

/// Add members to any group.
///
/// The business API's add (as the owner may).
#[utoipa::path(
    post,
    path = "/api/admin/groups/{id}/members",
    operation_id = "admin_groups_add",
    tag = "admin",
    security(("api_key" = [])),
    params(("id" = u64, Path, description = "Group id"),),
    request_body = UserIds,
    responses(
        (status = 200, description = "The outcome", body = Added),
        (status = 400, description = "`bad_request` (no ids, id 0, too many) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_group` (no such group) or `unknown_user` (the message names the ids)", body = ErrorBody),
        (status = 409, description = "`group_full`: the group would pass its member limit", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn admin_add(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(group): Path<u64>,
    ApiJson(req): ApiJson<UserIds>,
) -> Result<Json<Added>, AppError> {
    Ok(Json(
        add_members(&state, &Actor::backend(), group, req.user_ids).await?,
    ))
}

/// Remove a member from any group.
///
/// The business API's remove (anyone but the owner).
#[utoipa::path(
    delete,
    path = "/api/admin/groups/{id}/members/{user}",
    operation_id = "admin_groups_remove",
    tag = "admin",
    security(("api_key" = [])),
    params(
        ("id" = u64, Path, description = "Group id"),
        ("user" = u64, Path, description = "User id of the member"),
    ),
    responses(
        (status = 200, description = "Removed; `seq` of the REMOVED event", body = GroupChange),
        (status = 400, description = "`bad_request`: bad id", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_group` (no such group) or `not_found` (the user is not a member)", body = ErrorBody),
        (status = 409, description = "`owner_stays`: the owner cannot be removed", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn admin_remove(
    State(state): State<AppState>,
    _key: ApiKey,
    Path((group, target)): Path<(u64, u64)>,
) -> Result<Json<GroupChange>, AppError> {
    Ok(Json(
        remove_member(&state, &Actor::backend(), group, target).await?,
    ))
}

/// Set a member's role in any group.
///
/// The business API's role change: `admin` or `member`.
#[utoipa::path(
    put,
    path = "/api/admin/groups/{id}/members/{user}/role",
    operation_id = "admin_groups_role",
    tag = "admin",
    security(("api_key" = [])),
    params(
        ("id" = u64, Path, description = "Group id"),
        ("user" = u64, Path, description = "User id of the member"),
    ),
    request_body = RoleBody,
    responses(
        (status = 200, description = "Changed; `seq` of the ROLE event", body = GroupChange),
        (status = 400, description = "`bad_request` (bad id or role) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_group` (no such group) or `not_found` (the user is not a member)", body = ErrorBody),
        (status = 409, description = "`owner_stays`: the owner's role cannot change", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn admin_role(
    State(state): State<AppState>,
    _key: ApiKey,
    Path((group, target)): Path<(u64, u64)>,
    ApiJson(req): ApiJson<RoleBody>,
) -> Result<Json<GroupChange>, AppError> {
    Ok(Json(
        set_role(&state, &Actor::backend(), group, target, &req.role).await?,
    ))
}

/// Rename any group.
///
/// The business API's rename.
#[utoipa::path(
    patch,
    path = "/api/admin/groups/{id}",
    operation_id = "admin_groups_rename",
    tag = "admin",
    security(("api_key" = [])),
    params(("id" = u64, Path, description = "Group id"),),
    request_body = Rename,
    responses(
        (status = 200, description = "Renamed; `seq` of the RENAMED event", body = GroupChange),
        (status = 400, description = "`bad_request` (bad id or name) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_group`: no such group", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn admin_rename(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(group): Path<u64>,
    ApiJson(req): ApiJson<Rename>,
) -> Result<Json<GroupChange>, AppError> {
    Ok(Json(
        rename_group(&state, &Actor::backend(), group, &req.name).await?,
    ))
}

/// Disband any group.
///
/// The business API's disband.
#[utoipa::path(
    delete,
    path = "/api/admin/groups/{id}",
    operation_id = "admin_groups_disband",
    tag = "admin",
    security(("api_key" = [])),
    params(("id" = u64, Path, description = "Group id"),),
    responses(
        (status = 200, description = "Disbanded; `seq` of the DISBANDED event", body = GroupChange),
        (status = 400, description = "`bad_request`: bad id", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_group`: no such group", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn admin_disband(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(group): Path<u64>,
) -> Result<Json<GroupChange>, AppError> {
    Ok(Json(disband_group(&state, &Actor::backend(), group).await?))
}

/// Send a message to any group.
///
/// As the system (no `sender_id`: sender 0) or as the member `sender_id` (403 `not_a_member`
/// if they are not one). Stored once in the group's log and pushed to the members online.
#[utoipa::path(
    post,
    path = "/api/admin/groups/{id}/messages",
    operation_id = "admin_groups_send",
    tag = "admin",
    security(("api_key" = [])),
    params(("id" = u64, Path, description = "Group id"),),
    request_body = AdminGroupMessage,
    responses(
        (status = 200, description = "Stored and pushed", body = GroupChatSent),
        (status = 400, description = "`bad_request` (empty body, bad id) or `invalid_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 403, description = "`not_a_member`: `sender_id` is not a member", body = ErrorBody),
        (status = 404, description = "`unknown_group` (no such group) or `unknown_user` (no user `sender_id`)", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not `application/json`", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn admin_send(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(group): Path<u64>,
    ApiJson(req): ApiJson<AdminGroupMessage>,
) -> Result<Json<GroupChatSent>, AppError> {
    let (sender_id, sender_name) = match req.sender_id.filter(|&id| id != 0) {
        None => (0, String::new()),
        Some(id) => (id, existing_user(&state, id).await?),
    };
    let item = Outgoing {
        sender_id,
        sender_name,
        send: group_send(group, req.body, req.message_id),
        backend: true,
    };
    Ok(Json(send_to_group(&state, group, item).await?))
}

/// List a user's groups.
///
/// Every stored group user `id` is a member of, ascending by id.
#[utoipa::path(
    get,
    path = "/api/admin/users/{id}/groups",
    operation_id = "admin_user_groups",
    tag = "admin",
    security(("api_key" = [])),
    params(("id" = u64, Path, description = "User id"),),
    responses(
        (status = 200, description = "The user's groups", body = GroupList),
        (status = 400, description = "`bad_request`: bad id", body = ErrorBody),
        (status = 401, description = "`unauthorized` (missing or wrong `X-Api-Key`) or `api_disabled` (no API keys configured)", body = ErrorBody),
        (status = 404, description = "`unknown_user`: no such user", body = ErrorBody),
        (status = 503, description = "`unavailable`, `overloaded` or `timeout`: retry later", body = ErrorBody),
    )
)]
pub async fn admin_user_groups(
    State(state): State<AppState>,
    _key: ApiKey,
    Path(user): Path<u64>,
) -> Result<Json<GroupList>, AppError> {
    existing_user(&state, user).await?;
    Ok(Json(groups_of(&state, user).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert_eq!(group_name("  team  ").unwrap(), "team");
        assert!(group_name("").is_err());
        assert!(group_name("   ").is_err());
        assert!(group_name("a\nb").is_err());
        assert!(group_name(&"x".repeat(MAX_GROUP_NAME_LEN)).is_ok());
        assert!(group_name(&"x".repeat(MAX_GROUP_NAME_LEN + 1)).is_err());
        // Bytes, not characters: 43 three-byte characters are 129 bytes.
        assert!(group_name(&"中".repeat(43)).is_err());
    }

    #[test]
    fn id_lists_are_deduplicated() {
        assert_eq!(user_ids(vec![3, 2, 3, 1], Some(1), 10).unwrap(), vec![3, 2]);
        assert!(user_ids(vec![0], None, 10).is_err());
        assert!(user_ids(vec![1, 2, 3], None, 2).is_err());
        assert_eq!(user_ids(vec![1, 1, 2], None, 2).unwrap(), vec![1, 2]);
    }

    #[test]
    fn long_name_lists_are_cut() {
        let names: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
        assert_eq!(name_list(&names[..2]), "u0, u1");
        assert!(name_list(&names).ends_with("u9 and 2 others"));
    }

    #[test]
    fn events_carry_what_happened() {
        let actor = Actor {
            user_id: 7,
            name: "alice".into(),
            backend: false,
        };
        let e = group_event(
            &actor,
            9,
            GroupEventType::Role,
            vec![8],
            "",
            Some(Role::Admin),
            "alice made bob an admin".into(),
        );
        assert_eq!(e.kind, MessageKind::GroupEvent as i32);
        assert_eq!(
            (e.sender_id, e.sender_name.as_str(), e.group_id),
            (7, "alice", 9)
        );
        assert!(!e.id.is_empty() && e.timestamp_ms > 0);
        let g = e.group_event.unwrap();
        assert_eq!(g.r#type, GroupEventType::Role as i32);
        assert_eq!((g.user_ids, g.role.as_str()), (vec![8], "admin"));
        let system = group_event(
            &Actor::backend(),
            9,
            GroupEventType::Disbanded,
            vec![],
            "",
            None,
            String::new(),
        );
        assert_eq!(system.sender_id, 0);
    }
}
