//! Which endpoints an hcm may dial: the `allowed_endpoints` list of the hcm config.
//!
//! An empty list allows every endpoint (what Microsoft's HCM does). Otherwise an endpoint
//! `host:port` (from the hybrid connection's metadata or the config's override) must match
//! one entry:
//!
//! | entry | matches |
//! |---|---|
//! | `db.corp.local:5432` | that host (case-insensitive) and port |
//! | `db.corp.local:*` | that host, any port |
//! | `*.corp.local:5432` | any name below `corp.local` (not `corp.local` itself), that port |
//! | `10.0.0.0/8:5432`, `[fd00::/8]:*` | an endpoint written as an IP address inside the range |
//! | `*:443` | any host, that port |
//!
//! Entries match the endpoint as it is written: a CIDR entry does not match a host name
//! that happens to resolve into the range, and a name entry does not match an IP address.
//! IPv6 addresses are written in brackets (`[::1]:5432`, `[fd00::/8]:*`).

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::proto::metadata::HostPort;

/// The host part of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    Any,
    /// A host name, lower-case.
    Name(String),
    Ip(IpAddr),
    /// `*.suffix`: the lower-case suffix with its leading dot.
    Below(String),
    Cidr(IpAddr, u8),
}

/// One `allowed_endpoints` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointRule {
    host: HostPattern,
    /// `None` for `*`.
    port: Option<u16>,
    text: String,
}

impl FromStr for EndpointRule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let bad = |why: &str| format!("{text:?}: {why} (expected HOST:PORT, HOST:*, *.DOMAIN:PORT or CIDR:PORT)");
        let (host, port) = text.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port = match port {
            "*" => None,
            p => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("port must be 1-65535 or *"))?,
            ),
        };
        let host = parse_host(host.trim_start_matches('[').trim_end_matches(']')).map_err(|e| bad(&e))?;
        Ok(Self {
            host,
            port,
            text: text.to_owned(),
        })
    }
}

fn parse_host(h: &str) -> Result<HostPattern, String> {
    if h.is_empty() {
        return Err("empty host".into());
    }
    if h == "*" {
        return Ok(HostPattern::Any);
    }
    if let Some((ip, bits)) = h.split_once('/') {
        let ip: IpAddr = ip.parse().map_err(|_| format!("{ip:?} is not an IP address"))?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let bits = bits
            .parse::<u8>()
            .ok()
            .filter(|b| *b <= max)
            .ok_or_else(|| format!("prefix length must be 0-{max}"))?;
        return Ok(HostPattern::Cidr(ip, bits));
    }
    if let Ok(ip) = h.parse::<IpAddr>() {
        return Ok(HostPattern::Ip(ip));
    }
    let wildcard_ok = h.starts_with("*.") && !h[2..].contains('*');
    if h.contains(['*', '/', ' ']) && !wildcard_ok {
        return Err("`*` is allowed only as the whole host or as a leading `*.`".into());
    }
    let lower = h.to_ascii_lowercase();
    Ok(match lower.strip_prefix('*') {
        Some(suffix) => HostPattern::Below(suffix.to_owned()),
        None => HostPattern::Name(lower),
    })
}

impl EndpointRule {
    /// True if `ep` matches this entry.
    pub fn matches(&self, ep: &HostPort) -> bool {
        if self.port.is_some_and(|p| p != ep.port) {
            return false;
        }
        let host = ep.bare_host();
        let ip = host.parse::<IpAddr>().ok().map(|i| i.to_canonical());
        match (&self.host, ip) {
            (HostPattern::Any, _) => true,
            (HostPattern::Ip(a), Some(b)) => a.to_canonical() == b,
            (HostPattern::Cidr(net, bits), Some(b)) => in_cidr(*net, *bits, b),
            (HostPattern::Name(n), None) => host.eq_ignore_ascii_case(n),
            (HostPattern::Below(s), None) => host.len() > s.len() && host.to_ascii_lowercase().ends_with(s.as_str()),
            _ => false,
        }
    }
}

/// True if `ip` lies in `net/bits` (IPv4-mapped IPv6 addresses count as IPv4).
fn in_cidr(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    let (net, ip) = (net.to_canonical(), ip.to_canonical());
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => prefix_eq(u32::from(n).into(), u32::from(i).into(), bits, 32),
        (IpAddr::V6(n), IpAddr::V6(i)) => prefix_eq(u128::from(n), u128::from(i), bits, 128),
        _ => false,
    }
}

fn prefix_eq(a: u128, b: u128, bits: u8, width: u32) -> bool {
    let shift = width - u32::from(bits);
    shift >= width || (a >> shift) == (b >> shift)
}

impl fmt::Display for EndpointRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The whole list; empty allows everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList(pub Vec<EndpointRule>);

impl AllowList {
    /// True if the hcm may dial `ep`.
    pub fn allows(&self, ep: &HostPort) -> bool {
        self.0.is_empty() || self.0.iter().any(|r| r.matches(ep))
    }

    /// Parses the config entries; the error gives the index of the bad one and why.
    pub fn parse(entries: &[String]) -> Result<Self, (usize, String)> {
        entries
            .iter()
            .enumerate()
            .map(|(i, e)| e.parse().map_err(|err| (i, err)))
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn ep(s: &str) -> HostPort {
        s.parse().unwrap()
    }

    #[test]
    fn empty_allows_all() {
        assert!(AllowList::default().allows(&ep("anything.example:1")));
    }

    #[test]
    fn entry_forms() {
        let l = list(&[
            "db.corp.local:5432",
            "api.corp.local:*",
            "*.lab.example:8080",
            "10.0.0.0/8:5432",
            "[fd00::/8]:*",
            "192.168.1.5:22",
            "*:443",
        ]);
        for ok in [
            "DB.corp.local:5432",
            "api.corp.local:1",
            "x.lab.example:8080",
            "a.b.lab.example:8080",
            "10.1.2.3:5432",
            "[fd00::1]:9",
            "192.168.1.5:22",
            "[::ffff:10.9.9.9]:5432",
            "evil.example:443",
        ] {
            assert!(l.allows(&ep(ok)), "{ok} should be allowed");
        }
        for no in [
            "db.corp.local:5433",
            "lab.example:8080",
            "xlab.example:8080",
            "11.0.0.1:5432",
            "[fe80::1]:9",
            "192.168.1.6:22",
            "db.corp.local.evil:5432",
        ] {
            assert!(!l.allows(&ep(no)), "{no} should be refused");
        }
    }

    #[test]
    fn cidr_matches_ip_literals_only() {
        let l = list(&["127.0.0.0/8:*"]);
        assert!(l.allows(&ep("127.0.0.1:80")));
        assert!(
            !l.allows(&ep("localhost:80")),
            "names are not resolved for CIDR entries"
        );
        assert!(list(&["0.0.0.0/0:*"]).allows(&ep("1.2.3.4:5")));
    }

    #[test]
    fn bad_entries() {
        for bad in [
            "db",
            "db:0",
            "db:x",
            "10.0.0.0/33:1",
            "a*b:1",
            "*.*.x:1",
            ":5",
            "nope/8:1",
        ] {
            assert!(bad.parse::<EndpointRule>().is_err(), "{bad} should not parse");
        }
        let (i, _) = AllowList::parse(&["ok:1".into(), "bad".into()]).unwrap_err();
        assert_eq!(i, 1);
    }
}
