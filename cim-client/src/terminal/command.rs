//! What a typed line means: a message (to everyone or to one user) or a built-in command.
//!
//! The syntax follows CIM's terminal client:
//! - a plain line goes to everyone online;
//! - `bob;;hi` (CIM's private syntax) and `@bob hi` go to bob only;
//! - `:r bob hi` goes to bob only and asks for a receipt;
//! - `#room hi` goes to the online members of channel `room` (`:join room` first);
//!   `##text` sends `#text` to everyone;
//! - `:g 7 hi` goes to stored group 7 (`:gnew`, `:groups`); users in group commands are
//!   names or ids ([`UserRef`]), groups are ids;
//! - a line starting with `:` and a letter is a command (`:olu`, `:q!`, ...);
//!   `::text` sends `:text` literally, and `:)`-like lines are plain messages.
//!
//! Parsing is pure: it never talks to the network, so every rule is unit-tested here.

use cim_sdk::route::channel_name_error;
use std::time::Duration;

/// Longest delay `:delay` accepts. A delayed message lives only in this process, so an hour
/// is plenty and bounds how many timers a user can pile up by mistake.
pub const MAX_DELAY_SECS: u64 = 3600;
/// Messages `:hist` shows when no count is given.
pub const DEFAULT_HIST: usize = 20;
/// Most messages one `:hist` shows (the route's page bound is larger; a terminal screen is not).
pub const MAX_HIST: usize = 100;

/// A user named in a group command: a word of digits is a user id, anything else a name (to
/// be resolved to an id by the app). So a user whose name is all digits is named by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserRef {
    Id(u64),
    Name(String),
}

impl std::fmt::Display for UserRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserRef::Id(id) => write!(f, "#{id}"),
            UserRef::Name(name) => f.write_str(name),
        }
    }
}

/// A conversation named by `:hist`: a user, or a stored group (`#<id>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConvRef {
    User(UserRef),
    Group(u64),
}

/// Who a message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum To {
    /// Everyone online except the sender (CIM's group chat).
    All,
    /// One user, by name.
    User(String),
    /// The online members of a channel (the sender must be one), by name without the `#`.
    Channel(String),
    /// A stored group, by id (the sender must be a member).
    Group(u64),
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub to: To,
    pub body: String,
    /// Ask for a receipt (`:r`; private messages only).
    pub receipt: bool,
}

impl Outgoing {
    fn new(to: To, body: impl Into<String>) -> Self {
        Self {
            to,
            body: body.into(),
            receipt: false,
        }
    }
}

/// One parsed input line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Blank line: ignored.
    Empty,
    /// Send a message now.
    Send(Outgoing),
    /// `:all` / `:help`: list the commands.
    Help,
    /// `:olu` (all online users) or `:pu <prefix>` (online users whose name starts with it).
    Online { prefix: Option<String> },
    /// `:q!`: log out and exit.
    Quit,
    /// `:q <keyword>`: search the local history.
    Search(String),
    /// `:info`: who am I, where am I connected.
    Info,
    /// `:join <channel>`.
    Join(String),
    /// `:leave <channel>`.
    Leave(String),
    /// `:chans`: my channels with their member and online counts.
    Channels,
    /// `:gnew <name> [user …]`: create a stored group with these members.
    GroupNew { name: String, members: Vec<UserRef> },
    /// `:groups`: my stored groups with member and unread counts.
    Groups,
    /// `:gadd <id> <user …>`.
    GroupAdd { group: u64, users: Vec<UserRef> },
    /// `:gkick <id> <user>`.
    GroupKick { group: u64, user: UserRef },
    /// `:gleave <id>`.
    GroupLeave(u64),
    /// `:gmembers <id>`.
    GroupMembers(u64),
    /// `:hist <user|#group-id> [n]`: the last `n` stored messages of a conversation.
    History { conversation: ConvRef, count: usize },
    /// `:unread`: conversations with unread messages.
    Unread,
    /// `:delay <seconds> <message…>`: send `message` (any message syntax) later.
    Delay { after: Duration, message: Outgoing },
    /// A `:command` that does not exist (the name as typed).
    Unknown(String),
    /// A known command used wrongly, or a message without text: what to tell the user.
    Invalid(String),
}

/// One line of the command list: syntax and what it does.
pub const COMMANDS: &[(&str, &str)] = &[
    ("<text>", "send to everyone online"),
    ("<user>;;<text>", "send to one user (CIM syntax)"),
    ("@<user> <text>", "send to one user"),
    (
        ":r <user> <text>",
        "send to one user and show when they received it (receipt)",
    ),
    (
        "#<channel> <text>",
        "send to the online members of a channel",
    ),
    (
        ":join <channel>",
        "join a channel (created by its first member)",
    ),
    (":leave <channel>", "leave a channel"),
    (":chans", "list your channels with member and online counts"),
    (
        ":gnew <name> [user …]",
        "create a stored group (one-word name; users by name or id)",
    ),
    (":groups", "list your groups: id, name, members, unread"),
    (
        ":g <id> <text>",
        "send to group <id> (kept; members offline get it later)",
    ),
    (
        ":gadd <id> <user …>",
        "add users to group <id> (owner or admin)",
    ),
    (
        ":gkick <id> <user>",
        "remove a user from group <id> (owner or admin)",
    ),
    (":gleave <id>", "leave group <id>"),
    (
        ":gmembers <id>",
        "list the members of group <id> with their roles",
    ),
    (
        ":hist <user|#id> [n]",
        "the last n (default 20, at most 100) messages with a user or group #id; marks them read",
    ),
    (
        ":unread",
        "conversations with unread messages, newest first",
    ),
    (":all, :help", "list these commands"),
    (":olu", "list online users"),
    (
        ":pu <prefix>",
        "list online users whose name starts with <prefix>",
    ),
    (":q <keyword>", "search the local message history"),
    (":info", "show user, route, server and connection state"),
    (
        ":delay <seconds> <message>",
        "send <message> (any form above) after 1 to 3600 seconds",
    ),
    ("::<text>", "send a text that starts with ':' to everyone"),
    ("##<text>", "send a text that starts with '#' to everyone"),
    (":q!", "log out and quit (also Ctrl-D, Ctrl-C)"),
];

/// Whether `name` can be a user name as the route accepts them: no whitespace or control
/// characters and none of the separators `; @ # |`. (The route also bounds its length; an
/// over-long name simply gets the route's "unknown user" answer.)
pub fn is_user_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ';' | '@' | '#' | '|'))
}

/// Parses one line as typed (surrounding whitespace does not matter).
pub fn parse(line: &str) -> Input {
    let line = line.trim();
    if line.is_empty() {
        return Input::Empty;
    }
    if let Some(rest) = line.strip_prefix(':') {
        // `::text` escapes a leading colon; only `:` + letter is a command, so smileys such as
        // `:)` or `:-D` are sent as they are instead of answering with the command list.
        if rest.starts_with(':') {
            return Input::Send(Outgoing::new(To::All, rest));
        }
        if rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return parse_command(rest);
        }
    }
    match parse_message(line) {
        Ok(message) => Input::Send(message),
        Err(why) => Input::Invalid(why),
    }
}

/// A message line: `#channel text`, `@name text`, `name;;text` or plain text.
fn parse_message(line: &str) -> Result<Outgoing, String> {
    let line = line.trim();
    if let Some(rest) = line.strip_prefix('#') {
        // `##text` escapes a leading `#`: to everyone.
        if rest.starts_with('#') {
            return Ok(Outgoing::new(To::All, rest));
        }
        return parse_channel_message(rest);
    }
    // The name follows the `@` directly: `@ hi` is text.
    if let Some(rest) = line
        .strip_prefix('@')
        .filter(|r| !r.starts_with(char::is_whitespace))
    {
        let (name, body) = split_word(rest);
        if is_user_name(name) {
            if body.is_empty() {
                return Err(format!("nothing to send to {name}: write @{name} <text>"));
            }
            return Ok(Outgoing::new(To::User(name.to_string()), body));
        }
        // `@ hi` or `@@x`: not an address, just text.
    }
    if let Some((name, body)) = line.split_once(";;") {
        if is_user_name(name) {
            let body = body.trim();
            if body.is_empty() {
                return Err(format!("nothing to send to {name}: write {name};;<text>"));
            }
            return Ok(Outgoing::new(To::User(name.to_string()), body));
        }
        // `a b;;c`: the part before `;;` cannot be a name, so the whole line is text.
    }
    if line.is_empty() {
        return Err("nothing to send".into());
    }
    Ok(Outgoing::new(To::All, line))
}

/// `rest` is a message line after its leading `#`: `<channel> <text>`.
fn parse_channel_message(rest: &str) -> Result<Outgoing, String> {
    const USAGE: &str =
        "usage: #<channel> <text> (to send a text starting with # to everyone: ##<text>)";
    // The name follows the `#` directly: `# hi` names no channel.
    if rest.is_empty() || rest.starts_with(char::is_whitespace) {
        return Err(USAGE.into());
    }
    let (name, body) = split_word(rest);
    if let Some(why) = channel_name_error(name) {
        return Err(format!("{why} ({USAGE})"));
    }
    if body.is_empty() {
        return Err(format!("nothing to send to #{name}: write #{name} <text>"));
    }
    Ok(Outgoing::new(To::Channel(name.to_string()), body))
}

/// The one channel argument of `:join` / `:leave` (a leading `#` is allowed: `:join #room`).
fn parse_channel_arg(command: &str, args: &str) -> Result<String, String> {
    let usage = format!("usage: :{command} <channel>");
    let name = args.strip_prefix('#').unwrap_or(args);
    if name.is_empty() {
        return Err(usage);
    }
    if name.contains(char::is_whitespace) {
        return Err(format!("{usage} (one channel; names have no spaces)"));
    }
    match channel_name_error(name) {
        Some(why) => Err(why),
        None => Ok(name.to_string()),
    }
}

/// First whitespace-separated word and the trimmed rest.
fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    match s.find(char::is_whitespace) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, ""),
    }
}

/// `rest` is the line after the leading `:`.
fn parse_command(rest: &str) -> Input {
    let (name, args) = split_word(rest);
    match name {
        "all" | "help" | "olu" | "info" | "chans" | "groups" | "unread" | "q!"
            if !args.is_empty() =>
        {
            Input::Invalid(format!(":{name} takes no arguments"))
        }
        "all" | "help" => Input::Help,
        "olu" => Input::Online { prefix: None },
        "info" => Input::Info,
        "chans" => Input::Channels,
        "groups" => Input::Groups,
        "unread" => Input::Unread,
        "q!" => Input::Quit,
        "gnew" => parse_gnew(args).unwrap_or_else(Input::Invalid),
        "g" => parse_group_message(args).unwrap_or_else(Input::Invalid),
        "gadd" => parse_gadd(args).unwrap_or_else(Input::Invalid),
        "gkick" => parse_gkick(args).unwrap_or_else(Input::Invalid),
        "gleave" => parse_one_group("gleave", args).map_or_else(Input::Invalid, Input::GroupLeave),
        "gmembers" => {
            parse_one_group("gmembers", args).map_or_else(Input::Invalid, Input::GroupMembers)
        }
        "hist" => parse_hist(args).unwrap_or_else(Input::Invalid),
        "join" => parse_channel_arg(name, args).map_or_else(Input::Invalid, Input::Join),
        "leave" => parse_channel_arg(name, args).map_or_else(Input::Invalid, Input::Leave),
        "pu" => match args {
            "" => Input::Invalid("usage: :pu <prefix>".into()),
            prefix if prefix.contains(char::is_whitespace) => {
                Input::Invalid("usage: :pu <prefix> (one word: names have no spaces)".into())
            }
            prefix => Input::Online {
                prefix: Some(prefix.to_string()),
            },
        },
        "q" => match args {
            "" => Input::Invalid("usage: :q <keyword> (to quit: :q!)".into()),
            keyword => Input::Search(keyword.to_string()),
        },
        "delay" => parse_delay(args),
        "r" => parse_receipt(args),
        other => Input::Unknown(format!(":{other}")),
    }
}

/// A group id: a positive integer (a leading `#` is allowed, as `:hist` writes it).
fn parse_group_id(word: &str, usage: &str) -> Result<u64, String> {
    let digits = word.strip_prefix('#').unwrap_or(word);
    match digits.parse::<u64>() {
        Ok(id) if id > 0 && digits.bytes().all(|b| b.is_ascii_digit()) => Ok(id),
        _ => Err(format!("{word:?} is not a group id ({usage})")),
    }
}

/// A user word: digits are an id, else a user name.
fn parse_user_ref(word: &str, usage: &str) -> Result<UserRef, String> {
    if !word.is_empty() && word.bytes().all(|b| b.is_ascii_digit()) {
        return match word.parse::<u64>() {
            Ok(id) if id > 0 => Ok(UserRef::Id(id)),
            _ => Err(format!("{word:?} is not a user id ({usage})")),
        };
    }
    if is_user_name(word) {
        Ok(UserRef::Name(word.to_string()))
    } else {
        Err(format!("{word:?} is not a user name ({usage})"))
    }
}

fn parse_users(words: &str, usage: &str) -> Result<Vec<UserRef>, String> {
    let mut users: Vec<UserRef> = Vec::new();
    for word in words.split_whitespace() {
        let user = parse_user_ref(word, usage)?;
        // Naming someone twice is harmless; sending them twice is noise.
        if !users.contains(&user) {
            users.push(user);
        }
    }
    Ok(users)
}

/// `:gnew <name> [user …]`.
fn parse_gnew(args: &str) -> Result<Input, String> {
    const USAGE: &str = "usage: :gnew <name> [user …]";
    let (name, rest) = split_word(args);
    if name.is_empty() {
        return Err(USAGE.into());
    }
    Ok(Input::GroupNew {
        name: name.to_string(),
        members: parse_users(rest, USAGE)?,
    })
}

/// `:g <id> <text>`.
fn parse_group_message(args: &str) -> Result<Input, String> {
    const USAGE: &str = "usage: :g <group id> <text>";
    let (id, body) = split_word(args);
    if id.is_empty() {
        return Err(USAGE.into());
    }
    let group = parse_group_id(id, USAGE)?;
    if body.is_empty() {
        return Err(format!(
            "nothing to send to group {group}: write :g {group} <text>"
        ));
    }
    Ok(Input::Send(Outgoing::new(To::Group(group), body)))
}

/// `:gadd <id> <user …>`.
fn parse_gadd(args: &str) -> Result<Input, String> {
    const USAGE: &str = "usage: :gadd <group id> <user …>";
    let (id, rest) = split_word(args);
    if id.is_empty() {
        return Err(USAGE.into());
    }
    let group = parse_group_id(id, USAGE)?;
    let users = parse_users(rest, USAGE)?;
    if users.is_empty() {
        return Err(format!("nobody to add ({USAGE})"));
    }
    Ok(Input::GroupAdd { group, users })
}

/// `:gkick <id> <user>`.
fn parse_gkick(args: &str) -> Result<Input, String> {
    const USAGE: &str = "usage: :gkick <group id> <user>";
    let (id, rest) = split_word(args);
    let (user, extra) = split_word(rest);
    if id.is_empty() || user.is_empty() {
        return Err(USAGE.into());
    }
    if !extra.is_empty() {
        return Err(format!("{USAGE} (one user at a time)"));
    }
    Ok(Input::GroupKick {
        group: parse_group_id(id, USAGE)?,
        user: parse_user_ref(user, USAGE)?,
    })
}

/// The one group id argument of `:gleave` / `:gmembers`.
fn parse_one_group(command: &str, args: &str) -> Result<u64, String> {
    let usage = format!("usage: :{command} <group id>");
    let (id, extra) = split_word(args);
    if id.is_empty() || !extra.is_empty() {
        return Err(usage);
    }
    parse_group_id(id, &usage)
}

/// `:hist <user|#group-id> [n]`.
fn parse_hist(args: &str) -> Result<Input, String> {
    const USAGE: &str = "usage: :hist <user|#group-id> [n] (n: 1 to 100, default 20)";
    let (who, rest) = split_word(args);
    let (count, extra) = split_word(rest);
    if who.is_empty() || !extra.is_empty() {
        return Err(USAGE.into());
    }
    // `#` never starts a user name, so `#7` is always group 7.
    let conversation = if who.starts_with('#') {
        ConvRef::Group(parse_group_id(who, USAGE)?)
    } else {
        ConvRef::User(parse_user_ref(who, USAGE)?)
    };
    let count = match count {
        "" => DEFAULT_HIST,
        n => match n.parse::<usize>() {
            Ok(n) if (1..=MAX_HIST).contains(&n) => n,
            Ok(n) => return Err(format!(":hist: {n} is out of range (1 to {MAX_HIST})")),
            Err(_) => return Err(USAGE.into()),
        },
    };
    Ok(Input::History {
        conversation,
        count,
    })
}

/// `:r <user> <text>`: a private message with a receipt.
fn parse_receipt(args: &str) -> Input {
    const USAGE: &str = "usage: :r <user> <text>";
    let (name, body) = split_word(args);
    if name.is_empty() {
        return Input::Invalid(USAGE.into());
    }
    if !is_user_name(name) {
        return Input::Invalid(format!("{name:?} is not a user name ({USAGE})"));
    }
    if body.is_empty() {
        return Input::Invalid(format!("nothing to send to {name}: write :r {name} <text>"));
    }
    Input::Send(Outgoing {
        to: To::User(name.to_string()),
        body: body.to_string(),
        receipt: true,
    })
}

fn parse_delay(args: &str) -> Input {
    const USAGE: &str = "usage: :delay <seconds> <message> (seconds: 1 to 3600)";
    let (secs, message) = split_word(args);
    let Ok(secs) = secs.parse::<u64>() else {
        return Input::Invalid(USAGE.into());
    };
    if !(1..=MAX_DELAY_SECS).contains(&secs) {
        return Input::Invalid(format!(
            ":delay: {secs} seconds is out of range (1 to {MAX_DELAY_SECS})"
        ));
    }
    if message.is_empty() {
        return Input::Invalid(USAGE.into());
    }
    // The message keeps its own syntax (`bob;;hi`, `@bob hi`, `::text`), but is never a command:
    // `:delay 5 :q!` sends the text ":q!" rather than quitting in five seconds.
    let message = match message.strip_prefix(':') {
        Some(rest) if rest.starts_with(':') => Ok(Outgoing::new(To::All, rest)),
        _ => parse_message(message),
    };
    match message {
        Ok(message) => Input::Delay {
            after: Duration::from_secs(secs),
            message,
        },
        Err(why) => Input::Invalid(why),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(body: &str) -> Input {
        Input::Send(Outgoing::new(To::All, body))
    }

    fn private(to: &str, body: &str) -> Input {
        Input::Send(Outgoing::new(To::User(to.into()), body))
    }

    fn invalid(input: &str) -> String {
        match parse(input) {
            Input::Invalid(why) => why,
            other => panic!("{input:?} should be invalid, parsed as {other:?}"),
        }
    }

    #[test]
    fn blank_lines_are_empty() {
        assert_eq!(parse(""), Input::Empty);
        assert_eq!(parse("   \t "), Input::Empty);
        assert_eq!(parse("\r"), Input::Empty);
    }

    #[test]
    fn plain_text_goes_to_everyone_trimmed() {
        assert_eq!(parse("hello world"), all("hello world"));
        assert_eq!(parse("  hi  "), all("hi"));
        assert_eq!(parse("你好"), all("你好"));
    }

    #[test]
    fn cim_private_syntax() {
        assert_eq!(parse("bob;;hi"), private("bob", "hi"));
        assert_eq!(parse("bob;; hi there "), private("bob", "hi there"));
        // Only the first `;;` separates: the body may contain more.
        assert_eq!(parse("bob;;a;;b"), private("bob", "a;;b"));
        assert!(invalid("bob;;").contains("bob;;<text>"));
        assert!(invalid("bob;;   ").contains("nothing to send to bob"));
    }

    #[test]
    fn double_semicolon_after_non_name_is_text() {
        assert_eq!(parse("a b;;c"), all("a b;;c"));
        assert_eq!(parse(";;hi"), all(";;hi"));
        assert_eq!(parse("x@y;;z"), all("x@y;;z"));
    }

    #[test]
    fn at_private_syntax() {
        assert_eq!(parse("@bob hi"), private("bob", "hi"));
        assert_eq!(parse("@bob   hi  there"), private("bob", "hi  there"));
        assert_eq!(parse("@bob\thi"), private("bob", "hi"));
        assert!(invalid("@bob").contains("@bob <text>"));
        assert!(invalid("@bob   ").contains("nothing to send to bob"));
    }

    #[test]
    fn at_without_a_name_is_text() {
        assert_eq!(parse("@ hi"), all("@ hi"));
        assert_eq!(parse("@@bob hi"), all("@@bob hi"));
        assert_eq!(parse("me@home"), all("me@home"));
    }

    #[test]
    fn at_takes_precedence_over_double_semicolon() {
        assert_eq!(parse("@bob x;;y"), private("bob", "x;;y"));
    }

    #[test]
    fn help_commands() {
        assert_eq!(parse(":all"), Input::Help);
        assert_eq!(parse(":help"), Input::Help);
        assert_eq!(parse("  :help  "), Input::Help);
        assert!(invalid(":help me").contains("no arguments"));
    }

    #[test]
    fn online_commands() {
        assert_eq!(parse(":olu"), Input::Online { prefix: None });
        assert_eq!(
            parse(":pu al"),
            Input::Online {
                prefix: Some("al".into())
            }
        );
        assert!(invalid(":pu").contains("usage: :pu"));
        assert!(invalid(":pu a b").contains("one word"));
        assert!(invalid(":olu x").contains("no arguments"));
    }

    #[test]
    fn quit_and_search() {
        assert_eq!(parse(":q!"), Input::Quit);
        assert!(invalid(":q! now").contains("no arguments"));
        assert_eq!(parse(":q hi"), Input::Search("hi".into()));
        assert_eq!(parse(":q  two words "), Input::Search("two words".into()));
        assert!(invalid(":q").contains(":q!"));
    }

    #[test]
    fn info() {
        assert_eq!(parse(":info"), Input::Info);
        assert!(invalid(":info x").contains("no arguments"));
    }

    #[test]
    fn delay_keeps_the_whole_rest_of_the_line() {
        assert_eq!(
            parse(":delay 5 see you   in five"),
            Input::Delay {
                after: Duration::from_secs(5),
                message: Outgoing::new(To::All, "see you   in five")
            }
        );
    }

    #[test]
    fn delay_message_may_be_private() {
        for line in [":delay 10 bob;;later", ":delay 10 @bob later"] {
            assert_eq!(
                parse(line),
                Input::Delay {
                    after: Duration::from_secs(10),
                    message: Outgoing::new(To::User("bob".into()), "later")
                },
                "{line}"
            );
        }
    }

    #[test]
    fn delayed_message_is_never_a_command() {
        assert_eq!(
            parse(":delay 1 :q!"),
            Input::Delay {
                after: Duration::from_secs(1),
                message: Outgoing::new(To::All, ":q!")
            }
        );
        assert_eq!(
            parse(":delay 1 ::x"),
            Input::Delay {
                after: Duration::from_secs(1),
                message: Outgoing::new(To::All, ":x")
            }
        );
    }

    #[test]
    fn delay_bounds_and_bad_input() {
        assert!(matches!(parse(":delay 1 x"), Input::Delay { .. }));
        assert!(matches!(parse(":delay 3600 x"), Input::Delay { .. }));
        assert!(invalid(":delay 0 x").contains("out of range"));
        assert!(invalid(":delay 3601 x").contains("out of range"));
        assert!(invalid(":delay 99999999999999999999999 x").contains("usage"));
        assert!(invalid(":delay -1 x").contains("usage"));
        assert!(invalid(":delay 1.5 x").contains("usage"));
        assert!(invalid(":delay abc x").contains("usage"));
        assert!(invalid(":delay").contains("usage"));
        assert!(invalid(":delay 5").contains("usage"));
        assert!(invalid(":delay 5    ").contains("usage"));
        assert!(invalid(":delay 5 bob;;").contains("nothing to send to bob"));
    }

    #[test]
    fn receipt_command_sends_privately_with_a_receipt() {
        assert_eq!(
            parse(":r bob did you get this?"),
            Input::Send(Outgoing {
                to: To::User("bob".into()),
                body: "did you get this?".into(),
                receipt: true
            })
        );
        assert!(invalid(":r").contains("usage: :r"));
        assert!(invalid(":r bob").contains("nothing to send to bob"));
        assert!(invalid(":r bob    ").contains(":r bob <text>"));
        assert!(invalid(":r a;b hi").contains("not a user name"));
        // Plain private syntaxes ask for none.
        assert!(matches!(
            parse("@bob hi"),
            Input::Send(Outgoing { receipt: false, .. })
        ));
    }

    fn channel(name: &str, body: &str) -> Input {
        Input::Send(Outgoing::new(To::Channel(name.into()), body))
    }

    #[test]
    fn hash_sends_to_a_channel() {
        assert_eq!(parse("#room1 hi all"), channel("room1", "hi all"));
        assert_eq!(
            parse("  #room1   hi  there "),
            channel("room1", "hi  there")
        );
        assert_eq!(parse("#room1\thi"), channel("room1", "hi"));
        assert_eq!(parse("#频道 你好"), channel("频道", "你好"));
        assert_eq!(parse("#news.eu-west_2 up"), channel("news.eu-west_2", "up"));
        // The body may hold anything, a `#` or `;;` included.
        assert_eq!(parse("#a b;;c #d"), channel("a", "b;;c #d"));
        // Case matters: names are case-sensitive.
        assert_eq!(parse("#Room x"), channel("Room", "x"));
    }

    #[test]
    fn hash_lines_that_are_not_channel_messages() {
        assert!(invalid("#room").contains("nothing to send to #room: write #room <text>"));
        assert!(invalid("#room    ").contains("nothing to send to #room"));
        assert!(invalid("# hi").contains("usage: #<channel> <text>"));
        assert!(invalid("#").contains("usage: #<channel> <text>"));
        assert!(invalid("#a/b hi").contains("'/' is not allowed"));
        assert!(invalid("#a:b hi").contains("not a channel name"));
        assert!(invalid(&format!("#{} hi", "x".repeat(65))).contains("at most 64"));
        assert!(invalid("#.. hi").contains("cannot be used"));
        // `##` escapes: text starting with `#`, to everyone.
        assert_eq!(parse("##1 priority"), all("#1 priority"));
        assert_eq!(parse("##"), all("#"));
        // A `#` later in the line is plain text.
        assert_eq!(parse("issue #42 fixed"), all("issue #42 fixed"));
    }

    #[test]
    fn channel_commands() {
        assert_eq!(parse(":join room1"), Input::Join("room1".into()));
        assert_eq!(parse(":join #room1"), Input::Join("room1".into()));
        assert_eq!(parse(":join 频道"), Input::Join("频道".into()));
        assert_eq!(parse(":leave room1"), Input::Leave("room1".into()));
        assert_eq!(parse(":leave  #room1 "), Input::Leave("room1".into()));
        assert_eq!(parse(":chans"), Input::Channels);
        assert!(invalid(":join").contains("usage: :join <channel>"));
        assert!(invalid(":join #").contains("usage: :join <channel>"));
        assert!(invalid(":leave").contains("usage: :leave <channel>"));
        assert!(invalid(":join a b").contains("one channel"));
        assert!(invalid(":join a/b").contains("not allowed"));
        assert!(invalid(":join ##a").contains("'#' is not allowed"));
        assert!(invalid(":chans x").contains("no arguments"));
    }

    #[test]
    fn delayed_channel_messages() {
        assert_eq!(
            parse(":delay 2 #room later"),
            Input::Delay {
                after: Duration::from_secs(2),
                message: Outgoing::new(To::Channel("room".into()), "later")
            }
        );
        assert!(invalid(":delay 2 #room").contains("nothing to send to #room"));
    }

    #[test]
    fn group_commands() {
        use UserRef::{Id, Name};
        assert_eq!(
            parse(":gnew team bob 42  bob"),
            Input::GroupNew {
                name: "team".into(),
                members: vec![Name("bob".into()), Id(42)]
            }
        );
        assert_eq!(
            parse(":gnew solo"),
            Input::GroupNew {
                name: "solo".into(),
                members: vec![]
            }
        );
        assert!(invalid(":gnew").contains("usage: :gnew"));
        assert!(invalid(":gnew t a;b").contains("not a user name"));
        assert!(invalid(":gnew t 0").contains("not a user id"));
        assert_eq!(parse(":groups"), Input::Groups);
        assert!(invalid(":groups x").contains("no arguments"));
        assert_eq!(
            parse(":g 7 hi  team"),
            Input::Send(Outgoing::new(To::Group(7), "hi  team"))
        );
        assert_eq!(
            parse(":g #7 hi"),
            Input::Send(Outgoing::new(To::Group(7), "hi"))
        );
        assert!(invalid(":g").contains("usage: :g"));
        assert!(invalid(":g 7").contains("nothing to send to group 7"));
        assert!(invalid(":g team hi").contains("not a group id"));
        assert!(invalid(":g 0 hi").contains("not a group id"));
        assert!(invalid(":g -1 hi").contains("not a group id"));
        assert!(invalid(":g +1 hi").contains("not a group id"));
        assert!(invalid(":g 99999999999999999999999 hi").contains("not a group id"));
        assert_eq!(
            parse(":gadd 7 carol 9"),
            Input::GroupAdd {
                group: 7,
                users: vec![Name("carol".into()), Id(9)]
            }
        );
        assert!(invalid(":gadd 7").contains("nobody to add"));
        assert!(invalid(":gadd").contains("usage: :gadd"));
        assert_eq!(
            parse(":gkick 7 bob"),
            Input::GroupKick {
                group: 7,
                user: Name("bob".into())
            }
        );
        assert!(invalid(":gkick 7").contains("usage: :gkick"));
        assert!(invalid(":gkick 7 a b").contains("one user at a time"));
        assert_eq!(parse(":gleave 7"), Input::GroupLeave(7));
        assert!(invalid(":gleave").contains("usage: :gleave"));
        assert!(invalid(":gleave 7 8").contains("usage: :gleave"));
        assert_eq!(parse(":gmembers 12"), Input::GroupMembers(12));
        assert!(invalid(":gmembers x").contains("not a group id"));
    }

    #[test]
    fn history_and_unread_commands() {
        assert_eq!(
            parse(":hist bob"),
            Input::History {
                conversation: ConvRef::User(UserRef::Name("bob".into())),
                count: DEFAULT_HIST
            }
        );
        assert_eq!(
            parse(":hist #7 5"),
            Input::History {
                conversation: ConvRef::Group(7),
                count: 5
            }
        );
        assert_eq!(
            parse(":hist 3 100"),
            Input::History {
                conversation: ConvRef::User(UserRef::Id(3)),
                count: 100
            }
        );
        assert!(invalid(":hist").contains("usage: :hist"));
        assert!(invalid(":hist bob 0").contains("out of range"));
        assert!(invalid(":hist bob 101").contains("out of range"));
        assert!(invalid(":hist bob x").contains("usage: :hist"));
        assert!(invalid(":hist bob 5 6").contains("usage: :hist"));
        assert!(invalid(":hist #x").contains("not a group id"));
        assert!(invalid(":hist a;b").contains("not a user name"));
        assert_eq!(parse(":unread"), Input::Unread);
        assert!(invalid(":unread now").contains("no arguments"));
    }

    #[test]
    fn unknown_commands_are_reported_by_name() {
        assert_eq!(parse(":nope"), Input::Unknown(":nope".into()));
        assert_eq!(parse(":OLU"), Input::Unknown(":OLU".into()));
        assert_eq!(parse(":q!!"), Input::Unknown(":q!!".into()));
    }

    #[test]
    fn colon_lines_that_are_not_commands_are_text() {
        assert_eq!(parse(":)"), all(":)"));
        assert_eq!(parse(":-D"), all(":-D"));
        assert_eq!(parse(":"), all(":"));
        assert_eq!(parse("::olu"), all(":olu"));
        assert_eq!(parse("::"), all(":"));
    }

    #[test]
    fn user_names_follow_the_route_rules() {
        assert!(is_user_name("alice"));
        assert!(is_user_name("张三"));
        assert!(is_user_name("a.b-c_d"));
        for bad in ["", "a b", "a;b", "a@b", "a#b", "a|b", "a\u{7}b"] {
            assert!(!is_user_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn command_list_names_every_command() {
        let syntax: String = COMMANDS.iter().map(|(s, _)| *s).collect();
        for cmd in [
            ":all",
            ":help",
            ":olu",
            ":pu",
            ":q!",
            ":q <",
            ":info",
            ":delay",
            ";;",
            "@",
            ":r ",
            "#<channel>",
            ":join",
            ":leave",
            ":chans",
            "##",
            ":gnew",
            ":groups",
            ":g <",
            ":gadd",
            ":gkick",
            ":gleave",
            ":gmembers",
            ":hist",
            ":unread",
        ] {
            assert!(syntax.contains(cmd), "{cmd} missing from the list");
        }
    }
}
