/*
 * cim web client: plain JavaScript, no framework, no build step. Served by cim-route at `/`.
 *
 * The flow of a session:
 *
 *   1. Log in over HTTP: POST /api/login {name, password} (POST /api/register first for a new
 *      account). The answer names a connection server (server.ws_addr), a single-use connect
 *      token and a session token (bearer of the other HTTP calls).
 *   2. Open ws://{server.ws_addr}/ws (a page served over https: wss://{server.wss_addr}/ws
 *      when the server has a TLS WebSocket listener, else wss://{server.ws_addr}/ws, for a
 *      proxy that terminates TLS in front of it). Every frame is one proto3 JSON text message: camelCase
 *      fields, enums as strings ("MESSAGE_KIND_PRIVATE"), 64-bit integers as strings.
 *   3. The first frame is {"login":{"token": connect_token}}; the server answers loginResult
 *      with the heartbeat interval.
 *   4. Ping loop: {"ping":{"nonce":"N"}} every heartbeatIntervalMs. A connection that stays
 *      silent longer than heartbeatTimeoutMs is given up (and replaced, step 6).
 *   5. Frames from the server: push (messages; at the start of a connection the ones that
 *      arrived while we were away, with replay: true), sendResult (the outcome of our sends),
 *      kick, error. Received messages are de-duplicated by id and shown; the stored kinds
 *      (PRIVATE, SYSTEM, RECEIPT) are then acked ({"ack":{"messageIds":[...]}}) so they leave
 *      the inbox; unacked ones come again on the next connection.
 *   6. When the connection ends: a kick with reason LOGGED_OUT, ADMIN or REPLACED ends the
 *      session (shown, no reconnect). Anything else reconnects through the route: wait
 *      (exponential backoff with jitter), resume the session (POST /api/login/resume with
 *      the session token, no password: the route ends the old connection if its server still
 *      has it and answers as a login; 401 session_ended: the session is over, log in again),
 *      and continue at step 2, maybe on another server. Messages whose result never came are
 *      sent again with the same message id, so the route stores a private one once and
 *      delivers a group or channel one once.
 *   7. The session token is kept in the tab's sessionStorage: a reload resumes at once (step
 *      6) instead of showing the login form; a logout or a final kick forgets it. The
 *      password is never kept.
 *
 * Besides the socket, HTTP calls with the session token list the people online
 * (GET /api/users/online) and manage channels (POST /api/channels/{name}/join|leave,
 * GET /api/channels/mine); both lists refresh periodically and after events.
 *
 * Stored conversations (private ones and stored groups) come from the route, so a reload
 * shows them again: GET /api/conversations (newest activity first, with unread counts and
 * the peer's read mark), re-fetched at every (re)connection and updated live by pushes.
 * Opening one loads its newest history page (GET /api/conversations/{type}/{id}/messages),
 * scrolling to the top the older ones (before=<oldest log_seq>); it is marked read with a
 * ReadMark frame up to the newest log_seq shown. GROUP_CHAT / GROUP_EVENT pushes are acked by
 * position ({"ack":{"groups":[{groupId, logSeq}]}}). Groups are created and managed over
 * /api/groups. Typing frames go out at most every TYPING_SEND_MS while the user types; one
 * received shows "NAME is typing…" for TYPING_SHOW_MS. A private conversation shows "seen"
 * under the last of my messages the peer's read mark covers; an open stored group watches its
 * read marks ({"watchReads":{"groupId"}}, stopped when another conversation opens, sent
 * again at every login) and shows "seen by N" under my last message N members have read.
 *
 * Conversation keys: "group" (everyone online), "system", "user:NAME" (private),
 * "channel:NAME", "grp:ID" (a stored group).
 *
 * Everything a user typed (names, message bodies, channel names) reaches the page through
 * textContent and createElement only, never as markup.
 */
"use strict";

// ---------------------------------------------------------------------------------------
// Settings

const RECONNECT_MIN_MS = 500;
const RECONNECT_MAX_MS = 30000;
/** How long a login from the form waits for the previous session's slot (e.g. after a reload). */
const FIRST_LOGIN_PATIENCE_MS = 15000;
/** A connection that has not logged in by then is given up. */
const CONNECT_TIMEOUT_MS = 10000;
const LIST_REFRESH_MS = 10000;
const ONLINE_PAGE = 500;
const ONLINE_MAX_PAGES = 4;
const SEEN_IDS_MAX = 5000;
const MESSAGES_PER_CONVERSATION = 500;
const ACK_BATCH_MAX = 1024;
const CHANNEL_NAME = /^[\p{L}\p{N}_.-]{1,64}$/u;
const HISTORY_PAGE = 50;
const CONVERSATIONS_PAGE = 200;
const TYPING_SEND_MS = 2000;
const TYPING_SHOW_MS = 4000;
/** Near the top of the message list (px): the older history page is loaded. */
const OLDER_AT_PX = 40;

/** Kinds the server stores until acked. */
const STORED_KINDS = new Set([
  "MESSAGE_KIND_PRIVATE",
  "MESSAGE_KIND_SYSTEM",
  "MESSAGE_KIND_RECEIPT",
]);

/** Kicks that end the session: no reconnect. */
const FINAL_KICKS = {
  KICK_REASON_LOGGED_OUT: "logged out (this session ended)",
  KICK_REASON_ADMIN: "disconnected by an administrator",
  KICK_REASON_REPLACED: "your account connected somewhere else",
};

const OTHER_KICKS = {
  KICK_REASON_SERVER_SHUTDOWN: "the server is shutting down",
  KICK_REASON_SLOW_CONSUMER: "the server dropped a slow connection",
};

// ---------------------------------------------------------------------------------------
// State

/** The login session and its connection. */
const session = {
  name: "",
  userId: "",
  sessionToken: null,
  serverId: "",
  /** Bumped whenever a session starts or ends: callbacks of an older one do nothing. */
  generation: 0,
  ended: true,
  ws: null,
  loggedIn: false,
  /** Last kick / error frame of the current socket: why it closes. */
  kick: null,
  lastError: null,
  lastHeard: 0,
  heartbeatMs: 10000,
  timeoutMs: 30000,
  attempt: 0,
  timers: { ping: null, connect: null, reconnect: null, lists: null },
  nextClientId: 1,
  nextNonce: 1,
  /** clientId → { send, record }: sends whose result has not come yet. */
  pending: new Map(),
};

/** What the page shows. */
const chat = {
  /** key ("group", "system", "user:NAME", "channel:NAME") → conversation */
  conversations: new Map(),
  active: "group",
  /** name → { userId, serverId } of the people online (without me) */
  online: new Map(),
  /** [{ name, members, online }] of my channels */
  channels: [],
  channelsAvailable: true,
  seen: new Set(),
  seenOrder: [],
  /** message id → record of a message I sent (for receipts) */
  mine: new Map(),
  refreshing: false,
  /** the online list refresh in flight, if any */
  onlineRefresh: null,
  /** the conversation list fetch in flight, if any */
  conversationsRefresh: null,
  /** { key, at } of the last Typing frame sent */
  typingSent: { key: "", at: 0, later: null },
  /** timer that hides the typing indicator */
  typingTimer: null,
};

// ---------------------------------------------------------------------------------------
// Small helpers

const $ = (id) => document.getElementById(id);

/**
 * Creates an element. `props`: "class", "text" (textContent), "data-*" attributes, or
 * element properties. Children are nodes or strings (strings become text nodes).
 */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-") || key.startsWith("aria-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Exponential backoff with jitter for the given attempt (1, 2, ...). */
function backoff(attempt) {
  const base = Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * 2 ** (attempt - 1));
  return Math.round(base / 2 + Math.random() * (base / 2));
}

/** A message id of our own (1-64 of [0-9A-Za-z_-]); resends reuse it. */
function newMessageId() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return "web" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** The tab's sessionStorage entry of the session token (a reload resumes with it). */
const SAVED_SESSION = "cim.session";

function saveSession(name, token) {
  try {
    sessionStorage.setItem(SAVED_SESSION, JSON.stringify({ name, token }));
  } catch {
    // storage disabled: a reload shows the login form
  }
}

function forgetSession() {
  try {
    sessionStorage.removeItem(SAVED_SESSION);
  } catch {
    // nothing was saved
  }
}

function savedSession() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(SAVED_SESSION) || "null");
    return saved && typeof saved.token === "string" && typeof saved.name === "string" ? saved : null;
  } catch {
    return null;
  }
}

/** localStorage, when the browser allows it (the last name used, to prefill the form). */
function remember(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    // storage disabled: nothing to prefill next time
  }
}

function recall(key) {
  try {
    return localStorage.getItem(key) || "";
  } catch {
    return "";
  }
}

function formatTime(ms) {
  const date = new Date(Number(ms) || Date.now());
  const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  if (date.toDateString() === new Date().toDateString()) return time;
  return `${date.toLocaleDateString()} ${time}`;
}

// ---------------------------------------------------------------------------------------
// HTTP API of the route (same origin)

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body, token = session.sessionToken) {
  const headers = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (token) headers.authorization = `Bearer ${token}`;
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "unreachable", "the route is unreachable");
  }
  const data = await resp.json().catch(() => null);
  if (!resp.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(resp.status, error.code || `http_${resp.status}`, error.message || resp.statusText);
  }
  return data;
}

const login = (name, password) => api("POST", "/api/login", { name, password }, null);
/** A new session in place of the one `token` belongs to (no password); 401: it has ended. */
const resume = (token) => api("POST", "/api/login/resume", undefined, token);

/** Best effort: ends a session token's login (frees its slot). */
function logoutToken(token) {
  if (token) api("POST", "/api/logout", undefined, token).catch(() => {});
}

// ---------------------------------------------------------------------------------------
// Connection state shown in the top bar

/** state: "connecting" | "online" | "reconnecting" | "offline" */
function setStatus(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.textContent = text;
  status.title = text;
  $("composer").classList.toggle("disconnected", state !== "online");
}

// ---------------------------------------------------------------------------------------
// Login form

function showLoginView(notice) {
  $("chat-view").hidden = true;
  $("login-view").hidden = false;
  $("me").hidden = true;
  $("logout").hidden = true;
  setLoginNotice(notice || "");
  const nameInput = $("login-name");
  if (!nameInput.value) nameInput.value = recall("cim.name");
  (nameInput.value ? $("login-password") : nameInput).focus();
}

function setLoginNotice(text) {
  $("login-notice").textContent = text;
  $("login-notice").hidden = !text;
}

function setLoginBusy(busy) {
  $("login-button").disabled = busy;
  $("register-button").disabled = busy;
}

async function onLoginForm(register) {
  const form = $("login-form");
  if (!form.reportValidity()) return;
  const name = $("login-name").value.trim();
  const password = $("login-password").value;
  setLoginBusy(true);
  setLoginNotice("");
  setStatus("connecting", "logging in…");
  try {
    const nameTaken = register && (await registerAccount(name, password));
    const answer = await loginPatiently(name, password).catch((e) => {
      if (nameTaken && e.code === "bad_credentials") {
        throw new ApiError(e.status, e.code, `the name ${name} is taken (and the password does not match)`);
      }
      throw e;
    });
    $("login-password").value = "";
    startSession(name, answer);
  } catch (e) {
    setStatus("offline", `offline: ${e.message}`);
    setLoginNotice(e.message);
  } finally {
    setLoginBusy(false);
  }
}

/** Creates the account; returns true when the name was taken already (then we log in). */
async function registerAccount(name, password) {
  try {
    await api("POST", "/api/register", { name, password }, null);
    return false;
  } catch (e) {
    if (e.code === "name_taken") return true;
    throw e;
  }
}

/**
 * Logs in; while the account is still logged in (409: e.g. this page was just reloaded and
 * the server has not seen the old connection close yet), tries again for a while.
 */
async function loginPatiently(name, password) {
  const deadline = Date.now() + FIRST_LOGIN_PATIENCE_MS;
  for (let attempt = 1; ; attempt++) {
    try {
      return await login(name, password);
    } catch (e) {
      if (e.code !== "already_logged_in" || Date.now() > deadline) throw e;
      setStatus("connecting", "waiting for your previous session to end…");
      await sleep(backoff(attempt));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Session: start, connection, reconnect, end

function startSession(name, answer) {
  session.generation++;
  session.ended = false;
  session.name = name;
  session.attempt = 0;
  session.userId = String(answer.user_id);
  remember("cim.name", name);
  resetChat();
  showChatView();
  session.timers.lists = setInterval(refreshLists, LIST_REFRESH_MS);
  connect(answer);
}

/** Opens the WebSocket of a login answer and sends the login frame. */
function connect(answer) {
  session.userId = String(answer.user_id);
  session.sessionToken = answer.session_token;
  saveSession(session.name, answer.session_token);
  session.serverId = answer.server.id;
  session.loggedIn = false;
  session.kick = null;
  session.lastError = null;
  setStatus("connecting", `connecting to ${answer.server.id}…`);

  let ws;
  try {
    ws = new WebSocket(wsUrl(answer.server));
  } catch (e) {
    scheduleReconnect(`cannot connect to ${answer.server.id}: ${e.message}`);
    return;
  }
  session.ws = ws;
  ws.onopen = () => sendFrame({ login: { token: answer.connect_token } });
  ws.onmessage = (event) => {
    if (ws === session.ws) onMessageEvent(event);
  };
  ws.onclose = (event) => {
    if (ws === session.ws) connectionLost(closeReason(event));
  };
  clearTimeout(session.timers.connect);
  session.timers.connect = setTimeout(() => {
    if (ws === session.ws && !session.loggedIn) connectionLost("the server did not answer the login");
  }, CONNECT_TIMEOUT_MS);
}

// A page served over https may only open wss:// (browsers block ws:// there): the server's
// own TLS listener when it has one, else its plain address behind a TLS-terminating proxy.
function wsUrl(server) {
  if (location.protocol !== "https:") return `ws://${server.ws_addr}/ws`;
  return `wss://${server.wss_addr || server.ws_addr}/ws`;
}

function sendFrame(frame) {
  const ws = session.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify(frame));
  return true;
}

function closeReason(event) {
  if (session.kick) return OTHER_KICKS[session.kick.reason] || session.kick.message || "kicked by the server";
  if (session.lastError) return session.lastError;
  if (event.code === 1000) return "closed by the server";
  return "connection lost";
}

/** The socket is gone (closed, silent, or never logged in): end or reconnect. */
function connectionLost(reason) {
  const ws = session.ws;
  session.ws = null;
  stopHeartbeat();
  clearTimeout(session.timers.connect);
  if (ws) {
    ws.onclose = ws.onmessage = null;
    ws.close();
  }
  if (session.ended) return;
  const kick = session.kick;
  if (kick && FINAL_KICKS[kick.reason]) {
    const detail = kick.message ? ` (${kick.message})` : "";
    endSession(`${FINAL_KICKS[kick.reason]}${detail}`);
    return;
  }
  scheduleReconnect(reason);
}

function scheduleReconnect(reason) {
  session.attempt++;
  const delay = backoff(session.attempt);
  const seconds = (delay / 1000).toFixed(1);
  setStatus("reconnecting", `reconnecting (attempt ${session.attempt}, in ${seconds} s): ${reason}`);
  const generation = session.generation;
  clearTimeout(session.timers.reconnect);
  session.timers.reconnect = setTimeout(() => reconnect(generation), delay);
}

/** Logs in again through the route by resuming the session (its token, no password). */
async function reconnect(generation) {
  session.timers.reconnect = null;
  if (generation !== session.generation) return;
  setStatus("connecting", `logging in again (attempt ${session.attempt})…`);
  let answer;
  try {
    answer = await resume(session.sessionToken);
  } catch (e) {
    if (generation !== session.generation) return;
    if (e.status === 401) endSession(sessionEndedWhy(e));
    else scheduleReconnect(e.code === "already_logged_in" ? "your account is connected somewhere else" : e.message);
    return;
  }
  if (generation !== session.generation) {
    logoutToken(answer.session_token);
    return;
  }
  connect(answer);
}

/** Why a session could not be resumed (401 from resume). */
function sessionEndedWhy(e) {
  if (e.code === "token_expired") return "your session expired: log in again";
  return "your session ended (logged out, or logged in elsewhere): log in again";
}

/** Resumes the session this tab had before a reload, if any; else shows the login form. */
async function resumeSaved() {
  const saved = savedSession();
  if (!saved) {
    showLoginView("");
    return;
  }
  setStatus("connecting", "resuming your session…");
  $("login-view").hidden = true;
  try {
    const answer = await resume(saved.token);
    startSession(saved.name, answer);
  } catch (e) {
    if (e.status === 401) forgetSession();
    const why = e.status === 401 ? sessionEndedWhy(e) : `could not resume your session: ${e.message}`;
    setStatus("offline", `offline: ${why}`);
    $("login-name").value = saved.name;
    showLoginView(e.status === 401 ? "" : why);
  }
}

/** Ends the session for good (logout, final kick, ended elsewhere) and shows why. */
function endSession(why) {
  session.ended = true;
  session.generation++;
  const ws = session.ws;
  session.ws = null;
  if (ws) {
    ws.onclose = ws.onmessage = null;
    ws.close(1000);
  }
  stopHeartbeat();
  for (const timer of ["connect", "reconnect"]) clearTimeout(session.timers[timer]);
  clearInterval(session.timers.lists);
  failPending("not sent: the session ended");
  forgetSession();
  setStatus("offline", `offline: ${why}`);
  showLoginView(`Offline: ${why}.`);
}

async function logout() {
  const token = session.sessionToken;
  session.sessionToken = null;
  endSession("you logged out");
  if (token) await api("POST", "/api/logout", undefined, token).catch(() => {});
}

// ---------------------------------------------------------------------------------------
// Frames from the server

function onMessageEvent(event) {
  if (typeof event.data !== "string") return; // we speak JSON; binary frames are not for us
  let frame;
  try {
    frame = JSON.parse(event.data);
  } catch {
    console.warn("cim: undecodable frame", event.data);
    return;
  }
  session.lastHeard = Date.now();
  if (frame.loginResult) onLoginResult(frame.loginResult);
  else if (frame.push) onPush(frame.push);
  else if (frame.sendResult) onSendResult(frame.sendResult);
  else if (frame.kick) session.kick = frame.kick; // the server closes right after
  else if (frame.error) onErrorFrame(frame.error);
  else if (frame.readMark) onReadMark(frame.readMark);
  else if (frame.typing) onTyping(frame.typing);
  // pong: lastHeard is all it is for
}

function onLoginResult(result) {
  session.loggedIn = true;
  session.attempt = 0;
  clearTimeout(session.timers.connect);
  session.serverId = result.serverId || session.serverId;
  session.heartbeatMs = Number(result.heartbeatIntervalMs) || 10000;
  session.timeoutMs = Number(result.heartbeatTimeoutMs) || 3 * session.heartbeatMs;
  setStatus("online", `online · ${session.serverId}`);
  $("status").dataset.server = session.serverId;
  startHeartbeat();
  resendPending();
  refreshLists();
  // Read marks sent while the socket was gone were lost: send the active one again.
  for (const conv of chat.conversations.values()) conv.readSent = 0;
  markRead(conversation(chat.active));
  // A watch lives as long as one connection.
  watchReads(conversation(chat.active), true);
  refreshConversations();
}

function onErrorFrame(error) {
  const text = error.message || error.code || "error";
  session.lastError = text;
  console.warn("cim: server error", error.code, error.message);
  if (session.loggedIn) addNote(`server: ${text}`);
}

// ---------------------------------------------------------------------------------------
// Heartbeat

function startHeartbeat() {
  stopHeartbeat();
  session.lastHeard = Date.now();
  session.timers.ping = setInterval(heartbeat, session.heartbeatMs);
}

function stopHeartbeat() {
  clearInterval(session.timers.ping);
  session.timers.ping = null;
}

function heartbeat() {
  if (Date.now() - session.lastHeard > session.timeoutMs) {
    connectionLost("the connection went silent");
    return;
  }
  sendFrame({ ping: { nonce: String(session.nextNonce++) } });
}

// ---------------------------------------------------------------------------------------
// Receiving messages

function onPush(push) {
  const replay = Boolean(push.replay);
  const toAck = [];
  /** group id → highest log_seq pushed */
  const groups = new Map();
  for (const message of push.messages || []) {
    if (STORED_KINDS.has(message.kind) && message.id) toAck.push(message.id);
    if (GROUP_LOG_KINDS.has(message.kind) && message.groupId && Number(message.logSeq)) {
      const seq = Number(message.logSeq);
      groups.set(String(message.groupId), Math.max(seq, groups.get(String(message.groupId)) || 0));
    }
    if (!message.id || firstSighting(message.id)) showIncoming(message, replay);
  }
  renderSidebar();
  // Acked after they are shown; a repeat is acked again (its first ack may have been lost).
  sendAcks(toAck);
  sendGroupAcks(groups);
}

/** Kinds kept in a stored group's log: acked by position. */
const GROUP_LOG_KINDS = new Set(["MESSAGE_KIND_GROUP_CHAT", "MESSAGE_KIND_GROUP_EVENT"]);

function sendGroupAcks(groups) {
  const positions = [...groups].map(([groupId, seq]) => ({ groupId, logSeq: String(seq) }));
  for (let i = 0; i < positions.length; i += ACK_BATCH_MAX) {
    sendFrame({ ack: { groups: positions.slice(i, i + ACK_BATCH_MAX) } });
  }
}

/** Remembers a message id; false when it was seen before (a repeat after a reconnect). */
function firstSighting(id) {
  if (chat.seen.has(id)) return false;
  chat.seen.add(id);
  chat.seenOrder.push(id);
  if (chat.seenOrder.length > SEEN_IDS_MAX) chat.seen.delete(chat.seenOrder.shift());
  return true;
}

function sendAcks(ids) {
  for (let i = 0; i < ids.length; i += ACK_BATCH_MAX) {
    sendFrame({ ack: { messageIds: ids.slice(i, i + ACK_BATCH_MAX) } });
  }
}

function showIncoming(message, replay) {
  if (message.kind === "MESSAGE_KIND_RECEIPT") {
    markReceived(message.receiptFor, message.senderName);
    return;
  }
  const key = conversationKeyOf(message);
  const conv = conversation(key);
  if (message.kind === "MESSAGE_KIND_PRIVATE" && Number(message.senderId)) conv.userId = String(message.senderId);
  if (message.groupId && conv.kind === "grp") {
    conv.groupId = String(message.groupId);
    const event = message.groupEvent || {};
    if (event.name && (event.type === "GROUP_EVENT_TYPE_CREATED" || event.type === "GROUP_EVENT_TYPE_RENAMED")) {
      conv.name = event.name;
    }
    // A group we did not know (we were just added): the list has its name.
    if (!conv.stored) refreshConversations();
  }
  const record = recordOf(message, replay);
  if (record.mine && !chat.mine.has(record.id) && !pendingWithId(record.id)) chat.mine.set(record.id, record);
  // My own message (e.g. caught up from a group's log): shown as mine, once.
  if (record.mine && chat.mine.get(record.id) !== record) return;
  addMessage(conv, record);
  // Someone we did not know was online: the list is behind.
  if (message.kind !== "MESSAGE_KIND_GROUP_EVENT" && Number(message.senderId) && !chat.online.has(message.senderName)) {
    refreshOnline();
  }
}

/** Whether a send waiting for its result has this (delivered) message id. */
function pendingWithId(id) {
  for (const { send } of session.pending.values()) {
    if (`${session.userId}-${send.messageId}` === id) return true;
  }
  return false;
}

/** The on-screen record of a pushed or stored message. */
function recordOf(message, replay) {
  const event = message.kind === "MESSAGE_KIND_GROUP_EVENT";
  const mine = !event && Number(message.senderId) > 0 && String(message.senderId) === session.userId;
  const record = {
    id: message.id,
    mine,
    event,
    from: message.senderName || (message.kind === "MESSAGE_KIND_SYSTEM" ? "system" : "?"),
    body: message.body || "",
    at: message.timestampMs,
    replay,
    logSeq: Number(message.logSeq) || 0,
  };
  if (mine) {
    record.status = "delivered";
    record.statusText = "✓ sent";
  }
  return record;
}

function conversationKeyOf(message) {
  switch (message.kind) {
    case "MESSAGE_KIND_PRIVATE":
      return `user:${message.senderName}`;
    case "MESSAGE_KIND_GROUP":
      return "group";
    case "MESSAGE_KIND_CHANNEL":
      return `channel:${message.channel}`;
    case "MESSAGE_KIND_GROUP_CHAT":
    case "MESSAGE_KIND_GROUP_EVENT":
      return `grp:${message.groupId}`;
    default:
      return "system";
  }
}

function markReceived(messageId, by) {
  const record = chat.mine.get(messageId);
  if (record) setRecordStatus(record, "received", `✓ ${by} received it`);
}

// ---------------------------------------------------------------------------------------
// Sending messages

function onComposerSubmit() {
  const input = $("message-input");
  const text = input.value;
  if (!text.trim()) return;
  const conv = conversation(chat.active);
  const send = sendFrameFor(conv, text);
  if (!send) return;
  input.value = "";
  const record = { mine: true, from: session.name, body: text, at: Date.now(), replay: false, conv: conv.key };
  addMessage(conv, record);
  const clientId = String(session.nextClientId++);
  send.clientId = clientId;
  session.pending.set(clientId, { send, record });
  setRecordStatus(record, "sending", session.loggedIn ? "sending…" : "waiting for the connection…");
  if (session.loggedIn) sendFrame({ send });
}

/** The Send frame body for a message to a conversation (null: nothing can be sent there). */
function sendFrameFor(conv, body) {
  // Every send has its own id, so sending it again after a reconnect is safe.
  const messageId = newMessageId();
  if (conv.key === "group") return { kind: "MESSAGE_KIND_GROUP", body, messageId };
  if (conv.key.startsWith("user:")) {
    return { kind: "MESSAGE_KIND_PRIVATE", toUserName: conv.name, body, messageId };
  }
  if (conv.key.startsWith("channel:")) {
    return { kind: "MESSAGE_KIND_CHANNEL", channel: conv.name, body, messageId };
  }
  if (conv.kind === "grp") return { kind: "MESSAGE_KIND_GROUP_CHAT", groupId: conv.groupId, body, messageId };
  return null;
}

function onSendResult(result) {
  const entry = session.pending.get(String(result.clientId));
  if (!entry) return;
  session.pending.delete(String(result.clientId));
  const { send, record } = entry;
  if (result.messageId) {
    record.id = result.messageId;
    chat.mine.set(result.messageId, record);
    const conv = chat.conversations.get(record.conv);
    if (conv) conv.ids.add(record.id);
    if (record.el) record.el.dataset.id = result.messageId;
  }
  if (result.timestampMs) record.at = result.timestampMs;
  if (Number(result.logSeq)) {
    record.logSeq = Number(result.logSeq);
    const conv = chat.conversations.get(record.conv);
    if (conv) {
      touch(conv, record);
      renderSeen(conv);
      renderSidebar();
    }
  }
  switch (result.status) {
    case "SEND_STATUS_DELIVERED":
      setRecordStatus(record, "delivered", deliveredText(send, result.delivered, result.repeat));
      break;
    case "SEND_STATUS_STORED":
      setRecordStatus(record, "stored", "✓ stored: they get it when they come online");
      refreshOnline();
      break;
    default: {
      const error = result.error || {};
      setRecordStatus(record, "failed", `not sent: ${error.message || error.code || "failed"}`);
    }
  }
}

function deliveredText(send, count, repeat) {
  if (send.kind === "MESSAGE_KIND_PRIVATE") return "✓ delivered";
  if (send.kind === "MESSAGE_KIND_GROUP_CHAT") return "✓ sent";
  // Sent again after a reconnect, but the first send had gone out: nobody got it twice.
  if (repeat) return "✓ delivered (before the connection dropped)";
  const n = Number(count) || 0;
  return `✓ delivered to ${n} ${n === 1 ? "person" : "people"} online`;
}

/**
 * After a reconnect: messages without a result are sent again with the same message id. The
 * route stores a private message once and delivers a group or channel message once (a repeat
 * is answered with `repeat: true`), so nobody sees a message twice.
 */
function resendPending() {
  for (const { send, record } of session.pending.values()) {
    setRecordStatus(record, "sending", "sending…");
    sendFrame({ send });
  }
}

function failPending(text) {
  for (const { record } of session.pending.values()) setRecordStatus(record, "failed", text);
  session.pending.clear();
}

// ---------------------------------------------------------------------------------------
// Conversations and messages on screen

function resetChat() {
  chat.conversations.clear();
  chat.online.clear();
  chat.channels = [];
  chat.channelsAvailable = true;
  chat.seen.clear();
  chat.seenOrder = [];
  chat.mine.clear();
  session.pending.clear();
  conversation("group");
  chat.active = "group";
}

/** The conversation with this key, created on first use. */
function conversation(key) {
  let conv = chat.conversations.get(key);
  if (!conv) {
    const [kind, ...rest] = key.split(":");
    const name = rest.join(":");
    conv = {
      key,
      kind,
      name,
      messages: [],
      /** ids of `messages` */
      ids: new Set(),
      unread: 0,
      /** a stored conversation (private or stored group): listed with the recent ones */
      stored: false,
      /** peer's user id (private) / the group's id (grp), as strings */
      userId: "",
      groupId: kind === "grp" ? name : "",
      activity: 0,
      lastText: "",
      peerReadSeq: 0,
      /** stored group: user id → seq of the read marks received while watching */
      readers: new Map(),
      /** the seq of the last ReadMark sent */
      readSent: 0,
      historyLoaded: false,
      hasMore: false,
      loading: false,
      /** { name, until } of who is typing here */
      typing: null,
    };
    chat.conversations.set(key, conv);
  }
  return conv;
}

function conversationTitle(conv) {
  switch (conv.kind) {
    case "group":
      return "Everyone online";
    case "system":
      return "System messages";
    case "channel":
      return `# ${conv.name}`;
    case "grp":
      return conv.name || `group ${conv.groupId}`;
    default:
      return conv.name;
  }
}

function addMessage(conv, record) {
  if (record.id && conv.ids.has(record.id)) {
    // Shown from the history first, then replayed from the inbox: it did arrive while away.
    const known = conv.messages.find((r) => r.id === record.id);
    if (record.replay && known && !known.replay) {
      known.replay = true;
      if (conv.key === chat.active) renderMessages(conv);
    }
    return;
  }
  record.conv = conv.key;
  conv.messages.push(record);
  if (record.id) conv.ids.add(record.id);
  if (conv.messages.length > MESSAGES_PER_CONVERSATION) {
    const dropped = conv.messages.shift();
    conv.ids.delete(dropped.id);
    conv.hasMore = conv.stored;
  }
  if (conv.kind === "user" || conv.kind === "grp") touch(conv, record);
  if (conv.key === chat.active) {
    const list = $("messages");
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.append(messageElement(record));
    if (atBottom || record.mine) list.scrollTop = list.scrollHeight;
    if (!record.mine && conv.typing && conv.typing.name === record.from) setTyping(conv, null);
    markRead(conv);
    renderSeen(conv);
  } else if (!record.mine) {
    conv.unread++;
  }
}

/** A message in a stored conversation: it moves to the top of the list, with its text. */
function touch(conv, record) {
  conv.stored = true;
  conv.activity = Math.max(conv.activity, Number(record.at) || Date.now());
  conv.lastText = lastTextOf(record);
}

function lastTextOf(record) {
  if (record.event) return record.body;
  return `${record.mine ? "you" : record.from}: ${record.body}`;
}

/** A line in the active conversation that is not a message (e.g. a server error). */
function addNote(text) {
  $("messages").append(el("li", { class: "note", text }));
}

function messageElement(record) {
  if (record.event) {
    const item = el("li", { class: "event", "data-id": record.id, text: record.body });
    record.el = item;
    return item;
  }
  const meta = el(
    "div",
    { class: "meta" },
    el("span", { class: "from", text: record.mine ? "you" : record.from }),
    el("time", { class: "time", text: formatTime(record.at) }),
    record.replay && el("span", { class: "badge", text: "offline", title: "sent while you were offline" }),
  );
  const status = el("div", { class: "status", "data-status": record.status || "", text: record.statusText || "" });
  const item = el(
    "li",
    { class: "msg" + (record.mine ? " mine" : "") + (record.replay ? " replay" : ""), "data-id": record.id },
    meta,
    el("div", { class: "body", text: record.body }),
    record.mine && status,
  );
  record.el = item;
  record.statusEl = status;
  return item;
}

function setRecordStatus(record, status, text) {
  record.status = status;
  record.statusText = text;
  if (record.statusEl) {
    record.statusEl.dataset.status = status;
    record.statusEl.textContent = text;
  }
}

function openConversation(key) {
  const conv = conversation(key);
  if (chat.active !== key) watchReads(conversation(chat.active), false);
  chat.active = key;
  watchReads(conv, true);
  conv.unread = 0;
  $("conversation-title").textContent = conversationTitle(conv);
  $("leave-channel").hidden = conv.kind !== "channel";
  $("group-tools").hidden = conv.kind !== "grp";
  setMemberPanelOpen(false);
  setGroupNotice("");
  const input = $("message-input");
  input.disabled = conv.kind === "system";
  input.placeholder = composerHint(conv);
  renderMessages(conv);
  $("messages").scrollTop = $("messages").scrollHeight;
  renderTyping();
  setSidebarOpen(false);
  renderSidebar();
  if (!input.disabled) input.focus();
  if (!conv.historyLoaded) loadHistory(conv, false);
  else markRead(conv);
}

/** (Re)draws the open conversation's messages. */
function renderMessages(conv) {
  for (const record of conv.messages) record.el = record.statusEl = null;
  $("messages").replaceChildren(...conv.messages.map(messageElement));
  renderSeen(conv);
}

function composerHint(conv) {
  switch (conv.kind) {
    case "group":
      return "Message everyone online";
    case "channel":
      return `Message #${conv.name}`;
    case "user":
      return `Message ${conv.name}`;
    case "grp":
      return `Message ${conversationTitle(conv)}`;
    default:
      return "System messages cannot be answered";
  }
}

function showChatView() {
  $("login-view").hidden = true;
  $("chat-view").hidden = false;
  $("me").hidden = false;
  $("me").textContent = session.name;
  $("me").dataset.userId = session.userId;
  $("logout").hidden = false;
  openConversation(chat.active);
}

// ---------------------------------------------------------------------------------------
// Sidebar: rooms, channels, people

function renderSidebar() {
  renderRecent();
  renderRooms();
  renderChannels();
  renderPeople();
  const unread = [...chat.conversations.values()].reduce((n, c) => n + c.unread, 0);
  $("toggle-sidebar").textContent = unread ? `Conversations (${unread} unread)` : "Conversations";
}

function conversationButton(key, label, detail, extraClass = "") {
  const conv = conversation(key);
  const button = el(
    "button",
    {
      type: "button",
      class: `conv ${extraClass}` + (key === chat.active ? " active" : ""),
      "data-conv": key,
      "aria-current": key === chat.active ? "true" : undefined,
    },
    el("span", { class: "label", text: label }),
    detail && el("span", { class: "detail", text: detail }),
    conv.unread > 0 && el("span", { class: "unread", text: String(conv.unread) }),
  );
  button.addEventListener("click", () => openConversation(key));
  return el("li", {}, button);
}

function renderRooms() {
  const items = [conversationButton("group", "Everyone online", "group chat")];
  if (chat.conversations.has("system")) items.push(conversationButton("system", "System", ""));
  $("rooms").replaceChildren(...items);
}

function renderChannels() {
  const names = new Set(chat.channels.map((c) => c.name));
  const items = chat.channels.map((c) =>
    conversationButton(`channel:${c.name}`, `# ${c.name}`, `${c.members} members · ${c.online} online`),
  );
  // Channel messages of channels not in the list (yet): still reachable.
  for (const conv of chat.conversations.values()) {
    if (conv.kind === "channel" && !names.has(conv.name) && conv.messages.length) {
      items.push(conversationButton(conv.key, `# ${conv.name}`, "not a member"));
    }
  }
  $("channels").replaceChildren(...items);
}

function renderPeople() {
  const names = new Set(chat.online.keys());
  for (const conv of chat.conversations.values()) {
    if (conv.kind === "user") names.add(conv.name);
  }
  names.delete(session.name);
  // Those with a stored conversation are in the conversation list (one button per key).
  for (const conv of chat.conversations.values()) {
    if (conv.kind === "user" && conv.stored) names.delete(conv.name);
  }
  const sorted = [...names].sort((a, b) => {
    const online = Number(chat.online.has(b)) - Number(chat.online.has(a));
    return online || a.localeCompare(b);
  });
  $("people").replaceChildren(
    ...sorted.map((name) => {
      const online = chat.online.has(name);
      return conversationButton(`user:${name}`, name, null, online ? "online" : "offline");
    }),
  );
  $("online-count").textContent = `(${chat.online.size} online)`;
}

function setSidebarOpen(open) {
  $("chat-view").classList.toggle("sidebar-open", open);
  $("toggle-sidebar").setAttribute("aria-expanded", String(open));
}

// ---------------------------------------------------------------------------------------
// Lists over HTTP: people online, my channels

async function refreshLists() {
  if (!session.sessionToken || chat.refreshing) return;
  chat.refreshing = true;
  try {
    await Promise.all([refreshOnline(), refreshChannels()]);
  } finally {
    chat.refreshing = false;
  }
}

/** Refreshes the people online (one refresh at a time: calls during one share it). */
function refreshOnline() {
  if (!chat.onlineRefresh) {
    chat.onlineRefresh = fetchOnline().finally(() => {
      chat.onlineRefresh = null;
    });
  }
  return chat.onlineRefresh;
}

async function fetchOnline() {
  const generation = session.generation;
  const online = new Map();
  let after = "";
  try {
    for (let page = 0; page < ONLINE_MAX_PAGES; page++) {
      const query = `limit=${ONLINE_PAGE}` + (after ? `&after=${encodeURIComponent(after)}` : "");
      const answer = await api("GET", `/api/users/online?${query}`);
      for (const user of answer.users || []) {
        if (user.name !== session.name) online.set(user.name, { userId: user.user_id, serverId: user.server_id });
      }
      if (!answer.next) break;
      after = answer.next;
    }
  } catch (e) {
    console.warn("cim: online users", e.message);
    return;
  }
  if (generation !== session.generation) return;
  chat.online = online;
  renderSidebar();
}

async function refreshChannels() {
  if (!chat.channelsAvailable) return;
  const generation = session.generation;
  try {
    const answer = await api("GET", "/api/channels/mine");
    if (generation !== session.generation) return;
    chat.channels = answer.channels || [];
    renderSidebar();
  } catch (e) {
    if (e.status === 404 && e.code === "not_found") {
      chat.channelsAvailable = false;
      setChannelNotice("channels are not available on this route");
    }
  }
}

function setChannelNotice(text) {
  $("channel-notice").textContent = text;
  $("channel-notice").hidden = !text;
}

async function joinChannel(name) {
  if (!CHANNEL_NAME.test(name)) {
    setChannelNotice("a channel name is 1-64 letters, digits, _ - or .");
    return;
  }
  try {
    await api("POST", `/api/channels/${encodeURIComponent(name)}/join`);
    setChannelNotice("");
    $("join-name").value = "";
    chat.channelsAvailable = true;
    await refreshChannels();
    openConversation(`channel:${name}`);
  } catch (e) {
    setChannelNotice(`could not join ${name}: ${e.message}`);
  }
}

async function leaveChannel(name) {
  try {
    await api("POST", `/api/channels/${encodeURIComponent(name)}/leave`);
    setChannelNotice("");
    chat.conversations.delete(`channel:${name}`);
    await refreshChannels();
    openConversation("group");
  } catch (e) {
    setChannelNotice(`could not leave ${name}: ${e.message}`);
  }
}

// ---------------------------------------------------------------------------------------
// Stored conversations: the list, history, read marks, "seen", typing

/** Private conversations and stored groups, newest activity first. */
function renderRecent() {
  const convs = [...chat.conversations.values()]
    .filter((c) => c.stored && (c.kind === "user" || c.kind === "grp"))
    .sort((a, b) => b.activity - a.activity || a.key.localeCompare(b.key));
  $("recent").replaceChildren(
    ...convs.map((c) => {
      const presence = c.kind === "user" ? (chat.online.has(c.name) ? "online" : "offline") : "stored-group";
      return conversationButton(c.key, conversationTitle(c), c.lastText || " ", `recent ${presence}`);
    }),
  );
  $("recent-empty").hidden = convs.length > 0;
}

/** Fetches the conversation list (one fetch at a time: calls during one share it). */
function refreshConversations() {
  if (!chat.conversationsRefresh) {
    chat.conversationsRefresh = fetchConversations().finally(() => {
      chat.conversationsRefresh = null;
    });
  }
  return chat.conversationsRefresh;
}

async function fetchConversations() {
  const generation = session.generation;
  let answer;
  try {
    answer = await api("GET", `/api/conversations?limit=${CONVERSATIONS_PAGE}`);
  } catch (e) {
    console.warn("cim: conversations", e.message);
    return;
  }
  if (generation !== session.generation) return;
  for (const c of answer.conversations || []) {
    const key = c.type === "group" ? `grp:${c.id}` : `user:${c.name}`;
    if (c.type !== "group" && (!c.name || c.name === session.name)) continue;
    const conv = conversation(key);
    conv.stored = true;
    if (c.type === "group") {
      conv.groupId = String(c.id);
      conv.name = c.name;
    } else {
      conv.userId = String(c.id);
    }
    conv.activity = Math.max(conv.activity, Number(c.activity_ms) || 0);
    if (c.last && (!conv.lastText || Number(c.last.logSeq) >= newestSeq(conv))) {
      conv.lastText = lastTextOf(recordOf(c.last, false));
    }
    conv.unread = key === chat.active ? 0 : Number(c.unread) || 0;
    conv.peerReadSeq = Math.max(conv.peerReadSeq, Number(c.peer_read_seq) || 0);
    if (key === chat.active) {
      $("conversation-title").textContent = conversationTitle(conv);
      renderSeen(conv);
      // Newer than what is shown (missed while reconnecting): the newest page again.
      if (conv.historyLoaded && Number(c.top) > newestSeq(conv)) loadHistory(conv, false);
    }
  }
  renderSidebar();
}

/** The newest log_seq among a conversation's messages (0: none). */
function newestSeq(conv) {
  return conv.messages.reduce((max, r) => Math.max(max, r.logSeq || 0), 0);
}

function oldestSeq(conv) {
  return conv.messages.reduce((min, r) => (r.logSeq && r.logSeq < min ? r.logSeq : min), Infinity);
}

/** The `Conversation` of frames for this conversation (null: it is not a stored one). */
function conversationRef(conv) {
  if (conv.kind === "grp" && conv.groupId) return { groupId: conv.groupId };
  if (conv.kind === "user") {
    const userId = conv.userId || (chat.online.get(conv.name) || {}).userId;
    if (userId) {
      conv.userId = String(userId);
      return { userId: conv.userId };
    }
  }
  return null;
}

/** The HTTP path of a stored conversation (null: not one, or its peer's id is unknown). */
function conversationPath(conv) {
  const ref = conversationRef(conv);
  if (!ref) return null;
  return ref.groupId ? `/api/conversations/group/${ref.groupId}` : `/api/conversations/user/${ref.userId}`;
}

/**
 * Loads a history page: the newest (older = false) or the one before the oldest shown. Pages
 * are merged by message id, so what was pushed meanwhile is not shown twice.
 */
async function loadHistory(conv, older) {
  const path = conversationPath(conv);
  if (!path || conv.loading || !session.sessionToken) return;
  const oldest = oldestSeq(conv);
  if (older && (!conv.hasMore || oldest === Infinity)) return;
  conv.loading = true;
  const generation = session.generation;
  let page;
  try {
    const query = `limit=${HISTORY_PAGE}` + (older ? `&before=${oldest}` : "");
    page = await api("GET", `${path}/messages?${query}`);
  } catch (e) {
    if (generation === session.generation && conv.key === chat.active && e.status !== 404) {
      addNote(`could not load the history: ${e.message}`);
    }
    return;
  } finally {
    conv.loading = false;
  }
  if (generation !== session.generation) return;
  const messages = page.messages || [];
  const wasLoaded = conv.historyLoaded;
  conv.historyLoaded = true;
  if (older || !wasLoaded) conv.hasMore = messages.length >= HISTORY_PAGE && Number(messages[0].logSeq) > 1;
  mergeHistory(conv, messages);
  if (conv.key === chat.active) {
    const list = $("messages");
    const fromBottom = list.scrollHeight - list.scrollTop;
    renderMessages(conv);
    // Older messages go on top: what was in view stays in view.
    list.scrollTop = older ? list.scrollHeight - fromBottom : list.scrollHeight;
    markRead(conv);
  }
  renderSidebar();
}

function mergeHistory(conv, messages) {
  for (const message of messages) {
    if (!message.id) continue;
    if (conv.ids.has(message.id)) {
      const known = conv.messages.find((r) => r.id === message.id);
      if (known && !known.logSeq) known.logSeq = Number(message.logSeq) || 0;
      continue;
    }
    const record = recordOf(message, false);
    if (record.mine && !chat.mine.has(record.id)) chat.mine.set(record.id, record);
    record.conv = conv.key;
    conv.messages.push(record);
    conv.ids.add(record.id);
    if (conv.messages.length === 1 || record.logSeq >= newestSeq(conv)) touch(conv, record);
  }
  // In log order; what has no seq yet (my sends waiting for their result) stays last.
  conv.messages.sort((a, b) => (a.logSeq || Infinity) - (b.logSeq || Infinity));
}

/** Marks the open conversation read up to the newest message shown (ReadMark frame). */
function markRead(conv) {
  if (conv.key !== chat.active) return;
  conv.unread = 0;
  const ref = conversationRef(conv);
  const seq = newestSeq(conv);
  if (!ref || seq <= conv.readSent) return;
  if (sendFrame({ readMark: { conversation: ref, seq: String(seq) } })) conv.readSent = seq;
}

/** Starts or stops getting a stored group's read marks (only groups: private marks come anyway). */
function watchReads(conv, on) {
  if (conv.kind !== "grp" || !conv.groupId) return;
  sendFrame({ watchReads: on ? { groupId: conv.groupId } : { groupId: conv.groupId, stop: true } });
}

/**
 * Private (open): "seen" under the last of my messages the peer's read mark covers. Stored
 * group (open): "seen by N" under my last message, N the members whose marks cover it.
 */
function renderSeen(conv) {
  if (conv.key !== chat.active || (conv.kind !== "user" && conv.kind !== "grp")) return;
  for (const old of $("messages").querySelectorAll(".seen")) old.remove();
  if (conv.kind === "user") {
    const seen = conv.messages.filter((r) => r.mine && r.logSeq && r.logSeq <= conv.peerReadSeq).pop();
    if (seen && seen.el) seen.el.append(el("div", { class: "seen", text: "seen" }));
    return;
  }
  const last = conv.messages.filter((r) => r.mine && r.logSeq).pop();
  if (!last || !last.el) return;
  const readers = [...conv.readers.values()].filter((seq) => seq >= last.logSeq).length;
  if (readers > 0) last.el.append(el("div", { class: "seen", text: `seen by ${readers}` }));
}

/** Someone read a conversation of mine: the private peer, or a member of a watched group. */
function onReadMark(mark) {
  const ref = mark.conversation || {};
  const seq = Number(mark.seq) || 0;
  if (ref.groupId) {
    const conv = chat.conversations.get(`grp:${ref.groupId}`);
    if (!conv || !mark.userId) return;
    const id = String(mark.userId);
    conv.readers.set(id, Math.max(conv.readers.get(id) || 0, seq));
    renderSeen(conv);
    return;
  }
  if (!ref.userId) return;
  const conv = [...chat.conversations.values()].find((c) => c.kind === "user" && c.userId === String(ref.userId));
  if (!conv) return;
  conv.peerReadSeq = Math.max(conv.peerReadSeq, seq);
  renderSeen(conv);
}

function onTyping(typing) {
  const ref = typing.conversation || {};
  let conv;
  if (ref.groupId) conv = chat.conversations.get(`grp:${ref.groupId}`);
  else if (typing.userName) conv = chat.conversations.get(`user:${typing.userName}`) || conversation(`user:${typing.userName}`);
  if (!conv) return;
  if (!ref.groupId && typing.userId) conv.userId = String(typing.userId);
  setTyping(conv, typing.stopped ? null : { name: typing.userName || "someone", until: Date.now() + TYPING_SHOW_MS });
}

function setTyping(conv, typing) {
  conv.typing = typing;
  if (conv.key === chat.active) renderTyping();
}

/** Shows who is typing in the open conversation, until it runs out. */
function renderTyping() {
  clearTimeout(chat.typingTimer);
  const conv = conversation(chat.active);
  const typing = conv.typing && conv.typing.until > Date.now() ? conv.typing : null;
  $("typing").textContent = typing ? `${typing.name} is typing…` : "";
  $("typing").hidden = !typing;
  if (typing) chat.typingTimer = setTimeout(renderTyping, typing.until - Date.now() + 10);
}

/**
 * The user types: tell the conversation, at most every TYPING_SEND_MS. Typing within that
 * time is told when it is over (if the input still has text), so the peer's indicator keeps
 * going while the user types on.
 */
function onComposerInput() {
  const conv = conversation(chat.active);
  const ref = conversationRef(conv);
  if (!ref || !$("message-input").value.trim()) return;
  const wait = chat.typingSent.at + TYPING_SEND_MS - Date.now();
  if (chat.typingSent.key === conv.key && wait > 0) {
    if (!chat.typingSent.later) {
      chat.typingSent.later = setTimeout(() => {
        chat.typingSent.later = null;
        if (chat.active === conv.key) onComposerInput();
      }, wait);
    }
    return;
  }
  clearTimeout(chat.typingSent.later);
  if (sendFrame({ typing: { conversation: ref } })) chat.typingSent = { key: conv.key, at: Date.now(), later: null };
}

function onMessagesScroll() {
  const conv = conversation(chat.active);
  if ($("messages").scrollTop < OLDER_AT_PX && conv.hasMore) loadHistory(conv, true);
}

// ---------------------------------------------------------------------------------------
// Stored groups: create, add people, members, leave

/**
 * User ids of a comma-separated list of names and ids. The API takes ids: a name is resolved
 * through the people online and the private conversations the page knows.
 */
function resolveUsers(text) {
  const ids = [];
  const unknown = [];
  for (const item of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    if (/^[0-9]+$/.test(item)) {
      ids.push(Number(item));
      continue;
    }
    const online = chat.online.get(item);
    const conv = chat.conversations.get(`user:${item}`);
    const id = (online && online.userId) || (conv && conv.userId);
    if (id) ids.push(Number(id));
    else unknown.push(item);
  }
  if (unknown.length) {
    throw new Error(`unknown: ${unknown.join(", ")} (name people online or in your conversations, or give user ids)`);
  }
  return [...new Set(ids)];
}

function setNotice(id, text) {
  $(id).textContent = text;
  $(id).hidden = !text;
}

const setGroupNotice = (text) => setNotice("group-notice", text);

async function createGroup() {
  const name = $("group-name").value.trim();
  if (!name) return;
  let members;
  try {
    members = resolveUsers($("group-members").value);
  } catch (e) {
    setNotice("group-form-notice", e.message);
    return;
  }
  try {
    const answer = await api("POST", "/api/groups", { name, members });
    const group = answer.group;
    const conv = conversation(`grp:${group.id}`);
    conv.groupId = String(group.id);
    conv.name = group.name;
    conv.stored = true;
    conv.activity = Math.max(conv.activity, Number(group.created_ms) || Date.now());
    conv.lastText = "group created";
    $("group-name").value = "";
    $("group-members").value = "";
    setNotice("group-form-notice", notAddedText(answer.added));
    openConversation(conv.key);
  } catch (e) {
    setNotice("group-form-notice", `could not create the group: ${e.message}`);
  }
}

/** Why some people were not added (empty: everyone was). */
function notAddedText(added) {
  if (!added) return "";
  const parts = [];
  if (added.group_full) parts.push("the group is full");
  if ((added.too_many_groups || []).length) parts.push(`in too many groups: ${added.too_many_groups.join(", ")}`);
  return parts.length ? `not everyone was added (${parts.join("; ")})` : "";
}

async function addMembers() {
  const conv = conversation(chat.active);
  if (conv.kind !== "grp") return;
  let ids;
  try {
    ids = resolveUsers($("add-members").value);
  } catch (e) {
    setGroupNotice(e.message);
    return;
  }
  if (!ids.length) return;
  try {
    const answer = await api("POST", `/api/groups/${conv.groupId}/members`, { user_ids: ids });
    $("add-members").value = "";
    const already = (answer.already || []).length ? `already members: ${answer.already.join(", ")}` : "";
    setGroupNotice([notAddedText(answer), already].filter(Boolean).join("; "));
    // The JOINED event is not pushed to whoever made the change: it comes with the history.
    await Promise.all([loadHistory(conv, false), showMembers(conv)]);
  } catch (e) {
    setGroupNotice(`could not add: ${e.message}`);
  }
}

function setMemberPanelOpen(open) {
  $("member-panel").hidden = !open;
  $("members-button").setAttribute("aria-expanded", String(open));
}

async function showMembers(conv) {
  try {
    const answer = await api("GET", `/api/groups/${conv.groupId}/members?limit=200`);
    if (conv.key !== chat.active) return;
    $("member-list").replaceChildren(
      ...(answer.members || []).map((m) =>
        el("li", { "data-user-id": String(m.user_id) }, el("span", { class: "name", text: m.name }), el("span", { class: "role", text: m.role })),
      ),
    );
    if (answer.next) $("member-list").append(el("li", { class: "more", text: "and more…" }));
  } catch (e) {
    setGroupNotice(`could not list the members: ${e.message}`);
  }
}

async function leaveGroup() {
  const conv = conversation(chat.active);
  if (conv.kind !== "grp") return;
  try {
    await api("POST", `/api/groups/${conv.groupId}/leave`);
    chat.conversations.delete(conv.key);
    openConversation("group");
  } catch (e) {
    setGroupNotice(e.code === "owner_stays" ? "the owner cannot leave the group" : `could not leave: ${e.message}`);
  }
}

// ---------------------------------------------------------------------------------------
// Wiring

function wire() {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    onLoginForm(false);
  });
  $("register-button").addEventListener("click", () => onLoginForm(true));
  $("logout").addEventListener("click", logout);
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    onComposerSubmit();
  });
  $("join-form").addEventListener("submit", (event) => {
    event.preventDefault();
    joinChannel($("join-name").value.trim());
  });
  $("leave-channel").addEventListener("click", () => {
    const conv = conversation(chat.active);
    if (conv.kind === "channel") leaveChannel(conv.name);
  });
  $("message-input").addEventListener("input", onComposerInput);
  $("messages").addEventListener("scroll", onMessagesScroll, { passive: true });
  $("group-form").addEventListener("submit", (event) => {
    event.preventDefault();
    createGroup();
  });
  $("add-form").addEventListener("submit", (event) => {
    event.preventDefault();
    addMembers();
  });
  $("members-button").addEventListener("click", () => {
    const open = $("member-panel").hidden;
    setMemberPanelOpen(open);
    if (open) showMembers(conversation(chat.active));
  });
  $("leave-group").addEventListener("click", leaveGroup);
  $("toggle-sidebar").addEventListener("click", () => {
    setSidebarOpen(!$("chat-view").classList.contains("sidebar-open"));
  });
  // Back online: do not wait for the backoff.
  window.addEventListener("online", () => {
    if (session.timers.reconnect) {
      clearTimeout(session.timers.reconnect);
      reconnect(session.generation);
    }
  });
  setStatus("offline", "offline");
  resumeSaved();
}

wire();
