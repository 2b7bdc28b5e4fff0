//! The DataService server: verifies and decrypts Fernet tokens from
//! mutually authenticated callers and answers with the plaintext's digest.
//!
//! [`DataHandler`] is the service alone, free of transport concerns; wrap it
//! in `DataServiceServer` and run it with [`securemesh_tls::serve_mtls`],
//! which adds mutual TLS, health and reflection.

mod handler;

pub use handler::DataHandler;
