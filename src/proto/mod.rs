//! The wire protocol, sans-IO: nothing here touches a socket or a runtime.
//!
//! Every parser takes bytes or text from a peer and returns typed values or a typed error;
//! "need more bytes" is `Ok(None)`. Each has a fuzz target in `fuzz/`.

pub mod address;
pub mod client_id;
pub mod connstr;
pub mod control;
pub mod extensions;
pub mod frame;
pub mod handshake;
pub mod hop;
pub mod host;
pub mod ids;
pub mod mask;
pub mod metadata;
pub mod sas;
pub mod secret;

pub use secret::Secret;
