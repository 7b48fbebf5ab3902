//! hyrelay: a self-hosted Hybrid Connections relay, connection manager and bridge.
//!
//! Layout (see `../shared/docs/architecture.md` for the design):
//! - [`proto`]: the Azure Relay Hybrid Connections wire protocol, sans-IO.
pub mod bridge;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod dataplane;
pub mod echo;
#[doc(hidden)]
pub mod fuzzing;
pub mod hcm;
pub mod proto;
pub mod relay;
pub mod telemetry;
pub mod transport;
