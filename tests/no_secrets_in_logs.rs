//! No key, token, signature or rendezvous secret ever reaches the logs, at any level.
//!
//! One test (the subscriber is process-global): trace-level logging of every module is
//! captured into a buffer while a relay, an hcm and a bridge go through the usual
//! scenarios and the failing ones (wrong key, bad token in the query and in headers, a
//! token-only connection string, key regeneration, management calls with and without
//! rights, a refused hcm endpoint). Then every key and token used is looked for in the
//! captured text, as are the markers of credentials in general (`sig=`, `sb-hc-rid=`,
//! `SharedAccessKey=`).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hyrelay::client;
use hyrelay::hcm::config::HcEntry;
use hyrelay::proto::connstr::{ConnectionString, Credential};
use hyrelay::transport::ws;

/// The captured log text.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn install() -> Capture {
    let cap = Capture::default();
    let writer = cap.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    cap
}

/// Every key of every rule the relay holds for `hc` and the namespace, from `show`.
async fn keys_of(rig: &Rig, hc: &str) -> Vec<String> {
    let v = rig.mgmt.show(hc).await.unwrap();
    let mut keys: Vec<String> = v["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            [
                r["primaryKey"].as_str().unwrap().to_owned(),
                r["secondaryKey"].as_str().unwrap().to_owned(),
            ]
        })
        .collect();
    if let Credential::Key { key, .. } = &rig.relay.manage_connection_string().credential {
        keys.push(key.expose().to_owned());
    }
    keys
}

/// The signature part of a token.
fn sig(token: &str) -> String {
    token
        .split("sig=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_is_ever_logged() {
    let cap = install();
    let rig = Rig::new(true);
    rig.create("sec", echo()).await;
    let mut secrets = keys_of(&rig, "sec").await;
    let (listen, send) = (rig.listen_cs("sec").await, rig.send_cs("sec").await);

    // The usual path: hcm + bridge, bytes both ways.
    let hcm = rig.hcm(&listen);
    rig.wait_listeners("sec", 1).await;
    let bridge = rig.bridge("sec", &send);
    let data = payload(5000, 7);
    assert_eq!(round_trip(bridge.addr_of("sec").unwrap(), &data).await.unwrap(), data);

    // A sender with its token in the query, and one with a forged signature.
    let token = client::token(&send, "sec", Duration::from_secs(600));
    secrets.push(token.clone());
    let enc = percent_encoding::utf8_percent_encode(&token, percent_encoding::NON_ALPHANUMERIC).to_string();
    let mut url = client::hc_url(&send, "sec", "connect", "q");
    url.target.push_str(&format!("&sb-hc-token={enc}"));
    let c = ws::connect(&url, Some(&rig.tls), &[], Duration::from_secs(10))
        .await
        .expect("query-token sender");
    drop(c);
    let forged = token.replace("sig=", "sig=Zm9yZ2Vk");
    secrets.push(forged.clone());
    let url = client::hc_url(&send, "sec", "connect", "f");
    let e = ws::connect(
        &url,
        Some(&rig.tls),
        &[("ServiceBusAuthorization", &forged)],
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(e.err().and_then(|e| e.status()), Some(401));

    // A bridge with a wrong key; a listener token in the query.
    let mut wrong = send.clone();
    if let Credential::Key { key, .. } = &mut wrong.credential {
        *key = hyrelay::proto::Secret::new("d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXkgd3Jvbmc=".to_owned());
        secrets.push(key.expose().to_owned());
    }
    let bad_bridge = rig.bridge("sec", &wrong);
    let _ = round_trip(bad_bridge.addr_of("sec").unwrap(), b"x").await;
    let lt = client::token(&listen, "sec", Duration::from_secs(600));
    secrets.push(lt.clone());
    let mut url = client::hc_url(&listen, "sec", "listen", "ql");
    url.target.push_str(&format!(
        "&sb-hc-token={}",
        percent_encoding::utf8_percent_encode(&lt, percent_encoding::NON_ALPHANUMERIC)
    ));
    drop(
        ws::connect(&url, Some(&rig.tls), &[], Duration::from_secs(10))
            .await
            .expect("query-token listener"),
    );

    // An hcm given a token-only connection string.
    let tok_cs = ConnectionString {
        credential: Credential::Token(hyrelay::proto::Secret::new(lt.clone())),
        ..listen.clone()
    };
    let hcm2 = rig.hcm(&tok_cs);
    rig.wait_listeners("sec", 2).await;

    // Management: without rights, then a key regeneration (old and new keys are secrets).
    let nomanage = hyrelay::client::Management::new(send.clone(), rig.tls.clone());
    assert!(nomanage.list().await.is_err());
    rig.mgmt
        .regenerate_key("sec", false, Some("defaultSender"))
        .await
        .unwrap();
    secrets.extend(keys_of(&rig, "sec").await);

    // An hcm refusing an endpoint it is not allowed to dial.
    let mut cfg = rig.hcm_config(vec![HcEntry::new(listen.clone(), None).unwrap()]);
    cfg.allowed_endpoints = hyrelay::hcm::allow::AllowList::parse(&["nothing.example:1".into()]).unwrap();
    let hcm3 = hyrelay::hcm::start(cfg).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;

    drop((hcm, hcm2, hcm3, bridge, bad_bridge));
    let text = cap.text();
    assert!(text.len() > 2_000, "trace logging was captured ({} bytes)", text.len());
    assert!(
        text.contains("endpoint_not_allowed") && text.contains("sender_refused"),
        "the scenarios ran"
    );
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "a secret was logged: {s}");
        if s.contains("sig=") {
            assert!(!text.contains(&sig(s)), "a signature was logged: {s}");
        }
    }
    for marker in [
        "sig=",
        "sig%3D",
        "sb-hc-rid=",
        "SharedAccessKey=",
        "SharedAccessSignature sr",
    ] {
        assert!(!text.contains(marker), "credential marker {marker:?} in the logs");
    }
}
