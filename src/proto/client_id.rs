//! The client id our bridge names itself with on a sender connect (hyrelay's own header,
//! sans-IO): the header, and the rule by which the relay records what arrives in it. Any
//! other relay ignores the header (and passes it to the listener like any other);
//! Microsoft's clients do not send it.

/// The request header.
pub const CLIENT_ID_HEADER: &str = "X-Hyrelay-Client-Id";
/// Longest client id kept.
pub const MAX_CLIENT_ID: usize = 64;
/// What a client id that is too long or has other characters is recorded as.
pub const INVALID_CLIENT_ID: &str = "(invalid)";

/// The client id a sender sent, as recorded: `None` without the header.
pub fn client_id(header: Option<&str>) -> Option<String> {
    let v = header?.trim();
    let ok = !v.is_empty()
        && v.chars().count() <= MAX_CLIENT_ID
        && v.chars().all(|c| c.is_ascii_alphanumeric() || ".-_:@".contains(c));
    Some(if ok { v.to_owned() } else { INVALID_CLIENT_ID.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_checked() {
        assert_eq!(client_id(None), None);
        assert_eq!(
            client_id(Some(" app-1.corp:web@x ")).as_deref(),
            Some("app-1.corp:web@x")
        );
        assert_eq!(client_id(Some("<script>")).as_deref(), Some(INVALID_CLIENT_ID));
        assert_eq!(client_id(Some(&"a".repeat(65))).as_deref(), Some(INVALID_CLIENT_ID));
    }
}
