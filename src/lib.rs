//! StacyVM: a self-hosted control plane for disposable, isolated sandboxes.
//!
//! See ARCHITECTURE.md for the map of this crate.

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod duration;
pub mod events;
pub mod failpoint;
pub mod ids;
pub mod image_ref;
pub mod lifecycle;
pub mod provider;
pub mod scheduler;
pub mod service;
pub mod store;
pub mod ticker;
pub mod worker;
