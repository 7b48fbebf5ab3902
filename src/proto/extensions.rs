//! hyrelay-to-hyrelay extensions, sans-IO: what a relay advertises and how our hcm and
//! bridge opt in. None of this is part of the Azure Relay protocol; Microsoft's clients
//! never send the opt-in headers and ignore the advertisement (an unknown response header).
//!
//! - The relay advertises on every 101 it sends (control channels, senders, rendezvous):
//!   `X-Hyrelay-Extensions: rendezvous-pool, early-data, reuse, head-timeout=10`.
//! - `rendezvous-pool`: a listener may open pre-authenticated rendezvous connections (a
//!   `listen` upgrade with `X-Hyrelay-Pool: 1` and its Listen token); the relay hands an
//!   opted-in sender to one of them directly with the `accept` as the first text frame.
//! - `early-data`: a sender with `X-Hyrelay-Early: 1` may send WebSocket frames right
//!   behind its upgrade request; the relay holds them (bounded) until the tunnel is joined,
//!   and may answer it from the rendezvous pool.
//! - `head-timeout=N`: seconds the relay waits for a request head after TCP (and TLS); a
//!   bridge keeps warm connections younger than that.
//! - `reuse`: a connection may carry one tunnel after another. An opted-in upgrade
//!   (`X-Hyrelay-Reuse: 1`, a bridge's connect or an hcm's pooled `listen`) whose 101 says
//!   `X-Hyrelay-Reuse: 1` (the relay's promise for that connection) is not closed when its
//!   tunnel ends with the close handshake complete in both directions (each Close
//!   forwarded): a sender's connection is read for a new request head, as a new connection
//!   is after TLS (within the head timeout, authenticated from scratch), which the bridge
//!   sends for its next app connection or it closes the connection; a pooled rendezvous
//!   connection, if both Closes were normal (1000 or none), goes back into the pool as it
//!   was (its Listen token checked again whenever it is taken), and the hcm waits on it for
//!   the next `accept` or retires it as any pooled connection. What came after a Close is
//!   never tunnel data: it is the next request, or on a pooled connection the retire ping.
//!   Any other end closes the connection as before. The relay promises it only where it
//!   can keep it (not on the completion backend, whose tunnels end by closing).
//! - A pooled rendezvous connection's 101 also names the relay node it reached
//!   (`X-Hyrelay-Node: ws(s)://host[:port]`, the base of that node's accept addresses), so
//!   the hcm sizes its pool by the senders of the nodes its pool is on.
//!
//! Parsing never fails: unknown tokens are ignored, so relays can add extensions later.

/// Response header carrying the advertisement.
pub const ADVERTISE_HEADER: &str = "X-Hyrelay-Extensions";
/// Request header of a pooled rendezvous connection (value `1`).
pub const POOL_HEADER: &str = "X-Hyrelay-Pool";
/// Response header of a pooled rendezvous connection's 101: the base URL of the accept
/// addresses of the relay node it reached.
pub const NODE_HEADER: &str = "X-Hyrelay-Node";
/// Request header of a sender that sends early data and accepts a pooled rendezvous.
pub const EARLY_HEADER: &str = "X-Hyrelay-Early";
/// Request header (value `1`) of a client that can reuse its connection after a tunnel;
/// the same header on the 101 is the relay's promise to keep it.
pub const REUSE_HEADER: &str = "X-Hyrelay-Reuse";

/// True if an opt-in or promise header's `value` ([`POOL_HEADER`], [`EARLY_HEADER`],
/// [`REUSE_HEADER`]) says yes (`1`).
pub fn flag_set(value: Option<&str>) -> bool {
    value.map(str::trim) == Some("1")
}

/// What a relay offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Advertised {
    pub rendezvous_pool: bool,
    pub early_data: bool,
    /// Connections may carry one tunnel after another (see the module's docs).
    pub reuse: bool,
    /// The relay's head timeout in seconds, if it said.
    pub head_timeout_secs: Option<u32>,
}

impl Advertised {
    /// Parses the header value (`None`: the relay sent no header, so nothing is offered).
    pub fn parse(value: Option<&str>) -> Self {
        let mut a = Self::default();
        for token in value.unwrap_or_default().split(',') {
            let (name, arg) = match token.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (token.trim(), None),
            };
            if name.eq_ignore_ascii_case("rendezvous-pool") {
                a.rendezvous_pool = true;
            } else if name.eq_ignore_ascii_case("early-data") {
                a.early_data = true;
            } else if name.eq_ignore_ascii_case("reuse") {
                a.reuse = true;
            } else if name.eq_ignore_ascii_case("head-timeout") {
                a.head_timeout_secs = arg.and_then(|v| v.parse().ok()).filter(|s| *s > 0);
            }
        }
        a
    }

    /// The header value; `None` when nothing is offered.
    pub fn header_value(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.rendezvous_pool {
            parts.push("rendezvous-pool".to_owned());
        }
        if self.early_data {
            parts.push("early-data".to_owned());
        }
        if self.reuse {
            parts.push("reuse".to_owned());
        }
        if !parts.is_empty()
            && let Some(s) = self.head_timeout_secs
        {
            parts.push(format!("head-timeout={s}"));
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tolerance() {
        let a = Advertised {
            rendezvous_pool: true,
            early_data: true,
            reuse: true,
            head_timeout_secs: Some(10),
        };
        let v = a.header_value().unwrap();
        assert_eq!(v, "rendezvous-pool, early-data, reuse, head-timeout=10");
        assert_eq!(Advertised::parse(Some(&v)), a);
        assert_eq!(Advertised::parse(None), Advertised::default());
        assert_eq!(Advertised::default().header_value(), None);
        assert!(flag_set(Some(" 1")) && !flag_set(Some("0")) && !flag_set(None));
        let odd = Advertised::parse(Some("Early-Data , future-thing=3,head-timeout=x,,"));
        assert_eq!(
            odd,
            Advertised {
                early_data: true,
                ..Default::default()
            }
        );
    }
}
