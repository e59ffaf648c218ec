mod api;
mod graphql;
mod providers;
mod store;
mod support;
