//! Types generated from `proto/cim.proto`, the client wire contract, with serde
//! implementations following the proto3 JSON mapping (used by WebSocket text frames), and a
//! few constructors of frames.

#[allow(clippy::all, clippy::pedantic)]
mod generated {
    include!(concat!(env!("OUT_DIR"), "/cim.rs"));
    include!(concat!(env!("OUT_DIR"), "/cim.serde.rs"));
}
pub use generated::*;

use frame::Body;

impl Frame {
    /// Wraps a body into a frame.
    pub fn new(body: Body) -> Self {
        Frame { body: Some(body) }
    }

    /// An error frame.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Frame::new(Body::Error(Error {
            code: code as i32,
            message: message.into(),
        }))
    }

    /// A kick frame.
    pub fn kick(reason: KickReason, message: impl Into<String>) -> Self {
        Frame::new(Body::Kick(Kick {
            reason: reason as i32,
            message: message.into(),
        }))
    }

    /// Short name of the body, for logs and errors.
    pub fn kind_name(&self) -> &'static str {
        match &self.body {
            None => "unknown",
            Some(Body::Login(_)) => "login",
            Some(Body::LoginResult(_)) => "login_result",
            Some(Body::Ping(_)) => "ping",
            Some(Body::Pong(_)) => "pong",
            Some(Body::Send(_)) => "send",
            Some(Body::SendResult(_)) => "send_result",
            Some(Body::Push(_)) => "push",
            Some(Body::Kick(_)) => "kick",
            Some(Body::Error(_)) => "error",
            Some(Body::Ack(_)) => "ack",
            Some(Body::ReadMark(_)) => "read_mark",
            Some(Body::Typing(_)) => "typing",
            Some(Body::WatchReads(_)) => "watch_reads",
        }
    }
}

impl SendResult {
    /// A failed send result for `client_id`.
    pub fn failed(client_id: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        SendResult {
            client_id,
            status: SendStatus::Failed as i32,
            error: Some(Error {
                code: code as i32,
                message: message.into(),
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod props;
