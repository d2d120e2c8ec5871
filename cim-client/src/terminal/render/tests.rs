//! The exact wording of everything the terminal shows, one test per kind of output.

use super::*;
use crate::terminal::history::{Direction, Kind};

fn msg(kind: pb::MessageKind, from: &str, body: &str) -> pb::Message {
    pb::Message {
        id: "01".into(),
        sender_id: 2,
        sender_name: from.into(),
        receiver_id: 1,
        kind: kind as i32,
        body: body.into(),
        timestamp_ms: 1_700_000_000_000,
        ..Default::default()
    }
}

fn strip_time(s: &str) -> &str {
    // "[HH:MM:SS] " is 11 characters.
    assert!(s.starts_with('[') && &s[9..11] == "] ", "{s}");
    &s[11..]
}

#[test]
fn time_is_local_hh_mm_ss() {
    let t = time_of_day(1_700_000_000_000);
    assert_eq!(t.len(), 8);
    assert_eq!(&t[2..3], ":");
    assert_eq!(&t[5..6], ":");
    // 1_700_000_000 s is 22:13:20 UTC; today's zone offsets are whole minutes, so the
    // seconds read the same in every local time zone.
    assert_eq!(&t[6..], "20");
    assert_eq!(time_of_day(i64::MAX), "??:??:??");
    assert_eq!(date_time(1_700_000_000_000).len(), 19);
}

#[test]
fn incoming_private_group_and_system() {
    let p = incoming(
        Style::PLAIN,
        &msg(pb::MessageKind::Private, "bob", "hi"),
        false,
    );
    assert_eq!(strip_time(&p), "bob → you: hi");
    let g = incoming(
        Style::PLAIN,
        &msg(pb::MessageKind::Group, "bob", "hi all"),
        false,
    );
    assert_eq!(strip_time(&g), "bob → all: hi all");
    let s = incoming(
        Style::PLAIN,
        &msg(pb::MessageKind::System, "", "maintenance"),
        false,
    );
    assert_eq!(strip_time(&s), "system: maintenance");
    let mut c = msg(pb::MessageKind::Channel, "bob", "x");
    c.channel = "news".into();
    assert_eq!(
        strip_time(&incoming(Style::PLAIN, &c, false)),
        "bob → #news: x"
    );
    c.channel = "频道\x1b[2J".into();
    let line = incoming(Style::COLOR, &c, false);
    assert!(
        line.contains(&format!("{GREEN}#频道\\u{{1b}}[2J{RESET}")),
        "{line:?}"
    );
}

#[test]
fn channel_answers() {
    assert_eq!(joined(Style::PLAIN, "room1", true), "joined #room1");
    assert_eq!(
        joined(Style::PLAIN, "room1", false),
        "already a member of #room1"
    );
    assert_eq!(left(Style::PLAIN, "room1", true), "left #room1");
    assert_eq!(
        left(Style::PLAIN, "room1", false),
        "not a member of #room1: nothing to leave"
    );
    assert_eq!(
        not_a_member("room1"),
        "not sent: you are not a member of #room1 (:join room1 first)"
    );
    assert_eq!(
        nobody_in_channel(Style::PLAIN, "room1"),
        "(no other member of #room1 is online: not delivered)"
    );
    let info = |name: &str, members, online| ChannelInfo {
        name: name.into(),
        members,
        online,
    };
    assert_eq!(
        channels(Style::PLAIN, &[info("a", 1, 1), info("room1", 3, 2)]),
        "you are in 2 channels:\n  #a      1 member, 1 online\n  #room1  3 members, 2 online"
    );
    assert_eq!(
        channels(Style::PLAIN, &[info("频道", 2, 0)]),
        "you are in 1 channel:\n  #频道  2 members, 0 online"
    );
    assert_eq!(
        channels(Style::PLAIN, &[]),
        "you are in no channel (:join <channel> to join one)."
    );
}

#[test]
fn messages_received_while_offline_are_tagged_with_their_time() {
    let m = msg(pb::MessageKind::Private, "bob", "hi");
    // Seen a second later: the same day in every time zone (the seconds read :20).
    let same_day = incoming_at(Style::PLAIN, &m, true, m.timestamp_ms + 1000);
    assert_eq!(
        same_day,
        format!("[{}] [offline] bob → you: hi", time_of_day(m.timestamp_ms))
    );
    // Two days later: the date is shown too.
    let later = incoming_at(Style::PLAIN, &m, true, m.timestamp_ms + 2 * 86_400_000);
    assert_eq!(
        later,
        format!("[{}] [offline] bob → you: hi", date_time(m.timestamp_ms))
    );
    // Live messages carry no tag.
    assert!(!incoming(Style::PLAIN, &m, false).contains(OFFLINE_TAG));
    let coloured = incoming_at(Style::COLOR, &m, true, m.timestamp_ms);
    assert!(coloured.contains(&format!("{YELLOW}{OFFLINE_TAG}{RESET}")));
}

#[test]
fn receipt_lines() {
    let line = receipt(Style::PLAIN, "bob", "01JABC", 1_700_000_000_000);
    assert_eq!(strip_time(&line), "✓ bob received your message (id 01JABC)");
    let line = receipt(Style::PLAIN, "eve\x1b[2J", "x\x07", 0);
    assert!(!line.contains('\x1b') && !line.contains('\x07'), "{line:?}");
}

#[test]
fn colour_only_when_asked() {
    let m = msg(pb::MessageKind::Private, "bob", "hi");
    assert!(!incoming(Style::PLAIN, &m, false).contains('\x1b'));
    let coloured = incoming(Style::COLOR, &m, false);
    assert!(
        coloured.contains(BOLD) && coloured.contains(RESET),
        "{coloured:?}"
    );
}

#[test]
fn control_characters_from_others_are_neutralised() {
    let m = msg(
        pb::MessageKind::Group,
        "eve\x1b[2J",
        "\x1b]0;pwned\x07line1\nline2",
    );
    let line = incoming(Style::PLAIN, &m, false);
    assert!(!line.contains('\x1b') && !line.contains('\x07'), "{line:?}");
    assert!(
        line.contains("\\u{1b}]0;pwned\\u{7}line1\n    line2"),
        "{line:?}"
    );
}

#[test]
fn outgoing_lines() {
    assert_eq!(
        strip_time(&outgoing(Style::PLAIN, 0, &To::User("bob".into()), "hi")),
        "you → bob: hi"
    );
    assert_eq!(
        strip_time(&outgoing(Style::PLAIN, 0, &To::All, "hi")),
        "you → all: hi"
    );
    assert_eq!(
        strip_time(&outgoing(
            Style::PLAIN,
            0,
            &To::Channel("room1".into()),
            "hi"
        )),
        "you → #room1: hi"
    );
    assert_eq!(
        offline(Style::PLAIN, "carol"),
        "carol is offline: they will get it at their next login"
    );
}

#[test]
fn what_follows_a_send() {
    let sent = |status, delivered, repeat| cim_sdk::SendOutcome {
        message_id: "m".into(),
        status,
        delivered,
        timestamp_ms: 0,
        repeat,
        log_seq: 0,
    };
    let (stored, delivered) = (pb::SendStatus::Stored, pb::SendStatus::Delivered);
    let bob = To::User("bob".into());
    let room = To::Channel("room1".into());
    let after = |to: &To, outcome| after_sent(Style::PLAIN, to, &outcome);
    assert_eq!(
        after(&bob, sent(stored, 0, false)).as_deref(),
        Some("bob is offline: they will get it at their next login")
    );
    assert_eq!(after(&bob, sent(delivered, 1, false)), None);
    assert_eq!(
        after(&To::All, sent(delivered, 0, false)).as_deref(),
        Some("(nobody else is online: not delivered)")
    );
    assert_eq!(
        after(&room, sent(delivered, 0, false)).as_deref(),
        Some("(no other member of #room1 is online: not delivered)")
    );
    // Delivered by the send before it, whose answer the dropped connection lost.
    assert_eq!(after(&To::All, sent(delivered, 0, true)), None);
    assert_eq!(after(&room, sent(delivered, 0, true)), None);
    assert_eq!(after(&To::All, sent(delivered, 3, false)), None);
}

#[test]
fn state_lines() {
    assert_eq!(state(&ConnState::Connecting), "connecting…");
    assert_eq!(
        state(&ConnState::Connected {
            server_id: "s1".into(),
            addr: "127.0.0.1:9000".into()
        }),
        "connected to server s1 (127.0.0.1:9000)"
    );
    assert_eq!(
        state(&ConnState::Reconnecting {
            attempt: 2,
            retry_in: Duration::from_millis(1234),
            reason: "connection lost".into()
        }),
        "reconnecting… (attempt 2, retry in 1.2s): connection lost"
    );
    assert_eq!(
        state(&ConnState::Closed {
            reason: "logged out".into()
        }),
        "disconnected: logged out"
    );
    assert_eq!(short_duration(Duration::from_millis(350)), "350ms");
}

#[test]
fn a_long_reconnect_shows_one_line_per_change_not_per_attempt() {
    let reconnecting = |attempt, reason: &str| ConnState::Reconnecting {
        attempt,
        retry_in: Duration::from_secs(5),
        reason: reason.into(),
    };
    let connected = ConnState::Connected {
        server_id: "s2".into(),
        addr: "127.0.0.1:9010".into(),
    };
    let mut events = vec![
        ConnState::Connecting,
        connected.clone(),
        reconnecting(1, "connection closed by the server"),
    ];
    // Two minutes of attempts against a route that is down, then one that refuses.
    for attempt in 2..=14 {
        events.push(ConnState::Connecting);
        events.push(reconnecting(
            attempt,
            "route unreachable: Connection refused",
        ));
    }
    for attempt in 15..=16 {
        events.push(ConnState::Connecting);
        events.push(reconnecting(
            attempt,
            "503 unavailable: no connection server",
        ));
    }
    events.push(ConnState::Connecting);
    events.push(connected);
    events.push(ConnState::Closed {
        reason: "logged out".into(),
    });
    let mut lines = StateLines::default();
    let shown: Vec<String> = events.iter().filter_map(|s| lines.line(s)).collect();
    assert_eq!(
        shown,
        [
            "connecting…",
            "connected to server s2 (127.0.0.1:9010)",
            "reconnecting… (attempt 1, retry in 5.0s): connection closed by the server",
            "reconnecting… (attempt 2, retry in 5.0s): route unreachable: Connection refused",
            "reconnecting… (attempt 15, retry in 5.0s): 503 unavailable: no connection server",
            "connected to server s2 (127.0.0.1:9010)",
            "disconnected: logged out",
        ]
    );
}

#[test]
fn kick_lines() {
    assert_eq!(
        kicked(pb::KickReason::Admin, ""),
        "disconnected by the service"
    );
    assert_eq!(
        kicked(pb::KickReason::Admin, "disconnected by the service"),
        "disconnected by the service"
    );
    assert_eq!(
        kicked(pb::KickReason::Admin, "maintenance\x1b[2J"),
        "disconnected by the service: maintenance\\u{1b}[2J"
    );
    assert_eq!(
        kicked(pb::KickReason::ServerShutdown, "bye"),
        "kicked: the server is shutting down: bye"
    );
}

#[test]
fn online_lists_count_and_mark_me() {
    let users = vec![
        OnlineUser {
            user_id: 1,
            name: "alice".into(),
            server_id: "s1".into(),
        },
        OnlineUser {
            user_id: 2,
            name: "bob".into(),
            server_id: "s2".into(),
        },
    ];
    let all = online(Style::PLAIN, &users, None, 1, 100);
    assert_eq!(
        all,
        "2 users online:\n  alice (you)  #1 on s1\n  bob  #2 on s2"
    );
    let some = online(Style::PLAIN, &users[..1], Some("al"), 1, 100);
    assert!(
        some.starts_with("1 user online whose name starts with \"al\":"),
        "{some}"
    );
    assert_eq!(
        online(Style::PLAIN, &[], Some("zz"), 1, 100),
        "0 users online whose name starts with \"zz\"."
    );
    assert!(online(Style::PLAIN, &users, None, 1, 2).contains("(first 2 shown)"));
}

#[test]
fn info_shows_user_route_server_state() {
    let i = ClientInfo {
        user_id: 7,
        name: "alice".into(),
        route_url: "http://r:8080".into(),
        server_id: Some("s1".into()),
        server_addr: Some("127.0.0.1:9000".into()),
        state: ConnState::Connected {
            server_id: "s1".into(),
            addr: "127.0.0.1:9000".into(),
        },
    };
    let text = info(&i, Some(std::path::Path::new("/h/history.jsonl")));
    assert_eq!(
        text,
        "user:    alice (#7)\nroute:   http://r:8080\nserver:  s1 (127.0.0.1:9000)\n\
         state:   connected\nhistory: /h/history.jsonl"
    );
    let closed = ClientInfo {
        server_id: None,
        server_addr: None,
        state: ConnState::Closed { reason: "x".into() },
        ..i
    };
    let text = info(&closed, None);
    assert!(text.contains("server:  none") && text.contains("closed (x)"));
    assert!(text.contains("history: disabled"));
}

#[test]
fn help_lists_every_command_aligned() {
    let h = help(Style::PLAIN);
    assert_eq!(h.lines().count(), COMMANDS.len() + 1);
    let columns: std::collections::HashSet<usize> = COMMANDS
        .iter()
        .map(|(syntax, what)| {
            let line = h
                .lines()
                .find(|l| l.trim_start().starts_with(syntax) && l.ends_with(what))
                .unwrap_or_else(|| panic!("{syntax} missing:\n{h}"));
            line.chars().count() - what.chars().count()
        })
        .collect();
    assert_eq!(columns.len(), 1, "descriptions start in one column:\n{h}");
}

#[test]
fn highlight_marks_every_match_case_insensitively() {
    assert_eq!(
        highlight(Style::COLOR, "Hi hi", "hi"),
        format!("{HIGHLIGHT}Hi{RESET} {HIGHLIGHT}hi{RESET}")
    );
    assert_eq!(highlight(Style::COLOR, "nothing", "xyz"), "nothing");
    assert_eq!(highlight(Style::PLAIN, "Hi hi", "hi"), "Hi hi");
    assert_eq!(
        highlight(Style::COLOR, "说你好", "你好"),
        format!("说{HIGHLIGHT}你好{RESET}")
    );
}

#[test]
fn search_answer() {
    let e = Entry {
        ts: 1_700_000_000_000,
        id: "1".into(),
        dir: Direction::Out,
        kind: Kind::Private,
        from: "alice".into(),
        to: Some("bob".into()),
        body: "say HI".into(),
    };
    let text = search(Style::COLOR, "hi", std::slice::from_ref(&e), 0);
    assert!(text.starts_with("1 message match \"hi\":"), "{text}");
    assert!(
        text.contains(&format!("alice → bob: say {HIGHLIGHT}HI{RESET}")),
        "{text:?}"
    );
    let text = search(Style::PLAIN, "hi", std::slice::from_ref(&e), 4);
    assert!(text.starts_with("5 messages match \"hi\" (newest 1 shown):"));
    assert_eq!(
        search(Style::PLAIN, "zz", &[], 0),
        "no message in the history matches \"zz\""
    );
}

#[test]
fn stored_group_lines() {
    let mut m = msg(pb::MessageKind::GroupChat, "alice", "hi team");
    m.group_id = 7;
    assert_eq!(
        strip_time(&incoming_in(Style::PLAIN, &m, false, Some("team"))),
        "alice → team(7): hi team"
    );
    assert_eq!(
        strip_time(&incoming_in(Style::PLAIN, &m, false, None)),
        "alice → group 7: hi team"
    );
    m.kind = pb::MessageKind::GroupEvent as i32;
    m.body = "alice added bob".into();
    assert_eq!(
        strip_time(&incoming_in(Style::PLAIN, &m, false, Some("team"))),
        "system → team(7): alice added bob"
    );
    assert_eq!(
        strip_time(&outgoing_in(
            Style::PLAIN,
            0,
            &To::Group(7),
            "x",
            Some("team")
        )),
        "you → team(7): x"
    );
    assert_eq!(
        strip_time(&outgoing(Style::PLAIN, 0, &To::Group(7), "x")),
        "you → group 7: x"
    );
}

fn conv(kind: &str, id: u64, name: &str, unread: u64) -> ConversationView {
    ConversationView {
        kind: kind.into(),
        id,
        name: name.into(),
        last: None,
        top: unread,
        read_seq: 0,
        unread,
        peer_read_seq: 0,
        activity_ms: 0,
    }
}

#[test]
fn unread_and_groups_answers() {
    let list = [
        conv("group", 7, "team", 3),
        conv("user", 2, "bob", 0),
        conv("user", 3, "carol", 1),
    ];
    assert_eq!(
        unread(Style::PLAIN, &list),
        "4 unread messages in 2 conversations:\n  team(7)  3 unread\n  carol    1 unread"
    );
    assert_eq!(unread(Style::PLAIN, &list[1..2]), "no unread messages.");
    let g = GroupView {
        id: 7,
        name: "team".into(),
        owner: 1,
        created_ms: 0,
        members: 2,
        top: 3,
        version: 1,
    };
    let counts = HashMap::from([(7, 3)]);
    assert_eq!(
        groups(Style::PLAIN, std::slice::from_ref(&g), &counts),
        "you are in 1 group:\n  7  team  2 members, 3 unread"
    );
    assert!(groups(Style::PLAIN, &[], &counts).contains(":gnew"));
    let added = Added {
        added: vec![2],
        already: vec![3],
        too_many_groups: vec![4],
        group_full: false,
        seq: 5,
    };
    let names = HashMap::from([(2, "bob".to_string())]);
    assert_eq!(
        group_added("team(7)", &added, &names),
        "added bob to team(7); #3 already in team(7); not added (in too many groups): #4"
    );
}
