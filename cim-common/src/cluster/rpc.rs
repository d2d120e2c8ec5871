//! Internal calls over one long-lived connection per peer ("cim-rpc"): the same paths and
//! protobuf bodies as the HTTP calls, without an HTTP request and answer per call.
//!
//! A caller opens the connection with an HTTP/1.1 upgrade (`GET /internal/rpc`,
//! `Upgrade: cim-rpc`) on the peer's internal listener. So it needs no port, address or
//! registry entry of its own, and its authentication is checked once, on the upgrade, by the
//! listener's usual check. After the `101` answer both sides exchange frames:
//!
//! ```text
//! frame   = u32 payload length (big-endian) · payload        (payload ≤ MAX_FRAME bytes)
//! call    = u64 call id · u16 path length · path · body       (caller → peer)
//! answer  = u64 call id · u16 HTTP status · body              (peer → caller)
//! ```
//!
//! Any number of calls are in flight at once, answered in any order and matched by id. The
//! peer runs each call through the listener's own handlers (an axum `Router`), so an
//! endpoint exists once whichever way it is called, and its answer has the status and body
//! the HTTP call would have had. Frames that are ready together leave in one write: under
//! load one connection carries many calls per system call, where HTTP/1.1 spends a request
//! (parsed headers, a connection from a pool, a write and a read) on each.
//!
//! Failure: a connection that breaks fails its calls in flight at once ([`RpcError::Closed`])
//! and [`Channel::is_closed`] tells the caller to open a new one. A caller whose call went
//! past its deadline [retires](Channel::retire) the connection instead of closing it: no new
//! calls go there, and it closes once the calls in flight on it are done, so one slow call
//! fails alone. A frame that cannot be
//! decoded ends the connection (peers are authenticated cluster members, so it is a bug or a
//! version mismatch, not something to answer). The peer stops reading calls when its
//! listener shuts down, sends the answers of the calls it took, then closes. An upgraded
//! connection is no longer the HTTP server's (its graceful shutdown does not wait for it), so
//! [`endpoint`] serves it in a task of the owner's `TaskTracker`, which the owner's shutdown
//! waits for: a call the peer took is answered before the process exits.

use super::{with_auth, CONTENT_TYPE, MAX_BODY};
use crate::secret::Keyring;
use axum::{
    body::{Body, Bytes},
    extract::Request,
    http::{header, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, MethodRouter},
    Router,
};
use bytes::{Buf, BufMut, BytesMut};
use futures_util::{SinkExt, StreamExt};
use prost::Message;
use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    sync::{mpsc, oneshot, Semaphore},
};
use tokio_util::{
    codec::{FramedRead, FramedWrite, LengthDelimitedCodec},
    sync::CancellationToken,
    task::TaskTracker,
};
use tower::ServiceExt;
use tracing::{debug, warn};

/// The upgrade endpoint on an internal listener.
pub const PATH: &str = "/internal/rpc";
/// The `Upgrade` protocol token.
pub const PROTOCOL: &str = "cim-rpc";
/// Largest frame payload: a body of the largest internal size plus the call's header.
pub const MAX_FRAME: usize = MAX_BODY + 64 * 1024;
/// Calls one connection may have running on the serving side; past it the peer stops
/// reading calls until one finishes (TCP backpressure reaches the caller).
const MAX_RUNNING: usize = 1024;
/// Frames waiting for the writer of a connection.
const WRITE_QUEUE: usize = 1024;
/// Bytes of a call before its path: id and path length.
const CALL_HEADER: usize = 8 + 2;
/// Bytes of an answer before its body: id and status.
const ANSWER_HEADER: usize = 8 + 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpcError {
    /// The connection closed (or broke) before the answer came.
    #[error("the connection closed before the answer")]
    Closed,
    /// The call cannot be framed (a path longer than a frame header can say).
    #[error("cannot frame the call: {0}")]
    Unframable(&'static str),
}

/// An answer: the status and body the same call over HTTP would have had.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

/// The caller's side of one connection. Cheap to share (`Arc`); dropping the last handle
/// closes the connection.
pub struct Channel {
    calls: mpsc::Sender<Bytes>,
    waiting: Arc<Waiting>,
    next_id: AtomicU64,
    closed: CancellationToken,
}

/// Calls sent and not yet answered, and whether the connection is retired; `calls` holds
/// `None` once the connection has closed, so that a call can never wait on a connection that will
/// not answer it.
struct Waiting {
    calls: Mutex<Calls>,
    /// Written under `calls`' lock (so that `take` and `retire` agree on who closes), read
    /// without it on every call's reuse check.
    retired: AtomicBool,
    closed: CancellationToken,
}

/// The answer senders of the calls in flight, by call id.
type Calls = Option<HashMap<u64, oneshot::Sender<Answer>>>;

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().expect("rpc waiting lock")
    }

    /// Removes call `id` (answered, or its caller stopped waiting); the last call of a
    /// retired connection closes it.
    fn take(&self, id: u64) -> Option<oneshot::Sender<Answer>> {
        let mut calls = self.lock();
        let calls = calls.as_mut()?;
        let tx = calls.remove(&id);
        if self.retired.load(Ordering::Relaxed) && calls.is_empty() {
            self.closed.cancel();
        }
        tx
    }

    /// No new calls go here; closes once the calls in flight are done (at once if none is).
    fn retire(&self) {
        let calls = self.lock();
        self.retired.store(true, Ordering::Relaxed);
        if calls.as_ref().is_none_or(HashMap::is_empty) {
            self.closed.cancel();
        }
    }

    /// Fails every call still waiting (their senders drop).
    fn close(&self) {
        self.lock().take();
    }
}

/// Forgets a call that stopped waiting (its caller's deadline passed or it was dropped).
struct Forget<'a> {
    waiting: &'a Waiting,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.waiting.take(self.id);
    }
}

/// What [`Channel::open`] found at the peer.
pub enum Opened {
    Channel(Channel),
    /// The peer answered the upgrade with this status and body instead of switching (a
    /// version that does not serve cim-rpc, or a refusal such as a wrong secret).
    Refused {
        status: StatusCode,
        body: Bytes,
    },
}

impl Channel {
    /// Opens a connection to the internal listener at `addr` (`host:port`) through `http`,
    /// authenticated with `keys`.
    pub async fn open(
        http: &reqwest::Client,
        addr: &str,
        keys: &Keyring,
    ) -> Result<Opened, reqwest::Error> {
        let response = with_auth(http.get(format!("http://{addr}{PATH}")), keys)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, PROTOCOL)
            .send()
            .await?;
        let status = response.status();
        if status != StatusCode::SWITCHING_PROTOCOLS {
            let body = response.bytes().await.unwrap_or_default();
            return Ok(Opened::Refused { status, body });
        }
        Ok(Opened::Channel(Self::start(response.upgrade().await?)))
    }

    /// Starts the caller's side on an established connection.
    pub fn start<IO>(io: IO) -> Self
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(io);
        let (calls, queue) = mpsc::channel(WRITE_QUEUE);
        let closed = CancellationToken::new();
        let waiting = Arc::new(Waiting {
            calls: Mutex::new(Some(HashMap::new())),
            retired: AtomicBool::new(false),
            closed: closed.clone(),
        });
        tokio::spawn(write_frames(write, queue, closed.clone()));
        tokio::spawn(read_answers(read, waiting.clone(), closed.clone()));
        Self {
            calls,
            waiting,
            next_id: AtomicU64::new(1),
            closed,
        }
    }

    /// Whether the connection has closed (a new call would fail at once).
    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Whether new calls should go here: open and not [retired](Self::retire).
    pub fn is_usable(&self) -> bool {
        !self.is_closed() && !self.waiting.retired.load(Ordering::Relaxed)
    }

    /// Takes the connection out of use without failing the calls in flight: it closes once
    /// they are answered or their callers stop waiting. For a connection that may be wedged
    /// (a call went past its deadline): the next call opens a new one, while the calls
    /// already sent here keep their own deadlines (a slow call fails alone).
    pub fn retire(&self) {
        self.waiting.retire();
    }

    /// Closes the connection: calls in flight fail with [`RpcError::Closed`].
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Sends one call and waits for its answer. It has no deadline of its own: the caller
    /// puts one around it.
    pub async fn call(&self, path: &str, body: &impl Message) -> Result<Answer, RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode_call(id, path, body)?;
        let (tx, rx) = oneshot::channel();
        match self.waiting.lock().as_mut() {
            Some(waiting) => waiting.insert(id, tx),
            None => return Err(RpcError::Closed),
        };
        let _forget = Forget {
            waiting: &self.waiting,
            id,
        };
        tokio::select! {
            sent = self.calls.send(frame) => sent.map_err(|_| RpcError::Closed)?,
            () = self.closed.cancelled() => return Err(RpcError::Closed),
        }
        rx.await.map_err(|_| RpcError::Closed)
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.closed.cancel();
    }
}

fn encode_call(id: u64, path: &str, body: &impl Message) -> Result<Bytes, RpcError> {
    let path_len = u16::try_from(path.len()).map_err(|_| RpcError::Unframable("path too long"))?;
    let mut frame = BytesMut::with_capacity(CALL_HEADER + path.len() + body.encoded_len());
    frame.put_u64(id);
    frame.put_u16(path_len);
    frame.put_slice(path.as_bytes());
    body.encode(&mut frame)
        .expect("BytesMut grows to fit the message");
    Ok(frame.freeze())
}

/// A call as the serving side reads it.
struct Call {
    id: u64,
    path: Bytes,
    body: Bytes,
}

fn decode_call(mut frame: Bytes) -> Result<Call, &'static str> {
    if frame.len() < CALL_HEADER {
        return Err("call shorter than its header");
    }
    let id = frame.get_u64();
    let path_len = usize::from(frame.get_u16());
    if frame.len() < path_len {
        return Err("call shorter than its path");
    }
    let path = frame.split_to(path_len);
    Ok(Call {
        id,
        path,
        body: frame,
    })
}

fn encode_answer(id: u64, status: StatusCode, body: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(ANSWER_HEADER + body.len());
    frame.put_u64(id);
    frame.put_u16(status.as_u16());
    frame.put_slice(body);
    frame.freeze()
}

fn decode_answer(mut frame: Bytes) -> Result<(u64, Answer), &'static str> {
    if frame.len() < ANSWER_HEADER {
        return Err("answer shorter than its header");
    }
    let id = frame.get_u64();
    let status = StatusCode::from_u16(frame.get_u16()).map_err(|_| "answer status invalid")?;
    Ok((
        id,
        Answer {
            status,
            body: frame,
        },
    ))
}

/// Writes the queued frames, all those ready together in one write, until the queue's
/// senders are gone or `closed` fires; then shuts the stream down and fires `closed`.
async fn write_frames<W>(write: W, mut queue: mpsc::Receiver<Bytes>, closed: CancellationToken)
where
    W: AsyncWrite + Send,
{
    let mut out = FramedWrite::new(Box::pin(write), codec());
    let written: io::Result<()> = async {
        loop {
            let first = tokio::select! {
                () = closed.cancelled() => break,
                frame = queue.recv() => frame,
            };
            let Some(first) = first else { break };
            out.feed(first).await?;
            while let Ok(frame) = queue.try_recv() {
                out.feed(frame).await?;
            }
            SinkExt::<Bytes>::flush(&mut out).await?;
        }
        SinkExt::<Bytes>::close(&mut out).await
    }
    .await;
    if let Err(e) = written {
        debug!(error = %e, "rpc connection: writing failed");
    }
    closed.cancel();
}

/// The caller's reader: hands each answer to its call; on end of stream, a broken stream or
/// an undecodable answer, closes the connection and fails the calls still waiting.
async fn read_answers<R>(read: R, waiting: Arc<Waiting>, closed: CancellationToken)
where
    R: AsyncRead + Send,
{
    let mut frames = FramedRead::new(Box::pin(read), codec());
    while let Some((id, answer)) = next_frame(&mut frames, &closed, decode_answer).await {
        // None: the call stopped waiting (deadline); its answer is dropped.
        if let Some(tx) = waiting.take(id) {
            let _ = tx.send(answer);
        }
    }
    closed.cancel();
    waiting.close();
}

/// The next frame of `frames`, decoded. `None` ends the connection: the end of the stream,
/// `stop` firing, or a frame that cannot be read (oversize lengths included: nothing past the
/// limit is buffered) or decoded, each logged.
async fn next_frame<R, T>(
    frames: &mut FramedRead<Pin<Box<R>>, LengthDelimitedCodec>,
    stop: &CancellationToken,
    decode: fn(Bytes) -> Result<T, &'static str>,
) -> Option<T>
where
    R: AsyncRead,
{
    let frame = tokio::select! {
        () = stop.cancelled() => return None,
        frame = frames.next() => frame?,
    };
    match frame {
        Ok(frame) => decode(frame.freeze())
            .inspect_err(|e| warn!(error = e, "rpc connection: undecodable frame, closing"))
            .ok(),
        Err(e) => {
            debug!(error = %e, "rpc connection: reading failed");
            None
        }
    }
}

/// The upgrade endpoint for an internal listener: answers `101` and serves the connection's
/// calls through `calls` until the caller closes it or `cancel` fires. Mount it behind the
/// listener's authentication check ([`super::authorize`]), at [`PATH`]. Each connection is served in a task of
/// `tracker` (it ends once the calls it took are answered): wait for the tracker on shutdown.
pub fn endpoint<S>(
    calls: Router,
    cancel: CancellationToken,
    tracker: TaskTracker,
) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    get(move |req: Request| {
        let (calls, cancel, tracker) = (calls.clone(), cancel.clone(), tracker.clone());
        async move { accept(req, calls, cancel, &tracker) }
    })
}

fn accept(
    req: Request,
    calls: Router,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Response {
    if cancel.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let wants_rpc = req
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(PROTOCOL.as_bytes()));
    if !wants_rpc {
        return (
            StatusCode::UPGRADE_REQUIRED,
            [(header::UPGRADE, PROTOCOL)],
            "this endpoint only upgrades to cim-rpc",
        )
            .into_response();
    }
    let upgrade = hyper::upgrade::on(req);
    tracker.spawn(async move {
        match upgrade.await {
            Ok(upgraded) => serve(hyper_util::rt::TokioIo::new(upgraded), calls, cancel).await,
            Err(e) => debug!(error = %e, "rpc upgrade did not complete"),
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [(header::CONNECTION, "upgrade"), (header::UPGRADE, PROTOCOL)],
    )
        .into_response()
}

/// The serving side of one connection: each call runs through `calls` in a task of its own
/// (at most [`MAX_RUNNING`] at once); answers leave as they finish. When `cancel` fires it
/// stops reading calls, lets the running ones answer, and closes.
pub async fn serve<IO>(io: IO, calls: Router, cancel: CancellationToken)
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (read, write) = tokio::io::split(io);
    let mut frames = FramedRead::new(Box::pin(read), codec());
    let (answers, queue) = mpsc::channel(WRITE_QUEUE);
    let writer = tokio::spawn(write_frames(write, queue, CancellationToken::new()));
    let running = Arc::new(Semaphore::new(MAX_RUNNING));
    loop {
        let permit = tokio::select! {
            () = cancel.cancelled() => break,
            permit = running.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let Some(call) = next_frame(&mut frames, &cancel, decode_call).await else {
            break;
        };
        let (calls, answers) = (calls.clone(), answers.clone());
        tokio::spawn(async move {
            let (status, body) = dispatch(calls, &call.path, call.body).await;
            // An error means the connection is gone; its caller has failed the call.
            let _ = answers.send(encode_answer(call.id, status, &body)).await;
            drop(permit);
        });
    }
    // The writer ends once every running call has sent its answer.
    drop(answers);
    let _ = writer.await;
}

/// Runs one call through the handlers as the POST it stands for.
async fn dispatch(calls: Router, path: &[u8], body: Bytes) -> (StatusCode, Bytes) {
    let request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(header::CONTENT_TYPE, CONTENT_TYPE)
        .body(Body::from(body));
    let Ok(request) = request else {
        return (
            StatusCode::BAD_REQUEST,
            Bytes::from_static(b"call path is not a valid path"),
        );
    };
    let response = match calls.oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    let status = response.status();
    match axum::body::to_bytes(response.into_body(), MAX_BODY).await {
        Ok(body) => (status, body),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Bytes::from(format!("reading the answer failed: {e}")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::cluster::{PresenceRequest, PresenceResponse};
    use axum::{extract::Path, routing::post};
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// `/echo/{delay_ms}` answers a `PresenceRequest` with `online` = its first user id,
    /// after that many (paused-clock) milliseconds; `/fail` answers 503.
    fn handlers() -> Router {
        Router::new()
            .route(
                "/echo/{delay}",
                post(|Path(delay): Path<u64>, body: Bytes| async move {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    let req = PresenceRequest::decode(body).unwrap();
                    PresenceResponse {
                        online: req.user_ids[0],
                        ..Default::default()
                    }
                    .encode_to_vec()
                }),
            )
            .route(
                "/fail",
                post(|| async { (StatusCode::SERVICE_UNAVAILABLE, "busy") }),
            )
    }

    fn asking(id: u64) -> PresenceRequest {
        PresenceRequest { user_ids: vec![id] }
    }

    fn answered(answer: Answer) -> u64 {
        assert_eq!(answer.status, StatusCode::OK);
        PresenceResponse::decode(answer.body).unwrap().online
    }

    /// A channel to a serving side over an in-memory stream.
    fn pair(cancel: &CancellationToken) -> (Channel, tokio::task::JoinHandle<()>) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(serve(far, handlers(), cancel.clone()));
        (Channel::start(near), served)
    }

    #[tokio::test(start_paused = true)]
    async fn answers_find_their_calls_whatever_order_they_finish_in() {
        let cancel = CancellationToken::new();
        let (channel, _served) = pair(&cancel);
        // The first call finishes last, the last first.
        let calls = (1..=50u64).map(|i| {
            let channel = &channel;
            async move {
                let answer = channel
                    .call(&format!("/echo/{}", 100 - i), &asking(i))
                    .await
                    .unwrap();
                (i, answered(answer))
            }
        });
        for (asked, got) in futures_util::future::join_all(calls).await {
            assert_eq!(asked, got);
        }
        let failed = channel.call("/fail", &asking(1)).await.unwrap();
        assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(&failed.body[..], b"busy");
        let unknown = channel.call("/nowhere", &asking(1)).await.unwrap();
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_connection_fails_the_calls_in_flight_at_once() {
        let cancel = CancellationToken::new();
        let (near, far) = tokio::io::duplex(64 * 1024);
        let channel = Channel::start(near);
        let seven = asking(7);
        let call = channel.call("/echo/0", &seven);
        let broken = async {
            // The peer goes away without answering.
            tokio::task::yield_now().await;
            drop(far);
        };
        let (result, ()) = tokio::join!(call, broken);
        assert_eq!(result.unwrap_err(), RpcError::Closed);
        tokio::time::timeout(Duration::from_secs(1), channel.closed.cancelled())
            .await
            .expect("the channel notices the end of the stream");
        assert!(channel.is_closed());
        assert_eq!(
            channel.call("/echo/0", &asking(8)).await.unwrap_err(),
            RpcError::Closed
        );
        drop(cancel);
    }

    #[tokio::test(start_paused = true)]
    async fn on_cancel_the_running_call_answers_then_the_connection_closes() {
        let cancel = CancellationToken::new();
        let (channel, served) = pair(&cancel);
        let three = asking(3);
        let slow = channel.call("/echo/500", &three);
        let stop = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            cancel.cancel();
        };
        let (answer, ()) = tokio::join!(slow, stop);
        assert_eq!(answered(answer.unwrap()), 3);
        served.await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), channel.closed.cancelled())
            .await
            .expect("the serving side closed the connection");
        assert_eq!(
            channel.call("/echo/0", &asking(4)).await.unwrap_err(),
            RpcError::Closed
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_stops_waiting_is_forgotten_and_the_connection_goes_on() {
        let cancel = CancellationToken::new();
        let (channel, _served) = pair(&cancel);
        let gave_up = tokio::time::timeout(
            Duration::from_millis(10),
            channel.call("/echo/1000", &asking(1)),
        )
        .await;
        assert!(gave_up.is_err(), "the deadline passed first");
        assert!(channel.waiting.lock().as_ref().unwrap().is_empty());
        // Its late answer is dropped; later calls are answered as usual.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            answered(channel.call("/echo/0", &asking(2)).await.unwrap()),
            2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retired_connection_answers_its_calls_in_flight_then_closes() {
        let cancel = CancellationToken::new();
        let (channel, _served) = pair(&cancel);
        let channel = Arc::new(channel);
        let in_flight = tokio::spawn({
            let channel = channel.clone();
            async move { channel.call("/echo/1000", &asking(7)).await }
        });
        // The call is sent (it waits for its answer) before the connection is retired.
        while channel.waiting.lock().as_ref().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        channel.retire();
        assert!(
            !channel.is_usable(),
            "no new calls go to a retired connection"
        );
        assert!(!channel.is_closed(), "a call is still in flight");
        assert_eq!(answered(in_flight.await.unwrap().unwrap()), 7);
        assert!(channel.is_closed(), "its last call answered, it closes");

        // Retired with nothing in flight: closed at once.
        let (idle, _served) = pair(&cancel);
        idle.retire();
        assert!(idle.is_closed());
    }

    #[tokio::test]
    async fn bad_frames_end_the_connection_without_buffering_them() {
        for bad in [
            // A length over the maximum: refused before any of it is read.
            u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes().to_vec(),
            // A call shorter than its header.
            vec![0, 0, 0, 3, 1, 2, 3],
            // A path length past the end of the call.
            [&[0, 0, 0, 10][..], &1u64.to_be_bytes(), &[0xff, 0xff]].concat(),
        ] {
            let (mut near, far) = tokio::io::duplex(64 * 1024);
            let served = tokio::spawn(serve(far, handlers(), CancellationToken::new()));
            near.write_all(&bad).await.unwrap();
            tokio::time::timeout(Duration::from_secs(5), served)
                .await
                .expect("the serving side gives up on the connection")
                .unwrap();
            let mut rest = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut near, &mut rest)
                .await
                .unwrap();
            assert!(rest.is_empty(), "nothing is answered to {bad:?}");
        }
    }

    /// The endpoint over a real listener: an upgraded connection is served in a task of the
    /// owner's tracker, so the owner's shutdown waits for a call the peer took (the HTTP
    /// server's graceful shutdown no longer sees the connection once it is upgraded).
    #[tokio::test]
    async fn an_upgraded_connection_is_tracked_until_its_calls_are_answered() {
        let arrived = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let gated = Router::new().route(
            "/gate",
            post({
                let (arrived, release) = (arrived.clone(), release.clone());
                move || async move {
                    arrived.notify_one();
                    release.notified().await;
                    PresenceResponse {
                        online: 5,
                        ..Default::default()
                    }
                    .encode_to_vec()
                }
            }),
        );
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        let app: Router =
            Router::new().route(PATH, endpoint(gated, cancel.clone(), tracker.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = cancel.clone().cancelled_owned();
        let http = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
        });
        let Opened::Channel(channel) =
            Channel::open(&reqwest::Client::new(), &addr, &Keyring::single("s"))
                .await
                .unwrap()
        else {
            panic!("the endpoint refused the upgrade");
        };
        let call = tokio::spawn(async move { channel.call("/gate", &asking(5)).await });
        arrived.notified().await;

        // Shutdown: the HTTP server is done at once, the connection is not.
        cancel.cancel();
        tracker.close();
        http.await.unwrap().unwrap();
        assert_eq!(tracker.len(), 1, "the upgraded connection is still served");
        assert!(!call.is_finished());

        release.notify_one();
        assert_eq!(answered(call.await.unwrap().unwrap()), 5);
        tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .expect("the connection's task ends once its call is answered");
    }

    #[test]
    fn frames_round_trip() {
        let frame = encode_call(42, "/internal/push", &asking(9)).unwrap();
        let call = decode_call(frame).unwrap();
        assert_eq!(call.id, 42);
        assert_eq!(&call.path[..], b"/internal/push");
        assert_eq!(PresenceRequest::decode(call.body).unwrap(), asking(9));
        let (id, answer) = decode_answer(encode_answer(7, StatusCode::CONFLICT, b"x")).unwrap();
        assert_eq!(
            (id, answer.status, &answer.body[..]),
            (7, StatusCode::CONFLICT, &b"x"[..])
        );
        assert!(decode_answer(Bytes::from_static(&[0; 9])).is_err());
        assert!(decode_answer(Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1])).is_err());
        let long = "/".repeat(usize::from(u16::MAX) + 1);
        assert!(matches!(
            encode_call(1, &long, &asking(1)),
            Err(RpcError::Unframable(_))
        ));
    }
}
