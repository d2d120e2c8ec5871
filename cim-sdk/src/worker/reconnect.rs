//! Reconnecting: backoff, resume or password login, and the states reported meanwhile (the
//! rules are in [`crate::client`]'s module doc).

use super::*;

impl Worker {
    /// Reconnects with backoff until connected, or until the end is final.
    pub(super) async fn reconnect(&mut self, mut reason: String) -> Result<Live, End> {
        let stop = self.shared.stop.clone();
        loop {
            self.attempt = self.attempt.saturating_add(1);
            if let Some(max) = self.config.reconnect.max_attempts {
                if self.attempt > max {
                    return Err(End::Closed(format!(
                        "gave up after {max} reconnect attempts: {reason}"
                    )));
                }
            }
            let delay = self.config.reconnect.backoff(self.attempt);
            self.set_state(ConnState::Reconnecting {
                attempt: self.attempt,
                retry_in: delay,
                reason: reason.clone(),
            })
            .await;
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return Err(End::Stop),
            }
            self.set_state(ConnState::Connecting).await;
            let attempt = tokio::select! {
                result = self.try_login() => result,
                () = stop.cancelled() => return Err(End::Stop),
            };
            match attempt {
                Ok(live) => return Ok(live),
                Err(Failed::Retry(why)) => {
                    tracing::debug!(attempt = self.attempt, %why, "reconnect attempt failed");
                    reason = why;
                }
                Err(Failed::Final(why)) => return Err(End::Closed(why)),
            }
        }
    }

    /// One reconnect attempt: resume the previous session (or log in with the password),
    /// then connect.
    pub(super) async fn try_login(&mut self) -> Result<Live, Failed> {
        let login = match self.token.take() {
            Some(old) => match self.resume(old).await? {
                Some(login) => login,
                None => self.password_login().await?,
            },
            None => self.password_login().await?,
        };
        // From here the new session holds the slot until connected or logged out.
        self.token = Some(login.session_token.clone());
        let live = open(&login, self.config.transport, self.config.tls, &self.route)
            .await
            .map_err(|e| Failed::Retry(e.to_string()))?;
        *lock(&self.shared.session_token) = login.session_token;
        Ok(live)
    }

    /// Logs in again with the previous session's token: the route replaces that session
    /// (ending its connection if its server still has it), so a reconnect is never refused
    /// by our own old session, and costs no password hash. `None` when that session ended
    /// (a password login follows).
    pub(super) async fn resume(&mut self, old: String) -> Result<Option<LoginInfo>, Failed> {
        match self.route.resume(&old).await {
            Ok(login) => Ok(Some(login)),
            // The route could not be asked: keep the token for the next attempt.
            Err(e @ RouteError::Transport(_)) => {
                self.token = Some(old);
                Err(Failed::Retry(e.to_string()))
            }
            // A route older than resume: free the old slot by logging it out, then log in.
            Err(e) if e.status() == Some(404) => match self.route.logout(&old).await {
                Err(e @ RouteError::Transport(_)) => {
                    self.token = Some(old);
                    Err(Failed::Retry(e.to_string()))
                }
                _ => Ok(None),
            },
            Err(e) if e.status().is_some_and(|s| s >= 500 || s == 429) => {
                self.token = Some(old);
                Err(Failed::Retry(e.to_string()))
            }
            // 401: that session ended (logged out, replaced, expired): log in afresh. 409:
            // another login took the slot at the same moment; the password login says so.
            Err(_) => Ok(None),
        }
    }

    /// Logs in with the name and password.
    pub(super) async fn password_login(&self) -> Result<LoginInfo, Failed> {
        self.route
            .login(&self.config.name, &self.config.password)
            .await
            .map_err(|e| match e.error_code() {
                // Unknown names and wrong passwords get the same answer (no account probing).
                Some(ErrorCode::BadCredentials) => Failed::Final(
                    "the route no longer accepts this name and password (the account was \
                     removed, e.g. by a standalone restart, or its password changed)"
                        .into(),
                ),
                _ => Failed::Retry(e.to_string()),
            })
    }

    /// Records `state` for [`crate::Client::info`] and reports it as an event.
    pub(super) async fn set_state(&mut self, state: ConnState) {
        {
            let mut info = lock(&self.shared.info);
            match &state {
                ConnState::Connected { server_id, addr } => {
                    info.server_id = Some(server_id.clone());
                    info.server_addr = Some(addr.clone());
                }
                _ => {
                    info.server_id = None;
                    info.server_addr = None;
                }
            }
            info.state = state.clone();
        }
        let stop = self.shared.stop.clone();
        tokio::select! {
            // An error means nobody listens: nothing to report to.
            _ = self.events.send(Event::State(state)) => {}
            () = stop.cancelled() => {}
        }
    }

    /// Hands the backlog's events to the application after the connection was lost. Its acks
    /// are dropped: the messages come again at the next connection, where the ring of
    /// recent ids filters them out and they are acked.
    pub(super) async fn emit_backlog(&mut self, backlog: &mut Backlog) {
        let stop = self.shared.stop.clone();
        while let Some(item) = backlog.pop_front() {
            let Item::Event(event) = item else { continue };
            tokio::select! {
                sent = self.events.send(event) => if sent.is_err() { backlog.clear() },
                () = stop.cancelled() => return,
            }
        }
    }

    /// Ends the session: logout if asked, close the connection, report `Closed`.
    pub(super) async fn finish(mut self, end: End, conn: Option<Connection>, mut backlog: Backlog) {
        // Taken under the lock that `logout` checks, so a logout either is answered here or
        // sees `Finished` and returns at once.
        let logout = match std::mem::replace(&mut *lock(&self.shared.logout), LogoutSlot::Finished)
        {
            LogoutSlot::Requested(reply) => Some(reply),
            LogoutSlot::Open | LogoutSlot::Finished => None,
        };
        let connected = conn.is_some();
        let reason = match end {
            End::Closed(reason) => reason,
            End::Stop if logout.is_some() => "logged out".to_string(),
            End::Stop => "every client handle was dropped".to_string(),
            End::Reconnect(reason) => reason,
        };
        let mut logout_result = Ok(());
        if let Some(token) = self.token.take() {
            if logout.is_some() {
                // 401: the session ended already (kicked, expired), which is what was asked.
                logout_result = match self.route.logout(&token).await {
                    Err(e) if e.status() != Some(401) => Err(ClientError::Route(e)),
                    _ => Ok(()),
                };
            } else if !connected {
                // A reconnect attempt logged in but never connected: give its slot back now
                // rather than after the connect-token TTL. (An open connection frees its slot
                // itself when it closes.)
                if let Err(e) = self.route.logout(&token).await {
                    tracing::debug!(error = %e, "logout of an unused login failed");
                }
            }
        }
        if let Some(conn) = conn {
            close(conn).await;
        }
        self.set_state_quietly(ConnState::Closed {
            reason: reason.clone(),
        });
        tracing::debug!(user = %self.config.name, %reason, "client closed");
        if let Some(reply) = logout {
            let _ = reply.send(logout_result);
        }
        // Queued sends are answered `Closed` when their reply senders drop with the receiver.
        self.commands.close();
        backlog.push_back(Item::Event(Event::State(ConnState::Closed { reason })));
        let events = self.events;
        let deliver = async {
            for item in backlog {
                // Acks cannot be written any more: those messages come again at the next
                // login (a new client has no memory of them, so they arrive twice).
                let Item::Event(event) = item else { continue };
                if events.send(event).await.is_err() {
                    return;
                }
            }
        };
        // An application that never reads again must not keep this task alive.
        let _ = tokio::time::timeout(FINAL_EVENTS_TIMEOUT, deliver).await;
    }

    pub(super) fn set_state_quietly(&self, state: ConnState) {
        let mut info = lock(&self.shared.info);
        info.server_id = None;
        info.server_addr = None;
        info.state = state;
    }
}
