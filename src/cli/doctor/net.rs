//! The network steps: DNS and TCP for the relay and for the endpoint, and the relay's TLS
//! (verification, version, certificate expiry).
//!
//! The TLS step runs over the TCP connection the TCP step made, so the two report on the
//! same address. Endpoint checks run from this host: what matters is the hcm's host.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use rustls::{CertificateError, ProtocolVersion};
use tokio::net::TcpStream;

use super::{Checkup, Step, StepResult};
use crate::proto::metadata::{HostPort, endpoint_from_user_metadata};
use crate::proto::sas::unix_now;

/// A certificate expiring sooner than this is a warning.
const EXPIRY_WARNING_DAYS: i64 = 14;

/// Step 1: the relay host resolves.
pub(super) async fn relay_dns(c: &mut Checkup<'_>) -> StepResult {
    if let Some(p) = &c.via_proxy {
        return StepResult::skip(Step::RelayDns, format!("the proxy {p} resolves the relay's name"));
    }
    if let Some(why) = &c.relay_blocked {
        return StepResult::skip(Step::RelayDns, format!("skipped: {why}"));
    }
    let ep = &c.cs().endpoint;
    let (host, port) = (bare(&ep.host).to_owned(), ep.port);
    match resolve(c, &host, port).await {
        Ok((addrs, finding)) => {
            c.relay_addrs = addrs;
            StepResult::ok(Step::RelayDns, finding)
        }
        Err(finding) => {
            c.relay_blocked = Some(format!("the relay host {host} does not resolve"));
            let fix = "check the host in the connection string's Endpoint, and this host's DNS (resolv.conf, VPN, corporate DNS)";
            StepResult::fail(Step::RelayDns, finding, fix)
        }
    }
}

/// Step 2: a TCP connection to the relay port.
pub(super) async fn relay_tcp(c: &mut Checkup<'_>) -> StepResult {
    if let Some(why) = &c.relay_blocked {
        return StepResult::skip(Step::RelayTcp, format!("skipped: {why}"));
    }
    if let Some(p) = &c.via_proxy {
        return StepResult::ok(Step::RelayTcp, format!("through the tunnel {p} opened (see proxy)"));
    }
    match connect_any(c, &c.relay_addrs).await {
        Ok((tcp, finding)) => {
            c.relay_tcp = Some(tcp);
            StepResult::ok(Step::RelayTcp, finding)
        }
        Err(finding) => {
            let port = c.cs().endpoint.port;
            c.relay_blocked = Some(format!("no TCP connection to the relay on port {port}"));
            let fix = format!(
                "check that the relay runs and listens on port {port}, and that firewalls and proxies let this host open outbound TCP to it"
            );
            StepResult::fail(Step::RelayTcp, finding, fix)
        }
    }
}

/// Step 3: TLS handshake, verified against the system store and the CA files.
pub(super) async fn tls(c: &mut Checkup<'_>) -> StepResult {
    if let Some(why) = &c.relay_blocked {
        return StepResult::skip(Step::Tls, format!("skipped: {why}"));
    }
    let tcp = c.relay_tcp.take();
    if !c.cs().endpoint.tls {
        return StepResult::skip(
            Step::Tls,
            "plain ws:// endpoint: no TLS to check (fine behind a TLS terminator or in a test, not across the internet)",
        );
    }
    let cfg = match (&c.tls, &c.tls_error) {
        (Some(cfg), None) => cfg.clone(),
        (_, e) => {
            c.relay_blocked = Some("no TLS trust store".into());
            let e = e.as_deref().unwrap_or("no TLS configuration");
            return StepResult::fail(
                Step::Tls,
                format!("cannot load the trust store: {e}"),
                "check the --ca-file paths (PEM files)",
            );
        }
    };
    let host = bare(&c.cs().endpoint.host).to_owned();
    let Some(tcp) = tcp else {
        c.relay_blocked = Some("no TCP connection to the relay".into());
        return StepResult::fail(Step::Tls, "no connection to run TLS over", "rerun the check");
    };
    let result = handshake(c, cfg, tcp, &host).await;
    if result.verdict == super::Verdict::Fail {
        c.relay_blocked = Some("the TLS handshake with the relay failed".into());
    }
    result
}

async fn handshake(c: &Checkup<'_>, cfg: Arc<rustls::ClientConfig>, tcp: TcpStream, host: &str) -> StepResult {
    let name = match rustls::pki_types::ServerName::try_from(host.to_owned()) {
        Ok(n) => n,
        Err(e) => {
            return StepResult::fail(
                Step::Tls,
                format!("{host:?} is not a valid TLS server name: {e}"),
                "fix the Endpoint host",
            );
        }
    };
    let connecting = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp);
    let stream = match c.within(connecting).await {
        Some(Ok(s)) => s,
        Some(Err(e)) => return tls_failure(&e, host, c.cs().endpoint.port),
        None => {
            let finding = format!("no TLS handshake within {}", c.timeout_text());
            let fix = "check that this port serves TLS (a relay started with --plain needs Endpoint=ws://HOST:PORT/) and that no proxy holds the connection";
            return StepResult::fail(Step::Tls, finding, fix);
        }
    };
    let conn = stream.get_ref().1;
    let version = conn.protocol_version().map(version_name).unwrap_or("TLS ?");
    let trust = trust_text(c.opts.ca_files.len());
    let leaf = conn.peer_certificates().and_then(|chain| chain.first());
    let Some(not_after) = leaf.and_then(|der| crate::transport::cert::not_after(der)) else {
        return StepResult::ok(
            Step::Tls,
            format!("{version}, certificate verified for {host} ({trust}); expiry unreadable"),
        );
    };
    expiry_verdict(version, host, &trust, not_after)
}

/// OK with the days left, or WARN under [`EXPIRY_WARNING_DAYS`].
fn expiry_verdict(version: &str, host: &str, trust: &str, not_after: i64) -> StepResult {
    let days = (not_after - unix_now() as i64).div_euclid(86_400);
    let date = u64::try_from(not_after)
        .ok()
        .map(|s| humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(s)).to_string())
        .unwrap_or_else(|| "before 1970".into());
    let finding = format!("{version}, certificate verified for {host} ({trust}), expires {date} ({days} days left)");
    if days < EXPIRY_WARNING_DAYS {
        StepResult::warn(
            Step::Tls,
            finding,
            "renew the relay's certificate before it expires: clients refuse it from then on",
        )
    } else {
        StepResult::ok(Step::Tls, finding)
    }
}

fn trust_text(ca_files: usize) -> String {
    match ca_files {
        0 => "system store".into(),
        1 => "system store + 1 CA file".into(),
        n => format!("system store + {n} CA files"),
    }
}

fn version_name(v: ProtocolVersion) -> &'static str {
    match v {
        ProtocolVersion::TLSv1_3 => "TLS 1.3",
        ProtocolVersion::TLSv1_2 => "TLS 1.2",
        _ => "TLS (old version)",
    }
}

/// A failed handshake as a finding and the fix for its cause.
fn tls_failure(e: &io::Error, host: &str, port: u16) -> StepResult {
    let rustls_error = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let (finding, fix) = match rustls_error {
        Some(rustls::Error::InvalidCertificate(ce)) => certificate_problem(ce, host),
        Some(rustls::Error::AlertReceived(alert)) => (
            format!("the relay aborted the handshake (alert {alert:?})"),
            "the relay may not offer TLS 1.2/1.3 or a certificate for this name; check its TLS settings".to_owned(),
        ),
        _ => (
            format!("TLS handshake failed: {e}"),
            format!(
                "check that {host}:{port} serves TLS (a relay started with --plain needs Endpoint=ws://{host}:{port}/) and that no proxy intercepts it"
            ),
        ),
    };
    StepResult::fail(Step::Tls, finding, fix)
}

fn certificate_problem(ce: &CertificateError, host: &str) -> (String, String) {
    match ce {
        CertificateError::UnknownIssuer => (
            "the relay's certificate is not issued by a CA trusted here".into(),
            "pass the issuing CA with --ca-file (for a relay with --self-signed: <relay data dir>/tls/ca.pem), or add it to the system store".into(),
        ),
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => (
            format!("the relay's certificate is not valid for {host}"),
            format!("use the host name the certificate names in Endpoint, or reissue the certificate for {host}"),
        ),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => (
            "the relay's certificate has expired".into(),
            "renew the relay's certificate (and check this host's clock)".into(),
        ),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => (
            "the relay's certificate is not valid yet".into(),
            "check this host's clock, and the certificate's notBefore".into(),
        ),
        other => (
            format!("the relay's certificate is rejected: {other:?}"),
            "reissue the relay's certificate (a server certificate with the relay's name, signed by a trusted CA)".into(),
        ),
    }
}

/// Step 7: the endpoint resolves (from this host).
pub(super) async fn endpoint_dns(c: &mut Checkup<'_>) -> StepResult {
    let ep = match endpoint(c) {
        Ok(ep) => ep,
        Err(r) => {
            c.endpoint_blocked = Some("no endpoint to check".into());
            return r;
        }
    };
    match resolve(c, ep.bare_host(), ep.port).await {
        Ok((addrs, finding)) => {
            c.endpoint_addrs = addrs;
            StepResult::ok(
                Step::EndpointDns,
                format!("{finding} (from this host; the hcm's host is what matters)"),
            )
        }
        Err(finding) => {
            c.endpoint_blocked = Some(format!("the endpoint host {} does not resolve", ep.bare_host()));
            let fix = "run this on the hcm's host; if it fails there too, fix the endpoint name (hybrid connection metadata or hcm config) or that host's DNS / hosts file";
            StepResult::fail(Step::EndpointDns, finding, fix)
        }
    }
}

/// Step 8: a TCP connection to the endpoint.
pub(super) async fn endpoint_tcp(c: &mut Checkup<'_>) -> StepResult {
    if let Some(why) = &c.endpoint_blocked {
        return StepResult::skip(Step::EndpointTcp, format!("skipped: {why}"));
    }
    match connect_any(c, &c.endpoint_addrs).await {
        Ok((_tcp, finding)) => StepResult::ok(Step::EndpointTcp, format!("{finding} (from this host)")),
        Err(finding) => {
            let fix = "start the service, or correct the endpoint; run this on the hcm's host and check firewalls between it and the endpoint";
            StepResult::fail(Step::EndpointTcp, finding, fix)
        }
    }
}

/// The endpoint: `--endpoint`, else the hybrid connection's metadata; otherwise the
/// verdict explaining why there is none.
fn endpoint(c: &Checkup<'_>) -> Result<HostPort, StepResult> {
    if let Some(ep) = &c.opts.endpoint {
        return Ok(ep.clone());
    }
    let skip = |why: &str| Err(StepResult::skip(Step::EndpointDns, why));
    let Some(entity) = c.entity() else {
        return skip("no --endpoint, and a namespace-wide string names no hybrid connection to read one from");
    };
    let Some(info) = &c.info else {
        return skip("no --endpoint, and the hybrid connection's metadata could not be read (see above)");
    };
    match endpoint_from_user_metadata(&info.user_metadata) {
        Ok(Some(ep)) => Ok(ep),
        Ok(None) => Err(StepResult::warn(
            Step::EndpointDns,
            format!("hybrid connection {entity} has no endpoint metadata: an hcm has nowhere to connect senders"),
            format!(
                "recreate it with --endpoint HOST:PORT (hyrelay hc create {entity} --endpoint HOST:PORT) or set the endpoint in the hcm's config; pass --endpoint to check one"
            ),
        )),
        Err(e) => Err(StepResult::fail(
            Step::EndpointDns,
            format!("hybrid connection {entity} has malformed endpoint metadata: {e}"),
            "recreate the hybrid connection with --endpoint HOST:PORT",
        )),
    }
}

/// Resolves `host:port` within the timeout: the addresses and a finding, or a finding.
async fn resolve(c: &Checkup<'_>, host: &str, port: u16) -> Result<(Vec<SocketAddr>, String), String> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Ok((
            vec![SocketAddr::new(ip, port)],
            format!("{host} is an IP address (no lookup)"),
        ));
    }
    let started = Instant::now();
    match c.within(tokio::net::lookup_host((host, port))).await {
        Some(Ok(addrs)) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            if addrs.is_empty() {
                return Err(format!("{host} resolves to no address"));
            }
            let list: Vec<String> = addrs.iter().map(|a| a.ip().to_string()).collect();
            Ok((
                addrs,
                format!("{host} → {} ({} ms)", list.join(", "), started.elapsed().as_millis()),
            ))
        }
        Some(Err(e)) => Err(format!("{host} does not resolve: {e}")),
        None => Err(format!("no answer resolving {host} within {}", c.timeout_text())),
    }
}

/// Connects to the first address that answers, all within the timeout.
async fn connect_any(c: &Checkup<'_>, addrs: &[SocketAddr]) -> Result<(TcpStream, String), String> {
    let started = Instant::now();
    let mut errors = Vec::new();
    let attempt = async {
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(s) => return Some((s, *addr)),
                Err(e) => errors.push(describe_connect_error(*addr, &e)),
            }
        }
        None
    };
    let outcome = c.within(attempt).await;
    match outcome {
        Some(Some((s, addr))) => Ok((
            s,
            format!("connected to {addr} in {} ms", started.elapsed().as_millis()),
        )),
        Some(None) => Err(errors.join("; ")),
        None => {
            let pending = addrs.get(errors.len()).map(|a| a.to_string()).unwrap_or_default();
            errors.push(format!(
                "no answer from {pending} within {} (a firewall may drop the packets)",
                c.timeout_text()
            ));
            Err(errors.join("; "))
        }
    }
}

fn describe_connect_error(addr: SocketAddr, e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => format!("{addr} refused the connection (nothing listens there)"),
        _ => format!("cannot connect to {addr}: {e}"),
    }
}

/// Host without IPv6 brackets.
fn bare(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::Verdict;

    /// Unix time `days` (and an hour) from now.
    fn in_days(days: i64) -> i64 {
        unix_now() as i64 + days * 86_400 + 3_600
    }

    #[test]
    fn expiry_thresholds() {
        let r = expiry_verdict("TLS 1.3", "relay", "system store", in_days(400));
        assert_eq!(r.verdict, Verdict::Ok, "{r}");
        assert!(r.finding.contains("400 days left"), "{r}");
        let r = expiry_verdict("TLS 1.3", "relay", "system store", in_days(13));
        assert_eq!(r.verdict, Verdict::Warn, "{r}");
        assert!(r.finding.contains("13 days left"), "{r}");
        assert_eq!(
            expiry_verdict("TLS 1.2", "relay", "x", in_days(14)).verdict,
            Verdict::Ok
        );
    }

    #[test]
    fn certificate_problems_name_the_fix() {
        let (_, fix) = certificate_problem(&CertificateError::UnknownIssuer, "relay");
        assert!(fix.contains("--ca-file"));
        let (finding, _) = certificate_problem(&CertificateError::NotValidForName, "relay.example");
        assert!(finding.contains("relay.example"));
    }
}
