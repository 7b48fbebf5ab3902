//! The admin listener of every role (`--admin 127.0.0.1:PORT`): `/metrics` (Prometheus
//! text), `/healthz`, `/readyz`, `/status` (JSON) and `/` (an HTML status page that
//! refreshes itself, no external assets).
//!
//! It runs on its own thread with a small runtime, apart from the data plane; every
//! request is one short HTTP/1.1 exchange (`Connection: close`). Bind it to loopback or a
//! management network: it shows hybrid connection names and addresses (never keys).

use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::proto::handshake;
use crate::proto::metadata::xml_escape;

/// How a row of the status page is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    Broken,
    Unknown,
}

impl Health {
    fn class(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Broken => "broken",
            Health::Unknown => "unknown",
        }
    }
}

/// One row of the status table (one hybrid connection or forward).
#[derive(Debug, Clone)]
pub struct Row {
    /// Identifies the row for scripts (`data-name`).
    pub name: String,
    pub cells: Vec<String>,
    pub health: Health,
}

/// What a role reports at one moment.
#[derive(Debug, Clone)]
pub struct Report {
    /// Whether `/readyz` answers 200.
    pub ready: bool,
    /// Body of `/status` and detail of `/readyz`.
    pub status: Value,
    /// Column headers of the status page table.
    pub columns: Vec<&'static str>,
    pub rows: Vec<Row>,
}

/// A role's source of status.
pub trait StatusSource: Send + Sync + 'static {
    fn role(&self) -> &'static str;
    fn report(&self) -> Pin<Box<dyn Future<Output = Report> + Send + '_>>;
}

/// A running admin listener; dropping it stops it.
#[must_use = "dropping the handle stops the admin listener"]
pub struct AdminHandle {
    addr: SocketAddr,
    stop: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for AdminHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminHandle").field("addr", &self.addr).finish()
    }
}

impl AdminHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

/// Binds `addr` and serves the admin endpoints for `source` on a thread of its own.
pub fn spawn(addr: SocketAddr, source: Arc<dyn StatusSource>) -> std::io::Result<AdminHandle> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    let stop = CancellationToken::new();
    let stop2 = stop.clone();
    let role = source.role();
    let thread = std::thread::Builder::new()
        .name(format!("hyrelay-{role}-admin"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, "cannot start the admin runtime"),
            };
            rt.block_on(async move {
                let listener = match TcpListener::from_std(std_listener) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, "cannot register the admin listener"),
                };
                tokio::spawn(super::metrics::upkeep_loop());
                let started = Instant::now();
                loop {
                    let (s, _) = tokio::select! {
                        _ = stop2.cancelled() => break,
                        a = listener.accept() => match a {
                            Ok(a) => a,
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        },
                    };
                    let source = source.clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(10), serve(s, source, started)).await;
                    });
                }
            });
        })?;
    tracing::info!(role, addr = %local, "admin listener (metrics, health, status page)");
    Ok(AdminHandle {
        addr: local,
        stop,
        thread: Some(thread),
    })
}

async fn serve(mut s: TcpStream, source: Arc<dyn StatusSource>, started: Instant) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = loop {
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        match handshake::parse_request(&buf, 8192) {
            Ok(Some((h, _))) => break h,
            Ok(None) => continue,
            Err(_) => return write(&mut s, 400, "text/plain", b"bad request").await,
        }
    };
    if head.method != "GET" && head.method != "HEAD" {
        return write(&mut s, 405, "text/plain", b"only GET").await;
    }
    let path = head.target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => {
            let body = super::metrics::handle().map(|h| h.render()).unwrap_or_default();
            write(&mut s, 200, "text/plain; version=0.0.4; charset=utf-8", body.as_bytes()).await
        }
        "/healthz" => {
            let body = json!({
                "status": "ok",
                "role": source.role(),
                "version": env!("CARGO_PKG_VERSION"),
                "uptimeSeconds": started.elapsed().as_secs(),
            });
            write_json(&mut s, 200, &body).await
        }
        "/readyz" => {
            let r = source.report().await;
            let body = json!({ "ready": r.ready, "role": source.role(), "detail": r.status });
            write_json(&mut s, if r.ready { 200 } else { 503 }, &body).await
        }
        "/status" => {
            let r = source.report().await;
            write_json(&mut s, 200, &r.status).await
        }
        "/" | "/index.html" => {
            let r = source.report().await;
            let html = page(source.role(), &r);
            write(&mut s, 200, "text/html; charset=utf-8", html.as_bytes()).await
        }
        _ => write(&mut s, 404, "text/plain", b"not found").await,
    }
}

async fn write_json(s: &mut TcpStream, status: u16, v: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec_pretty(v).unwrap_or_default();
    write(s, status, "application/json", &body).await
}

async fn write(s: &mut TcpStream, status: u16, content_type: &str, body: &[u8]) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let bytes = handshake::response(status, reason, content_type, body);
    s.write_all(&bytes).await?;
    s.shutdown().await
}

/// The status page: a table, one row per hybrid connection, refreshed every 2 s.
pub fn page(role: &str, r: &Report) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        concat!(
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
            "<meta http-equiv=\"refresh\" content=\"2\"><title>hyrelay {role} status</title>",
            "<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}",
            "th,td{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}th{{background:#eee}}",
            "tr.ok td.state{{color:#0a0;font-weight:bold}}tr.broken td.state{{color:#c00;font-weight:bold}}",
            "tr.unknown td.state{{color:#888}}</style></head><body>",
            "<h1>hyrelay {role}</h1><p id=\"summary\" data-ready=\"{ready}\">{summary}</p>",
            "<table id=\"hybrid-connections\"><thead><tr>"
        ),
        role = xml_escape(role),
        ready = r.ready,
        summary = if r.ready { "Ready" } else { "Not ready" },
    );
    for c in &r.columns {
        let _ = write!(h, "<th>{}</th>", xml_escape(c));
    }
    h.push_str("</tr></thead><tbody>");
    for row in &r.rows {
        let _ = write!(
            h,
            "<tr class=\"{cls}\" data-name=\"{name}\" data-status=\"{cls}\">",
            cls = row.health.class(),
            name = xml_escape(&row.name)
        );
        for (i, c) in row.cells.iter().enumerate() {
            let class = if i == 1 { " class=\"state\"" } else { "" };
            let _ = write!(
                h,
                "<td{class}>{}</td>",
                xml_escape(&crate::proto::host::escape_controls(c))
            );
        }
        h.push_str("</tr>");
    }
    if r.rows.is_empty() {
        let _ = write!(
            h,
            "<tr><td colspan=\"{}\">No hybrid connections.</td></tr>",
            r.columns.len().max(1)
        );
    }
    let _ = write!(
        h,
        "</tbody></table><p><small>Refreshes every 2 s. <a href=\"/status\">JSON</a> · <a href=\"/metrics\">metrics</a> · version {}</small></p></body></html>",
        env!("CARGO_PKG_VERSION")
    );
    h
}

/// `SystemTime` as RFC 3339, for status fields.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    crate::clock::rfc3339(t)
}

/// Bytes in a short human form (KiB, MiB, GiB).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_escapes_and_marks_rows() {
        let r = Report {
            ready: false,
            status: json!({}),
            columns: vec!["Hybrid connection", "Status"],
            rows: vec![
                Row {
                    name: "db".into(),
                    cells: vec!["db".into(), "Connected".into()],
                    health: Health::Ok,
                },
                Row {
                    name: "<x>".into(),
                    cells: vec!["<x>".into(), "Not connected".into()],
                    health: Health::Broken,
                },
            ],
        };
        let h = page("relay", &r);
        assert!(h.contains("data-name=\"db\" data-status=\"ok\""));
        assert!(h.contains("data-name=\"&lt;x&gt;\" data-status=\"broken\""));
        assert!(!h.contains("<x>"));
        assert!(h.contains("data-ready=\"false\""));
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
