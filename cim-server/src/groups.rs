//! Group subscriptions: which connections here receive a stored group's messages.
//!
//! A route pushes a group message once per live server with the group's id; each server
//! hands it to the connections subscribed to that group ([`GroupSubs::members`]). A
//! connection is subscribed to its user's groups at login (read from the store, see
//! `session::replay::group_start`) and follows the group's own membership events: a
//! CREATED or JOINED event subscribes the users it names who are connected here, LEFT and REMOVED unsubscribe them
//! after the event reached them, DISBANDED drops the group. The server knows no membership
//! rules: only which of its connections a group's messages go to.
//!
//! One connection per user per server, so subscriptions are kept by user id and dropped
//! when the user's connection leaves the table.
//!
//! A subscribed connection may also watch a group's read marks (`WatchReads`, at most
//! [`MAX_READ_WATCHES`] groups): the route relays every group read mark to every live server,
//! and each hands it to the watchers here only ([`GroupSubs::read_watchers`]). A watch ends
//! with the subscription (left, removed, disbanded, disconnected).
//!
//! Events of one group may reach a server out of order with its messages (two routes push
//! concurrently). So every pushed group message carries the membership version it was
//! appended under; a server that has not seen that version checks its subscribers against
//! the store's members first ([`GroupSubs::stale`], then `GroupSync::group_check`): a member
//! removed at version v gets nothing appended under v + 1 or later, whichever arrives first.

use crate::pb::{GroupEventType, Message, MessageKind};
use std::{
    collections::{HashMap, HashSet},
    sync::{PoisonError, RwLock},
};

#[derive(Default)]
struct Subs {
    by_group: HashMap<u64, HashSet<u64>>,
    by_user: HashMap<u64, HashSet<u64>>,
    /// Per group, the newest membership version this server has checked its subscribers
    /// against (see [`GroupSubs::stale`]).
    versions: HashMap<u64, u64>,
    /// Per group, the subscribers that watch its read marks (a subset of `by_group`'s).
    read_watchers: HashMap<u64, HashSet<u64>>,
}

/// Groups one connection may watch the read marks of at once (a client watches the
/// conversations it shows, not all of its groups).
pub(crate) const MAX_READ_WATCHES: usize = 16;

/// Why a `WatchReads` was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum WatchRefused {
    /// The user is no member of the group (as far as this server knows).
    NotMember,
    /// The connection watches [`MAX_READ_WATCHES`] groups already.
    TooMany,
}

/// The subscriptions of this server's connections (see the module docs).
#[derive(Default)]
pub(crate) struct GroupSubs {
    inner: RwLock<Subs>,
}

impl GroupSubs {
    /// Subscribes `user` to `groups` (on top of what they have).
    pub(crate) fn subscribe(&self, user: u64, groups: &[u64]) {
        let mut subs = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        for &g in groups {
            subs.by_group.entry(g).or_default().insert(user);
            subs.by_user.entry(user).or_default().insert(g);
        }
    }

    fn unsubscribe(subs: &mut Subs, user: u64, group: u64) {
        Self::unwatch(subs, user, group);
        if let Some(users) = subs.by_group.get_mut(&group) {
            users.remove(&user);
            if users.is_empty() {
                subs.by_group.remove(&group);
                subs.versions.remove(&group);
            }
        }
        if let Some(groups) = subs.by_user.get_mut(&user) {
            groups.remove(&group);
            if groups.is_empty() {
                subs.by_user.remove(&user);
            }
        }
    }

    /// Drops every subscription of `user` (their connection left).
    pub(crate) fn forget_user(&self, user: u64) {
        let mut subs = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(groups) = subs.by_user.remove(&user) {
            for g in groups {
                Self::unwatch(&mut subs, user, g);
                if let Some(users) = subs.by_group.get_mut(&g) {
                    users.remove(&user);
                    if users.is_empty() {
                        subs.by_group.remove(&g);
                        subs.versions.remove(&g);
                    }
                }
            }
        }
    }

    /// Whether a message appended under membership `version` needs the subscribers checked
    /// first: the server has not seen that version (a member may have been removed, and the
    /// REMOVED event may still be on its way from another route). Version 0: unknown, no.
    pub(crate) fn stale(&self, group: u64, version: u64) -> bool {
        let subs = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        version > subs.versions.get(&group).copied().unwrap_or(0)
            && subs.by_group.contains_key(&group)
    }

    /// Records that the subscribers of `group` were checked at membership `version`: those
    /// in `gone` are no members and are unsubscribed.
    pub(crate) fn checked(&self, group: u64, version: u64, gone: &[u64]) {
        let mut subs = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        for &u in gone {
            Self::unsubscribe(&mut subs, u, group);
        }
        let known = subs.versions.entry(group).or_insert(0);
        *known = (*known).max(version);
        if !subs.by_group.contains_key(&group) {
            subs.versions.remove(&group);
        }
    }

    /// The users subscribed to `group`, but `except`.
    pub(crate) fn members(&self, group: u64, except: u64) -> Vec<u64> {
        let subs = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        subs.by_group
            .get(&group)
            .map(|users| users.iter().copied().filter(|&u| u != except).collect())
            .unwrap_or_default()
    }

    /// Starts (`on`) or ends the watch of `user` on `group`'s read marks. Only a subscriber
    /// (a member connected here) may watch; ending a watch that is none is no error.
    pub(crate) fn watch_reads(&self, user: u64, group: u64, on: bool) -> Result<(), WatchRefused> {
        let mut subs = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if !on {
            Self::unwatch(&mut subs, user, group);
            return Ok(());
        }
        let Some(groups) = subs.by_user.get(&user) else {
            return Err(WatchRefused::NotMember);
        };
        if !groups.contains(&group) {
            return Err(WatchRefused::NotMember);
        }
        let watching = |g: &u64| subs.read_watchers.get(g).is_some_and(|w| w.contains(&user));
        if watching(&group) {
            return Ok(());
        }
        if groups.iter().filter(|g| watching(g)).count() >= MAX_READ_WATCHES {
            return Err(WatchRefused::TooMany);
        }
        subs.read_watchers.entry(group).or_default().insert(user);
        Ok(())
    }

    fn unwatch(subs: &mut Subs, user: u64, group: u64) {
        if let Some(users) = subs.read_watchers.get_mut(&group) {
            users.remove(&user);
            if users.is_empty() {
                subs.read_watchers.remove(&group);
            }
        }
    }

    /// The users here watching `group`'s read marks, but `except` (who set the mark).
    pub(crate) fn read_watchers(&self, group: u64, except: u64) -> Vec<u64> {
        let subs = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        subs.read_watchers
            .get(&group)
            .map(|users| users.iter().copied().filter(|&u| u != except).collect())
            .unwrap_or_default()
    }

    /// What a group event changes before it is delivered: a CREATED event (naming the
    /// owner) or a JOINED one subscribes the users it names for whom `connected` is true (so
    /// the event reaches them too).
    pub(crate) fn before_event(&self, message: &Message, connected: impl Fn(u64) -> bool) {
        if let Some((GroupEventType::Joined | GroupEventType::Created, users)) = event_of(message) {
            let joined: Vec<u64> = users.iter().copied().filter(|&u| connected(u)).collect();
            for u in joined {
                self.subscribe(u, &[message.group_id]);
            }
        }
    }

    /// What a group event changes after it was delivered: LEFT and REMOVED unsubscribe the
    /// users it names, DISBANDED everyone.
    pub(crate) fn after_event(&self, message: &Message) {
        let Some((kind, users)) = event_of(message) else {
            return;
        };
        let mut subs = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        match kind {
            GroupEventType::Left | GroupEventType::Removed => {
                for &u in users {
                    Self::unsubscribe(&mut subs, u, message.group_id);
                }
            }
            GroupEventType::Disbanded => {
                let members: Vec<u64> = subs
                    .by_group
                    .get(&message.group_id)
                    .map(|u| u.iter().copied().collect())
                    .unwrap_or_default();
                for u in members {
                    Self::unsubscribe(&mut subs, u, message.group_id);
                }
            }
            _ => {}
        }
    }
}

/// The type and users of a GROUP_EVENT message.
fn event_of(message: &Message) -> Option<(GroupEventType, &[u64])> {
    if MessageKind::try_from(message.kind).ok() != Some(MessageKind::GroupEvent) {
        return None;
    }
    let event = message.group_event.as_ref()?;
    let kind = GroupEventType::try_from(event.r#type).ok()?;
    Some((kind, &event.user_ids))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::GroupEvent;

    fn event(kind: GroupEventType, group: u64, users: &[u64]) -> Message {
        Message {
            kind: MessageKind::GroupEvent as i32,
            group_id: group,
            group_event: Some(GroupEvent {
                r#type: kind as i32,
                user_ids: users.to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn events_follow_membership() {
        let subs = GroupSubs::default();
        subs.subscribe(1, &[10, 11]);
        assert_eq!(subs.members(10, 0), [1]);
        assert!(subs.members(10, 1).is_empty());
        // Only connected users are subscribed by a JOINED event.
        subs.before_event(&event(GroupEventType::Joined, 10, &[2, 3]), |u| u == 2);
        let mut m = subs.members(10, 0);
        m.sort_unstable();
        assert_eq!(m, [1, 2]);
        subs.after_event(&event(GroupEventType::Removed, 10, &[1]));
        assert_eq!(subs.members(10, 0), [2]);
        assert_eq!(subs.members(11, 0), [1]);
        // A message of a newer membership version asks for a check, once.
        assert!(subs.stale(10, 5));
        subs.checked(10, 5, &[2]);
        assert!(!subs.stale(10, 5));
        assert!(subs.members(10, 0).is_empty());
        subs.subscribe(2, &[10]);
        assert!(subs.stale(10, 6) && !subs.stale(10, 0));
        subs.after_event(&event(GroupEventType::Disbanded, 10, &[]));
        assert!(subs.members(10, 0).is_empty());
        subs.forget_user(1);
        assert!(subs.members(11, 0).is_empty());
    }

    #[test]
    fn read_watches_are_for_members_bounded_and_end_with_the_membership() {
        let subs = GroupSubs::default();
        let groups: Vec<u64> = (1..=20).collect();
        subs.subscribe(1, &groups);
        subs.subscribe(2, &[1, 2]);
        assert_eq!(subs.watch_reads(3, 1, true), Err(WatchRefused::NotMember));
        assert_eq!(subs.watch_reads(2, 5, true), Err(WatchRefused::NotMember));
        for g in 1..=MAX_READ_WATCHES as u64 {
            assert_eq!(subs.watch_reads(1, g, true), Ok(()));
        }
        // Watching one again is no new watch; one more group is.
        assert_eq!(subs.watch_reads(1, 1, true), Ok(()));
        assert_eq!(subs.watch_reads(1, 20, true), Err(WatchRefused::TooMany));
        assert_eq!(subs.watch_reads(1, 16, false), Ok(()));
        assert_eq!(subs.watch_reads(1, 20, true), Ok(()));
        assert_eq!(subs.watch_reads(2, 1, true), Ok(()));
        let mut w = subs.read_watchers(1, 0);
        w.sort_unstable();
        assert_eq!(w, [1, 2]);
        // The one who set the mark does not get it back.
        assert_eq!(subs.read_watchers(1, 2), [1]);
        assert!(subs.read_watchers(16, 0).is_empty());
        // Removed from the group: no more marks of it; disconnected: none at all.
        subs.after_event(&event(GroupEventType::Removed, 1, &[1]));
        assert_eq!(subs.read_watchers(1, 0), [2]);
        assert_eq!(subs.read_watchers(2, 0), [1]);
        subs.forget_user(1);
        assert!(subs.read_watchers(2, 0).is_empty());
        assert!(subs.read_watchers(20, 0).is_empty());
        subs.after_event(&event(GroupEventType::Disbanded, 1, &[]));
        assert!(subs.read_watchers(1, 0).is_empty());
    }
}
