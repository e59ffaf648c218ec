//! sea-orm entities for StacyVM's persistence model (see ARCHITECTURE.md).
//!
//! One module per table. Timestamps are UTC; durations are stored as
//! milliseconds; string maps (metadata) as JSON.

pub mod api_key;
pub mod audit_event;
pub mod execution;
pub mod lease;
pub mod owner;
pub mod provider;
pub mod sandbox;
pub mod template;
pub mod worker;
