//! Schema migrations for StacyVM's store, run at start-up and by `stacyvm migrate`.
//!
//! Migrations are written explicitly (not derived from the entities) so that
//! a change to an entity never silently changes history.

pub use sea_orm_migration::prelude::*;

mod m20261128_000001_initial;
mod m20261128_000002_api_keys;
mod m20261201_000003_tenants;
mod m20261202_000004_leases;
mod m20261202_000005_template_worker_labels;
mod m20261202_000006_replicas;
mod m20261202_000007_template_owner_names;
mod m20261203_000008_warm_pools;
mod m20261203_000009_lease_expiry_index;
mod m20261204_000010_reconcile_change_indexes;

/// Every migration, in order.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_initial::Migration),
            Box::new(m20261128_000002_api_keys::Migration),
            Box::new(m20261201_000003_tenants::Migration),
            Box::new(m20261202_000004_leases::Migration),
            Box::new(m20261202_000005_template_worker_labels::Migration),
            Box::new(m20261202_000006_replicas::Migration),
            Box::new(m20261202_000007_template_owner_names::Migration),
            Box::new(m20261203_000008_warm_pools::Migration),
            Box::new(m20261203_000009_lease_expiry_index::Migration),
            Box::new(m20261204_000010_reconcile_change_indexes::Migration),
        ]
    }
}
