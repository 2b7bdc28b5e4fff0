//! The coordinator: a DataService proxy that spreads calls over backend
//! servers and hides their failures from clients.
//!
//! The balancing, health checking, ejection and retries live in
//! [`securemesh_balance`]; this crate adds the proxying `DataService`
//! ([`Coordinator`]), which honours the caller's deadline and tells servers
//! who its caller was. Serve it with `securemesh_tls::authorized_data_service`
//! and `securemesh_tls::serve_mtls`, which add authorization, a message size
//! limit, mutual TLS, health, reflection and graceful drain.
//!
//! The coordinator relays tokens as opaque bytes: it never holds a Fernet key.

pub mod deadline;
pub mod proxy;

pub use proxy::Coordinator;
pub use securemesh_balance::{BackendOptions, BalanceOptions, EjectionPolicy};
