//! Mutual TLS for every securemesh connection.
//!
//! Servers and the coordinator accept connections through our own rustls
//! acceptor ([`TlsIncoming`]) rather than tonic's `ServerTlsConfig`: we need
//! control over the client verifier (revocation lists, rotation), a handshake
//! timeout and logging of refused handshakes. Outgoing connections present
//! our certificate and trust our CA through [`client_tls_config`] (a rustls
//! configuration for the balancer's own HTTP/2 channels, and for tonic
//! endpoints such as readiness checks). [`serve_mtls`] runs a tonic service
//! behind the acceptor with health and reflection; the coordinator's front
//! end serves HTTP/2 itself over the same acceptor. One crypto provider,
//! `ring`, is used throughout.

mod acceptor;
mod authorize;
mod client;
mod health;
mod identity;
mod material;
mod serve;
mod server;
mod throttle;

pub use acceptor::{Connection, PeerInfo, TlsIncoming};
pub use authorize::{
    audit_unserved_call, authorized_data_service, decode_caller, encode_caller, Authorization,
    Authorized, Caller, HandlerAudit, UnservedCall, CALLER_HEADER, COORDINATOR_IDENTITY,
};
pub use client::{client_tls, client_tls_config, foreign_server_tls, ClientTls};
pub use health::{add_health_and_reflection, report_draining, EndingStreams, ReflectionError};
pub use identity::{caller_identity, dialling_names, peer_identity, request_identity};
pub use material::{TlsError, TlsFiles};
pub use serve::{serve_mtls, ServeError, ServeOptions};
pub use server::{server_config, server_tls, ReloadableConfig, ServerTls};
pub use throttle::admit_log_line;
