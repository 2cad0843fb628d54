//! HTTP routes, one module per resource.

pub mod body;
pub mod common;
pub mod consumer;
pub mod health;
pub mod imports;
pub mod packages;
pub mod providers;
pub mod proxies;
pub mod users;
