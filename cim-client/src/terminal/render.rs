//! How things look on the terminal: messages, connection states, command answers.
//!
//! Every function here is pure (text in, text out) so the exact wording is unit-tested and
//! the app loop only decides *when* to print. Colour is optional ([`Style`]): off when
//! stdout is not a terminal or `NO_COLOR` is set, so piped output stays plain text.

use super::command::{To, COMMANDS};
use super::history::{find_matches, Entry};
use chrono::{DateTime, Local, TimeZone};
use cim_sdk::{
    pb,
    route::{ChannelInfo, OnlineUser},
    Added, ClientInfo, ConnState, ConversationView, GroupMembersPage, GroupView,
};
use std::{collections::HashMap, time::Duration};

const RESET: &str = "\x1b[0m";
const BOLD: &str = "\x1b[1m";
const DIM: &str = "\x1b[2m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const MAGENTA: &str = "\x1b[35m";
const CYAN: &str = "\x1b[36m";
const GREEN: &str = "\x1b[32m";
/// Search matches: bold on yellow background, readable on dark and light terminals.
pub const HIGHLIGHT: &str = "\x1b[1;30;43m";

/// Whether to use ANSI colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Style {
    pub color: bool,
}

impl Style {
    pub const PLAIN: Style = Style { color: false };
    pub const COLOR: Style = Style { color: true };

    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("{code}{text}{RESET}")
        } else {
            text.to_string()
        }
    }
}

/// `HH:MM:SS` in local time (a timestamp out of range shows as `??:??:??`).
pub fn time_of_day(ts_ms: i64) -> String {
    local(ts_ms).map_or_else(|| "??:??:??".into(), |t| t.format("%H:%M:%S").to_string())
}

/// `YYYY-MM-DD HH:MM:SS` in local time, for history, where the day matters.
pub fn date_time(ts_ms: i64) -> String {
    local(ts_ms).map_or_else(
        || "????-??-?? ??:??:??".into(),
        |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
    )
}

fn local(ts_ms: i64) -> Option<DateTime<Local>> {
    Local.timestamp_millis_opt(ts_ms).single()
}

/// Message bodies come from other users: control characters (escape sequences that could
/// move the cursor, clear the screen or retitle the terminal) are shown as `\u{..}` escapes
/// instead of being interpreted. Newlines are kept, indented under the message.
pub fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\n    "),
            '\t' => out.push(' '),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out
}

/// The tag of a message received while offline (replayed from the inbox at login).
pub const OFFLINE_TAG: &str = "[offline]";

/// A received message: `[12:03:04] bob → you: hi` (private), `[12:03:04] bob → all: hi`
/// (group), `[12:03:04] bob → #room1: hi` (channel), `[12:03:04] system: hi` (system). One that arrived while offline (`replayed`)
/// is tagged: `[12:03:04] [offline] bob → you: hi`, with the date too when it was sent on
/// another day than today: `[2024-05-01 12:03:04] [offline] …`.
pub fn incoming(style: Style, m: &pb::Message, replayed: bool) -> String {
    incoming_at(style, m, replayed, chrono::Utc::now().timestamp_millis())
}

/// [`incoming`] of a message of a stored group whose name is known (`team(7)` instead of
/// `group 7`).
pub fn incoming_in(style: Style, m: &pb::Message, replayed: bool, group: Option<&str>) -> String {
    incoming_full(
        style,
        m,
        replayed,
        chrono::Utc::now().timestamp_millis(),
        group,
    )
}

/// [`incoming`] as seen at `now_ms` (which decides whether the date is shown).
pub fn incoming_at(style: Style, m: &pb::Message, replayed: bool, now_ms: i64) -> String {
    incoming_full(style, m, replayed, now_ms, None)
}

fn incoming_full(
    style: Style,
    m: &pb::Message,
    replayed: bool,
    now_ms: i64,
    group: Option<&str>,
) -> String {
    let time = if replayed {
        let same_day = match (local(m.timestamp_ms), local(now_ms)) {
            (Some(t), Some(now)) => t.date_naive() == now.date_naive(),
            _ => false,
        };
        let when = if same_day {
            time_of_day(m.timestamp_ms)
        } else {
            date_time(m.timestamp_ms)
        };
        format!(
            "{} {}",
            style.paint(DIM, &format!("[{when}]")),
            style.paint(YELLOW, OFFLINE_TAG)
        )
    } else {
        style.paint(DIM, &format!("[{}]", time_of_day(m.timestamp_ms)))
    };
    let from = style.paint(
        BOLD,
        &sanitize(if m.sender_name.is_empty() {
            "system"
        } else {
            &m.sender_name
        }),
    );
    let body = sanitize(&m.body);
    match pb::MessageKind::try_from(m.kind).unwrap_or(pb::MessageKind::Unspecified) {
        pb::MessageKind::Private => {
            format!("{time} {from} → {}: {body}", style.paint(MAGENTA, "you"))
        }
        pb::MessageKind::Group => format!("{time} {from} → all: {body}"),
        pb::MessageKind::Channel => {
            format!("{time} {from} → {}: {body}", channel(style, &m.channel))
        }
        pb::MessageKind::GroupChat => {
            let group = group_label(style, m.group_id, group);
            format!("{time} {from} → {group}: {body}")
        }
        // A change of the group, said by the system: `[12:03:04] system → team(7): …`.
        pb::MessageKind::GroupEvent => {
            let group = group_label(style, m.group_id, group);
            format!("{time} {} → {group}: {body}", style.paint(CYAN, "system"))
        }
        // Receipts are events of their own ([`receipt`]); one shown as a message is odd but
        // harmless, so it reads like a system line.
        pb::MessageKind::System | pb::MessageKind::Receipt | pb::MessageKind::Unspecified => {
            format!("{time} {}: {body}", style.paint(CYAN, "system"))
        }
    }
}

/// A receipt for one of our messages: `[12:03:05] ✓ bob received your message (id 01J…)`.
pub fn receipt(style: Style, by_name: &str, message_id: &str, at_ms: i64) -> String {
    let time = style.paint(DIM, &format!("[{}]", time_of_day(at_ms)));
    let check = style.paint(GREEN, "✓");
    format!(
        "{time} {check} {} received your message (id {})",
        sanitize(by_name),
        sanitize(message_id)
    )
}

/// `#name`, coloured: how a channel is named everywhere.
pub fn channel(style: Style, name: &str) -> String {
    style.paint(GREEN, &format!("#{}", sanitize(name)))
}

/// How a stored group is named everywhere: `team(7)` when its name is known, else `group 7`.
pub fn group_label(style: Style, id: u64, name: Option<&str>) -> String {
    match name {
        Some(name) => style.paint(GREEN, &format!("{}({id})", sanitize(name))),
        None => style.paint(GREEN, &format!("group {id}")),
    }
}

/// One of our own messages, once the route accepted it: `[12:03:04] you → bob: hi`,
/// `you → all: hi`, `you → #room1: hi`, `you → group 7: hi`.
pub fn outgoing(style: Style, ts_ms: i64, to: &To, body: &str) -> String {
    outgoing_in(style, ts_ms, to, body, None)
}

/// [`outgoing`] to a stored group whose name is known: `you → team(7): hi`.
pub fn outgoing_in(style: Style, ts_ms: i64, to: &To, body: &str, group: Option<&str>) -> String {
    let time = style.paint(DIM, &format!("[{}]", time_of_day(ts_ms)));
    let to = match to {
        To::User(name) => style.paint(MAGENTA, &sanitize(name)),
        To::Channel(name) => channel(style, name),
        To::Group(id) => group_label(style, *id, group),
        To::All => "all".into(),
    };
    format!("{time} you → {to}: {}", sanitize(body))
}

/// A channel message that reached nobody.
pub fn nobody_in_channel(style: Style, name: &str) -> String {
    style.paint(
        YELLOW,
        &format!(
            "(no other member of #{} is online: not delivered)",
            sanitize(name)
        ),
    )
}

/// The answer of `:join`: `joined #room1`, or `already a member of #room1`.
pub fn joined(style: Style, name: &str, joined: bool) -> String {
    let name = channel(style, name);
    if joined {
        format!("joined {name}")
    } else {
        format!("already a member of {name}")
    }
}

/// The answer of `:leave`: `left #room1`, or `not a member of #room1`.
pub fn left(style: Style, name: &str, left: bool) -> String {
    let name = channel(style, name);
    if left {
        format!("left {name}")
    } else {
        format!("not a member of {name}: nothing to leave")
    }
}

/// A send refused because we are not a member of the channel.
pub fn not_a_member(name: &str) -> String {
    let name = sanitize(name);
    format!("not sent: you are not a member of #{name} (:join {name} first)")
}

/// The answer of `:chans`: a count line, then one channel per line with its counts.
pub fn channels(style: Style, list: &[ChannelInfo]) -> String {
    if list.is_empty() {
        return "you are in no channel (:join <channel> to join one).".into();
    }
    let n = list.len();
    let mut out = format!(
        "you are in {n} {}:",
        if n == 1 { "channel" } else { "channels" }
    );
    let width = list.iter().map(|c| sanitize(&c.name).chars().count()).max();
    let width = width.unwrap_or(0);
    for c in list {
        let pad = " ".repeat(width - sanitize(&c.name).chars().count());
        let members = if c.members == 1 { "member" } else { "members" };
        out.push_str(&format!(
            "\n  {}{pad}  {} {members}, {} online",
            channel(style, &c.name),
            c.members,
            c.online
        ));
    }
    out
}

/// The line that follows an accepted send, if any: a private message waits for its offline
/// receiver, or a group or channel message reached nobody. Not for a repeat (a send written
/// again after a lost connection): the send before it did the delivering.
pub fn after_sent(style: Style, to: &To, outcome: &cim_sdk::SendOutcome) -> Option<String> {
    let nobody = outcome.delivered == 0 && !outcome.repeat;
    match to {
        To::User(name) if outcome.status == pb::SendStatus::Stored => Some(offline(style, name)),
        To::All if nobody => Some(nobody_online(style)),
        To::Channel(name) if nobody => Some(nobody_in_channel(style, name)),
        _ => None,
    }
}

/// A group message that reached nobody.
pub fn nobody_online(style: Style) -> String {
    style.paint(YELLOW, "(nobody else is online: not delivered)")
}

/// A private message to a user who is not connected: stored, delivered at their next login.
pub fn offline(style: Style, name: &str) -> String {
    style.paint(
        YELLOW,
        &format!(
            "{} is offline: they will get it at their next login",
            sanitize(name)
        ),
    )
}

/// An error line, `prefix: detail`, in red.
pub fn error(style: Style, text: &str) -> String {
    style.paint(RED, text)
}

/// A neutral notice (connection state, confirmations), in yellow.
pub fn notice(style: Style, text: &str) -> String {
    style.paint(YELLOW, text)
}

/// `1.2s`, `350ms`: short and precise enough for retry delays.
pub fn short_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// The line shown when the connection state changes.
pub fn state(s: &ConnState) -> String {
    match s {
        ConnState::Connecting => "connecting…".into(),
        ConnState::Connected { server_id, addr } => {
            format!("connected to server {server_id} ({addr})")
        }
        ConnState::Reconnecting {
            attempt,
            retry_in,
            reason,
        } => format!(
            "reconnecting… (attempt {attempt}, retry in {}): {reason}",
            short_duration(*retry_in)
        ),
        ConnState::Closed { reason } => format!("disconnected: {reason}"),
    }
}

/// Which connection-state changes get a line: one short line per change a user cares about,
/// not one per reconnect attempt. While reconnecting, "connecting…" is not shown (an attempt
/// is not news) and a reconnecting line repeats only when its reason changes; the first
/// connect, every connected and the final close are always shown.
#[derive(Debug, Default)]
pub struct StateLines {
    last: Option<String>,
    reconnecting_for: Option<String>,
}

impl StateLines {
    /// The line to print for `s`, if any.
    pub fn line(&mut self, s: &ConnState) -> Option<String> {
        let line = match s {
            ConnState::Connecting if self.reconnecting_for.is_some() => return None,
            ConnState::Reconnecting { reason, .. } => {
                if self.reconnecting_for.as_deref() == Some(reason.as_str()) {
                    return None;
                }
                self.reconnecting_for = Some(reason.clone());
                state(s)
            }
            _ => {
                self.reconnecting_for = None;
                state(s)
            }
        };
        if self.last.as_deref() == Some(line.as_str()) {
            return None;
        }
        self.last = Some(line.clone());
        Some(line)
    }
}

/// Short state for `:info`.
pub fn state_word(s: &ConnState) -> String {
    match s {
        ConnState::Connecting => "connecting".into(),
        ConnState::Connected { .. } => "connected".into(),
        ConnState::Reconnecting { attempt, .. } => format!("reconnecting (attempt {attempt})"),
        ConnState::Closed { reason } => format!("closed ({reason})"),
    }
}

/// `kicked: <why>[: <server's message>]`; a force-offline by the service (business API):
/// `disconnected by the service[: <its message>]`.
pub fn kicked(reason: pb::KickReason, message: &str) -> String {
    let why = match reason {
        pb::KickReason::ServerShutdown => "the server is shutting down",
        pb::KickReason::SlowConsumer => "messages were not read fast enough",
        pb::KickReason::LoggedOut => "logged out",
        pb::KickReason::Replaced => "logged in elsewhere",
        pb::KickReason::Admin => return by_service(message),
        pb::KickReason::Unspecified => "no reason given",
    };
    if message.is_empty() {
        format!("kicked: {why}")
    } else {
        format!("kicked: {why}: {}", sanitize(message))
    }
}

/// `disconnected by the service[: <its message>]`.
fn by_service(message: &str) -> String {
    const BY_SERVICE: &str = "disconnected by the service";
    // The route's message when the service gave none is this very phrase.
    let message = message.trim();
    if message.is_empty() || message.eq_ignore_ascii_case(BY_SERVICE) {
        BY_SERVICE.into()
    } else {
        format!("{BY_SERVICE}: {}", sanitize(message))
    }
}

/// The answer of `:olu` / `:pu`: a count line, then one user per line. `me` is marked.
/// `limit` is how many were asked for: reaching it means there may be more.
pub fn online(
    style: Style,
    users: &[OnlineUser],
    prefix: Option<&str>,
    me: u64,
    limit: usize,
) -> String {
    let n = users.len();
    let plural = if n == 1 { "user" } else { "users" };
    let mut out = match prefix {
        Some(p) => format!("{n} {plural} online whose name starts with {:?}", p),
        None => format!("{n} {plural} online"),
    };
    if n >= limit {
        out.push_str(&format!(" (first {limit} shown)"));
    }
    out.push(if n == 0 { '.' } else { ':' });
    for u in users {
        let name = style.paint(BOLD, &sanitize(&u.name));
        let you = if u.user_id == me { " (you)" } else { "" };
        out.push_str(&format!(
            "\n  {name}{you}  #{} on {}",
            u.user_id, u.server_id
        ));
    }
    out
}

/// The answer of `:info`.
pub fn info(i: &ClientInfo, history: Option<&std::path::Path>) -> String {
    let server = match (&i.server_id, &i.server_addr) {
        (Some(id), Some(addr)) => format!("{id} ({addr})"),
        (Some(id), None) => id.clone(),
        _ => "none".into(),
    };
    let history = history.map_or_else(|| "disabled".into(), |p| p.display().to_string());
    format!(
        "user:    {} (#{})\nroute:   {}\nserver:  {server}\nstate:   {}\nhistory: {history}",
        i.name,
        i.user_id,
        i.route_url,
        state_word(&i.state)
    )
}

/// [`info`] with the total of unread messages (or why it is unknown) as a last line.
pub fn info_with_unread(
    i: &ClientInfo,
    history: Option<&std::path::Path>,
    unread: &Result<u64, String>,
) -> String {
    let unread = match unread {
        Ok(n) => n.to_string(),
        Err(why) => format!("unknown ({why})"),
    };
    format!("{}\nunread:  {unread}", info(i, history))
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// The answer of `:groups`: one group per line, `7  team  3 members, 2 unread`; `unread`
/// maps group ids to their unread counts (a group missing there has none).
pub fn groups(style: Style, list: &[GroupView], unread: &HashMap<u64, u64>) -> String {
    if list.is_empty() {
        return "you are in no group (:gnew <name> [user …] to create one).".into();
    }
    let mut out = format!(
        "you are in {}:",
        plural(list.len() as u64, "group", "groups")
    );
    let id_width = list.iter().map(|g| g.id.to_string().len()).max();
    let name_width = list.iter().map(|g| sanitize(&g.name).chars().count()).max();
    let (id_width, name_width) = (id_width.unwrap_or(0), name_width.unwrap_or(0));
    for g in list {
        let name = sanitize(&g.name);
        let pad = " ".repeat(name_width - name.chars().count());
        let unread = unread.get(&g.id).copied().unwrap_or(0);
        out.push_str(&format!(
            "\n  {:>id_width$}  {}{pad}  {}, {unread} unread",
            g.id,
            style.paint(GREEN, &name),
            plural(g.members, "member", "members"),
        ));
    }
    out
}

/// The answer of `:gnew`: `created team(7) with 3 members`, and whom adding skipped.
pub fn group_created(
    style: Style,
    group: &GroupView,
    added: Option<&Added>,
    names: &HashMap<u64, String>,
) -> String {
    let mut out = format!(
        "created {} with {}",
        group_label(style, group.id, Some(&group.name)),
        plural(group.members, "member", "members")
    );
    if let Some(added) = added {
        out.push_str(&skipped(&added.too_many_groups, names));
    }
    out
}

/// The answer of `:gadd`: who was added, who was a member already, who could not be.
pub fn group_added(label: &str, added: &Added, names: &HashMap<u64, String>) -> String {
    let mut parts = Vec::new();
    if !added.added.is_empty() {
        parts.push(format!("added {} to {label}", who(&added.added, names)));
    }
    if !added.already.is_empty() {
        parts.push(format!("{} already in {label}", who(&added.already, names)));
    }
    let mut out = if parts.is_empty() {
        format!("nobody was added to {label}")
    } else {
        parts.join("; ")
    };
    out.push_str(&skipped(&added.too_many_groups, names));
    out
}

/// `; not added (in too many groups): bob` when someone could not be added.
fn skipped(ids: &[u64], names: &HashMap<u64, String>) -> String {
    if ids.is_empty() {
        String::new()
    } else {
        format!("; not added (in too many groups): {}", who(ids, names))
    }
}

/// Names of `ids` where known, else `#id`, comma-separated.
fn who(ids: &[u64], names: &HashMap<u64, String>) -> String {
    ids.iter()
        .map(|id| {
            names
                .get(id)
                .map_or_else(|| format!("#{id}"), |n| sanitize(n))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The answer of `:gmembers`: one member per line with id and role.
pub fn group_members(style: Style, label: &str, page: &GroupMembersPage) -> String {
    let n = page.members.len() as u64;
    let mut out = format!("{label}: {}", plural(n, "member", "members"));
    if page.next.is_some() {
        out.push_str(&format!(" (first {n} shown)"));
    }
    out.push(':');
    let width = page
        .members
        .iter()
        .map(|m| sanitize(&m.name).chars().count())
        .max();
    let width = width.unwrap_or(0);
    for m in &page.members {
        let name = sanitize(&m.name);
        let pad = " ".repeat(width - name.chars().count());
        out.push_str(&format!(
            "\n  {}{pad}  #{}  {}",
            style.paint(BOLD, &name),
            m.user_id,
            sanitize(&m.role)
        ));
    }
    out
}

/// The answer of `:hist`: a title line, then the messages oldest first, each
/// `[date time] alice: text` (ours as `you`), group events as `[…] system: …`.
pub fn history_page(style: Style, title: &str, messages: &[pb::Message], me: u64) -> String {
    if messages.is_empty() {
        return format!("no stored message with {title}");
    }
    let mut out = format!(
        "last {} with {title}:",
        plural(messages.len() as u64, "message", "messages")
    );
    for m in messages {
        let time = style.paint(DIM, &format!("[{}]", date_time(m.timestamp_ms)));
        let event = m.kind == pb::MessageKind::GroupEvent as i32;
        let from = if event || m.sender_name.is_empty() {
            style.paint(CYAN, "system")
        } else if m.sender_id == me {
            style.paint(MAGENTA, "you")
        } else {
            style.paint(BOLD, &sanitize(&m.sender_name))
        };
        out.push_str(&format!("\n  {time} {from}: {}", sanitize(&m.body)));
    }
    out
}

/// How a conversation is named in `:unread`: `bob`, or `team(7)`.
pub fn conversation_label(style: Style, c: &ConversationView) -> String {
    if c.kind == "group" {
        group_label(style, c.id, Some(&c.name))
    } else {
        style.paint(MAGENTA, &sanitize(&c.name))
    }
}

/// The answer of `:unread`: the conversations with unread messages, in the order given
/// (the route's: newest activity first), `bob  2 unread`.
pub fn unread(style: Style, list: &[ConversationView]) -> String {
    let with: Vec<&ConversationView> = list.iter().filter(|c| c.unread > 0).collect();
    if with.is_empty() {
        return "no unread messages.".into();
    }
    let total: u64 = with.iter().map(|c| c.unread).sum();
    let mut out = format!(
        "{} in {}:",
        plural(total, "unread message", "unread messages"),
        plural(with.len() as u64, "conversation", "conversations")
    );
    let labels: Vec<String> = with
        .iter()
        .map(|c| conversation_label(Style::PLAIN, c))
        .collect();
    let width = labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    for (c, plain) in with.iter().zip(&labels) {
        let pad = " ".repeat(width - plain.chars().count());
        out.push_str(&format!(
            "\n  {}{pad}  {} unread",
            conversation_label(style, c),
            c.unread
        ));
    }
    out
}

/// The command list (`:help`, `:all`, unknown commands).
pub fn help(style: Style) -> String {
    let width = COMMANDS.iter().map(|(s, _)| s.chars().count()).max();
    let width = width.unwrap_or(0);
    let mut out = String::from("commands:");
    for (syntax, what) in COMMANDS {
        let pad = " ".repeat(width - syntax.chars().count());
        out.push_str(&format!("\n  {}{pad}  {what}", style.paint(BOLD, syntax)));
    }
    out
}

/// `text` with every case-insensitive occurrence of `keyword` highlighted.
pub fn highlight(style: Style, text: &str, keyword: &str) -> String {
    if !style.color {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut at = 0;
    for (start, end) in find_matches(text, keyword) {
        out.push_str(&text[at..start]);
        out.push_str(HIGHLIGHT);
        out.push_str(&text[start..end]);
        out.push_str(RESET);
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

/// The answer of `:q <keyword>`: matches oldest first, keyword highlighted.
pub fn search(style: Style, keyword: &str, found: &[Entry], left_out: usize) -> String {
    if found.is_empty() {
        return format!("no message in the history matches {keyword:?}");
    }
    let n = found.len() + left_out;
    let plural = if n == 1 { "message" } else { "messages" };
    let mut out = format!("{n} {plural} match {keyword:?}");
    if left_out > 0 {
        out.push_str(&format!(" (newest {} shown)", found.len()));
    }
    out.push(':');
    for e in found {
        // Highlight before sanitizing would split escapes; sanitize first, then search the
        // text as displayed (a keyword never contains control characters the user could type).
        let text = sanitize(&e.searchable());
        out.push_str(&format!(
            "\n  {} {}",
            style.paint(DIM, &format!("[{}]", date_time(e.ts))),
            highlight(style, &text, keyword)
        ));
    }
    out
}

#[cfg(test)]
mod tests;
