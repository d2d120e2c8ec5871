//! The backends of cim-common, held to one behaviour.
//!
//! Each behavioural test of the state store is written once, as an async fn over a
//! [`StoreUnderTest`] (a `dyn StateStore` plus a way to look inside), and run three times by
//! [`for_each_store!`]: against `RedisStore` on a real `redis-server` started by the testkit
//! (`<test>::redis`), against `RedisStore` on a real 3-master Redis Cluster
//! (`<test>::cluster`: every command slot-safe, the sharded keys), and against the in-memory
//! `MemoryStore` of standalone mode (`<test>::memory`). The registry tests do the same with [`RegistryUnderTest`] for
//! `EtcdRegistry` on a real `etcd` and `MemoryRegistry`. What only a real process can show
//! (an outage, a restart, lease expiry, keys of other prefixes) is tested on it alone
//! (`redis_only`, `etcd_only`; the merge of a cluster's sharded streams: `cluster_only`). Each test has its own processes and its own key prefix.
//!
//! One module per domain of the store (`accounts`, `login`, `routes`, `inbox`, `presence`,
//! `leases`, `channels`, `chat`), as the stores themselves are cut; the lists below name
//! every shared test once, and put it at the crate root, so its path is `<test>::redis`.

mod accounts;
mod channels;
mod chat;
mod cluster_only;
mod connecting;
mod etcd_only;
mod harness;
mod inbox;
mod leases;
mod login;
mod presence;
mod redis_only;
mod registries;
mod routes;

// Helpers of one domain serve others too (a message, a connected user, a server entry).
use self::{harness::*, inbox::*, presence::*, registries::*};

use cim_common::{
    events::{reason, EventId, PresenceEvent, PresenceKind, StoredEvent},
    keys::{self, Keys},
    pb::{Message, MessageKind},
    registry::{self, EtcdRegistry, MemoryRegistry, Registry, ServiceInfo, ServiceKind},
    // The roles, for calls on a concrete store (`RedisStore`, `MemoryStore`).
    store::prelude::*,
    store::{
        AckedReceipt, AttachOutcome, ChannelInfo, ClaimOutcome, HistoryLimits, InboxLimits,
        JoinOutcome, MemoryStore, RedisStore, RouteEntry, StateStore, StoreError, MAX_CHANNEL_PAGE,
        MAX_CHANNEL_STATS, MAX_EVENTS_READ,
    },
    time::now_ms,
};
use cim_tests::{
    unique_prefix, wait_until, Etcd, Infra, Redis, RedisKind, RedisNodes, RedisOptions,
};
use redis::AsyncCommands as _;
use std::{collections::BTreeMap, ops::Deref, sync::Arc, time::Duration};

pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pending-slot TTL of the normal tests: long enough never to expire by accident.
pub(crate) const LONG_TTL: Duration = Duration::from_secs(60);
pub(crate) const DEADLINE: Duration = Duration::from_secs(10);

pub(crate) fn nobody_live(_: &str) -> bool {
    false
}

pub(crate) fn everyone_live(_: &str) -> bool {
    true
}

pub(crate) fn route(user_id: u64, server: &str, session: &str) -> RouteEntry {
    RouteEntry {
        user_id,
        server_id: server.to_string(),
        session: session.to_string(),
    }
}

/// Runs each named `async fn(&StoreUnderTest) -> anyhow::Result<()>` of a domain module as
/// three tests, `<name>::redis` (one Redis), `<name>::cluster` (a 3-master Redis Cluster)
/// and `<name>::memory` (at the crate root, so a test's path does not name its module). Multi-threaded, so concurrent calls really overlap.
macro_rules! for_each_store {
    ($($module:ident::$name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() -> anyhow::Result<()> {
                super::$module::$name(&super::StoreUnderTest::redis().await?).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cluster() -> anyhow::Result<()> {
                super::$module::$name(&super::StoreUnderTest::cluster().await?).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() -> anyhow::Result<()> {
                super::$module::$name(&super::StoreUnderTest::memory()).await
            }
        }
    )*};
}

for_each_store!(
    accounts::create_user_and_look_up,
    accounts::concurrent_create_of_one_name_has_one_winner,
    login::claim_pending_is_taken_over_or_expires,
    login::claim_of_attached_slot_depends_on_server_liveness,
    login::concurrent_claims_have_one_winner,
    login::take_over_replaces_only_the_named_session,
    login::generations_count_per_user_and_restart_after_keep,
    login::attach_is_single_use,
    login::detach_removes_only_its_own_route_and_slot,
    login::late_detach_of_an_old_session_keeps_the_new_one,
    login::release_login_frees_the_slot_and_returns_the_server,
    routes::routes_returns_one_entry_per_id_in_order,
    routes::server_routes_visits_every_route_of_the_server_exactly_once,
    routes::server_routes_reaches_every_route_present_throughout,
    routes::remove_stale_route_removes_only_an_unchanged_route,
    routes::online_page_filters_by_prefix_and_pages_by_cursor,
    inbox::inbox_store_assigns_increasing_seqs_in_order,
    inbox::inbox_store_is_idempotent_by_receiver_and_id,
    inbox::concurrent_stores_of_one_message_store_it_once,
    inbox::inbox_read_pages_by_seq_and_limit,
    inbox::inbox_top_is_the_last_seq_given_even_once_acked,
    inbox::inbox_store_then_routes_stores_then_looks_up,
    inbox::inbox_keeps_the_newest_max_messages,
    inbox::inbox_read_skips_and_removes_expired_messages,
    inbox::inbox_ack_removes_messages_once,
    inbox::inbox_ack_returns_each_receipt_once,
    inbox::receipt_requests_stay_pending_until_done,
    inbox::inbox_ack_ignores_oversized_input,
    inbox::inboxes_of_users_are_separate,
    presence::attach_and_detach_publish_presence_events,
    presence::remove_stale_route_publishes_server_lost,
    presence::events_after_pages_from_an_exclusive_start,
    presence::events_wait_returns_new_events_or_nothing_after_its_timeout,
    presence::event_stream_is_capped_near_events_max_len,
    presence::message_events_are_published_once_per_message_and_receiver,
    leases::leases_are_held_renewed_and_expire,
    leases::broadcast_claims_answer_repeats_until_released_or_expired,
    leases::cursors_are_stored_by_name,
    channels::channel_join_leave_and_membership,
    channels::channel_join_respects_the_per_user_limit,
    channels::channel_members_page_by_user_id,
    channels::channel_list_pages_by_name_and_drops_empty_channels,
    channels::channel_stats_count_members_and_online,
    chat::groups_are_created_added_to_and_removed_from_within_limits,
    chat::groups_change_roles_rename_and_disband,
    chat::group_appends_are_idempotent_and_for_members_only,
    chat::private_logs_are_shared_by_the_pair_and_idempotent,
    chat::history_pages_backwards_and_forwards,
    chat::group_history_starts_at_the_join_less_before_join,
    chat::history_keeps_the_newest_max_messages_and_drops_old_ones,
    chat::conversations_list_newest_first_with_unread_counts_and_read_marks,
    chat::group_cursors_acks_and_checks,
);

/// Runs each named `async fn(&RegistryUnderTest) -> anyhow::Result<()>` of [`registries`] as
/// two tests, `<name>::etcd` and `<name>::memory`.
macro_rules! for_each_registry {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn etcd() -> anyhow::Result<()> {
                super::registries::$name(&super::RegistryUnderTest::etcd().await?).await
            }

            #[tokio::test]
            async fn memory() -> anyhow::Result<()> {
                super::registries::$name(&super::RegistryUnderTest::memory()).await
            }
        }
    )*};
}

for_each_registry!(
    watcher_sees_registrations_sorted_by_id,
    deregister_removes_at_once,
    a_dropped_registration_leaves_the_list,
    late_watcher_sees_the_current_list,
    servers_and_routes_are_listed_apart,
);
