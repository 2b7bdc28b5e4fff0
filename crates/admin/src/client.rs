//! Fetching another process's `/status` (for `securemesh status`) or any
//! other admin path.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::StatusReport;

/// How long `securemesh status` waits for an answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a status could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Nothing answered at the address.
    #[error("cannot reach the admin listener at {address}: {source}")]
    Connect {
        /// The address tried.
        address: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed: often a port that is not an admin
    /// listener (a gRPC port speaks TLS, not plain HTTP).
    #[error("no HTTP answer ({0}): is this the port given to --metrics-listen?")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The listener answered with an error status.
    #[error("the admin listener answered {0}")]
    Status(hyper::StatusCode),
    /// The answer is not a status document.
    #[error("not a status document: {0}")]
    Decode(#[from] serde_json::Error),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// `GET http://<address>/status`, decoded.
pub async fn fetch_status(address: SocketAddr) -> Result<StatusReport, FetchError> {
    Ok(serde_json::from_slice(&fetch(address, "/status").await?)?)
}

/// `GET http://<address><path>`: the body of a successful answer.
pub async fn fetch(address: SocketAddr, path: &str) -> Result<Bytes, FetchError> {
    tokio::time::timeout(FETCH_TIMEOUT, get(address, path))
        .await
        .map_err(|_| FetchError::Timeout(FETCH_TIMEOUT))?
}

async fn get(address: SocketAddr, path: &str) -> Result<Bytes, FetchError> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|source| FetchError::Connect { address, source })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, address.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    driver.abort();
    if !status.is_success() {
        return Err(FetchError::Status(status));
    }
    Ok(body)
}
