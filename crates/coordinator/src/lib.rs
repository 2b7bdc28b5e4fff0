//! The coordinator: a DataService proxy that spreads calls over backend
//! servers and hides their failures from clients.
//!
//! A call goes through a stack of tower layers, each in its own module:
//!
//! 1. [`retry`]: a failed attempt that is safe to repeat (`UNAVAILABLE`,
//!    connection failures) is sent again, bounded by attempts and by a retry
//!    budget shared by all calls;
//! 2. [`fail_fast`]: with no healthy backend, the call fails at once with
//!    `UNAVAILABLE` instead of queueing;
//! 3. a `tower::buffer::Buffer`, so that many calls share one balancer;
//! 4. `tower::balance::p2c::Balance` over a [`pool::BackendPool`] discovery
//!    stream, comparing backends by their calls in flight;
//! 5. [`backend::Backend`]: one backend's channel, which reports itself not
//!    ready while ejected; [`health`] probes it and brings it back.
//!
//! The coordinator relays tokens as opaque bytes: it never holds a Fernet key.
//! Wrap a [`Coordinator`] in `DataServiceServer` and run it with
//! `securemesh_tls::serve_mtls`, which adds mutual TLS, health and reflection.

pub mod backend;
pub mod fail_fast;
pub mod health;
pub mod pool;
pub mod proxy;
pub mod retry;

pub use pool::{BackendOptions, BackendPool, BackendSnapshot};
pub use proxy::{Coordinator, ProxyOptions};
