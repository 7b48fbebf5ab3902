//! SAS authorization as senders and listeners see it (hc-protocol.md §3, §7).

mod common;

use std::time::Duration;

use common::*;
use hyrelay::client;
use hyrelay::proto::connstr::{ConnectionString, Credential};
use hyrelay::proto::sas::{create_token, unix_now};
use hyrelay::transport::ws::{self, ConnectError};

fn key_of(cs: &ConnectionString) -> (String, String) {
    match &cs.credential {
        Credential::Key { name, key } => (name.clone(), key.expose().to_owned()),
        Credential::Token(_) => panic!("expected a key"),
    }
}

/// Opens `action` on `hc` with `token` and returns the HTTP status (101 on success).
async fn status(rig: &Rig, hc: &str, action: &str, token: Option<&str>) -> u16 {
    let cs = rig.relay.manage_connection_string();
    let url = client::hc_url(&cs, hc, action, "test-id");
    let headers: Vec<(&str, &str)> = token.map(|t| ("ServiceBusAuthorization", t)).into_iter().collect();
    match ws::connect(&url, Some(&rig.tls), &headers, Duration::from_secs(10)).await {
        Ok(_) => 101,
        Err(ConnectError::Rejected { status, .. }) => status,
        Err(e) => panic!("unexpected failure: {e}"),
    }
}

fn token_for(rig: &Rig, hc: &str, name: &str, key: &str, ttl_secs: i64) -> String {
    let host = rig.relay.local_endpoint().host;
    create_token(
        &format!("http://{host}/{hc}"),
        name,
        key,
        (unix_now() as i64 + ttl_secs) as u64,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auth_matrix() {
    let rig = Rig::new(true);
    rig.create("secure", echo()).await;
    let (ln, lk) = key_of(&rig.listen_cs("secure").await);
    let (sn, sk) = key_of(&rig.send_cs("secure").await);
    let listen = token_for(&rig, "secure", &ln, &lk, 600);
    let send = token_for(&rig, "secure", &sn, &sk, 600);

    // No listener yet: a valid sender learns that with 404.
    assert_eq!(status(&rig, "secure", "connect", Some(&send)).await, 404, "no listener");
    assert_eq!(
        status(&rig, "nope", "connect", Some(&send)).await,
        404,
        "unknown entity"
    );
    assert_eq!(
        status(&rig, "nope", "listen", Some(&listen)).await,
        404,
        "unknown entity (listen)"
    );

    let wrong = token_for(&rig, "secure", &ln, "d3JvbmcgYnV0IHdlbGwtZm9ybWVkIGtleSAxMjM0NTY=", 600);
    assert_eq!(status(&rig, "secure", "listen", Some(&wrong)).await, 401, "wrong key");
    assert_eq!(status(&rig, "secure", "listen", None).await, 401, "no token");
    assert_eq!(
        status(&rig, "secure", "listen", Some("SharedAccessSignature sr=x")).await,
        401,
        "malformed"
    );
    assert_eq!(
        status(&rig, "secure", "listen", Some(&send)).await,
        403,
        "Send key used to listen"
    );
    assert_eq!(
        status(&rig, "secure", "connect", Some(&listen)).await,
        403,
        "Listen key used to connect"
    );
    let expired = token_for(&rig, "secure", &sn, &sk, -10);
    assert_eq!(
        status(&rig, "secure", "connect", Some(&expired)).await,
        401,
        "expired token"
    );

    // A real listener makes valid senders succeed, including with the secondary key.
    let _hcm = rig.hcm(&rig.listen_cs("secure").await);
    rig.wait_listeners("secure", 1).await;
    assert_eq!(status(&rig, "secure", "connect", Some(&send)).await, 101);
    let secondary = rig.mgmt.connection_string("secure", true, true).await.unwrap();
    let (_, sk2) = key_of(&secondary);
    assert_ne!(sk, sk2);
    let send2 = token_for(&rig, "secure", &sn, &sk2, 600);
    assert_eq!(
        status(&rig, "secure", "connect", Some(&send2)).await,
        101,
        "secondary key accepted"
    );

    // Regenerating the primary key invalidates tokens made with the old one.
    rig.mgmt.regenerate_key("secure", false, None).await.unwrap();
    assert_eq!(
        status(&rig, "secure", "connect", Some(&send)).await,
        401,
        "old primary key"
    );
    assert_eq!(
        status(&rig, "secure", "connect", Some(&send2)).await,
        101,
        "secondary untouched"
    );
    let (_, fresh) = key_of(&rig.send_cs("secure").await);
    let send3 = token_for(&rig, "secure", &sn, &fresh, 600);
    assert_eq!(
        status(&rig, "secure", "connect", Some(&send3)).await,
        101,
        "new primary key"
    );

    // The namespace Manage rule may do everything.
    let (rn, rk) = key_of(&rig.relay.manage_connection_string());
    let host = rig.relay.local_endpoint().host;
    let root = create_token(&format!("http://{host}/"), &rn, &rk, unix_now() + 600);
    assert_eq!(
        status(&rig, "secure", "connect", Some(&root)).await,
        101,
        "namespace root token"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_in_query_and_anonymous_senders() {
    let rig = Rig::new(false);
    let ep = echo();
    rig.mgmt.create("open", Some(&ep.to_string()), false).await.unwrap();
    let _hcm = rig.hcm(&rig.listen_cs("open").await);
    rig.wait_listeners("open", 1).await;
    // requiresClientAuthorization = false: no token needed.
    assert_eq!(status(&rig, "open", "connect", None).await, 101);

    // sb-hc-token in the query works like the header.
    rig.create("q", echo()).await;
    let (sn, sk) = key_of(&rig.send_cs("q").await);
    let _hcm2 = rig.hcm(&rig.listen_cs("q").await);
    rig.wait_listeners("q", 1).await;
    let token = token_for(&rig, "q", &sn, &sk, 600);
    let cs = rig.relay.manage_connection_string();
    let mut url = client::hc_url(&cs, "q", "connect", "id");
    let enc = percent_encoding::utf8_percent_encode(&token, hyrelay::proto::sas::URI_COMPONENT);
    url.target.push_str(&format!("&sb-hc-token={enc}"));
    assert!(
        ws::connect(&url, Some(&rig.tls), &[], Duration::from_secs(10))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn management_needs_manage() {
    let rig = Rig::new(true);
    rig.create("m", echo()).await;
    let listen = rig.listen_cs("m").await;
    let weak = hyrelay::client::Management::new(
        ConnectionString {
            entity_path: None,
            ..listen
        },
        rig.tls.clone(),
    );
    match weak.list().await {
        Err(hyrelay::client::ManagementError::Refused { status, .. }) => {
            assert!(status == 401 || status == 403, "{status}")
        }
        other => panic!("listen key must not manage: {other:?}"),
    }
    match rig.mgmt.create("m", None, true).await {
        Err(hyrelay::client::ManagementError::Refused { status: 409, .. }) => {}
        other => panic!("duplicate create must be 409: {other:?}"),
    }
    match rig.mgmt.create("bad name!", None, true).await {
        Err(hyrelay::client::ManagementError::Refused { status: 400, message }) => {
            assert!(message.contains("bad name!"), "{message}")
        }
        other => panic!("bad name must be 400: {other:?}"),
    }
    rig.mgmt.delete("m").await.unwrap();
    assert!(matches!(
        rig.mgmt.show("m").await,
        Err(hyrelay::client::ManagementError::Refused { status: 404, .. })
    ));
}
