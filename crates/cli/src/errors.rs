//! How an error reaches a person: its message and each cause after it,
//! leaving out a cause whose text the message already quotes (many error
//! types, ours and the crates', print their source inside their own
//! message, so anyhow's `{:#}` would say it twice).

/// `error` and its causes, joined by `: `, each said once.
pub fn describe(error: &anyhow::Error) -> String {
    securemesh::error_text::with_causes(error.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct Quoting {
        path: &'static str,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("reading the key")]
    struct Silent {
        source: std::io::Error,
    }

    fn missing() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::NotFound, "No such file or directory")
    }

    #[test]
    fn a_cause_is_said_once_whether_its_error_quotes_it_or_not() {
        let quoting = anyhow::Error::new(Quoting {
            path: "certs/server_key.pem",
            source: missing(),
        });
        assert_eq!(
            describe(&quoting),
            "certs/server_key.pem: No such file or directory"
        );
        let silent = anyhow::Error::new(Silent { source: missing() });
        assert_eq!(
            describe(&silent),
            "reading the key: No such file or directory"
        );
        let with_context = anyhow::Error::new(Quoting {
            path: "certs/server_key.pem",
            source: missing(),
        })
        .context("TLS configuration");
        assert_eq!(
            describe(&with_context),
            "TLS configuration: certs/server_key.pem: No such file or directory"
        );
    }
}
