//! proxypool's system tests: the whole system for one test, each service started in-process through the same
//! `App::build(config, …)` and `run(shutdown)` as its `main.rs`, configured through its own `from_env` from the
//! environment an operator would set ([`proxypool_test_support::service_env`]).
//!
//! - [`app`]: [`TestApp`], with typed helpers (lease over HTTP and NATS, insert proxies, check the invariants).
//! - [`load`]: consumers and a probe for the fault tests, judged from the consumers' own records.
//!
//! The tests under `tests/` span services; each service's own crate tests only itself (its binary's lifecycle).

pub mod app;
pub mod load;

pub use app::{TestApp, TestAppBuilder};
pub use proxypool_test_support::{fakes, init_logs, servers, MongoServer, NatsServer, API_KEY, JWT_SECRET};
