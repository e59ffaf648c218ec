mod api;
mod auth;
mod chaos;
mod graphql;
mod private_dockerd;
mod providers;
mod store;
mod support;
