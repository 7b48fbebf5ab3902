//! hyrelay: a self-hosted Hybrid Connections relay, connection manager and bridge.
//!
//! Layout (see `../shared/docs/architecture.md` for the design):
//! - [`proto`]: the Azure Relay Hybrid Connections wire protocol, sans-IO.
pub mod proto;
pub mod config;
pub mod dataplane;
pub mod relay;
pub mod transport;
pub mod client;
pub mod hcm;
pub mod bridge;
pub mod echo;
#[doc(hidden)]
pub mod fuzzing;
pub mod cli;
pub mod telemetry;
