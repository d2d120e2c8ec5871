//! Forwarding what clients send to a route: the server holds no routing rules, so every `Send`
//! becomes a [`ForwardItem`] carrying the authenticated sender, batched with others into one
//! `POST /internal/forward` to a live route (found through the registry), and each
//! `SendResult` of the answer goes back to the connection it came from.
//!
//! - [`ForwardQueue`] (in the server state) takes sends from sessions without blocking; when
//!   it is full the session answers OVERLOADED at once.
//! - [`Forwarder`] (one task) takes whatever is queued, up to `forward_batch_max`, as soon as
//!   one item is there, so batching adds no latency when idle and grows under load. At most
//!   `forward_concurrency` calls are in flight; routes are chosen round-robin and a batch a
//!   route refused is retried on the next one.

use crate::{
    conn::{ConnShared, Outbound},
    pb::{
        cluster::{ForwardItem, ForwardRequest, ForwardResponse},
        frame::Body,
        ErrorCode, Frame, Send, SendResult,
    },
};
use axum::http::StatusCode;
use cim_common::{
    cluster::{ClusterClient, ClusterError},
    registry::{MembersRx, ServiceInfo},
};
use std::sync::Arc;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, warn};

/// Path of the route's forward endpoint.
pub(crate) const FORWARD_PATH: &str = "/internal/forward";
/// Calls per batch at most (the first and two retries on other routes).
const MAX_ATTEMPTS: usize = 3;

/// One client send waiting to be forwarded, with the connection that gets its result.
pub(crate) struct Pending {
    pub(crate) conn: Arc<ConnShared>,
    pub(crate) send: Send,
}

/// The submitting side, shared by all sessions.
pub(crate) struct ForwardQueue {
    tx: mpsc::Sender<Pending>,
}

impl ForwardQueue {
    pub(crate) fn new(capacity: usize) -> (Self, mpsc::Receiver<Pending>) {
        let (tx, rx) = mpsc::channel(capacity);
        (Self { tx }, rx)
    }

    /// Queues a send of `conn`'s user. Gives the send back when the queue is full (or the
    /// forwarder stopped), for the caller to answer it.
    pub(crate) fn submit(&self, conn: &Arc<ConnShared>, send: Send) -> Result<(), Send> {
        self.tx
            .try_send(Pending {
                conn: conn.clone(),
                send,
            })
            .map_err(|e| e.into_inner().send)
    }
}

/// The address to call on a route: its internal address, or its HTTP address when it
/// serves internal calls there.
fn route_addr(route: &ServiceInfo) -> Option<&str> {
    [&route.internal_addr, &route.http_addr]
        .into_iter()
        .find(|a| !a.is_empty())
        .map(String::as_str)
}

/// Whether a failed call certainly did not reach the route's handler, so sending the batch
/// elsewhere cannot duplicate messages. A timeout or a connection lost mid-call is ambiguous:
/// the route may have routed the messages, and a retry would send them twice.
fn retryable(e: &ClusterError) -> bool {
    match e {
        ClusterError::Transport { source, .. } => source.is_connect(),
        ClusterError::Status { status, .. } => matches!(
            *status,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_GATEWAY
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT
        ),
        ClusterError::Decode { .. } => false,
    }
}

/// What the batches share.
struct Context {
    client: ClusterClient,
    routes: MembersRx,
    server_id: String,
}

/// The batching task's state.
pub(crate) struct Forwarder {
    rx: mpsc::Receiver<Pending>,
    ctx: Arc<Context>,
    batch_max: usize,
    concurrency: usize,
}

impl Forwarder {
    pub(crate) fn new(
        rx: mpsc::Receiver<Pending>,
        routes: MembersRx,
        client: ClusterClient,
        server_id: String,
        batch_max: usize,
        concurrency: usize,
    ) -> Self {
        Self {
            rx,
            ctx: Arc::new(Context {
                client,
                routes,
                server_id,
            }),
            batch_max,
            concurrency,
        }
    }

    /// Runs until `cancel`. Batch calls run as tasks on `tracker`.
    pub(crate) async fn run(mut self, cancel: CancellationToken, tracker: TaskTracker) {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let mut next_route = 0usize;
        loop {
            // A permit first, then the items: while every call is in flight, sends pile up
            // and leave together in the next batch.
            let permit = tokio::select! {
                () = cancel.cancelled() => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break, // never closed
                },
            };
            let mut batch = Vec::new();
            let n = tokio::select! {
                () = cancel.cancelled() => break,
                n = self.rx.recv_many(&mut batch, self.batch_max) => n,
            };
            if n == 0 {
                break; // every sender is gone: the server is being dropped
            }
            let start = next_route;
            next_route = next_route.wrapping_add(1);
            let ctx = self.ctx.clone();
            tracker.spawn(async move {
                deliver(&ctx, batch, start).await;
                drop(permit);
            });
        }
        debug!("forwarder stopped");
    }
}

/// Calls routes for one batch, then hands each result to its connection.
async fn deliver(ctx: &Context, batch: Vec<Pending>, start: usize) {
    let (conns, items): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|p| {
            // The sender is the connection's authenticated user, whatever the frame says.
            let item = ForwardItem {
                sender_id: p.conn.user_id,
                sender_name: p.conn.user_name.clone(),
                send: Some(p.send),
            };
            (p.conn, item)
        })
        .unzip();
    let request = ForwardRequest {
        server_id: ctx.server_id.clone(),
        items,
    };
    let client_id = |i: usize| {
        request.items[i]
            .send
            .as_ref()
            .map_or(0, |send| send.client_id)
    };
    let results = match call_routes(ctx, &request, start).await {
        Ok(response) => {
            if response.results.len() != conns.len() {
                warn!(
                    sent = conns.len(),
                    answered = response.results.len(),
                    "route answered a different number of results than items"
                );
            }
            let mut answered = response.results.into_iter();
            (0..conns.len())
                .map(|i| {
                    answered.next().unwrap_or_else(|| {
                        SendResult::failed(
                            client_id(i),
                            ErrorCode::Internal,
                            "the route returned no result for this send",
                        )
                    })
                })
                .collect::<Vec<_>>()
        }
        Err(message) => (0..conns.len())
            .map(|i| SendResult::failed(client_id(i), ErrorCode::Unavailable, message.clone()))
            .collect(),
    };
    for (conn, result) in conns.iter().zip(results) {
        // A full queue closes that connection as a slow consumer; nothing else to do here.
        conn.enqueue(Outbound::new(Frame::new(Body::SendResult(result))));
    }
}

/// Up to [`MAX_ATTEMPTS`] calls, each to the next live route. `Err` is the message for the
/// clients.
async fn call_routes(
    ctx: &Context,
    request: &ForwardRequest,
    start: usize,
) -> Result<ForwardResponse, String> {
    for attempt in 0..MAX_ATTEMPTS {
        // Re-read the live list each time: a route that just died may have left it.
        let addr = {
            let routes = ctx.routes.borrow();
            let addrs: Vec<&str> = routes.iter().filter_map(route_addr).collect();
            if addrs.is_empty() {
                warn!(
                    "no route is registered: failing {} sends",
                    request.items.len()
                );
                break;
            }
            addrs[start.wrapping_add(attempt) % addrs.len()].to_string()
        };
        match ctx
            .client
            .call::<_, ForwardResponse>(&addr, FORWARD_PATH, request)
            .await
        {
            Ok(response) => return Ok(response),
            Err(e) if retryable(&e) => {
                warn!(route = %addr, attempt = attempt + 1, error = %e, "forward failed, trying the next route");
            }
            Err(e) => {
                warn!(route = %addr, error = %e, "forward failed after reaching the route");
                return Err(format!(
                    "route did not answer: the message may or may not have been sent ({e})"
                ));
            }
        }
    }
    Err("no route reachable".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_address_prefers_internal() {
        let mut info = ServiceInfo {
            id: "r".into(),
            http_addr: "h:1".into(),
            ..Default::default()
        };
        assert_eq!(route_addr(&info), Some("h:1"));
        info.internal_addr = "i:2".into();
        assert_eq!(route_addr(&info), Some("i:2"));
        assert_eq!(route_addr(&ServiceInfo::default()), None);
    }

    #[test]
    fn queue_refuses_when_full() {
        let (queue, _rx) = ForwardQueue::new(1);
        let conn = Arc::new(ConnShared::new(1, "a".into(), "s".into(), 8));
        let send = |id| Send {
            client_id: id,
            ..Default::default()
        };
        assert!(queue.submit(&conn, send(1)).is_ok());
        let refused = queue.submit(&conn, send(2)).unwrap_err();
        assert_eq!(refused.client_id, 2);
    }
}
