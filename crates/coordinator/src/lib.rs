//! The coordinator: a DataService proxy that spreads calls over backend
//! servers and hides their failures from clients.
//!
//! The balancing, health checking, ejection and retries live in
//! [`securemesh_balance`]; this crate adds the proxying `DataService`
//! ([`Coordinator`]), which honours the caller's deadline and tells servers
//! who its caller was, and its HTTP/2 front end ([`serve`]), which adds
//! authorization, a message size limit, mutual TLS (`securemesh_tls`'s
//! acceptor), health, reflection and graceful drain.
//!
//! The coordinator relays tokens as opaque bytes: it never holds a Fernet key.

pub mod deadline;
pub mod front;
pub mod proxy;

pub use front::serve;
pub use proxy::Coordinator;
pub use securemesh_balance::{BackendOptions, BalanceOptions, EjectionPolicy};
