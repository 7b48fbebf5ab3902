//! Just enough DER to read two things from a certificate: its `notAfter` (doctor's expiry
//! warning) and the names its subjectAltName covers (the host names a relay answers to by
//! default).
//!
//! Walks `Certificate → tbsCertificate → validity → notAfter` (RFC 5280 §4.1) and converts
//! a UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`) to
//! Unix seconds; and `tbsCertificate → extensions → subjectAltName` for its dNSName and
//! iPAddress entries. Anything unexpected gives `None` or nothing; rustls does the
//! verifying, so this never decides trust.

/// DER tags this walk meets.
const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const EXPLICIT_VERSION: u8 = 0xA0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const EXPLICIT_EXTENSIONS: u8 = 0xA3;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
/// subjectAltName, 2.5.29.17.
const SAN_OID: &[u8] = &[0x55, 0x1D, 0x11];
/// GeneralName choices: dNSName [2] and iPAddress [7], both implicit and primitive.
const DNS_NAME: u8 = 0x82;
const IP_ADDRESS: u8 = 0x87;

/// `tbsCertificate` from `serial` on (the optional version skipped).
fn tbs_fields(der: &[u8]) -> Option<&[u8]> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    if rest.first() == Some(&EXPLICIT_VERSION) {
        rest = tlv(rest)?.2;
    }
    Some(rest)
}

/// `notAfter` of a DER certificate, in Unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let rest = tbs_fields(der)?;
    let (_serial, rest) = expect(rest, INTEGER)?;
    let (_signature, rest) = expect(rest, SEQUENCE)?;
    let (_issuer, rest) = expect(rest, SEQUENCE)?;
    let (validity, _) = expect(rest, SEQUENCE)?;
    let (_, _not_before, rest) = tlv(validity)?;
    let (tag, not_after, _) = tlv(rest)?;
    parse_time(tag, not_after)
}

/// The dNSName and iPAddress entries of a DER certificate's subjectAltName, lower-cased,
/// IPv6 addresses in brackets (as a token's audience writes them). Empty if it has none or
/// the certificate cannot be read.
pub fn subject_names(der: &[u8]) -> Vec<String> {
    san(der).unwrap_or_default()
}

fn san(der: &[u8]) -> Option<Vec<String>> {
    let rest = tbs_fields(der)?;
    // serial, signature, issuer, validity, subject, subjectPublicKeyInfo
    let mut rest = rest;
    for _ in 0..6 {
        rest = tlv(rest)?.2;
    }
    // Optional issuerUniqueID [1] and subjectUniqueID [2], then extensions [3].
    let extensions = loop {
        let (tag, content, after) = tlv(rest)?;
        if tag == EXPLICIT_EXTENSIONS {
            break expect(content, SEQUENCE)?.0;
        }
        rest = after;
    };
    let mut list = extensions;
    while !list.is_empty() {
        let (ext, after) = expect(list, SEQUENCE)?;
        list = after;
        let (oid, mut fields) = expect(ext, OID)?;
        if oid != SAN_OID {
            continue;
        }
        if fields.first() == Some(&BOOLEAN) {
            fields = tlv(fields)?.2;
        }
        let (value, _) = expect(fields, OCTET_STRING)?;
        let (mut names, _) = expect(value, SEQUENCE)?;
        let mut out = Vec::new();
        while !names.is_empty() {
            let (tag, content, after) = tlv(names)?;
            names = after;
            match (tag, content.len()) {
                (DNS_NAME, _) => out.push(std::str::from_utf8(content).ok()?.to_ascii_lowercase()),
                (IP_ADDRESS, 4) => out.push(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(content).ok()?).to_string()),
                (IP_ADDRESS, 16) => out.push(format!(
                    "[{}]",
                    std::net::Ipv6Addr::from(<[u8; 16]>::try_from(content).ok()?)
                )),
                _ => {}
            }
        }
        return Some(out);
    }
    Some(Vec::new())
}

/// One TLV of `tag`: its content and what follows it.
fn expect(buf: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, content, rest) = tlv(buf)?;
    (t == tag).then_some((content, rest))
}

/// Splits the first TLV off `buf`: tag, content, rest. Single-byte tags, definite lengths.
fn tlv(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, buf) = buf.split_first()?;
    let (&first, mut buf) = buf.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || buf.len() < n {
            return None;
        }
        let len = buf[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        buf = &buf[n..];
        len
    };
    (buf.len() >= len).then(|| (tag, &buf[..len], &buf[len..]))
}

/// UTCTime or GeneralizedTime (UTC, `Z`, no fractions) to Unix seconds.
fn parse_time(tag: u8, text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    let (year, rest) = match tag {
        UTC_TIME if text.len() == 12 => {
            let yy = digits(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        GENERALIZED_TIME if text.len() == 14 => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| digits(&rest[i..i + 2]);
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(days * 86_400 + hour * 3_600 + minute * 60 + second)
}

fn digits(s: &str) -> Option<i64> {
    s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse().ok())?
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_until(year: i32, month: u8, day: u8) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(vec!["relay.test".to_owned()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(year, month, day);
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_utc_time() {
        // 2030-01-01T00:00:00Z
        assert_eq!(not_after(&cert_until(2030, 1, 1)), Some(1_893_456_000));
    }

    #[test]
    fn reads_generalized_time() {
        // Years from 2050 on are GeneralizedTime. 2060-03-01T00:00:00Z
        assert_eq!(not_after(&cert_until(2060, 3, 1)), Some(2_845_324_800));
    }

    #[test]
    fn time_forms() {
        assert_eq!(parse_time(UTC_TIME, b"700101000000Z"), Some(0));
        assert_eq!(parse_time(UTC_TIME, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(GENERALIZED_TIME, b"20000229120000Z"), Some(951_825_600));
        assert_eq!(parse_time(UTC_TIME, b"700101000000"), None);
        assert_eq!(parse_time(UTC_TIME, b"701301000000Z"), None);
        assert_eq!(parse_time(GENERALIZED_TIME, b"700101000000Z"), None);
    }

    #[test]
    fn reads_subject_alt_names() {
        let p = rcgen::CertificateParams::new(vec![
            "Relay.Example.com".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
            "*.nodes.example.com".to_owned(),
        ])
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let der = p.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(
            subject_names(&der),
            ["relay.example.com", "127.0.0.1", "[::1]", "*.nodes.example.com"]
        );
        assert!(subject_names(b"").is_empty());
        assert!(subject_names(&der[..60]).is_empty());
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(not_after(b""), None);
        assert_eq!(not_after(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        let mut der = cert_until(2030, 1, 1);
        der.truncate(40);
        assert_eq!(not_after(&der), None);
    }
}
