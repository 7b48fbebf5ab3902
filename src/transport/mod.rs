//! Sockets, TLS, outbound proxies and WebSocket connections over them; everything that
//! does I/O for the protocol layer.

pub mod cert;
pub mod http;
pub mod http_body;
pub mod proxy;
pub mod record;
pub mod sock;
pub mod stream;
pub mod tls;
pub mod tls_conn;
pub mod tls_session;
pub mod ws;

pub use stream::Stream;
