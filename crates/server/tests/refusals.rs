//! What a server logs of refused tokens: every refusal in the audit line,
//! with its reason, and a warning at most once a second, since any caller
//! can send bad tokens at will. In a test binary of its own, so that no
//! other test on another thread hits these log lines first while nobody
//! listens (tracing would remember that nobody does).

use std::sync::{Arc, Mutex};

use securemesh::v1::data_service_server::DataService as _;
use securemesh::v1::SubmitRequest;
use securemesh_crypto::KeyRing;
use securemesh_server::DataHandler;
use tonic::Request;

/// Log output gathered in memory.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn each_refusal_is_audited_with_its_reason_and_warned_of_once_a_second() {
    let lines = Lines::default();
    let writer = lines.clone();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );
    let keys = KeyRing::from_key_strings(&[securemesh_crypto::generate_key()]).unwrap();
    let handler = DataHandler::new(keys.clone(), "test:1", false);
    for _ in 0..20 {
        let refused = handler
            .submit(Request::new(SubmitRequest {
                token: b"garbage".to_vec().into(),
            }))
            .await;
        assert!(refused.is_err());
    }
    let accepted = handler
        .submit(Request::new(SubmitRequest {
            token: keys.encrypt(b"fine").into(),
        }))
        .await;
    assert!(accepted.is_ok());
    let log = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
    let audited = |refused: bool| {
        log.lines()
            .filter(|line| line.contains(" audit "))
            .filter(|line| line.contains("refused=\"invalid token: malformed token") == refused)
            .count()
    };
    assert_eq!((audited(true), audited(false)), (20, 1), "{log}");
    assert_eq!(log.matches("Submit refused").count(), 1, "{log}");
}
