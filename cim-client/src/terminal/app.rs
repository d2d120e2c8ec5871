//! The client's event loop: logs in, then turns typed lines into SDK calls and SDK events
//! into printed lines.
//!
//! Typed lines are handled strictly in order, one at a time: a line that needs the network
//! (a send, `:olu`) runs while the loop keeps printing incoming messages and state changes,
//! and the next line starts when it finished. So a script's `hi` then `:q!` sends `hi` before
//! quitting, and one's own messages leave in the order typed. `:delay` timers run beside the
//! queue and join it when they fire.
//!
//! Exit status: 0 after `:q!` / end of input / Ctrl-C (logged out); 1 when the login fails or
//! the connection ends for good (kicked, logged out elsewhere, gave up reconnecting).

use super::{
    command::{self, ConvRef, Input, Outgoing, To, UserRef},
    history::{Direction, Entry, History, Kind},
    input::{InputEvent, Output, Terminal},
    render::{self, Style},
    Args,
};
use cim_sdk::{
    pb, route::RouteError, Client, ClientConfig, ClientError, ErrorCode, Event, Events, Recipient,
    SendOptions,
};
use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    pin::Pin,
    process::ExitCode,
};
use tokio::task::JoinSet;

/// Most online users one `:olu` / `:pu` lists.
const ONLINE_LIMIT: usize = 100;
/// Most history matches one `:q` shows (the newest).
const SEARCH_LIMIT: usize = 50;
/// Most `:delay` messages waiting at once: each is a timer in this process.
const MAX_DELAYED: usize = 100;
/// Parsed lines waiting for the one in progress. When full, the loop stops reading input
/// (the input channel, then the terminal, buffer the rest).
const QUEUE_CAPACITY: usize = 64;
/// Conversations one `:unread` / `:groups` / `:info` reads (the newest): unread counts of
/// older ones are not shown.
const CONVERSATIONS_LIMIT: usize = 100;
/// Members one `:gmembers` lists.
const MEMBERS_LIMIT: usize = 100;

/// Logs in and runs until the user quits or the connection ends for good.
pub async fn run(args: Args, password: String, style: Style) -> ExitCode {
    let route = args.route.trim_end_matches('/').to_string();
    let config = ClientConfig {
        transport: args.transport.into(),
        tls: args.tls.into(),
        ca_file: args.ca_file.clone(),
        ..ClientConfig::new(&route, &args.name, &password)
    };
    if args.register {
        match Client::register_with(&config).await {
            Ok(id) => println!("registered {} (#{id})", args.name),
            // Documented choice: `--register` of an existing name logs in to it, so a script
            // can always pass `--register`; a wrong password then fails the login below.
            Err(e) if e.error_code() == Some(ErrorCode::NameTaken) => {
                println!("{} is already registered; logging in", args.name)
            }
            Err(e) => {
                eprintln!(
                    "{}",
                    render::error(style, &format!("register failed: {}", describe(&e, &route)))
                );
                return ExitCode::FAILURE;
            }
        }
    }
    println!("connecting to {route} as {}…", args.name);
    let (client, events) = match Client::connect(config).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "{}",
                render::error(style, &format!("login failed: {}", describe(&e, &route)))
            );
            return ExitCode::FAILURE;
        }
    };

    let info = client.info();
    let base = args.data_dir.clone().or_else(super::default_data_dir);
    let dir = base.map(|b| super::user_dir(&b, &route, &info.name));
    let mut notices = Vec::new();
    let history = match &dir {
        Some(dir) => match History::open(&dir.join("history.jsonl"), args.history_lines) {
            Ok(h) => Some(h),
            Err(e) => {
                notices.push(format!("history disabled: {}: {e}", dir.display()));
                None
            }
        },
        None => {
            notices.push("history disabled: no data directory (use --data-dir)".into());
            None
        }
    };
    let input_history = history
        .as_ref()
        .and(dir.as_ref())
        .map(|d| d.join("input_history.txt"));
    let terminal = match Terminal::start(format!("{}> ", info.name), input_history) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}", render::error(style, &format!("terminal: {e}")));
            let _ = client.logout().await;
            return ExitCode::FAILURE;
        }
    };
    let output = terminal.output.clone();
    for n in notices {
        output.print(render::notice(style, &n)).await;
    }
    output
        .print(render::notice(style, "type :help for the commands"))
        .await;

    let mut app = App {
        client: Some(client),
        me: info.user_id,
        my_name: info.name,
        out: output,
        style,
        history,
        state_lines: render::StateLines::default(),
        group_names: HashMap::new(),
    };
    let mut terminal = terminal;
    let (code, input_stopped) = app.run(events, &mut terminal).await;
    drop(app);
    terminal.finish(input_stopped);
    code
}

/// What a line that needed the network came back with.
enum Done {
    Sent {
        message: Outgoing,
        result: Result<cim_sdk::SendOutcome, ClientError>,
    },
    Online {
        prefix: Option<String>,
        result: Result<Vec<cim_sdk::route::OnlineUser>, ClientError>,
    },
    Joined {
        channel: String,
        result: Result<bool, ClientError>,
    },
    Left {
        channel: String,
        result: Result<bool, ClientError>,
    },
    Channels(Result<Vec<cim_sdk::route::ChannelInfo>, ClientError>),
    /// A command whose answer was rendered by its task: the line, or the error line.
    Text(Result<String, String>),
    Created(Result<(cim_sdk::CreatedGroup, HashMap<u64, String>), String>),
    Groups(Result<(Vec<cim_sdk::GroupView>, HashMap<u64, u64>), String>),
    Unread(Result<Vec<cim_sdk::ConversationView>, String>),
    /// `:info`'s total of unread messages.
    Info(Result<u64, String>),
}

type Work = Pin<Box<dyn Future<Output = Done> + Send>>;

struct App {
    /// `None` once logged out.
    client: Option<Client>,
    me: u64,
    my_name: String,
    out: Output,
    style: Style,
    history: Option<History>,
    /// Which state changes get a line (not every reconnect attempt).
    state_lines: render::StateLines,
    /// Names of stored groups, learnt from `:groups`, `:gnew`, `:unread` and group events:
    /// how their messages are labelled.
    group_names: HashMap<u64, String>,
}

impl App {
    /// The loop; returns the exit code and whether the input thread stopped.
    async fn run(&mut self, mut events: Events, terminal: &mut Terminal) -> (ExitCode, bool) {
        let mut queue: VecDeque<Input> = VecDeque::new();
        let mut running: Option<Work> = None;
        let mut delayed: JoinSet<Outgoing> = JoinSet::new();
        let mut input_open = true;
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let mut signalled = false;

        loop {
            // Start what is queued, in order: local commands complete at once, a network one
            // becomes `running` and holds the rest back until it is done.
            while running.is_none() {
                let Some(input) = queue.pop_front() else {
                    break;
                };
                if input == Input::Quit {
                    let code = self.quit(delayed.len()).await;
                    return (code, !input_open);
                }
                running = self.start(input, &mut delayed).await;
            }

            tokio::select! {
                event = events.next() => match event {
                    Some(event) => self.on_event(event).await,
                    // The client closed for good (the `Closed` state was printed).
                    None => return (ExitCode::FAILURE, !input_open),
                },
                done = async { running.as_mut().expect("guarded by the condition").await },
                    if running.is_some() =>
                {
                    running = None;
                    self.on_done(done).await;
                }
                Some(fired) = delayed.join_next(), if !delayed.is_empty() => {
                    // A timer task cannot fail (it only sleeps); a panic would be a bug and
                    // dropping that one message is the sane outcome.
                    if let Ok(message) = fired {
                        queue.push_back(Input::Send(message));
                    }
                }
                line = terminal.lines.recv(), if input_open && queue.len() < QUEUE_CAPACITY => {
                    match line {
                        Some(InputEvent::Line(line)) => queue.push_back(command::parse(&line)),
                        Some(InputEvent::Failed(e)) => {
                            self.error(format!("terminal: {e}")).await;
                            input_open = false;
                            queue.push_back(Input::Quit);
                        }
                        Some(InputEvent::Eof | InputEvent::Interrupted) | None => {
                            input_open = false;
                            queue.push_back(Input::Quit);
                        }
                    }
                }
                // Ctrl-C outside line editing (piped input): quit the same polite way.
                _ = &mut ctrl_c, if !signalled => {
                    signalled = true;
                    queue.clear();
                    queue.push_back(Input::Quit);
                }
            }
        }
    }

    /// Handles one parsed line; returns the network work it started, if any.
    async fn start(&mut self, input: Input, delayed: &mut JoinSet<Outgoing>) -> Option<Work> {
        let client = self.client.clone()?;
        match input {
            Input::Empty | Input::Quit => None,
            Input::Send(message) => Some(Box::pin(async move {
                let result = match &message.to {
                    To::All => client.send_group(&message.body).await,
                    To::Channel(name) => client.send_channel(name, &message.body).await,
                    To::Group(id) => client.send_group_chat(*id, &message.body).await,
                    To::User(name) => {
                        let options = SendOptions {
                            receipt: message.receipt,
                            ..SendOptions::default()
                        };
                        client
                            .send_with(Recipient::Name(name.clone()), &message.body, options)
                            .await
                    }
                };
                Done::Sent { message, result }
            })),
            Input::Online { prefix } => Some(Box::pin(async move {
                let result = client.online_users(prefix.as_deref(), ONLINE_LIMIT).await;
                Done::Online { prefix, result }
            })),
            Input::Join(channel) => Some(Box::pin(async move {
                let result = client.join_channel(&channel).await;
                Done::Joined { channel, result }
            })),
            Input::Leave(channel) => Some(Box::pin(async move {
                let result = client.leave_channel(&channel).await;
                Done::Left { channel, result }
            })),
            Input::Channels => Some(Box::pin(async move {
                Done::Channels(client.my_channels().await)
            })),
            Input::Help => {
                self.print(render::help(self.style)).await;
                None
            }
            Input::Info => Some(Box::pin(async move {
                let list = client.conversations(None, Some(CONVERSATIONS_LIMIT)).await;
                let total = list.map(|l| l.iter().map(|c| c.unread).sum());
                Done::Info(total.map_err(|e| describe(&e, "the route")))
            })),
            Input::GroupNew { name, members } => Some(Box::pin(async move {
                let result = async {
                    let (ids, names) = resolve_all(&client, &members).await?;
                    let created = client.create_group(&name, &ids).await;
                    let created = created
                        .map_err(|e| format!("group not created: {}", describe(&e, "the route")))?;
                    Ok((created, names))
                };
                Done::Created(result.await)
            })),
            Input::Groups => Some(Box::pin(async move {
                let result = async {
                    let groups = client
                        .groups()
                        .await
                        .map_err(|e| format!("groups: {}", describe(&e, "the route")))?;
                    let convs = client.conversations(None, Some(CONVERSATIONS_LIMIT)).await;
                    let convs =
                        convs.map_err(|e| format!("groups: {}", describe(&e, "the route")))?;
                    let unread = convs
                        .iter()
                        .filter(|c| c.kind == "group")
                        .map(|c| (c.id, c.unread))
                        .collect();
                    Ok((groups, unread))
                };
                Done::Groups(result.await)
            })),
            Input::GroupAdd { group, users } => {
                let label = self.group_label(group);
                Some(Box::pin(async move {
                    let result = async {
                        let (ids, names) = resolve_all(&client, &users).await?;
                        let added = client.add_group_members(group, &ids).await;
                        let added = added.map_err(|e| {
                            format!("not added to {label}: {}", describe(&e, "the route"))
                        })?;
                        Ok(render::group_added(&label, &added, &names))
                    };
                    Done::Text(result.await)
                }))
            }
            Input::GroupKick { group, user } => {
                let label = self.group_label(group);
                Some(Box::pin(async move {
                    let result = async {
                        let (id, name) = resolve(&client, &user).await?;
                        let removed = client.remove_group_member(group, id).await;
                        removed.map_err(|e| {
                            format!(
                                "{name} not removed from {label}: {}",
                                describe(&e, "the route")
                            )
                        })?;
                        Ok(format!("removed {name} from {label}"))
                    };
                    Done::Text(result.await)
                }))
            }
            Input::GroupLeave(group) => {
                let label = self.group_label(group);
                Some(Box::pin(async move {
                    let left = client.leave_group(group).await;
                    Done::Text(match left {
                        Ok(_) => Ok(format!("left {label}")),
                        Err(e) => Err(format!(
                            "could not leave {label}: {}",
                            describe(&e, "the route")
                        )),
                    })
                }))
            }
            Input::GroupMembers(group) => {
                let label = self.group_label(group);
                let style = self.style;
                Some(Box::pin(async move {
                    let page = client.group_members(group, None, Some(MEMBERS_LIMIT)).await;
                    Done::Text(match page {
                        Ok(page) => Ok(render::group_members(style, &label, &page)),
                        Err(e) => Err(format!("members of {label}: {}", describe(&e, "the route"))),
                    })
                }))
            }
            Input::History {
                conversation,
                count,
            } => {
                let style = self.style;
                let me = self.me;
                let group_label = match &conversation {
                    ConvRef::Group(id) => Some(self.group_label(*id)),
                    ConvRef::User(_) => None,
                };
                Some(Box::pin(async move {
                    let result = async {
                        let (conv, title) = match (&conversation, group_label) {
                            (ConvRef::Group(id), Some(label)) => (
                                pb::Conversation {
                                    user_id: 0,
                                    group_id: *id,
                                },
                                label,
                            ),
                            (ConvRef::User(user), _) => {
                                let (id, name) = resolve(&client, user).await?;
                                (
                                    pb::Conversation {
                                        user_id: id,
                                        group_id: 0,
                                    },
                                    name,
                                )
                            }
                            (ConvRef::Group(id), None) => (
                                pb::Conversation {
                                    user_id: 0,
                                    group_id: *id,
                                },
                                format!("group {id}"),
                            ),
                        };
                        let page = client
                            .history(&conv, cim_sdk::HistoryFrom::Newest, Some(count))
                            .await
                            .map_err(|e| {
                                format!("history of {title}: {}", describe(&e, "the route"))
                            })?;
                        // What was shown is read: the unread count drops by as much.
                        if let Some(top) = page.iter().map(|m| m.log_seq).max().filter(|s| *s > 0) {
                            client.mark_read_http(&conv, top).await.map_err(|e| {
                                format!(
                                    "history of {title} shown, not marked read: {}",
                                    describe(&e, "the route")
                                )
                            })?;
                        }
                        Ok(render::history_page(style, &title, &page, me))
                    };
                    Done::Text(result.await)
                }))
            }
            Input::Unread => Some(Box::pin(async move {
                let list = client.conversations(None, Some(CONVERSATIONS_LIMIT)).await;
                Done::Unread(list.map_err(|e| format!("unread: {}", describe(&e, "the route"))))
            })),
            Input::Search(keyword) => {
                let text = match &self.history {
                    None => render::error(self.style, "history is disabled"),
                    Some(h) => match h.search(&keyword, SEARCH_LIMIT) {
                        Ok((found, left_out)) => {
                            render::search(self.style, &keyword, &found, left_out)
                        }
                        Err(e) => render::error(self.style, &format!("history: {e}")),
                    },
                };
                self.print(text).await;
                None
            }
            Input::Delay { after, message } => {
                if delayed.len() >= MAX_DELAYED {
                    self.error(format!(
                        "{MAX_DELAYED} delayed messages are already waiting; not scheduled"
                    ))
                    .await;
                    return None;
                }
                let to = match &message.to {
                    To::All => "everyone".to_string(),
                    To::User(name) => name.clone(),
                    To::Channel(name) => format!("#{name}"),
                    To::Group(id) => format!("group {id}"),
                };
                self.print(render::notice(
                    self.style,
                    &format!("will send to {to} in {}s", after.as_secs()),
                ))
                .await;
                delayed.spawn(async move {
                    tokio::time::sleep(after).await;
                    message
                });
                None
            }
            Input::Unknown(name) => {
                self.error(format!("unknown command {name}")).await;
                self.print(render::help(self.style)).await;
                None
            }
            Input::Invalid(why) => {
                self.error(why).await;
                None
            }
        }
    }

    async fn on_done(&mut self, done: Done) {
        match done {
            Done::Sent { message, result } => self.on_sent(message, result).await,
            Done::Online { prefix, result } => {
                let text = match result {
                    Ok(users) => {
                        render::online(self.style, &users, prefix.as_deref(), self.me, ONLINE_LIMIT)
                    }
                    Err(e) => render::error(
                        self.style,
                        &format!("online users: {}", describe(&e, "the route")),
                    ),
                };
                self.print(text).await;
            }
            Done::Joined { channel, result } => {
                let text = match result {
                    Ok(joined) => render::joined(self.style, &channel, joined),
                    Err(e) => render::error(
                        self.style,
                        &format!("could not join #{channel}: {}", describe(&e, "the route")),
                    ),
                };
                self.print(text).await;
            }
            Done::Left { channel, result } => {
                let text = match result {
                    Ok(left) => render::left(self.style, &channel, left),
                    Err(e) => render::error(
                        self.style,
                        &format!("could not leave #{channel}: {}", describe(&e, "the route")),
                    ),
                };
                self.print(text).await;
            }
            Done::Text(result) => {
                let text = result.unwrap_or_else(|why| render::error(self.style, &why));
                self.print(text).await;
            }
            Done::Created(result) => {
                let text = match result {
                    Ok((created, names)) => {
                        let g = &created.group;
                        self.group_names.insert(g.id, g.name.clone());
                        render::group_created(self.style, g, created.added.as_ref(), &names)
                    }
                    Err(why) => render::error(self.style, &why),
                };
                self.print(text).await;
            }
            Done::Groups(result) => {
                let text = match result {
                    Ok((groups, unread)) => {
                        for g in &groups {
                            self.group_names.insert(g.id, g.name.clone());
                        }
                        render::groups(self.style, &groups, &unread)
                    }
                    Err(why) => render::error(self.style, &why),
                };
                self.print(text).await;
            }
            Done::Unread(result) => {
                let text = match result {
                    Ok(list) => {
                        for c in list.iter().filter(|c| c.kind == "group") {
                            self.group_names.insert(c.id, c.name.clone());
                        }
                        render::unread(self.style, &list)
                    }
                    Err(why) => render::error(self.style, &why),
                };
                self.print(text).await;
            }
            Done::Info(unread) => {
                let path = self.history.as_ref().map(|h| h.path().to_path_buf());
                if let Some(client) = &self.client {
                    let text = render::info_with_unread(&client.info(), path.as_deref(), &unread);
                    self.print(text).await;
                }
            }
            Done::Channels(result) => {
                let text = match result {
                    Ok(list) => render::channels(self.style, &list),
                    Err(e) => render::error(
                        self.style,
                        &format!("channels: {}", describe(&e, "the route")),
                    ),
                };
                self.print(text).await;
            }
        }
    }

    async fn on_sent(
        &mut self,
        message: Outgoing,
        result: Result<cim_sdk::SendOutcome, ClientError>,
    ) {
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(e) => return self.error(not_sent(&message.to, &e)).await,
        };
        let group = match &message.to {
            To::Group(id) => self.group_names.get(id).cloned(),
            _ => None,
        };
        self.print(render::outgoing_in(
            self.style,
            outcome.timestamp_ms,
            &message.to,
            &message.body,
            group.as_deref(),
        ))
        .await;
        if let Some(line) = render::after_sent(self.style, &message.to, &outcome) {
            self.print(line).await;
        }
        let (kind, to) = match message.to {
            To::All => (Kind::Group, None),
            To::User(name) => (Kind::Private, Some(name)),
            To::Channel(name) => (Kind::Channel, Some(name)),
            To::Group(id) => (Kind::Group, Some(self.plain_group_label(id))),
        };
        let entry = Entry {
            ts: outcome.timestamp_ms,
            id: outcome.message_id,
            dir: Direction::Out,
            kind,
            from: self.my_name.clone(),
            to,
            body: message.body,
        };
        self.record(&entry).await;
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::State(state) => {
                if let Some(line) = self.state_lines.line(&state) {
                    let text = render::notice(self.style, &line);
                    if matches!(state, cim_sdk::ConnState::Closed { .. }) {
                        self.out.print_final(text).await;
                    } else {
                        self.print(text).await;
                    }
                }
            }
            Event::Kicked { reason, message } => {
                let text = render::error(self.style, &render::kicked(reason, &message));
                if cim_sdk::client::kick_ends_session(reason) {
                    self.out.print_final(text).await;
                } else {
                    self.print(text).await;
                }
            }
            Event::Typing {
                by_name, stopped, ..
            } => {
                if !stopped {
                    let text = format!("{} is typing…", by_name);
                    self.print(render::notice(self.style, &text)).await;
                }
            }
            // "Seen" marks are shown by `:hist` (the peer's read seq), not as lines.
            Event::ReadMark { .. } => {}
            Event::Receipt {
                message_id,
                by_name,
                at_ms,
                ..
            } => {
                self.print(render::receipt(self.style, &by_name, &message_id, at_ms))
                    .await;
            }
            Event::Message {
                message: m,
                replayed,
            } => {
                if let Some(event) = &m.group_event {
                    let named = [
                        pb::GroupEventType::Created as i32,
                        pb::GroupEventType::Renamed as i32,
                    ];
                    if named.contains(&event.r#type) && !event.name.is_empty() {
                        self.group_names.insert(m.group_id, event.name.clone());
                    }
                }
                let group = self.group_names.get(&m.group_id).cloned();
                self.print(render::incoming_in(
                    self.style,
                    &m,
                    replayed,
                    group.as_deref(),
                ))
                .await;
                let kind = match pb::MessageKind::try_from(m.kind) {
                    Ok(pb::MessageKind::Private) => Kind::Private,
                    Ok(pb::MessageKind::Group | pb::MessageKind::GroupChat) => Kind::Group,
                    Ok(pb::MessageKind::Channel) => Kind::Channel,
                    _ => Kind::System,
                };
                let entry = Entry {
                    ts: m.timestamp_ms,
                    id: m.id,
                    dir: Direction::In,
                    kind,
                    from: if m.sender_name.is_empty() {
                        "system".into()
                    } else {
                        m.sender_name
                    },
                    to: match kind {
                        Kind::Private => Some(self.my_name.clone()),
                        Kind::Channel => Some(m.channel),
                        // A stored group's messages (and events) name their group.
                        _ if m.group_id != 0 => Some(self.plain_group_label(m.group_id)),
                        Kind::Group | Kind::System => None,
                    },
                    body: m.body,
                };
                self.record(&entry).await;
            }
        }
    }

    /// Logs out (pending delayed messages are dropped, and said so) and returns exit code 0,
    /// or 1 if the logout failed.
    async fn quit(&mut self, pending_delayed: usize) -> ExitCode {
        if pending_delayed > 0 {
            self.print(render::notice(
                self.style,
                &format!("{pending_delayed} delayed message(s) not sent"),
            ))
            .await;
        }
        let Some(client) = self.client.take() else {
            return ExitCode::SUCCESS;
        };
        match client.logout().await {
            Ok(()) => {
                self.print("logged out, bye".into()).await;
                ExitCode::SUCCESS
            }
            Err(e) => {
                self.error(format!("logout failed: {}", describe(&e, "the route")))
                    .await;
                ExitCode::FAILURE
            }
        }
    }

    /// `team(7)` or `group 7`, coloured as the style says.
    fn group_label(&self, id: u64) -> String {
        render::group_label(
            self.style,
            id,
            self.group_names.get(&id).map(String::as_str),
        )
    }

    /// [`App::group_label`] without colour, for the history file.
    fn plain_group_label(&self, id: u64) -> String {
        render::group_label(
            render::Style::PLAIN,
            id,
            self.group_names.get(&id).map(String::as_str),
        )
    }

    async fn record(&mut self, entry: &Entry) {
        let Some(history) = self.history.as_mut() else {
            return;
        };
        if let Err(e) = history.append(entry) {
            // Keep chatting without history rather than failing on every message.
            self.history = None;
            self.error(format!("history disabled: {e}")).await;
        }
    }

    async fn print(&self, text: String) {
        self.out.print(text).await;
    }

    async fn error(&self, text: String) {
        self.out.print(render::error(self.style, &text)).await;
    }
}

/// The id and name of `user`. Ids are taken as they are (the route checks them); a name is
/// looked up among the online users, then among the peers of this user's conversations: the
/// route has no lookup of any account by name, so an offline stranger must be named by id.
async fn resolve(client: &Client, user: &UserRef) -> Result<(u64, String), String> {
    let name = match user {
        UserRef::Id(id) => return Ok((*id, format!("#{id}"))),
        UserRef::Name(name) => name,
    };
    let online = client.online_users(Some(name), ONLINE_LIMIT).await;
    let online =
        online.map_err(|e| format!("cannot look up {name}: {}", describe(&e, "the route")))?;
    if let Some(u) = online.iter().find(|u| &u.name == name) {
        return Ok((u.user_id, name.clone()));
    }
    let convs = client.conversations(None, Some(CONVERSATIONS_LIMIT)).await;
    let convs =
        convs.map_err(|e| format!("cannot look up {name}: {}", describe(&e, "the route")))?;
    match convs.iter().find(|c| c.kind == "user" && &c.name == name) {
        Some(c) => Ok((c.id, name.clone())),
        None => Err(format!(
            "cannot find user {name}: not online and no conversation with them (name them by user id)"
        )),
    }
}

/// [`resolve`] of each user: their ids in order, and the names known for them.
async fn resolve_all(
    client: &Client,
    users: &[UserRef],
) -> Result<(Vec<u64>, HashMap<u64, String>), String> {
    let mut ids = Vec::with_capacity(users.len());
    let mut names = HashMap::new();
    for user in users {
        let (id, name) = resolve(client, user).await?;
        if let UserRef::Name(_) = user {
            names.insert(id, name);
        }
        ids.push(id);
    }
    Ok((ids, names))
}

/// The line for a refused or failed send to `to`.
fn not_sent(to: &To, e: &ClientError) -> String {
    let code = match e {
        ClientError::Send { code, .. } => Some(*code),
        _ => None,
    };
    match (to, code) {
        (To::User(name), Some(pb::ErrorCode::UnknownUser)) => {
            format!("not sent: there is no user {name}")
        }
        (To::Channel(name), Some(pb::ErrorCode::Forbidden)) => render::not_a_member(name),
        (To::Group(id), Some(pb::ErrorCode::Forbidden)) => {
            format!("not sent: you are not a member of group {id}")
        }
        (To::Group(id), _) => format!("not sent to group {id}: {}", describe(e, "the route")),
        (To::User(name), _) => format!("not sent to {name}: {}", describe(e, "the route")),
        (To::Channel(name), _) => format!("not sent to #{name}: {}", describe(e, "the route")),
        (To::All, _) => format!("not sent to everyone: {}", describe(e, "the route")),
    }
}

/// A readable explanation of an SDK error (the `Display` of some variants carries HTTP
/// details a chat user does not need). `route` names the route in "unreachable".
fn describe(e: &ClientError, route: &str) -> String {
    match e {
        ClientError::Route(RouteError::Transport(t)) => {
            // A refused certificate hides deep in the source chain, under a connect error.
            let mut source: Option<&dyn std::error::Error> = Some(t);
            let mut certificate = None;
            while let Some(e) = source {
                if e.to_string().contains("certificate") {
                    certificate = Some(e.to_string());
                }
                source = e.source();
            }
            let why = if let Some(tls) = certificate {
                format!("TLS: {tls}; --ca-file or CIM_CA_FILE adds a CA to trust")
            } else if t.is_timeout() {
                "timed out".to_string()
            } else if t.is_connect() {
                "connection refused or host unreachable".to_string()
            } else {
                t.to_string()
            };
            format!("route {route} unreachable ({why})")
        }
        ClientError::Route(RouteError::Api { code, message, .. }) => match code {
            ErrorCode::NameTaken => "this name is taken".into(),
            ErrorCode::SessionEnded => "the session ended (reconnecting?)".into(),
            _ => message.clone(),
        },
        ClientError::AlreadyLoggedIn(_) => {
            "already logged in elsewhere (single login: quit the other client first)".into()
        }
        ClientError::Send { message, .. } if !message.is_empty() => message.clone(),
        e => e.to_string(),
    }
}
