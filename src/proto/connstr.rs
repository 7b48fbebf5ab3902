//! Azure Relay connection strings (hc-protocol.md §3.5), sans-IO.
//!
//! `Endpoint=sb://{ns}/;SharedAccessKeyName={rule};SharedAccessKey={key};EntityPath={hc}`.
//! Pairs are `;`-separated and split on the first `=`; names are case-insensitive.
//! `Display` writes the exact order the App Service "gateway connection string" uses,
//! because HCM v2 parses it positionally.
//!
//! Besides `sb://` (TLS, port 443 unless given) hyrelay accepts `wss://` and, for tests or
//! a relay behind a TLS terminator, an explicit plain `ws://`.

use std::fmt;

use super::secret::Secret;

/// Where a relay is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelayEndpoint {
    /// TLS (`sb://`, `wss://`) or plain (`ws://`).
    pub tls: bool,
    /// Host name or IP literal (IPv6 in brackets).
    pub host: String,
    pub port: u16,
}

impl RelayEndpoint {
    /// `wss://host:port` or `ws://host:port`.
    pub fn ws_base(&self) -> String {
        format!("{}://{}:{}", if self.tls { "wss" } else { "ws" }, self.host, self.port)
    }

    /// `host` or `host:port` when the port is not the scheme's default: the `Host` header.
    pub fn authority(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The form used in connection strings: `sb://host[:port]/` or `ws://host:port/`.
    pub fn to_connection_form(&self) -> String {
        if self.tls {
            if self.port == 443 {
                format!("sb://{}/", self.host)
            } else {
                format!("sb://{}:{}/", self.host, self.port)
            }
        } else {
            format!("ws://{}:{}/", self.host, self.port)
        }
    }

    /// Parses `sb://`, `wss://`, `ws://` (with optional port and path, which is ignored).
    pub fn parse(s: &str) -> Result<Self, ConnStrError> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| ConnStrError::BadEndpoint(s.to_owned()))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "sb" | "wss" | "https" => true,
            "ws" | "http" => false,
            _ => return Err(ConnStrError::BadEndpoint(s.to_owned())),
        };
        let authority = rest.split('/').next().unwrap_or("");
        let (host, port) = split_host_port(authority).ok_or_else(|| ConnStrError::BadEndpoint(s.to_owned()))?;
        let port = port.unwrap_or(if tls { 443 } else { 80 });
        Ok(Self { tls, host, port })
    }
}

/// Splits `host[:port]` / `[v6][:port]`; `None` if the host is empty or the port is not a number.
pub fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return None,
        };
        (format!("[{h}]"), port)
    } else {
        match authority.rsplit_once(':') {
            // An IPv6 literal needs brackets. Without this, `a:b:443` parsed as host `a:b`,
            // which prints back (default port omitted) as `a:b` = host `a`, port `b`: a
            // connection string that `expose()` wrote could not be read back (found by fuzzing).
            Some((h, _)) if h.contains(':') => return None,
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (authority.to_owned(), None),
        }
    };
    super::host::validate(&host).ok()?;
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0)?),
        None => None,
    };
    Some((host, port))
}

/// How a connection string authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A rule name and one of its keys: tokens are minted locally.
    Key { name: String, key: Secret },
    /// A ready-made token (cannot be renewed).
    Token(Secret),
}

/// A parsed connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionString {
    pub endpoint: RelayEndpoint,
    pub credential: Credential,
    /// The hybrid connection, if the string is entity-scoped.
    pub entity_path: Option<String>,
}

/// One way a connection string can be wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnStrError {
    /// No `Endpoint=`.
    #[error("connection string has no Endpoint")]
    MissingEndpoint,
    /// The endpoint is not `sb://host[:port]/`, `wss://…` or `ws://…`.
    #[error("connection string Endpoint {0:?} is not sb://HOST[:PORT]/, wss://… or ws://…")]
    BadEndpoint(String),
    /// Neither a key name with a key nor a SharedAccessSignature.
    #[error("connection string needs SharedAccessKeyName and SharedAccessKey, or SharedAccessSignature")]
    MissingCredential,
    /// `Authentication=Managed Identity`, which a self-hosted relay cannot honour.
    #[error("connection string authentication {0:?} is not supported (use a SAS key)")]
    UnsupportedAuthentication(String),
    /// A segment without `=`.
    #[error("connection string segment {0:?} is not NAME=VALUE")]
    BadSegment(String),
}

impl ConnectionString {
    /// Parses a connection string. Unknown names (OperationTimeout, …) are ignored.
    pub fn parse(s: &str) -> Result<Self, ConnStrError> {
        let (mut endpoint, mut name, mut key, mut sas, mut entity) = (None, None, None, None, None);
        for seg in s.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = seg.split_once('=').ok_or_else(|| {
                // Do not echo what may be a key.
                ConnStrError::BadSegment(seg.chars().take(24).collect())
            })?;
            let v = v.trim();
            match k.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(RelayEndpoint::parse(v)?),
                "sharedaccesskeyname" => name = Some(v.to_owned()),
                "sharedaccesskey" => key = Some(Secret::new(v)),
                "sharedaccesssignature" => sas = Some(Secret::new(v)),
                // Slashes and spaces together: `/ hc1` left ` hc1`, which `expose()` wrote
                // as `EntityPath= hc1` and re-parsed as `hc1` (found by fuzzing).
                "entitypath" => {
                    let e = v.trim_matches(|c: char| c == '/' || c.is_whitespace());
                    entity = Some(e.to_owned()).filter(|e| !e.is_empty());
                }
                "authentication" => return Err(ConnStrError::UnsupportedAuthentication(v.to_owned())),
                _ => {}
            }
        }
        let credential = match (name, key, sas) {
            (_, _, Some(t)) => Credential::Token(t),
            (Some(name), Some(key), None) if !name.is_empty() && !key.expose().is_empty() => {
                Credential::Key { name, key }
            }
            _ => return Err(ConnStrError::MissingCredential),
        };
        Ok(Self {
            endpoint: endpoint.ok_or(ConnStrError::MissingEndpoint)?,
            credential,
            entity_path: entity,
        })
    }

    /// The full text, key included. Only for handing to a user who asked for it.
    pub fn expose(&self) -> String {
        let mut out = format!("Endpoint={}", self.endpoint.to_connection_form());
        match &self.credential {
            Credential::Key { name, key } => {
                out.push_str(&format!(";SharedAccessKeyName={name};SharedAccessKey={}", key.expose()));
            }
            Credential::Token(t) => out.push_str(&format!(";SharedAccessSignature={}", t.expose())),
        }
        if let Some(e) = &self.entity_path {
            out.push_str(&format!(";EntityPath={e}"));
        }
        out
    }

    /// Key name for display, if any.
    pub fn key_name(&self) -> Option<&str> {
        match &self.credential {
            Credential::Key { name, .. } => Some(name),
            Credential::Token(_) => None,
        }
    }
}

impl fmt::Display for ConnectionString {
    /// The string with the key or token replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Endpoint={}", self.endpoint.to_connection_form())?;
        match &self.credential {
            Credential::Key { name, .. } => write!(f, ";SharedAccessKeyName={name};SharedAccessKey=***")?,
            Credential::Token(_) => write!(f, ";SharedAccessSignature=***")?,
        }
        if let Some(e) = &self.entity_path {
            write!(f, ";EntityPath={e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_string_round_trips_in_azure_order() {
        let s = "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=defaultListener;SharedAccessKey=abc=;EntityPath=hc1";
        let c = ConnectionString::parse(s).unwrap();
        assert_eq!(c.expose(), s);
        assert_eq!(c.endpoint.port, 443);
        assert!(c.endpoint.tls);
        assert_eq!(c.entity_path.as_deref(), Some("hc1"));
        assert!(!c.to_string().contains("abc="), "Display hides the key");
    }

    #[test]
    fn endpoints() {
        let e = RelayEndpoint::parse("sb://localhost:9443/").unwrap();
        assert_eq!(
            (e.tls, e.port, e.ws_base()),
            (true, 9443, "wss://localhost:9443".into())
        );
        let e = RelayEndpoint::parse("ws://127.0.0.1:8080").unwrap();
        assert_eq!((e.tls, e.authority()), (false, "127.0.0.1:8080".into()));
        let e = RelayEndpoint::parse("sb://[::1]:9443/").unwrap();
        assert_eq!(e.host, "[::1]");
        assert!(RelayEndpoint::parse("ftp://x/").is_err());
        assert!(RelayEndpoint::parse("sb://x:99999/").is_err());
    }

    #[test]
    fn unbracketed_host_with_colon_is_rejected() {
        // fuzz/regressions/connection_string/unbracketed-colon-host: `:s.example:443`
        // used to parse as host `:s.example` and print back as the unreadable `sb://:s.example/`.
        assert_eq!(split_host_port(":s.example:443"), None);
        assert_eq!(split_host_port("a:b:443"), None);
        assert_eq!(split_host_port("::1:80"), None);
        assert!(RelayEndpoint::parse("sb://:s.example:443/path").is_err());
        assert_eq!(split_host_port("[::1]:80"), Some(("[::1]".into(), Some(80))));
        assert_eq!(split_host_port("a:443"), Some(("a".into(), Some(443))));
    }

    #[test]
    fn entity_path_trimmed_of_slashes_and_spaces_alike() {
        // fuzz/regressions/connection_string/entity-path-slash-space: `// /b` gave ` /b`,
        // which expose() wrote out and parse() then read back as `b`.
        for (raw, want) in [
            ("// /b", Some("b")),
            ("/ hc1 /", Some("hc1")),
            ("/ /", None),
            ("a/ b", Some("a/ b")),
        ] {
            let c = ConnectionString::parse(&format!("Endpoint=sb://ns/;SharedAccessSignature=t;EntityPath={raw}"))
                .unwrap();
            assert_eq!(c.entity_path.as_deref(), want, "{raw:?}");
            assert_eq!(ConnectionString::parse(&c.expose()).unwrap(), c, "{raw:?}");
        }
    }

    #[test]
    fn case_insensitive_names_any_order_and_errors() {
        let c = ConnectionString::parse(
            "entitypath=/a/b/; sharedaccesskey=k ;SHAREDACCESSKEYNAME=r;endpoint=sb://ns/;OperationTimeout=00:01:00",
        )
        .unwrap();
        assert_eq!(c.entity_path.as_deref(), Some("a/b"));
        assert_eq!(c.key_name(), Some("r"));
        assert_eq!(
            ConnectionString::parse("SharedAccessKeyName=r;SharedAccessKey=k"),
            Err(ConnStrError::MissingEndpoint)
        );
        assert_eq!(
            ConnectionString::parse("Endpoint=sb://ns/;SharedAccessKeyName=r"),
            Err(ConnStrError::MissingCredential)
        );
        assert!(matches!(
            ConnectionString::parse("Endpoint=sb://ns/;Authentication=Managed Identity"),
            Err(ConnStrError::UnsupportedAuthentication(_))
        ));
        let t = ConnectionString::parse(
            "Endpoint=sb://ns/;SharedAccessSignature=SharedAccessSignature sr=a&sig=b&se=1&skn=c",
        )
        .unwrap();
        assert!(matches!(t.credential, Credential::Token(_)));
    }
}
