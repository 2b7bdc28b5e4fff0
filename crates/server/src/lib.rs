//! The DataService server: verifies and decrypts Fernet tokens from
//! mutually authenticated callers and answers with the plaintext's digest.
//!
//! [`DataHandler`] is the service alone, free of transport concerns;
//! `securemesh_tls::authorized_data_service` puts it behind authorization
//! and a message size limit, and `securemesh_tls::serve_mtls` runs that with
//! mutual TLS, health and reflection.

mod handler;

pub use handler::DataHandler;
