//! Answering an `accept`: dial the endpoint, then open the rendezvous and splice; or, if
//! the endpoint cannot be reached, reject the rendezvous so the sender learns why.

use std::sync::Arc;
use std::time::Instant;

use percent_encoding::utf8_percent_encode;

use super::state::DialStatus;
use super::{HcRt, HcmCtx};
use crate::dataplane::splice::{self, SpliceConfig};
use crate::proto::control::Accept;
use crate::proto::frame::Role;
use crate::proto::metadata::HostPort;
use crate::proto::sas::URI_COMPONENT;
use crate::transport::ws::{self, ConnectError, WsUrl};

/// Serves one `accept` to the end of its tunnel.
pub(crate) async fn handle(a: Accept, hc: Arc<HcRt>, endpoint: HostPort, ctx: Arc<HcmCtx>) {
    let inflight = ctx.inflight.enter();
    let name = hc.entry.name().to_owned();
    count_accept(&hc, Some(&a.address));
    // Checked again here: the list is the last word whatever endpoint reached this task.
    if let Err(why) = super::channel::check_allowed(&endpoint, &ctx) {
        not_allowed(&hc, &endpoint, &why);
        reject(&a, 403, &format!("hyrelay hcm: {why}"), &ctx).await;
        return;
    }
    let url = match WsUrl::parse(&a.address) {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(hc = %name, error = %e, "relay sent an unusable accept address");
            return;
        }
    };
    // The endpoint dial and the connection to the relay (TCP, TLS) overlap; which request
    // goes out on the latter, accept or reject, waits for the dial's result.
    let opening = tokio::time::timeout(
        ctx.cfg.relay_timeout,
        ws::open_via(&url, Some(&ctx.tls), &ctx.cfg.proxy),
    );
    let (dialed, opened) = tokio::join!(dial(&hc, &endpoint, &ctx), opening);
    let opened = opened.unwrap_or_else(|_| Err(ConnectError::Timeout(ctx.cfg.relay_timeout)));
    // Until the tunnel opens, however this ends, the endpoint sees a reset: it must not
    // take a tunnel that never opened for a client that closed cleanly.
    let tcp = match dialed {
        Ok(tcp) => splice::ResetUnlessTaken::new(tcp),
        Err((status, detail)) => {
            reject_on(
                opened.ok(),
                &a,
                status,
                &format!("hyrelay hcm: endpoint {detail}"),
                &ctx,
            )
            .await;
            return;
        }
    };
    let protocol = a
        .connect_headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("Sec-WebSocket-Protocol"))
        .and_then(|(_, v)| v.split(',').map(str::trim).find(|p| !p.is_empty()))
        .map(str::to_owned);
    let headers: Vec<(&str, &str)> = protocol
        .as_deref()
        .map(|p| ("Sec-WebSocket-Protocol", p))
        .into_iter()
        .collect();
    let upgraded = match opened {
        Ok(stream) => tokio::time::timeout(ctx.cfg.relay_timeout, ws::upgrade(stream, &url, &headers))
            .await
            .unwrap_or_else(|_| Err(ConnectError::Timeout(ctx.cfg.relay_timeout))),
        Err(e) => Err(e),
    };
    let conn = match upgraded {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(event = "rendezvous_failed", hc = %name, error = %e, "cannot open the rendezvous; resetting the endpoint's connection");
            return;
        }
    };
    splice_tunnel(
        &hc,
        a.id,
        (conn.stream, conn.leftover),
        tcp.take(),
        &ctx,
        (inflight, None),
    );
}

/// Serves an `accept` that came on a pooled rendezvous connection (`hcm::pool`): the
/// relay has joined it to the sender already, so it only needs the endpoint. If that
/// cannot be reached, the tunnel is closed with 4000 + the status a rendezvous reject
/// would have carried (4502, 4504, 4403) and the same description. After a clean end the
/// connection goes to `back` (the relay promised to keep it), else it is closed.
pub(crate) async fn handle_pooled(
    a: Accept,
    hc: Arc<HcRt>,
    endpoint: HostPort,
    ctx: Arc<HcmCtx>,
    (mut stream, leftover): (crate::transport::Stream, bytes::BytesMut),
    back: Option<splice::Back>,
) {
    let inflight = ctx.inflight.enter();
    count_accept(&hc, None);
    let failed = match super::channel::check_allowed(&endpoint, &ctx) {
        Err(why) => {
            not_allowed(&hc, &endpoint, &why);
            Err((403, format!("hyrelay hcm: {why}")))
        }
        Ok(()) => dial(&hc, &endpoint, &ctx)
            .await
            .map_err(|(status, detail)| (status, format!("hyrelay hcm: endpoint {detail}"))),
    };
    match failed {
        Ok(tcp) => splice_tunnel(&hc, a.id, (stream, leftover), tcp, &ctx, (inflight, back)),
        Err((status, description)) => {
            let mut w = ws::WsWriter::new(&mut stream, Role::Client);
            let reason: String = description.chars().take(100).collect();
            let _ = tokio::time::timeout(ctx.cfg.relay_timeout, w.send_close(4000 + status, &reason)).await;
        }
    }
}

/// Counts an accept; `address`: its rendezvous address, `None` for one that came on a
/// pooled connection (demand the pool served).
fn count_accept(hc: &HcRt, address: Option<&str>) {
    hc.update(|s| s.accepts += 1);
    match address {
        Some(a) => hc.demand.count(a),
        None => hc.demand.count_pooled(),
    }
    metrics::counter!(crate::telemetry::metrics::HCM_ACCEPTS, "hc" => hc.entry.name().to_owned()).increment(1);
}

fn not_allowed(hc: &HcRt, endpoint: &HostPort, why: &str) {
    record_dial(hc, false, 0, why.to_owned());
    tracing::warn!(event = "endpoint_not_allowed", hc = %hc.entry.name(), %endpoint, "endpoint is not in allowed_endpoints; rejecting the sender");
}

/// Dials the endpoint within the dial timeout and records the result (status, metrics,
/// log); a failure comes back as the status and description the sender should get.
async fn dial(hc: &HcRt, endpoint: &HostPort, ctx: &HcmCtx) -> Result<tokio::net::TcpStream, (u16, String)> {
    let name = hc.entry.name().to_owned();
    let started = Instant::now();
    let dialed = tokio::time::timeout(ctx.cfg.dial_timeout, ws::dial(&endpoint.host, endpoint.port)).await;
    let took = started.elapsed();
    let millis = took.as_millis() as u64;
    metrics::histogram!(crate::telemetry::metrics::HCM_DIAL_SECONDS, "hc" => name.clone()).record(took.as_secs_f64());
    let dial_result = match &dialed {
        Ok(Ok(_)) => "ok",
        Ok(Err(ConnectError::Resolve { .. })) => "dns",
        Ok(Err(ConnectError::Connect { source, .. })) if source.kind() == std::io::ErrorKind::ConnectionRefused => {
            "refused"
        }
        Ok(Err(_)) => "error",
        Err(_) => "timeout",
    };
    metrics::counter!(crate::telemetry::metrics::HCM_DIALS, "hc" => name.clone(), "result" => dial_result).increment(1);
    let (status, detail) = match dialed {
        Ok(Ok(tcp)) => {
            record_dial(hc, true, millis, String::from("connected"));
            return Ok(tcp);
        }
        Ok(Err(ConnectError::Resolve { source, .. })) => (502, format!("cannot resolve {}: {source}", endpoint.host)),
        Ok(Err(ConnectError::Connect { source, .. })) => (502, format!("cannot connect to {endpoint}: {source}")),
        Ok(Err(e)) => (502, format!("cannot connect to {endpoint}: {e}")),
        Err(_) => (
            504,
            format!("{endpoint} did not answer within {:?}", ctx.cfg.dial_timeout),
        ),
    };
    record_dial(hc, false, millis, detail.clone());
    tracing::warn!(event = "endpoint_dial_failed", hc = %name, %endpoint, status, reason = %detail, "endpoint dial failed; rejecting the sender");
    Err((status, detail))
}

/// Splices the relay side (`ws`: the stream and bytes read past its handshake) to the
/// endpoint on this worker until the tunnel ends; then the WebSocket goes to `back`, if
/// any, after a clean end.
fn splice_tunnel(
    hc: &Arc<HcRt>,
    id: String,
    (stream, leftover): (crate::transport::Stream, bytes::BytesMut),
    tcp: tokio::net::TcpStream,
    ctx: &HcmCtx,
    (inflight, back): (crate::dataplane::drain::InFlightGuard, Option<splice::Back>),
) {
    let name = hc.entry.name().to_owned();
    tracing::debug!(event = "accept", hc = %name, id = %id, "tunnel open");
    hc.update(|s| s.active_tunnels += 1);
    let cfg = SpliceConfig {
        ping_interval: ctx.cfg.ping_interval,
        max_frame: ctx.cfg.max_frame,
        tcp_side: splice::TcpSide::Endpoint,
    };
    let done = {
        let (hc, name) = (hc.clone(), name.clone());
        move |stats: splice::SpliceStats| {
            hc.update(|s| s.active_tunnels -= 1);
            if stats.abnormal() {
                tracing::info!(event = "tunnel_closed", hc = %name, id = %id, to_endpoint = stats.to_tcp, from_endpoint = stats.to_ws, end = %stats.end, "tunnel ended abnormally");
            } else {
                tracing::debug!(event = "tunnel_closed", hc = %name, id = %id, to_endpoint = stats.to_tcp, from_endpoint = stats.to_ws, end = %stats.end, "tunnel closed");
            }
        }
    };
    crate::dataplane::offload::spawn_ws_tcp(&name, stream, leftover, tcp, &cfg, &ctx.shutdown, inflight, back, done);
}

fn record_dial(hc: &HcRt, ok: bool, millis: u64, detail: String) {
    hc.update(|s| {
        s.set_dial(DialStatus {
            ok,
            at: crate::clock::now_rfc3339(),
            millis,
            detail,
        })
    });
}

/// Rejects the rendezvous; the relay answers 410 and gives the sender `status description`.
async fn reject(a: &Accept, status: u16, description: &str, ctx: &HcmCtx) {
    reject_on(None, a, status, description, ctx).await;
}

/// [`reject`] on an already open connection to the relay, if there is one.
async fn reject_on(stream: Option<crate::transport::Stream>, a: &Accept, status: u16, description: &str, ctx: &HcmCtx) {
    let address = format!(
        "{}&sb-hc-statusCode={status}&sb-hc-statusDescription={}",
        a.address,
        utf8_percent_encode(description, URI_COMPONENT)
    );
    let Ok(url) = WsUrl::parse(&address) else { return };
    let answer = match stream {
        Some(s) => tokio::time::timeout(ctx.cfg.relay_timeout, ws::upgrade(s, &url, &[]))
            .await
            .unwrap_or_else(|_| Err(ConnectError::Timeout(ctx.cfg.relay_timeout))),
        None => ws::connect_via(&url, Some(&ctx.tls), &ctx.cfg.proxy, &[], ctx.cfg.relay_timeout).await,
    };
    match answer {
        Err(ConnectError::Rejected { status: 410, .. }) => {}
        Err(e) => tracing::warn!(error = %e, "relay did not take the rejection"),
        Ok(_) => tracing::warn!("relay accepted a rejection as a connection"),
    }
}
