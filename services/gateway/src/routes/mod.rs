//! HTTP routes, one module per audience.

pub mod admin;
pub mod body;
pub mod consumer;
pub mod health;
