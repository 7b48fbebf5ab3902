//! Which proxy, if any, a connection to a relay goes through: the proxy URL
//! (`http://user:pass@host:port`), the `NO_PROXY` list, and how the environment
//! (`HTTPS_PROXY`, `https_proxy`, `ALL_PROXY`, `all_proxy`, `NO_PROXY`, `no_proxy`) fills
//! what a role's configuration leaves unset.
//!
//! Invariants: a [`Proxy`] always has a host and a port (80, the `http` scheme's, when the
//! URL names none); its password is a [`Secret`] and never printed (`Display` and `Debug`
//! show `***`, and so do the errors about a URL); a [`NoProxy`] entry is `*`, an IP address, a
//! CIDR block or a host-name suffix, so matching cannot fail.

use std::fmt;
use std::net::IpAddr;

use percent_encoding::percent_decode_str;

use crate::proto::Secret;

/// An HTTP proxy that tunnels with `CONNECT`.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// Host name or IP literal (IPv6 in brackets).
    pub host: String,
    pub port: u16,
    /// Basic credentials, if the URL carries `user:password@`.
    pub auth: Option<Credentials>,
}

/// A user name and password for `Proxy-Authorization: Basic`.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: Secret,
}

/// Why a proxy URL or a `NO_PROXY` entry is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    /// The scheme is not `http://` (TLS to the proxy itself and SOCKS are not supported).
    #[error("proxy URL {0:?}: only http:// proxies are supported (the relay's TLS runs inside the CONNECT tunnel)")]
    Scheme(String),
    /// No host, or a port that is not a number.
    #[error("proxy URL {0:?}: expected http://[user:password@]host[:port]")]
    Malformed(String),
    /// A path, query or fragment after the authority.
    #[error("proxy URL {0:?}: a proxy URL has no path")]
    Path(String),
    /// A `NO_PROXY` entry with a `/` that is not a CIDR block.
    #[error("NO_PROXY entry {0:?}: not a CIDR block (ADDRESS/BITS)")]
    Cidr(String),
}

impl Proxy {
    /// Parses `http://[user[:password]@]host[:port][/]`; a missing scheme means `http://`.
    /// User and password are percent-decoded. Default port: 80.
    pub fn parse(url: &str) -> Result<Self, SettingError> {
        let shown = redact_url(url);
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some(_) => return Err(SettingError::Scheme(shown)),
            None => url,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(SettingError::Path(shown));
        }
        let (userinfo, authority) = match rest.rsplit_once('@') {
            Some((u, a)) => (Some(u), a),
            None => (None, rest),
        };
        let (host, port) =
            crate::proto::connstr::split_host_port(authority).ok_or_else(|| SettingError::Malformed(shown.clone()))?;
        let auth = userinfo.map(|u| {
            let (user, password) = u.split_once(':').unwrap_or((u, ""));
            Credentials {
                user: decode(user),
                password: Secret::new(decode(password)),
            }
        });
        Ok(Self {
            host,
            port: port.unwrap_or(80),
            auth,
        })
    }

    /// `host:port` of the proxy, for messages.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

fn decode(s: &str) -> String {
    percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// `url` with any password replaced by `***`, for error messages.
fn redact_url(url: &str) -> String {
    let Some((before, after)) = url.rsplit_once('@') else {
        return url.to_owned();
    };
    let start = before.find("://").map(|i| i + 3).unwrap_or(0);
    match before[start..].split_once(':') {
        Some((user, _)) => format!("{}{user}:***@{after}", &before[..start]),
        None => url.to_owned(),
    }
}

impl fmt::Display for Proxy {
    /// `http://user:***@host:port`: never the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.auth {
            Some(c) => write!(f, "http://{}:***@{}:{}", c.user, self.host, self.port),
            None => write!(f, "http://{}:{}", self.host, self.port),
        }
    }
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proxy({self})")
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}:***)", self.user)
    }
}

/// One `NO_PROXY` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Bypass {
    /// `*`: no proxy for any host.
    All,
    Ip(IpAddr),
    /// Network address and prefix length.
    Cidr(IpAddr, u8),
    /// Lower-case name without a leading `.` or `*.`: the host itself and its subdomains.
    Suffix(String),
}

/// Hosts reached directly although a proxy is set: host-name suffixes (`corp.local`,
/// `.corp.local`, `*.corp.local` all match `corp.local` and `db.corp.local`), IP addresses,
/// CIDR blocks (`10.0.0.0/8`, `fd00::/8`; they match hosts written as IP addresses), and
/// `*` for all. Ports on entries are ignored. Default: empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy(Vec<Bypass>);

impl NoProxy {
    /// Parses a list of entries (empty ones are skipped).
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, SettingError> {
        let mut out = Vec::new();
        for e in entries {
            let e = e.as_ref().trim();
            if !e.is_empty() {
                out.push(Bypass::parse(e)?);
            }
        }
        Ok(Self(out))
    }

    /// Parses the comma- (or space-) separated form of the `NO_PROXY` variable.
    pub fn parse_env(value: &str) -> Result<Self, SettingError> {
        let entries: Vec<&str> = value.split([',', ' ']).collect();
        Self::parse(&entries)
    }

    /// True if `host` (a name, or an IP literal with or without brackets) is to be
    /// reached directly.
    pub fn bypasses(&self, host: &str) -> bool {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let ip = bare.parse::<IpAddr>().ok();
        let name = bare.trim_end_matches('.').to_ascii_lowercase();
        self.0.iter().any(|b| b.matches(&name, ip))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Bypass {
    fn parse(entry: &str) -> Result<Self, SettingError> {
        if entry == "*" {
            return Ok(Bypass::All);
        }
        if let Some((addr, bits)) = entry.split_once('/') {
            return cidr(addr, bits).ok_or_else(|| SettingError::Cidr(entry.to_owned()));
        }
        let host = strip_port(entry);
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Bypass::Ip(ip));
        }
        let name = host
            .trim_start_matches("*.")
            .trim_start_matches('.')
            .trim_end_matches('.');
        Ok(Bypass::Suffix(name.to_ascii_lowercase()))
    }

    fn matches(&self, name: &str, ip: Option<IpAddr>) -> bool {
        match (self, ip) {
            (Bypass::All, _) => true,
            (Bypass::Ip(a), Some(ip)) => *a == ip,
            (Bypass::Cidr(net, bits), Some(ip)) => in_block(ip, *net, *bits),
            (Bypass::Suffix(s), _) => {
                !s.is_empty() && (name == s || name.strip_suffix(s.as_str()).is_some_and(|r| r.ends_with('.')))
            }
            _ => false,
        }
    }
}

/// `host` of `host:port` / `[v6]:port`; a bare IPv6 address is left whole.
fn strip_port(entry: &str) -> &str {
    if let Some(rest) = entry.strip_prefix('[') {
        return rest.split_once(']').map(|(h, _)| h).unwrap_or(entry);
    }
    match entry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.parse::<u16>().is_ok() => h,
        _ => entry,
    }
}

fn cidr(addr: &str, bits: &str) -> Option<Bypass> {
    let ip: IpAddr = addr.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
    let bits: u8 = bits.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (bits <= max).then_some(Bypass::Cidr(ip, bits))
}

fn in_block(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let (a, b, width) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        _ => return false,
    };
    let shift = width - u32::from(bits);
    shift >= width || (a >> shift) == (b >> shift)
}

/// How a role reaches relays: directly, or through a proxy except for the hosts in
/// `no_proxy`. Each part is either set (by the config file or a flag) or left to the
/// environment ([`ProxyConfig::with_env`]). Default: direct.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    proxy: Option<Proxy>,
    no_proxy: Option<NoProxy>,
}

/// A connection straight to the relay.
pub static DIRECT: ProxyConfig = ProxyConfig {
    proxy: None,
    no_proxy: None,
};

/// Environment variables naming the proxy, in the order they are looked at (curl's).
pub const PROXY_VARS: [&str; 4] = ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"];
/// Environment variables listing hosts reached directly.
pub const NO_PROXY_VARS: [&str; 2] = ["no_proxy", "NO_PROXY"];

impl ProxyConfig {
    /// A proxy and a bypass list; `None` leaves that part to the environment.
    pub fn new(proxy: Option<Proxy>, no_proxy: Option<NoProxy>) -> Self {
        Self { proxy, no_proxy }
    }

    /// From a config file's `proxy` and `no_proxy` values.
    pub fn from_settings(proxy: Option<&str>, no_proxy: Option<&[String]>) -> Result<Self, SettingError> {
        Ok(Self {
            proxy: proxy.map(Proxy::parse).transpose()?,
            no_proxy: no_proxy.map(NoProxy::parse).transpose()?,
        })
    }

    /// Fills the parts left unset from the variables `get` returns (the process
    /// environment: [`ProxyConfig::with_process_env`]). An empty variable counts as unset.
    pub fn with_env(mut self, get: impl Fn(&str) -> Option<String>) -> Result<Self, SettingError> {
        let first = |names: &[&str]| names.iter().find_map(|n| get(n).filter(|v| !v.trim().is_empty()));
        if self.proxy.is_none() {
            self.proxy = first(&PROXY_VARS).map(|v| Proxy::parse(v.trim())).transpose()?;
        }
        if self.no_proxy.is_none() {
            self.no_proxy = first(&NO_PROXY_VARS).map(|v| NoProxy::parse_env(&v)).transpose()?;
        }
        Ok(self)
    }

    /// [`ProxyConfig::with_env`] with this process's environment.
    pub fn with_process_env(self) -> Result<Self, SettingError> {
        self.with_env(|n| std::env::var(n).ok())
    }

    /// Replaces the proxy (a `--proxy` flag).
    pub fn set_proxy(&mut self, proxy: Proxy) {
        self.proxy = Some(proxy);
    }

    /// For a command without a config file: `--proxy URL` if given, the rest from this
    /// process's environment.
    pub fn from_flag(flag: Option<&str>) -> Result<Self, SettingError> {
        Self::from_settings(flag, None)?.with_process_env()
    }

    /// The proxy to use for `host`, or `None` to connect directly.
    pub fn for_host(&self, host: &str) -> Option<&Proxy> {
        let p = self.proxy.as_ref()?;
        match &self.no_proxy {
            Some(np) if np.bypasses(host) => None,
            _ => Some(p),
        }
    }

    /// The configured proxy, whatever the host.
    pub fn proxy(&self) -> Option<&Proxy> {
        self.proxy.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls() {
        let p = Proxy::parse("http://al%40ice:p%3Ass@proxy.corp:3128/").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        let c = p.auth.as_ref().unwrap();
        assert_eq!((c.user.as_str(), c.password.expose()), ("al@ice", "p:ss"));
        assert_eq!(p.to_string(), "http://al@ice:***@proxy.corp:3128");
        assert!(!format!("{p:?}").contains("p:ss"));
        let p = Proxy::parse("[::1]:8080").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.auth.is_none()), ("[::1]", 8080, true));
        assert_eq!(Proxy::parse("HTTP://u@h").unwrap().port, 80);
        assert_eq!(Proxy::parse("http://u@h").unwrap().auth.unwrap().password.expose(), "");
        for bad in [
            "https://h:1",
            "socks5://h:1",
            "http://",
            "http://h:x",
            "http://h:1/path",
        ] {
            assert!(Proxy::parse(bad).is_err(), "{bad}");
        }
        let e = Proxy::parse("https://u:hunter22@h:1").unwrap_err().to_string();
        assert!(!e.contains("hunter22") && e.contains("u:***@h:1"), "{e}");
    }

    #[test]
    fn bypass_rules() {
        let np =
            NoProxy::parse_env("localhost, .corp.local,*.lab.test,10.0.0.0/8,fd00::/8,192.0.2.7,[::1]:443").unwrap();
        for yes in [
            "localhost",
            "corp.local",
            "db.corp.local",
            "DB.Corp.Local.",
            "x.lab.test",
            "10.1.2.3",
            "[fd00::1]",
            "192.0.2.7",
            "::1",
        ] {
            assert!(np.bypasses(yes), "{yes}");
        }
        for no in [
            "notcorp.local",
            "relay.example.com",
            "11.0.0.1",
            "[fe80::1]",
            "192.0.2.8",
            "lab",
        ] {
            assert!(!np.bypasses(no), "{no}");
        }
        assert!(NoProxy::parse(&["*"]).unwrap().bypasses("anything"));
        assert!(NoProxy::parse(&["0.0.0.0/0"]).unwrap().bypasses("203.0.113.1"));
        assert!(!NoProxy::parse(&["0.0.0.0/0"]).unwrap().bypasses("::1"));
        for bad in ["10.0.0.0/33", "10.0.0.0/x", "name/8"] {
            assert!(NoProxy::parse(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn environment_fills_what_the_config_leaves_open() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |n: &str| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| v.to_string())
        };
        let c = ProxyConfig::default()
            .with_env(env(&[
                ("HTTPS_PROXY", "http://p:1"),
                ("ALL_PROXY", "http://q:2"),
                ("NO_PROXY", "relay.b"),
            ]))
            .unwrap();
        assert_eq!(c.for_host("relay.a").unwrap().authority(), "p:1");
        assert!(c.for_host("relay.b").is_none());
        let c = ProxyConfig::default()
            .with_env(env(&[("https_proxy", ""), ("all_proxy", "q:2")]))
            .unwrap();
        assert_eq!(c.for_host("x").unwrap().authority(), "q:2");
        let file = ProxyConfig::from_settings(Some("http://f:3"), Some(&[])).unwrap();
        let c = file
            .with_env(env(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "*")]))
            .unwrap();
        assert_eq!(
            c.for_host("x").unwrap().authority(),
            "f:3",
            "the file wins, also over NO_PROXY"
        );
        assert!(
            ProxyConfig::default()
                .with_env(env(&[]))
                .unwrap()
                .for_host("x")
                .is_none()
        );
        assert!(DIRECT.for_host("x").is_none());
        assert!(
            ProxyConfig::default()
                .with_env(env(&[("HTTPS_PROXY", "ftp://x")]))
                .is_err()
        );
    }
}
