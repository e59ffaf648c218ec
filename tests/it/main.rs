mod api;
mod providers;
mod store;
mod support;
