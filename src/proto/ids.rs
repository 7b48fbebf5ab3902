//! Identifiers the protocol carries: tracking ids (`sb-hc-id`, GUID-formatted) and
//! rendezvous secrets (the unguessable capability in an `accept` address).

/// A random GUID-formatted id (version 4 layout), as .NET clients send in `sb-hc-id`.
pub fn new_id() -> String {
    let mut b = rand::random::<[u8; 16]>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut id = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            id.push('-');
        }
        push_hex(&mut id, *x);
    }
    id
}

/// 128 random bits as 32 hex digits: a rendezvous capability.
pub fn new_secret() -> String {
    let mut s = String::with_capacity(32);
    for x in rand::random::<[u8; 16]>() {
        push_hex(&mut s, x);
    }
    s
}

/// Appends `x` as two lowercase hex digits (one allocation per id, not one per byte).
fn push_hex(s: &mut String, x: u8) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    s.push(char::from(DIGITS[usize::from(x >> 4)]));
    s.push(char::from(DIGITS[usize::from(x & 0x0f)]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_secrets() {
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(new_secret(), new_secret());
        assert_eq!(new_secret().len(), 32);
        // 8-4-4-4-12 lowercase hex digits, version 4, RFC 4122 variant.
        let groups: Vec<&str> = id.split('-').collect();
        assert_eq!(groups.iter().map(|g| g.len()).collect::<Vec<_>>(), [8, 4, 4, 4, 12]);
        assert!(
            id.chars()
                .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c))
        );
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        let secret = new_secret();
        assert!(secret.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
    }

    #[test]
    fn hex_digits_are_each_bytes_value() {
        let mut s = String::new();
        for x in [0x00, 0x09, 0x0a, 0x7f, 0xf0, 0xff] {
            push_hex(&mut s, x);
        }
        assert_eq!(s, "00090a7ff0ff");
    }
}
