//! hyrelay-to-hyrelay extensions, sans-IO: what a relay advertises and how our hcm and
//! bridge opt in. None of this is part of the Azure Relay protocol; Microsoft's clients
//! never send the opt-in headers and ignore the advertisement (an unknown response header).
//!
//! - The relay advertises on every 101 it sends (control channels, senders, rendezvous):
//!   `X-Hyrelay-Extensions: rendezvous-pool, early-data, head-timeout=10`.
//! - `rendezvous-pool`: a listener may open pre-authenticated rendezvous connections (a
//!   `listen` upgrade with `X-Hyrelay-Pool: 1` and its Listen token); the relay hands an
//!   opted-in sender to one of them directly with the `accept` as the first text frame.
//! - `early-data`: a sender with `X-Hyrelay-Early: 1` may send WebSocket frames right
//!   behind its upgrade request; the relay holds them (bounded) until the tunnel is joined,
//!   and may answer it from the rendezvous pool.
//! - `head-timeout=N`: seconds the relay waits for a request head after TCP (and TLS); a
//!   bridge keeps warm connections younger than that.
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

/// What a relay offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Advertised {
    pub rendezvous_pool: bool,
    pub early_data: bool,
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
            head_timeout_secs: Some(10),
        };
        let v = a.header_value().unwrap();
        assert_eq!(v, "rendezvous-pool, early-data, head-timeout=10");
        assert_eq!(Advertised::parse(Some(&v)), a);
        assert_eq!(Advertised::parse(None), Advertised::default());
        assert_eq!(Advertised::default().header_value(), None);
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
