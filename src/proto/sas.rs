//! Shared Access Signature tokens (hc-protocol.md §3), sans-IO.
//!
//! `SharedAccessSignature sr=<enc uri>&sig=<enc b64 hmac>&se=<unix secs>&skn=<key name>`.
//! The signature is HMAC-SHA256 keyed with the Base64 key *text*, over the raw (still
//! encoded) `sr` as it appears in the token, a newline and `se`. Verification never
//! re-encodes `sr`, because clients disagree on percent-encoding case.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// What JavaScript's `encodeURIComponent` leaves alone; the encoding all clients use for `sr`.
pub const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Rights a SAS rule grants.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rights(u8);

impl Rights {
    pub const LISTEN: Rights = Rights(1);
    pub const SEND: Rights = Rights(2);
    pub const MANAGE: Rights = Rights(4);
    pub const ALL: Rights = Rights(7);

    /// True if every right in `other` is also in `self`.
    pub fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: Rights) -> Rights {
        Rights(self.0 | other.0)
    }

    /// Names as Azure spells them: `Listen`, `Send`, `Manage`.
    pub fn names(self) -> Vec<&'static str> {
        [(Self::LISTEN, "Listen"), (Self::SEND, "Send"), (Self::MANAGE, "Manage")]
            .into_iter()
            .filter(|(r, _)| self.contains(*r))
            .map(|(_, n)| n)
            .collect()
    }

    /// Parses `Listen`, `Send`, `Manage` (any case). Manage implies Listen and Send.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<Rights, String> {
        let mut r = Rights::default();
        for n in names {
            r = r.union(match n.to_ascii_lowercase().as_str() {
                "listen" => Self::LISTEN,
                "send" => Self::SEND,
                "manage" => Self::ALL,
                other => return Err(format!("unknown right {other:?} (expected Listen, Send or Manage)")),
            });
        }
        Ok(r)
    }
}

impl fmt::Debug for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.names().join("|"))
    }
}

/// One way a token string can be malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The text does not start with `SharedAccessSignature `.
    #[error("token does not start with 'SharedAccessSignature '")]
    MissingPrefix,
    /// One of `sr`, `sig`, `se`, `skn` is absent or empty.
    #[error("token lacks the '{0}' field")]
    MissingField(&'static str),
    /// `se` is not a number of seconds.
    #[error("token expiry 'se' is not a number")]
    BadExpiry,
    /// A field is not valid percent-encoded UTF-8.
    #[error("token field '{0}' is not valid percent-encoded UTF-8")]
    BadEncoding(&'static str),
}

/// A parsed token. `Debug` hides the signature.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as in the token (percent-encoded); the signature covers this text.
    pub sr_raw: String,
    /// `sr` decoded once: the resource URI the token is scoped to.
    pub resource: String,
    /// Base64 signature text, percent-decoded.
    sig: String,
    /// Expiry, Unix seconds.
    pub expiry: u64,
    /// Key name, decoded.
    pub key_name: String,
}

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasToken")
            .field("resource", &self.resource)
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .field("sig", &"***")
            .finish()
    }
}

fn decode(field: &'static str, v: &str) -> Result<String, SasError> {
    percent_decode_str(v)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| SasError::BadEncoding(field))
}

impl SasToken {
    /// Parses a token; fields may come in any order, names are case-insensitive.
    pub fn parse(token: &str) -> Result<Self, SasError> {
        let token = token.trim();
        let prefix = "SharedAccessSignature ";
        let body = match token.get(..prefix.len()) {
            Some(p) if p.eq_ignore_ascii_case(prefix) => &token[prefix.len()..],
            _ => return Err(SasError::MissingPrefix),
        };
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for pair in body.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let slot = match k.trim().to_ascii_lowercase().as_str() {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => continue,
            };
            *slot = Some(v).filter(|v| !v.is_empty());
        }
        let sr_raw = sr.ok_or(SasError::MissingField("sr"))?;
        let se_text = decode("se", se.ok_or(SasError::MissingField("se"))?)?;
        // .NET parses `se` as a double; accept a fractional part and ignore it.
        let expiry = se_text
            .split('.')
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(SasError::BadExpiry)?;
        Ok(SasToken {
            resource: decode("sr", sr_raw)?,
            sr_raw: sr_raw.to_owned(),
            sig: decode("sig", sig.ok_or(SasError::MissingField("sig"))?)?,
            expiry,
            key_name: decode("skn", skn.ok_or(SasError::MissingField("skn"))?)?,
        })
    }

    /// Whether the signature was made with `key`.
    ///
    /// Constant time: `aws_lc_rs::hmac::verify` recomputes the tag and compares it in
    /// constant time (`CRYPTO_memcmp`). Never compare tags with `==`, which
    /// stops at the first differing byte and lets a client learn the tag byte by byte.
    pub fn signed_with(&self, key: &str) -> bool {
        let Ok(sig) = B64.decode(self.sig.as_bytes()) else {
            return false;
        };
        let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key.as_bytes());
        aws_lc_rs::hmac::verify(&k, string_to_sign(&self.sr_raw, self.expiry).as_bytes(), &sig).is_ok()
    }

    /// True once `now` is past the expiry.
    pub fn expired_at(&self, now: u64) -> bool {
        self.expiry < now
    }
}

fn string_to_sign(sr_raw: &str, expiry: u64) -> String {
    format!("{sr_raw}\n{expiry}")
}

/// Makes a token for `resource_uri` that expires at `expiry` (Unix seconds).
///
/// Encodes like `encodeURIComponent`, as hyco and the docs' helpers do.
pub fn create_token(resource_uri: &str, key_name: &str, key: &str, expiry: u64) -> String {
    let sr = utf8_percent_encode(resource_uri, URI_COMPONENT).to_string();
    let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, key.as_bytes());
    let tag = aws_lc_rs::hmac::sign(&k, string_to_sign(&sr, expiry).as_bytes());
    let sig = utf8_percent_encode(&B64.encode(tag.as_ref()), URI_COMPONENT).to_string();
    let skn = utf8_percent_encode(key_name, URI_COMPONENT);
    format!("SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn={skn}")
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The host and path a resource URI names, for the scope rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// Lower-cased host, without port.
    pub host: String,
    /// Percent-decoded path, lower-cased, always ending in `/`.
    pub path: String,
}

impl Scope {
    /// Parses a decoded `sr`: any scheme, the port ignored, query and fragment dropped.
    pub fn from_resource(resource: &str) -> Option<Scope> {
        let rest = resource.split_once("://").map(|(_, r)| r).unwrap_or(resource);
        let rest = rest.split(['?', '#']).next().unwrap_or("");
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let host = strip_port(authority).to_ascii_lowercase();
        if host.is_empty() {
            return None;
        }
        Some(Scope {
            host,
            path: normalize_path(&percent_decode_str(path).decode_utf8_lossy()),
        })
    }

    /// Whether this scope covers `target` (a decoded path such as `/hc1/suffix`):
    /// segment-prefix match, case-insensitive.
    pub fn covers(&self, target: &str) -> bool {
        normalize_path(target).starts_with(&self.path)
    }
}

/// Host without `:port`; keeps IPv6 literals in brackets whole.
pub fn strip_port(authority: &str) -> &str {
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    if authority.starts_with('[') {
        return authority.split_inclusive(']').next().unwrap_or(authority);
    }
    authority.split(':').next().unwrap_or(authority)
}

/// Lower-cases, collapses duplicate slashes and makes sure of a leading and trailing `/`.
pub fn normalize_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 2);
    out.push('/');
    for seg in path.split('/').filter(|s| !s.is_empty()) {
        out.push_str(&seg.to_lowercase());
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "J0J3GRnd0oq+HoKnOqLXm1jmjJM2Wov30j8nvRr2Jcg=";

    #[test]
    fn a_tag_wrong_in_any_byte_or_length_fails() {
        // The comparison itself is ring's constant-time one (see `signed_with`); this pins
        // the behaviour: first, last and middle byte, truncated and extended tags.
        let good = create_token("http://ns/hc1", "r", KEY, 2_000_000_000);
        let t = SasToken::parse(&good).unwrap();
        assert!(t.signed_with(KEY));
        let tag = B64.decode(t.sig.as_bytes()).unwrap();
        let mut variants = Vec::new();
        for i in [0, tag.len() / 2, tag.len() - 1] {
            let mut v = tag.clone();
            v[i] ^= 1;
            variants.push(v);
        }
        variants.push(tag[..tag.len() - 1].to_vec());
        variants.push([tag.as_slice(), &[0]].concat());
        for v in variants {
            let forged = SasToken {
                sig: B64.encode(&v),
                ..t.clone()
            };
            assert!(!forged.signed_with(KEY));
        }
    }

    #[test]
    fn create_parse_verify_round_trip() {
        let t = create_token("http://ns:443/hc1", "defaultListener", KEY, 2_000_000_000);
        assert!(t.starts_with("SharedAccessSignature sr=http%3A%2F%2Fns%3A443%2Fhc1&sig="));
        let p = SasToken::parse(&t).unwrap();
        assert_eq!(p.resource, "http://ns:443/hc1");
        assert_eq!(p.key_name, "defaultListener");
        assert!(p.signed_with(KEY));
        assert!(!p.signed_with("other"));
        assert!(!p.expired_at(1_999_999_999));
        assert!(p.expired_at(2_000_000_001));
    }

    #[test]
    fn signature_covers_raw_sr_whatever_its_encoding() {
        // Lower-case escapes as in the docs' example: sign over the raw text.
        let sr = "http%3a%2f%2fns%2fhc1";
        let k = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, KEY.as_bytes());
        let sig = B64.encode(aws_lc_rs::hmac::sign(&k, format!("{sr}\n100").as_bytes()).as_ref());
        let sig = utf8_percent_encode(&sig, URI_COMPONENT);
        let t = format!("sharedaccesssignature skn=r&se=100&SIG={sig}&sr={sr}");
        let p = SasToken::parse(&t).unwrap();
        assert!(p.signed_with(KEY));
        assert_eq!(p.resource, "http://ns/hc1");
    }

    #[test]
    fn malformed_tokens() {
        assert_eq!(SasToken::parse("Bearer x"), Err(SasError::MissingPrefix));
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=b&skn=c"),
            Err(SasError::MissingField("se"))
        );
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sig=b&se=x&skn=c"),
            Err(SasError::BadExpiry)
        );
        let p = SasToken::parse("SharedAccessSignature sr=a&sig=%%%&se=1&skn=c").unwrap();
        assert!(!p.signed_with(KEY), "undecodable signature never verifies");
    }

    #[test]
    fn scope_rule() {
        let s = Scope::from_resource("http://NS:443/HC1").unwrap();
        assert_eq!((s.host.as_str(), s.path.as_str()), ("ns", "/hc1/"));
        assert!(s.covers("/hc1"));
        assert!(s.covers("/hc1/sub/x"));
        assert!(!s.covers("/hc10"));
        let root = Scope::from_resource("sb://ns").unwrap();
        assert!(root.covers("/anything"));
        let spaced = Scope::from_resource("https://ns/My%20HC/").unwrap();
        assert!(spaced.covers("/my hc"));
        assert_eq!(strip_port("[::1]:9443"), "[::1]");
    }

    #[test]
    fn rights() {
        let r = Rights::from_names(["manage"]).unwrap();
        assert!(r.contains(Rights::LISTEN) && r.contains(Rights::SEND));
        assert!(!Rights::LISTEN.contains(Rights::SEND));
        assert_eq!(format!("{:?}", Rights::LISTEN.union(Rights::SEND)), "Listen|Send");
        assert!(Rights::from_names(["write"]).is_err());
    }
}
