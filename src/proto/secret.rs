//! [`Secret`]: a string that never shows up in `Debug`, `Display` or logs.

use std::fmt;

/// Key material or a token. Prints as `***`; read it with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret text. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A fresh 256-bit key as Base64 text (44 characters), the form Azure uses.
    pub fn random_key() -> Self {
        use base64::Engine;
        Self(base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints() {
        let s = Secret::random_key();
        assert_eq!(s.expose().len(), 44);
        assert_eq!(format!("{s:?} {s}"), "*** ***");
    }
}
