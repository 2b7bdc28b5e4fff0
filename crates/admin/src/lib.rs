//! The admin listener of servers and coordinators, off unless
//! `--metrics-listen` is given, on loopback unless told otherwise:
//!
//! - `/metrics`: Prometheus text exposition of every series the process
//!   records (`securemesh_telemetry::metrics()`);
//! - `/status`: a [`StatusReport`] as JSON;
//! - `/`: the same as a small HTML page that refreshes itself and needs
//!   nothing from the network.
//!
//! [`fetch_status`] is the client side, for `securemesh status`.

mod client;
mod page;
mod report;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Json};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

pub use client::{fetch, fetch_status, FetchError};
pub use report::{BackendStatus, StatusReport};

/// Why the admin listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The address is not `PORT`, `:PORT`, `IP:PORT` or `localhost:PORT`.
    #[error("{0:?} is not PORT, :PORT, IP:PORT or localhost:PORT (an http:// in front is fine)")]
    Address(String),
}

/// Produces the process's status on demand.
pub type StatusSource = Arc<dyn Fn() -> StatusReport + Send + Sync>;

/// `9100`, `:9100` and `localhost:9100` mean `127.0.0.1:9100`;
/// `0.0.0.0:9100` or any `IP:PORT` is taken as written. The URL a process
/// logs for its admin listener (`http://127.0.0.1:9100/`) is accepted too.
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, AdminError> {
    let address = text.strip_prefix("http://").unwrap_or(text);
    let address = address.strip_suffix('/').unwrap_or(address);
    let port_only = address
        .strip_prefix(':')
        .or_else(|| address.strip_prefix("localhost:"))
        .unwrap_or(address);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    address
        .parse()
        .map_err(|_| AdminError::Address(text.to_owned()))
}

#[derive(Clone)]
struct Admin {
    status: StatusSource,
}

/// Serves `/metrics`, `/status` and `/` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    status: StatusSource,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/status", get(status_json))
        .route("/", get(status_page))
        .with_state(Admin { status });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_text() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        securemesh_telemetry::metrics().render(),
    )
}

async fn status_json(State(admin): State<Admin>) -> Json<StatusReport> {
    Json((admin.status)())
}

async fn status_page(State(admin): State<Admin>) -> Html<String> {
    Html(page::render(&(admin.status)()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_alone_means_loopback() {
        for text in ["9100", ":9100"] {
            assert_eq!(
                parse_listen_address(text).unwrap(),
                SocketAddr::from(([127, 0, 0, 1], 9100))
            );
        }
        assert_eq!(
            parse_listen_address("0.0.0.0:9100").unwrap(),
            SocketAddr::from(([0, 0, 0, 0], 9100))
        );
        for logged in [
            "http://127.0.0.1:9100",
            "http://127.0.0.1:9100/",
            "localhost:9100",
        ] {
            assert_eq!(
                parse_listen_address(logged).unwrap(),
                SocketAddr::from(([127, 0, 0, 1], 9100)),
                "{logged}"
            );
        }
        for bad in [
            "",
            "example.org:9100",
            "99999",
            "127.0.0.1",
            "https://127.0.0.1:9100",
        ] {
            assert!(parse_listen_address(bad).is_err(), "{bad} was accepted");
        }
    }
}
