//! Control channels over time: token expiry and renewal, relay restarts, redundant hcms.

mod common;

use std::time::Duration;

use common::*;
use hyrelay::hcm::config::HcEntry;
use hyrelay::hcm::state::ChannelState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn connected(h: &hyrelay::hcm::HcmHandle) -> bool {
    h.status().iter().all(|s| s.state == ChannelState::Connected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_listener_token_closes_channel_but_not_tunnels() {
    let rig = Rig::with(false, |c| c.token_grace = Duration::from_secs(1));
    rig.create("exp", echo()).await;
    let mut cfg = rig.hcm_config(vec![HcEntry::new(rig.listen_cs("exp").await, None).unwrap()]);
    cfg.token_ttl = Duration::from_secs(3);
    cfg.renew_tokens = false;
    let hcm = hyrelay::hcm::start(cfg).unwrap();
    rig.wait_listeners("exp", 1).await;
    let bridge = rig.bridge("exp", &rig.send_cs("exp").await);

    // Open a tunnel before the token expires and keep it busy across the expiry.
    let mut s = tokio::net::TcpStream::connect(bridge.addr_of("exp").unwrap())
        .await
        .unwrap();
    let mut closed = false;
    for _ in 0..150 {
        let chunk = payload(1000, 3);
        s.write_all(&chunk).await.unwrap();
        let mut back = vec![0u8; chunk.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, chunk, "tunnel kept flowing");
        if hcm.status()[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("1008"))
        {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(closed, "relay closed the control channel with 1008: {:?}", hcm.status());
    // The tunnel opened under the old token still works after the channel was closed.
    let chunk = payload(50_000, 4);
    s.write_all(&chunk).await.unwrap();
    let mut back = vec![0u8; chunk.len()];
    s.read_exact(&mut back).await.unwrap();
    assert!(back == chunk);
    // And the hcm came back by itself with a fresh token.
    assert!(wait_for(Duration::from_secs(10), || async { connected(&hcm) }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_listener_token_keeps_the_channel() {
    let rig = Rig::with(false, |c| c.token_grace = Duration::from_secs(1));
    rig.create("renew", echo()).await;
    let mut cfg = rig.hcm_config(vec![HcEntry::new(rig.listen_cs("renew").await, None).unwrap()]);
    cfg.token_ttl = Duration::from_secs(3);
    let hcm = hyrelay::hcm::start(cfg).unwrap();
    rig.wait_listeners("renew", 1).await;
    // Three token lifetimes: without renewal the channel would have closed twice.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let st = &hcm.status()[0];
    assert_eq!(st.state, ChannelState::Connected);
    assert_eq!(st.reconnects, 0, "no reconnect: {st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_restart_hcm_reconnects_and_state_survives() {
    let mut rig = Rig::new(true);
    rig.create("persist", echo()).await;
    let listen = rig.listen_cs("persist").await;
    let send = rig.send_cs("persist").await;
    let hcm = rig.hcm(&listen);
    rig.wait_listeners("persist", 1).await;
    let bridge = rig.bridge("persist", &send);
    let addr = bridge.addr_of("persist").unwrap();
    assert_eq!(round_trip(addr, b"before").await.unwrap(), b"before");

    rig.restart();
    // Entities and keys survived: the same connection strings still work.
    assert_eq!(rig.listen_cs("persist").await, listen);
    assert_eq!(rig.send_cs("persist").await, send);
    // The hcm reconnects by itself (its backoff cap is 2 s here).
    rig.wait_listeners("persist", 1).await;
    assert!(hcm.status()[0].reconnects >= 1);
    assert_eq!(round_trip(addr, b"after").await.unwrap(), b"after");
    // The bridge's warm connections died with the old relay: none of the app bytes
    // sent while it finds that out may be lost (CI once saw "after" come back empty).
    let tries: Vec<_> = (0..8u64)
        .map(|i| tokio::spawn(async move { (i, round_trip(addr, &payload(3000, 500 + i)).await) }))
        .collect();
    for t in tries {
        let (i, got) = t.await.unwrap();
        assert_eq!(got.unwrap(), payload(3000, 500 + i), "connection {i} after the restart");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hcms_share_and_one_dying_does_not_stop_new_connections() {
    let rig = Rig::new(false);
    rig.create("ha", echo()).await;
    let listen = rig.listen_cs("ha").await;
    let a = rig.hcm(&listen);
    let b = rig.hcm(&listen);
    rig.wait_listeners("ha", 2).await;
    let bridge = rig.bridge("ha", &rig.send_cs("ha").await);
    let addr = bridge.addr_of("ha").unwrap();
    for i in 0..40u64 {
        let d = payload(100, i);
        assert_eq!(round_trip(addr, &d).await.unwrap(), d);
    }
    let (na, nb) = (a.status()[0].accepts, b.status()[0].accepts);
    assert_eq!(na + nb, 40);
    assert!(na > 0 && nb > 0, "both hcms got connections: {na} / {nb}");

    a.stop();
    rig.wait_listeners("ha", 1).await;
    for i in 0..50u64 {
        let d = payload(1000, 100 + i);
        assert_eq!(
            round_trip(addr, &d).await.unwrap(),
            d,
            "connection {i} after one hcm died"
        );
    }
    assert_eq!(b.status()[0].accepts, nb + 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_is_rejected_with_a_reason() {
    let rig = Rig::new(false);
    // A port with nothing listening.
    let (_refusing, dead) = refusing_addr();
    rig.create("dead", dead).await;
    let hcm = rig.hcm(&rig.listen_cs("dead").await);
    rig.wait_listeners("dead", 1).await;
    let cs = rig.send_cs("dead").await;
    let url = hyrelay::client::hc_url(&cs, "dead", "connect", "x");
    let token = hyrelay::client::token(&cs, "dead", Duration::from_secs(60));
    let err = hyrelay::transport::ws::connect(
        &url,
        Some(&rig.tls),
        &[("ServiceBusAuthorization", &token)],
        Duration::from_secs(20),
    )
    .await
    .unwrap_err();
    match err {
        hyrelay::transport::ws::ConnectError::Rejected { status, reason } => {
            assert_eq!(status, 502);
            assert!(
                reason.contains(&dead.to_string()) && reason.to_lowercase().contains("refused"),
                "{reason}"
            );
        }
        e => panic!("expected a rejection, got {e}"),
    }
    let dial = hcm.status()[0].last_dial.clone().unwrap();
    assert!(!dial.ok);
    // The app behind a bridge sees its connection reset promptly.
    let bridge = rig.bridge("dead", &cs);
    let mut s = tokio::net::TcpStream::connect(bridge.addr_of("dead").unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed promptly");
    assert!(matches!(r, Ok(0) | Err(_)));
}
