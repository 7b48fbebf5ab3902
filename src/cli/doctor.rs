//! `hyrelay doctor`: the hybrid-connection troubleshooting checklist as a command.
//!
//! Given a connection string (and optionally an endpoint) it runs nine steps in order and
//! gives one verdict per step: the outbound proxy, relay DNS, relay TCP, TLS, the WebSocket
//! upgrade on `/$hc/{entity}`, the token, the listener count, endpoint DNS and endpoint TCP.
//! With a proxy in effect for the relay, every relay step goes through it. With
//! `--http PATH` a tenth step sends one plain HTTP request through the relay to the listener.
//!
//! Invariants:
//! - Every network operation is bounded by [`Options::timeout`], so no step hangs (the
//!   token step may make two tests, listen then send, when the key name does not tell).
//! - A step whose precondition failed (the relay is unreachable, the token was refused, no
//!   endpoint is known) is `SKIP`, naming the earlier finding, so one fault is reported once.
//! - The checks leave nothing behind: a listen probe closes its control channel at once
//!   (and waits for the relay to drop it, so the listener count is not inflated), a send
//!   probe closes its test connection at once.
//! - No key or token is ever part of a finding; findings are scrubbed of the string's
//!   secrets before anyone sees them, as a last line of defence.

mod http;
mod listeners;
mod net;
mod probe;
mod proxy;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use percent_encoding::percent_decode_str;
use serde_json::json;

use crate::proto::connstr::{ConnectionString, Credential};
use crate::proto::metadata::{HostPort, RuntimeInfo};

/// `hyrelay doctor` command line.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The connection string to check: a hybrid connection's Listen or Send string (with
    /// EntityPath), or a namespace-wide one.
    #[command(flatten)]
    connection_string: super::secret_args::ConnStrArg,
    /// Check this endpoint instead of the one in the hybrid connection's metadata.
    #[arg(long, value_name = "HOST:PORT")]
    endpoint: Option<HostPort>,
    /// Extra CA certificate to trust (PEM), besides the system store; repeatable.
    #[arg(long, env = "HYRELAY_CA_FILE")]
    ca_file: Vec<PathBuf>,
    /// Time limit of each step: `5s`, `500ms`, `1m` (a bare number is seconds).
    #[arg(long, default_value = "5s", value_parser = parse_timeout)]
    timeout: Duration,
    /// One JSON object per step instead of text lines.
    #[arg(long)]
    json: bool,
    /// HTTP proxy to reach the relay through: `http://[USER:PASSWORD@]HOST:PORT`. Default:
    /// HTTPS_PROXY, else ALL_PROXY (NO_PROXY lists hosts reached directly).
    #[arg(long, value_name = "URL")]
    proxy: Option<String>,
    /// Also send `GET /{hybrid connection}PATH` through the relay (HTTP request/response
    /// mode) and check that the listener answers; needs a Send connection string.
    #[arg(long, value_name = "PATH", value_parser = parse_http_path)]
    http: Option<String>,
}

/// What to check.
#[derive(Debug, Clone)]
pub struct Options {
    pub connection_string: ConnectionString,
    /// The endpoint to check; default: the `endpoint` metadata of the hybrid connection.
    pub endpoint: Option<HostPort>,
    /// Extra CA files trusted besides the system store.
    pub ca_files: Vec<PathBuf>,
    /// Time limit of each step. Default: 5 s.
    pub timeout: Duration,
    /// How the relay is reached. Default: directly.
    pub proxy: crate::transport::proxy::ProxyConfig,
    /// `--http PATH`: send one HTTP-mode request to this path. Default: none.
    pub http_path: Option<String>,
}

impl Options {
    /// Options for `cs` with no endpoint override, no extra CA and a 5 s timeout.
    pub fn new(connection_string: ConnectionString) -> Self {
        Self {
            connection_string,
            endpoint: None,
            ca_files: Vec::new(),
            timeout: Duration::from_secs(5),
            proxy: Default::default(),
            http_path: None,
        }
    }
}

/// The checks, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    Proxy,
    RelayDns,
    RelayTcp,
    Tls,
    Upgrade,
    Token,
    Listeners,
    EndpointDns,
    EndpointTcp,
    /// Only with `--http PATH`, after the others.
    Http,
}

impl Step {
    /// Every step, in order.
    pub const ALL: [Step; 9] = [
        Step::Proxy,
        Step::RelayDns,
        Step::RelayTcp,
        Step::Tls,
        Step::Upgrade,
        Step::Token,
        Step::Listeners,
        Step::EndpointDns,
        Step::EndpointTcp,
    ];

    /// The name printed in a verdict line.
    pub fn name(self) -> &'static str {
        match self {
            Step::Proxy => "proxy",
            Step::RelayDns => "relay-dns",
            Step::RelayTcp => "relay-tcp",
            Step::Tls => "tls",
            Step::Upgrade => "websocket",
            Step::Token => "token",
            Step::Listeners => "listeners",
            Step::EndpointDns => "endpoint-dns",
            Step::EndpointTcp => "endpoint-tcp",
            Step::Http => "http",
        }
    }
}

/// A step's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verdict {
    Ok,
    /// Works now, but something needs attention (a certificate about to expire, …).
    Warn,
    /// Broken; the finding says what, the fix what to try.
    Fail,
    /// Not checked, because an earlier step failed or there is nothing to check.
    Skip,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "OK",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        }
    }
}

/// One verdict line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepResult {
    pub step: Step,
    pub verdict: Verdict,
    /// What was found.
    pub finding: String,
    /// What to try; set for failures and for warnings that have a remedy.
    pub fix: Option<String>,
}

impl StepResult {
    fn new(step: Step, verdict: Verdict, finding: impl Into<String>, fix: Option<String>) -> Self {
        Self {
            step,
            verdict,
            finding: finding.into(),
            fix,
        }
    }

    pub(crate) fn ok(step: Step, finding: impl Into<String>) -> Self {
        Self::new(step, Verdict::Ok, finding, None)
    }

    pub(crate) fn warn(step: Step, finding: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(step, Verdict::Warn, finding, Some(fix.into()))
    }

    pub(crate) fn fail(step: Step, finding: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(step, Verdict::Fail, finding, Some(fix.into()))
    }

    pub(crate) fn skip(step: Step, why: impl Into<String>) -> Self {
        Self::new(step, Verdict::Skip, why, None)
    }

    /// The step as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "step": self.step.name(),
            "verdict": self.verdict.as_str(),
            "finding": self.finding,
            "fix": self.fix,
        })
    }
}

impl fmt::Display for StepResult {
    /// `FAIL  token         <finding> — fix: <fix>`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<4}  {:<12}  {}",
            self.verdict.as_str(),
            self.step.name(),
            self.finding
        )?;
        match &self.fix {
            Some(fix) => write!(f, " — fix: {fix}"),
            None => Ok(()),
        }
    }
}

/// Runs every step and returns the verdicts in order.
pub async fn run_checks(opts: &Options) -> Vec<StepResult> {
    let mut out = Vec::with_capacity(Step::ALL.len());
    check_each(opts, |r| out.push(r.clone())).await;
    out
}

/// Runs every step, handing each verdict to `on_step` as soon as it is known.
pub async fn check_each(opts: &Options, mut on_step: impl FnMut(&StepResult)) {
    let mut c = Checkup::new(opts);
    for step in Step::ALL {
        let mut r = match step {
            Step::Proxy => proxy::proxy(&mut c).await,
            Step::RelayDns => net::relay_dns(&mut c).await,
            Step::RelayTcp => net::relay_tcp(&mut c).await,
            Step::Tls => net::tls(&mut c).await,
            Step::Upgrade => probe::upgrade(&mut c).await,
            Step::Token => probe::token(&mut c).await,
            Step::Listeners => listeners::listeners(&mut c).await,
            Step::EndpointDns => net::endpoint_dns(&mut c).await,
            Step::EndpointTcp => net::endpoint_tcp(&mut c).await,
            Step::Http => unreachable!("not in Step::ALL"),
        };
        c.redact(&mut r);
        on_step(&r);
    }
    if let Some(path) = &opts.http_path {
        let mut r = http::http(&mut c, path).await;
        c.redact(&mut r);
        on_step(&r);
    }
}

/// What the steps learn and hand on to later steps.
struct Checkup<'a> {
    opts: &'a Options,
    /// Client TLS config: the system store and the CA files (or, if those could not be
    /// loaded, the system store alone, which is all a plain `ws://` relay needs).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Why the CA files could not be loaded.
    tls_error: Option<String>,
    relay_addrs: Vec<SocketAddr>,
    /// The connection made by the TCP step (or the proxy's tunnel), reused by the TLS step.
    relay_tcp: Option<tokio::net::TcpStream>,
    /// The proxy (as shown) whose tunnel stands in for the relay TCP connection.
    via_proxy: Option<String>,
    /// Why the relay cannot be talked to; later relay steps skip with this.
    relay_blocked: Option<String>,
    /// Why the token step did not pass; the listener step skips with this.
    token_blocked: Option<String>,
    /// Runtime information of the hybrid connection, once read.
    info: Option<RuntimeInfo>,
    /// The management list, for a namespace-wide Manage string.
    namespace_list: Option<Vec<serde_json::Value>>,
    endpoint_addrs: Vec<SocketAddr>,
    /// Why the endpoint cannot be checked; the endpoint TCP step skips with this.
    endpoint_blocked: Option<String>,
    /// Texts that must never appear in a finding.
    secrets: Vec<String>,
}

impl<'a> Checkup<'a> {
    fn new(opts: &'a Options) -> Self {
        let (tls, tls_error) = match crate::transport::tls::client_config(&opts.ca_files) {
            Ok(t) => (Some(t), None),
            Err(e) => (crate::transport::tls::client_config(&[]).ok(), Some(format!("{e:#}"))),
        };
        let mut c = Self {
            opts,
            tls,
            tls_error,
            relay_addrs: Vec::new(),
            relay_tcp: None,
            via_proxy: None,
            relay_blocked: None,
            token_blocked: None,
            info: None,
            namespace_list: None,
            endpoint_addrs: Vec::new(),
            endpoint_blocked: None,
            secrets: Vec::new(),
        };
        match &opts.connection_string.credential {
            Credential::Key { key, .. } => c.secrets.push(key.expose().to_owned()),
            Credential::Token(t) => c.remember_token(t.expose()),
        }
        c
    }

    fn cs(&self) -> &ConnectionString {
        &self.opts.connection_string
    }

    fn entity(&self) -> Option<&str> {
        self.cs().entity_path.as_deref()
    }

    /// Records a token (and its signature, raw and decoded) as secret.
    fn remember_token(&mut self, token: &str) {
        self.secrets.push(token.to_owned());
        for sig in token.split(['&', ' ']).filter_map(|p| p.strip_prefix("sig=")) {
            self.secrets.push(sig.to_owned());
            self.secrets
                .push(percent_decode_str(sig).decode_utf8_lossy().into_owned());
        }
    }

    /// Replaces every secret in `r`'s texts with `***`.
    fn redact(&self, r: &mut StepResult) {
        for s in self.secrets.iter().filter(|s| s.len() >= 8) {
            if r.finding.contains(s.as_str()) {
                r.finding = r.finding.replace(s.as_str(), "***");
            }
            if let Some(fix) = r.fix.as_mut().filter(|f| f.contains(s.as_str())) {
                *fix = fix.replace(s.as_str(), "***");
            }
        }
    }

    /// Runs `f` within the step timeout; `None` when it ran out.
    async fn within<T>(&self, f: impl Future<Output = T>) -> Option<T> {
        tokio::time::timeout(self.opts.timeout, f).await.ok()
    }

    /// The verdict of a step that needs TLS when the CA files could not be loaded.
    fn no_tls(&self, step: Step) -> StepResult {
        let e = self.tls_error.as_deref().unwrap_or("no TLS configuration");
        StepResult::fail(
            step,
            format!("cannot load the trust store: {e}"),
            "check the --ca-file paths (PEM files)",
        )
    }

    /// "5s", for findings.
    fn timeout_text(&self) -> String {
        humantime::format_duration(self.opts.timeout).to_string()
    }
}

/// "1 listener", "2 listeners".
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Runs the command: prints one line (or JSON object) per step; fails if any step failed.
pub fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let opts = Options {
        connection_string: args.connection_string.read()?.ok_or_else(|| {
            anyhow::anyhow!("no connection string: give --connection-string-file FILE, --connection-string - (standard input) or HYRELAY_CONNECTION_STRING")
        })?,
        endpoint: args.endpoint,
        ca_files: args.ca_file,
        timeout: args.timeout,
        proxy: crate::transport::proxy::ProxyConfig::from_flag(args.proxy.as_deref())?,
        http_path: args.http,
    };
    let steps = Step::ALL.len() + usize::from(opts.http_path.is_some());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut failed = 0;
    rt.block_on(check_each(&opts, |r| {
        failed += usize::from(r.verdict == Verdict::Fail);
        if args.json {
            println!("{}", r.to_json());
        } else {
            println!("{r}");
        }
    }));
    // A DNS lookup that timed out may still sit in a blocking thread; do not wait for it.
    rt.shutdown_background();
    if failed > 0 {
        bail!("{failed} of {steps} checks failed");
    }
    Ok(())
}

/// `--http`: a path starting with `/` (a query may follow), no spaces or control characters.
fn parse_http_path(s: &str) -> Result<String, String> {
    if !s.starts_with('/') || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{s:?}: expected a path like /health or /api/v1?x=1"));
    }
    Ok(s.to_owned())
}

/// `5s`, `500ms`, `1m`, or a bare number of seconds; more than zero.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = match s.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}"))?,
    };
    if d.is_zero() {
        return Err("the timeout must be more than zero".into());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_timeout("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_timeout("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn lines() {
        let r = StepResult::fail(Step::Token, "401 bad", "copy a fresh string");
        assert_eq!(r.to_string(), "FAIL  token         401 bad — fix: copy a fresh string");
        assert_eq!(r.to_json()["verdict"], "FAIL");
        let r = StepResult::ok(Step::EndpointDns, "x");
        assert_eq!(r.to_string(), "OK    endpoint-dns  x");
        assert_eq!(r.to_json()["fix"], serde_json::Value::Null);
    }

    #[test]
    fn redacts_key_and_signature() {
        let cs = ConnectionString::parse("Endpoint=sb://ns/;SharedAccessKeyName=r;SharedAccessKey=c2VjcmV0a2V5MTIz")
            .unwrap();
        let opts = Options::new(cs);
        let mut c = Checkup::new(&opts);
        c.remember_token("SharedAccessSignature sr=x&sig=abc%2Bdefghij&se=1&skn=r");
        let mut r = StepResult::fail(Step::Token, "key c2VjcmV0a2V5MTIz sig abc+defghij", "abc%2Bdefghij");
        c.redact(&mut r);
        assert_eq!((r.finding.as_str(), r.fix.as_deref()), ("key *** sig ***", Some("***")));
    }

    #[test]
    fn bad_segment_is_not_echoed() {
        let e = crate::cli::secret_args::parse("c2VjcmV0a2V5MTIzNDU2Nzg5MAxx", "--connection-string")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("c2VjcmV0"), "{e}");
    }
}
