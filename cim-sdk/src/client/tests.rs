//! Unit tests of the client handle: config, sends and their checks, errors of a login,
//! server address choice.

use super::*;
use crate::{route::RouteError, Transport};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[test]
fn backoff_doubles_from_initial_up_to_max() {
    let p = ReconnectPolicy::default();
    // unit 0.5 is the middle of the jitter range: no jitter.
    let schedule: Vec<_> = (1..=9).map(|a| p.backoff_with(a, 0.5)).collect();
    assert_eq!(
        schedule,
        [
            ms(200),
            ms(400),
            ms(800),
            ms(1600),
            ms(3200),
            ms(6400),
            ms(10_000),
            ms(10_000),
            ms(10_000)
        ]
    );
}

#[test]
fn jitter_is_plus_minus_twenty_percent_and_never_exceeds_max() {
    let p = ReconnectPolicy::default();
    assert_eq!(p.backoff_with(1, 0.0), ms(160));
    assert_eq!(p.backoff_with(3, 0.0), ms(640));
    assert_eq!(p.backoff_with(3, 1.0), ms(960));
    // At the cap, jitter only shortens.
    assert_eq!(p.backoff_with(20, 0.0), ms(8000));
    assert_eq!(p.backoff_with(20, 1.0), ms(10_000));
    for attempt in 1..=12 {
        let base = p.backoff_with(attempt, 0.5);
        for _ in 0..200 {
            let d = p.backoff(attempt);
            assert!(d >= base.mul_f64(0.8), "{attempt}: {d:?} < 0.8 × {base:?}");
            assert!(d <= base.mul_f64(1.2), "{attempt}: {d:?} > 1.2 × {base:?}");
            assert!(d <= p.max_backoff);
        }
    }
}

#[test]
fn jitter_actually_varies() {
    let p = ReconnectPolicy::default();
    let draws: std::collections::HashSet<_> = (0..50).map(|_| p.backoff(2)).collect();
    assert!(draws.len() > 1, "{draws:?}");
}

#[test]
fn backoff_does_not_overflow_and_handles_odd_policies() {
    let p = ReconnectPolicy::default();
    assert_eq!(
        p.backoff_with(0, 0.5),
        ms(200),
        "attempt 0 counts as the first"
    );
    assert_eq!(p.backoff_with(u32::MAX, 0.5), ms(10_000));
    let huge = ReconnectPolicy {
        initial_backoff: Duration::from_secs(u64::MAX / 4),
        max_backoff: Duration::MAX,
        max_attempts: None,
    };
    assert!(huge.backoff_with(40, 0.99) <= Duration::MAX);
    // A max below the initial delay wins.
    let capped = ReconnectPolicy {
        initial_backoff: ms(500),
        max_backoff: ms(100),
        max_attempts: Some(1),
    };
    assert_eq!(capped.backoff_with(1, 0.5), ms(100));
    let zero = ReconnectPolicy {
        initial_backoff: Duration::ZERO,
        ..ReconnectPolicy::default()
    };
    assert_eq!(zero.backoff_with(5, 0.9), Duration::ZERO);
}

#[test]
fn config_debug_hides_the_password() {
    let c = ClientConfig::new("http://r", "alice", "hunter22");
    let s = format!("{c:?}");
    assert!(!s.contains("hunter22"), "{s}");
    assert!(s.contains("alice"));
    assert_eq!(c.transport, Transport::Tcp);
    assert_eq!(c.reconnect, ReconnectPolicy::default());
}

#[test]
fn login_errors_map_to_their_variants() {
    let api = |status, code: &str| RouteError::Api {
        status,
        code: code.into(),
        message: format!("{code} message"),
    };
    assert!(matches!(
        ClientError::from_login(api(401, "bad_credentials")),
        ClientError::BadCredentials
    ));
    assert!(matches!(
        ClientError::from_login(api(503, "no_server")),
        ClientError::NoServer
    ));
    let e = ClientError::from_login(api(409, "already_logged_in"));
    assert!(
        matches!(&e, ClientError::AlreadyLoggedIn(m) if m == "already_logged_in message"),
        "{e:?}"
    );
    assert_eq!(
        (e.code(), e.status()),
        (Some("already_logged_in"), Some(409))
    );
    let e = ClientError::from_login(api(400, "invalid_name"));
    assert_eq!((e.code(), e.status()), (Some("invalid_name"), Some(400)));
    assert!(!e.is_transport());
    assert_eq!(ClientError::Closed.code(), None);
}

#[test]
fn handles_can_move_between_tasks() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Client>();
    send_sync::<ClientError>();
    send::<Events>();
}

#[tokio::test]
async fn an_invalid_message_id_is_refused_before_sending() {
    let (commands, mut queued) = mpsc::channel(1);
    let shared = Arc::new(Shared {
        info: Mutex::new(ClientInfo {
            user_id: 1,
            name: "alice".into(),
            route_url: "http://r".into(),
            server_id: None,
            server_addr: None,
            state: ConnState::Connecting,
        }),
        session_token: Mutex::new(String::new()),
        stop: CancellationToken::new(),
        logout: Mutex::new(LogoutSlot::Open),
        next_client_id: AtomicU64::new(1),
    });
    let client = Client {
        shared: shared.clone(),
        route: RouteClient::new("http://r"),
        commands,
        _guard: Arc::new(HandleGuard(shared.stop.clone())),
    };
    for bad in ["", "has space", &"x".repeat(65)] {
        let options = SendOptions {
            message_id: Some(bad.to_string()),
            ..SendOptions::default()
        };
        let err = client.send_with("bob".into(), "hi", options).await;
        assert!(
            matches!(
                err,
                Err(ClientError::Send {
                    code: pb::ErrorCode::BadRequest,
                    ..
                })
            ),
            "{bad:?}: {err:?}"
        );
    }
    assert!(queued.try_recv().is_err(), "nothing was queued");
    // A valid id and the receipt flag go out as given; without an id the SDK picks one.
    let sending = {
        let client = client.clone();
        tokio::spawn(async move {
            let options = SendOptions {
                receipt: true,
                message_id: Some("my-id_1".into()),
            };
            let _ = client.send_with(Recipient::Id(2), "hi", options).await;
        })
    };
    let command = queued.recv().await.expect("queued");
    assert_eq!(command.send.message_id, "my-id_1");
    assert!(command.send.receipt);
    drop(command);
    sending.await.unwrap();
    let sending = {
        let client = client.clone();
        tokio::spawn(async move {
            let _ = client.send_group("all").await;
        })
    };
    let command = queued.recv().await.expect("queued");
    assert!(cim_proto::ids::valid_message_id(&command.send.message_id));
    assert!(!command.send.receipt);
    drop(command);
    sending.await.unwrap();
}

#[tokio::test]
async fn channel_sends_carry_the_channel_and_bad_names_are_refused_before_anything() {
    let (commands, mut queued) = mpsc::channel(1);
    let shared = Arc::new(Shared {
        info: Mutex::new(ClientInfo {
            user_id: 1,
            name: "alice".into(),
            route_url: "http://127.0.0.1:1".into(),
            server_id: None,
            server_addr: None,
            state: ConnState::Connecting,
        }),
        session_token: Mutex::new(String::new()),
        stop: CancellationToken::new(),
        logout: Mutex::new(LogoutSlot::Open),
        next_client_id: AtomicU64::new(1),
    });
    // Port 1: any HTTP call would fail as unreachable, not as an invalid name.
    let client = Client {
        shared: shared.clone(),
        route: RouteClient::new("http://127.0.0.1:1"),
        commands,
        _guard: Arc::new(HandleGuard(shared.stop.clone())),
    };
    for bad in ["", "a b", "#room", "a/b", ".", "..", &"x".repeat(65)] {
        let invalid = |r: Result<(), ClientError>| match r {
            Err(e @ ClientError::InvalidChannel(_)) => {
                assert_eq!(e.code(), Some("invalid_channel"));
            }
            other => panic!("{bad:?}: {other:?}"),
        };
        invalid(client.send_channel(bad, "hi").await.map(drop));
        invalid(client.join_channel(bad).await.map(drop));
        invalid(client.leave_channel(bad).await.map(drop));
        invalid(client.channel(bad).await.map(drop));
        invalid(client.channel_members(bad, None, None).await.map(drop));
    }
    assert!(queued.try_recv().is_err(), "nothing was queued");
    // A valid name reaches the network (here: an unreachable route).
    let e = client.join_channel("频道-1").await.unwrap_err();
    assert!(e.is_transport(), "{e:?}");
    let sending = {
        let client = client.clone();
        tokio::spawn(async move {
            let _ = client.send_channel("频道-1", "hello").await;
        })
    };
    let command = queued.recv().await.expect("queued");
    assert_eq!(command.send.kind, pb::MessageKind::Channel as i32);
    assert_eq!(
        (command.send.channel.as_str(), command.send.body.as_str()),
        ("频道-1", "hello")
    );
    assert!(cim_proto::ids::valid_message_id(&command.send.message_id));
    assert_eq!(
        (command.send.to_user_id, command.send.to_user_name.as_str()),
        (0, "")
    );
    drop(command);
    sending.await.unwrap();
    // A closed client says so before looking at anything else.
    *lock(&shared.info) = ClientInfo {
        state: ConnState::Closed { reason: "x".into() },
        ..client.info()
    };
    assert!(matches!(
        client.my_channels().await,
        Err(ClientError::Closed)
    ));
    assert!(matches!(
        client.send_channel("room", "x").await,
        Err(ClientError::Closed)
    ));
}

#[test]
fn recipients_convert() {
    assert_eq!(Recipient::from(7), Recipient::Id(7));
    assert_eq!(Recipient::from("bob"), Recipient::Name("bob".into()));
    assert_eq!(
        Recipient::from(String::from("bob")),
        Recipient::Name("bob".into())
    );
}
