//! Fetching another process's `/status` (for `securemesh status`) or any
//! other admin path.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use crate::StatusReport;

/// How long `securemesh status` waits for an answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer read: a status or a metrics page is far smaller,
/// and whatever else answers at the address must not fill the memory.
const MOST_ANSWER_BYTES: usize = 16 * 1024 * 1024;

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
    /// The answer is larger than any admin listener's.
    #[error("the answer is larger than {} MiB: not an admin listener", MOST_ANSWER_BYTES >> 20)]
    TooLarge,
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
    // The listener wants to be named as this host: "localhost" for a
    // loopback address, or an address that stands for every one of them
    // (0.0.0.0, which Linux reaches over loopback).
    let host = if address.ip().is_loopback() || address.ip().is_unspecified() {
        format!("localhost:{}", address.port())
    } else {
        address.to_string()
    };
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = match Limited::new(response.into_body(), MOST_ANSWER_BYTES)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(error) => match error.downcast::<hyper::Error>() {
            Ok(error) => return Err(FetchError::Http(*error)),
            Err(_too_large) => return Err(FetchError::TooLarge),
        },
    };
    driver.abort();
    if !status.is_success() {
        return Err(FetchError::Status(status));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// Whatever answers at the address cannot make `securemesh status`
    /// read without end: an endless answer is cut off at the limit.
    #[tokio::test]
    async fn an_answer_without_end_is_cut_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request).await;
            let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000000000000\r\n\r\n";
            stream.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b'x'; 64 * 1024];
            while stream.write_all(&chunk).await.is_ok() {}
        });
        let refused = fetch(address, "/status").await.unwrap_err();
        assert!(matches!(refused, FetchError::TooLarge), "{refused}");
    }
}
