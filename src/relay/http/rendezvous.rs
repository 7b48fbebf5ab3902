//! A listener's HTTP-mode rendezvous: `sb-hc-action=request` on the address of a request
//! (hc-protocol.md §6.3, §6.4). The address's `sb-hc-id` and `sb-hc-rid` (the single-use
//! secret) must name a request in flight, else 403; the connection is then sent to the
//! worker serving that request (parked, unless that is this worker), which answers the
//! upgrade and runs the exchange.
//! No token: the unguessable address is the capability (§3.1).

use std::sync::Arc;

use super::pending::Leg;
use crate::proto::address::HcRequest;
use crate::proto::handshake;
use crate::relay::Ctx;
use crate::relay::conn::{Incoming, refuse_rendezvous, respond};
use crate::transport::Stream;

/// Handles `sb-hc-action=request`.
pub(crate) async fn serve(mut stream: Stream, mut inc: Incoming, req: HcRequest, ctx: Arc<Ctx>) {
    let (Some(id), Some(secret)) = (req.id.as_deref(), req.rendezvous.as_deref()) else {
        return refuse_rendezvous(&mut stream, false).await;
    };
    let Some((tx, waiter)) = ctx.http.table.take_leg(id, secret) else {
        return refuse_rendezvous(&mut stream, true).await;
    };
    inc.pending.done();
    let upgrade = match handshake::validate_upgrade(&inc.head) {
        Ok(u) => u,
        Err(e) => return respond(&mut stream, 400, &e.to_string(), "").await,
    };
    if let Err(e) = stream.park_for(waiter) {
        tracing::warn!(peer = %inc.peer, error = %e, "cannot park the listener's rendezvous");
        return;
    }
    let leg = Leg {
        stream,
        leftover: inc.buf,
        key: upgrade.key,
        slot: inc.slot,
    };
    if let Err(mut leg) = tx.send(leg)
        && leg.stream.unpark().is_ok()
    {
        respond(&mut leg.stream, 410, "The request is no longer waiting.", "").await;
    }
}
