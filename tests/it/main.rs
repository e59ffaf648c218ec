mod api;
mod auth;
mod graphql;
mod providers;
mod store;
mod support;
