//! sea-orm entities for StacyVM's persistence model (see ARCHITECTURE.md).
//!
//! One module per table. Timestamps are UTC; durations are stored as
//! milliseconds; string maps (metadata) as JSON.

pub mod api_key;
pub mod audit_event;
pub mod cluster_secret;
pub mod execution;
pub mod leadership;
pub mod lease;
pub mod owner;
pub mod provider;
pub mod replica;
pub mod sandbox;
pub mod template;
pub mod worker;
