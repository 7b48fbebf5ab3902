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
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::proto::handshake;
use crate::proto::metadata::xml_escape;

/// How a row of the status page is doing; the status word and its colour both come from
/// here, so they cannot disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Green.
    Ok,
    /// Amber: up, but something on the way fails (an endpoint, every recent sender).
    Degraded,
    /// Red.
    Broken,
    /// Grey: not known yet, or stopped.
    Unknown,
}

impl Health {
    fn class(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Degraded => "degraded",
            Health::Broken => "broken",
            Health::Unknown => "unknown",
        }
    }
}

/// One cell of a status row.
#[derive(Debug, Clone)]
pub enum Cell {
    Text(String),
    /// A moment, shown relative ("12 s ago") with the absolute time on hover, and text after.
    Ago(SystemTime, String),
}

impl Cell {
    pub fn text(s: impl Into<String>) -> Self {
        Cell::Text(s.into())
    }

    /// An RFC 3339 time as [`Cell::Ago`]; text that does not parse stays text.
    pub fn ago_rfc3339(at: &str, after: impl Into<String>) -> Self {
        match humantime::parse_rfc3339(at) {
            Ok(t) => Cell::Ago(t, after.into()),
            Err(_) => Cell::Text(format!("{at} {}", after.into()).trim_end().to_owned()),
        }
    }
}

/// One row of the status table (one hybrid connection or forward).
#[derive(Debug, Clone)]
pub struct Row {
    /// Identifies the row for scripts (`data-name`).
    pub name: String,
    pub health: Health,
    /// The status word shown in the health's colour ("Connected", "Endpoint failing", ...).
    pub status: String,
    /// The role's own columns.
    pub cells: Vec<Cell>,
    /// The newest failure on any segment, with its time.
    pub last_error: Option<(SystemTime, String)>,
    /// The last 15 minutes, for the charts.
    pub history: Vec<super::history::Sample>,
}

/// One table: a role's hybrid connections (or forwards).
#[derive(Debug, Clone)]
pub struct Section {
    pub role: &'static str,
    /// Headers of [`Row::cells`]; the page adds name, status, last error and charts.
    pub columns: Vec<&'static str>,
    pub rows: Vec<Row>,
}

/// What a role (or `up`, three roles) reports at one moment.
#[derive(Debug, Clone)]
pub struct Report {
    /// Whether `/readyz` answers 200.
    pub ready: bool,
    /// Body of `/status` and detail of `/readyz`.
    pub status: Value,
    pub sections: Vec<Section>,
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A role's source of status.
pub trait StatusSource: Send + Sync + 'static {
    fn role(&self) -> &'static str;
    fn report(&self) -> Boxed<'_, Report>;
    /// The hybrid connections (or forwards) the role serves, as `(role, name)`: cheap and
    /// local (never a network probe), for `/metrics` and the systemd watchdog.
    fn hybrid_connections(&self) -> Boxed<'_, Vec<(&'static str, String)>> {
        Box::pin(async move {
            let r = self.report().await;
            r.sections
                .iter()
                .flat_map(|sec| sec.rows.iter().map(move |row| (sec.role, row.name.clone())))
                .collect()
        })
    }
    /// Adds one round of samples to the role's history (called every
    /// [`super::history::SAMPLE_EVERY`] by the admin thread).
    fn sample(&self) -> Boxed<'_, ()> {
        Box::pin(async {})
    }
}

/// Several roles in one process (`hyrelay up`): ready when all are, one section each.
pub struct Composite {
    parts: Vec<Arc<dyn StatusSource>>,
}

impl Composite {
    pub fn new(parts: Vec<Arc<dyn StatusSource>>) -> Self {
        Self { parts }
    }
}

impl StatusSource for Composite {
    fn role(&self) -> &'static str {
        "up"
    }

    fn report(&self) -> Boxed<'_, Report> {
        Box::pin(async move {
            let mut out = Report {
                ready: true,
                status: json!({ "role": "up" }),
                sections: Vec::new(),
            };
            for p in &self.parts {
                let r = p.report().await;
                out.ready &= r.ready;
                out.status[p.role()] = r.status;
                out.sections.extend(r.sections);
            }
            out
        })
    }

    fn sample(&self) -> Boxed<'_, ()> {
        Box::pin(async move {
            for p in &self.parts {
                p.sample().await;
            }
        })
    }

    fn hybrid_connections(&self) -> Boxed<'_, Vec<(&'static str, String)>> {
        Box::pin(async move {
            let mut out = Vec::new();
            for p in &self.parts {
                out.extend(p.hybrid_connections().await);
            }
            out
        })
    }
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
                let sampled = source.clone();
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(super::history::SAMPLE_EVERY);
                    loop {
                        tick.tick().await;
                        sampled.sample().await;
                    }
                });
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
            Err(_) => return write(&mut s, false, Reply::text(400, "bad request")).await,
        }
    };
    let head_only = head.method == "HEAD";
    let reply = if head.method != "GET" && !head_only {
        Reply::text(405, "only GET and HEAD")
    } else {
        answer(head.target.split('?').next().unwrap_or(""), &source, started).await
    };
    write(&mut s, head_only, reply).await
}

/// One admin response.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Reply {
    fn text(status: u16, body: &str) -> Self {
        Self {
            status,
            content_type: "text/plain",
            body: body.as_bytes().to_vec(),
        }
    }

    fn json(status: u16, v: &Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: serde_json::to_vec_pretty(v).unwrap_or_default(),
        }
    }
}

/// The response for `path` (the same for GET and HEAD; HEAD sends only its head).
async fn answer(path: &str, source: &Arc<dyn StatusSource>, started: Instant) -> Reply {
    match path {
        "/metrics" => {
            let hcs = source.hybrid_connections().await;
            Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: super::metrics::render(&hcs).into_bytes(),
            }
        }
        "/healthz" => Reply::json(
            200,
            &json!({
                "status": "ok",
                "role": source.role(),
                "version": env!("CARGO_PKG_VERSION"),
                "uptimeSeconds": started.elapsed().as_secs(),
            }),
        ),
        "/readyz" => {
            let r = source.report().await;
            let body = json!({ "ready": r.ready, "role": source.role(), "detail": r.status });
            Reply::json(if r.ready { 200 } else { 503 }, &body)
        }
        "/status" => Reply::json(200, &source.report().await.status),
        "/" | "/index.html" => {
            let r = source.report().await;
            Reply {
                status: 200,
                content_type: "text/html; charset=utf-8",
                body: page(source.role(), &r).into_bytes(),
            }
        }
        _ => Reply::text(404, "not found"),
    }
}

/// Writes `reply`; for a HEAD request the head alone, with the Content-Length a GET gets.
async fn write(s: &mut TcpStream, head_only: bool, reply: Reply) -> std::io::Result<()> {
    let reason = match reply.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let mut bytes = handshake::response(reply.status, reason, reply.content_type, &reply.body);
    if head_only {
        bytes.truncate(bytes.len() - reply.body.len());
    }
    s.write_all(&bytes).await?;
    s.shutdown().await
}

const STYLE: &str = concat!(
    "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}",
    "h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}",
    ".wrap{overflow-x:auto}table{border-collapse:collapse;min-width:100%}",
    "th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}",
    "th{background:#f2f2f2;font-weight:600}",
    ".state{font-weight:bold;white-space:nowrap}",
    "tr.ok .state{color:#0a7a0a}tr.degraded .state{color:#b36b00}",
    "tr.broken .state{color:#c00}tr.unknown .state{color:#777}",
    ".dot{display:inline-block;width:.7em;height:.7em;border-radius:50%;margin-right:.35em;background:currentColor}",
    "time{border-bottom:1px dotted #999;cursor:help}",
    ".err{color:#a00}.muted{color:#777}",
    "svg.chart{display:block}.legend{font-size:.8em;color:#555;white-space:nowrap}",
    "#summary.ready{color:#0a7a0a}#summary.notready{color:#c00}",
    "@media (max-width:760px){table,thead,tbody,tr,td{display:block}thead{display:none}",
    "tr{border:1px solid #ccc;margin-bottom:.8em}td{border:none;border-bottom:1px solid #eee}",
    "td::before{content:attr(data-label);display:block;font-size:.75em;color:#666}}",
);

/// The status page: one table per role (one for a role, three for `up`), one row per
/// hybrid connection, refreshed every 2 s; relative times with the absolute time on hover;
/// 15-minute charts drawn inline as SVG. No external assets, no script.
pub fn page(role: &str, r: &Report) -> String {
    let now = SystemTime::now();
    let mut h = String::new();
    let _ = write!(
        h,
        concat!(
            "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">",
            "<meta http-equiv=\"refresh\" content=\"2\"><title>hyrelay {role} status</title>",
            "<style>{style}</style></head><body>",
            "<h1>hyrelay {role}</h1><p id=\"summary\" class=\"{cls}\" data-ready=\"{ready}\">{summary}</p>"
        ),
        role = xml_escape(role),
        style = STYLE,
        cls = if r.ready { "ready" } else { "notready" },
        ready = r.ready,
        summary = if r.ready { "Ready" } else { "Not ready" },
    );
    for sec in &r.sections {
        section(&mut h, sec, r.sections.len() > 1, now);
    }
    let _ = write!(
        h,
        "<p class=\"muted\"><small>Refreshes every 2 s. Times are relative; hover for the exact time. Charts: the last 15 minutes, a sample every {} s. <a href=\"/status\">JSON</a> · <a href=\"/metrics\">metrics</a> · version {}</small></p></body></html>",
        super::history::SAMPLE_EVERY.as_secs(),
        env!("CARGO_PKG_VERSION")
    );
    h
}

fn section(h: &mut String, sec: &Section, titled: bool, now: SystemTime) {
    if titled {
        let _ = write!(h, "<h2>{}</h2>", xml_escape(sec.role));
    }
    let mut headers = vec!["Hybrid connection", "Status"];
    headers.extend(sec.columns.iter().copied());
    headers.extend(["Last error", "Last 15 min"]);
    let _ = write!(
        h,
        "<div class=\"wrap\"><table id=\"hybrid-connections{}\" data-role=\"{}\"><thead><tr>",
        if titled {
            format!("-{}", sec.role)
        } else {
            String::new()
        },
        sec.role
    );
    for c in &headers {
        let _ = write!(h, "<th>{}</th>", xml_escape(c));
    }
    h.push_str("</tr></thead><tbody>");
    for row in &sec.rows {
        let _ = write!(
            h,
            "<tr class=\"{cls}\" data-name=\"{name}\" data-status=\"{cls}\" data-role=\"{role}\"><td data-label=\"{l0}\">{name}</td><td class=\"state\" data-label=\"{l1}\"><span class=\"dot\"></span>{word}</td>",
            cls = row.health.class(),
            name = xml_escape(&row.name),
            role = sec.role,
            l0 = headers[0],
            l1 = headers[1],
            word = xml_escape(&row.status),
        );
        for (i, c) in row.cells.iter().enumerate() {
            let _ = write!(
                h,
                "<td data-label=\"{}\">{}</td>",
                xml_escape(headers[i + 2]),
                cell(c, now)
            );
        }
        let err = match &row.last_error {
            Some((at, e)) => format!("<span class=\"err\">{}</span> {}", xml_escape(e), ago(*at, now)),
            None => "<span class=\"muted\">none</span>".into(),
        };
        let _ = write!(
            h,
            "<td class=\"last-error\" data-label=\"Last error\">{err}</td><td data-label=\"Last 15 min\">{}</td></tr>",
            chart(&row.history)
        );
    }
    if sec.rows.is_empty() {
        let _ = write!(
            h,
            "<tr><td colspan=\"{}\">No hybrid connections.</td></tr>",
            headers.len()
        );
    }
    h.push_str("</tbody></table></div>");
}

fn cell(c: &Cell, now: SystemTime) -> String {
    match c {
        Cell::Text(t) => xml_escape(t),
        Cell::Ago(at, after) if after.is_empty() => ago(*at, now),
        Cell::Ago(at, after) => format!("{} {}", ago(*at, now), xml_escape(after)),
    }
}

/// `<time>` with "12 s ago" and the RFC 3339 time as its title.
pub fn ago(at: SystemTime, now: SystemTime) -> String {
    let abs = rfc3339(at);
    format!("<time datetime=\"{abs}\" title=\"{abs}\">{}</time>", relative(at, now))
}

/// "just now", "12 s ago", "5 min ago", "3 h ago", "2 d ago" (or "in 5 min" ahead).
pub fn relative(at: SystemTime, now: SystemTime) -> String {
    let (d, ahead) = match now.duration_since(at) {
        Ok(d) => (d, false),
        Err(e) => (e.duration(), true),
    };
    let s = d.as_secs();
    let text = match s {
        0 => return "just now".into(),
        1..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=172_799 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86_400),
    };
    if ahead {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// Active tunnels (line) and throughput (filled area) of the last 15 minutes as inline SVG,
/// each scaled to its own maximum, with the numbers beside it.
fn chart(samples: &[super::history::Sample]) -> String {
    const W: f64 = 180.0;
    const H: f64 = 36.0;
    if samples.len() < 2 {
        return "<span class=\"muted\">collecting…</span>".into();
    }
    let active: Vec<f64> = samples.iter().map(|s| s.active.max(0) as f64).collect();
    let rates = super::history::rates(samples);
    let span = super::history::KEEP as f64 - 1.0;
    let x = |i: usize, n: usize| W - (n - 1 - i) as f64 * W / span;
    let points = |v: &[f64]| -> String {
        let max = v.iter().copied().fold(0.0, f64::max).max(1.0);
        v.iter()
            .enumerate()
            .map(|(i, y)| format!("{:.1},{:.1}", x(i, v.len()), H - 2.0 - y / max * (H - 4.0)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let area = format!("{:.1},{H} {} {W},{H}", x(0, rates.len()), points(&rates));
    let (now_a, max_a) = (active[active.len() - 1], active.iter().copied().fold(0.0, f64::max));
    let (now_r, max_r) = (rates[rates.len() - 1], rates.iter().copied().fold(0.0, f64::max));
    format!(
        concat!(
            "<svg class=\"chart\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\">",
            "<title>active tunnels now {na} (max {ma}); throughput now {nr}/s (max {mr}/s)</title>",
            "<rect width=\"{w}\" height=\"{h}\" fill=\"#fafafa\" stroke=\"#e4e4e4\"/>",
            "<polygon class=\"throughput\" points=\"{area}\" fill=\"#9fd49f\" fill-opacity=\".6\"/>",
            "<polyline class=\"active\" points=\"{line}\" fill=\"none\" stroke=\"#2860c8\" stroke-width=\"1.5\"/></svg>",
            "<span class=\"legend\"><span style=\"color:#2860c8\">■</span> {na} tunnels (max {ma}) ",
            "<span style=\"color:#5cae5c\">■</span> {nr}/s (max {mr}/s)</span>"
        ),
        w = W,
        h = H,
        na = now_a,
        ma = max_a,
        nr = human_bytes(now_r as u64),
        mr = human_bytes(max_r as u64),
        area = area,
        line = points(&active),
    )
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
        let row = |name: &str, health, status: &str| Row {
            name: name.into(),
            health,
            status: status.into(),
            cells: vec![Cell::text("x")],
            last_error: None,
            history: Vec::new(),
        };
        let now = SystemTime::now();
        let mut broken = row("<x>", Health::Broken, "Not connected");
        broken.last_error = Some((now - Duration::from_secs(12), "refused".into()));
        let r = Report {
            ready: false,
            status: json!({}),
            sections: vec![Section {
                role: "relay",
                columns: vec!["Endpoint"],
                rows: vec![row("db", Health::Ok, "Connected"), broken],
            }],
        };
        let h = page("relay", &r);
        assert!(h.contains("data-name=\"db\" data-status=\"ok\""));
        assert!(h.contains("data-name=\"&lt;x&gt;\" data-status=\"broken\""));
        assert!(!h.contains("<x>"));
        assert!(h.contains("data-ready=\"false\""));
        assert!(h.contains("12 s ago</time>") && h.contains("refused"), "{h}");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }

    #[test]
    fn relative_times_and_charts() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(relative(t, t), "just now");
        assert_eq!(relative(t, t + Duration::from_secs(12)), "12 s ago");
        assert_eq!(relative(t, t + Duration::from_secs(300)), "5 min ago");
        assert_eq!(relative(t + Duration::from_secs(7200), t), "in 2 h");
        let s = |i: u64, active, bytes| super::super::history::Sample {
            at: t + Duration::from_secs(i * 10),
            active,
            bytes,
            ok: 0,
            failed: 0,
        };
        let svg = chart(&[s(0, 0, 0), s(1, 3, 10_240), s(2, 1, 20_480)]);
        assert!(
            svg.contains("<polyline class=\"active\"") && svg.contains("1 tunnels (max 3)"),
            "{svg}"
        );
        assert!(svg.contains("1.0 KiB/s"), "{svg}");
        assert!(chart(&[]).contains("collecting"));
    }
}
