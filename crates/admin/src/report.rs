//! The status document: what `/status` answers, the page shows and
//! `securemesh status` prints.

use securemesh_telemetry::WindowSnapshot;

/// One process's status.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StatusReport {
    /// `coordinator` or `server`.
    pub role: String,
    /// The address it serves gRPC on.
    pub listen: String,
    /// The securemesh version.
    pub version: String,
    /// Seconds since it started.
    pub uptime_seconds: u64,
    /// Calls being served now.
    pub in_flight: i64,
    /// Calls answered in the last 10 to 20 seconds.
    pub recent: WindowSnapshot,
    /// Where backends come from, besides the static list (e.g. the etcd
    /// prefix followed).
    pub discovery: Option<String>,
    /// The coordinator's backends (empty for a server).
    pub backends: Vec<BackendStatus>,
}

/// One backend as the coordinator sees it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BackendStatus {
    /// Its URL.
    pub url: String,
    /// `up` (in rotation), `ejected` (for failed calls), or `down` (failing
    /// health checks).
    pub state: String,
    /// Whether its last health check answered `SERVING`.
    pub healthy: bool,
    /// Whether it is ejected for failed calls.
    pub ejected: bool,
    /// Attempts in flight on it now.
    pub in_flight: u64,
    /// Attempts in the last 10 to 20 seconds.
    pub recent: WindowSnapshot,
    /// The most recent failure seen on it.
    pub last_failure: Option<String>,
}

impl BackendStatus {
    /// The state word for a backend: `up`, `ejected` or `down`.
    pub fn state_of(in_rotation: bool, ejected: bool) -> &'static str {
        match (in_rotation, ejected) {
            (true, _) => "up",
            (false, true) => "ejected",
            (false, false) => "down",
        }
    }
}

impl StatusReport {
    /// Backends in rotation.
    pub fn up(&self) -> usize {
        self.backends
            .iter()
            .filter(|backend| backend.state == "up")
            .count()
    }

    /// The report as a table for a terminal. Every text in it came from
    /// whatever answered at the address asked, so each is shown escaped.
    pub fn table(&self) -> String {
        use securemesh::text::printable;
        let mut out = format!(
            "{} {} (securemesh {}), up {} s\n\
             calls: {:.1}/s, p50 {:.2} ms, p99 {:.2} ms, {} failed of {} recently, {} in flight\n",
            printable(&self.role),
            printable(&self.listen),
            printable(&self.version),
            self.uptime_seconds,
            self.recent.per_second,
            self.recent.p50_ms,
            self.recent.p99_ms,
            self.recent.failures,
            self.recent.calls,
            self.in_flight,
        );
        if let Some(discovery) = &self.discovery {
            out.push_str(&format!("discovery: {}\n", printable(discovery)));
        }
        if self.backends.is_empty() {
            return out;
        }
        out.push_str(&format!(
            "backends: {} of {} up\n\n",
            self.up(),
            self.backends.len()
        ));
        let header = [
            "BACKEND",
            "STATE",
            "HEALTH",
            "IN FLIGHT",
            "CALLS/S",
            "P99 MS",
            "LAST FAILURE",
        ];
        let rows: Vec<[String; 7]> = self
            .backends
            .iter()
            .map(|backend| {
                [
                    printable(&backend.url),
                    printable(&backend.state),
                    if backend.healthy {
                        "serving"
                    } else {
                        "failing"
                    }
                    .to_owned(),
                    backend.in_flight.to_string(),
                    format!("{:.1}", backend.recent.per_second),
                    format!("{:.2}", backend.recent.p99_ms),
                    // The failure's text may be a backend's own message.
                    backend
                        .last_failure
                        .as_deref()
                        .map_or_else(|| "-".into(), printable),
                ]
            })
            .collect();
        let mut widths = header.map(str::len);
        for row in &rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let padded: Vec<String> = cells
                .iter()
                .zip(widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            padded.join("  ").trim_end().to_owned() + "\n"
        };
        out.push_str(&line(header.to_vec()));
        for row in &rows {
            out.push_str(&line(row.iter().map(String::as_str).collect()));
        }
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn report() -> StatusReport {
        let backend = |url: &str, up: bool, failure: Option<&str>| BackendStatus {
            url: url.into(),
            state: BackendStatus::state_of(up, false).into(),
            healthy: up,
            ejected: false,
            in_flight: u64::from(up),
            recent: WindowSnapshot {
                calls: 120,
                failures: 0,
                per_second: 12.0,
                p50_ms: 0.5,
                p99_ms: 1.25,
            },
            last_failure: failure.map(str::to_owned),
        };
        StatusReport {
            role: "coordinator".into(),
            listen: "127.0.0.1:8000".into(),
            version: "0.1.0".into(),
            uptime_seconds: 42,
            in_flight: 1,
            recent: WindowSnapshot::default(),
            discovery: None,
            backends: vec![
                backend("https://127.0.0.1:5001", true, None),
                backend(
                    "https://127.0.0.1:5002",
                    false,
                    Some("<b>connection refused</b>"),
                ),
            ],
        }
    }

    #[test]
    fn the_table_lines_up_and_says_what_is_down() {
        let table = report().table();
        assert!(table.contains("backends: 1 of 2 up"), "{table}");
        let rows: Vec<&str> = table
            .lines()
            .skip_while(|line| !line.starts_with("BACKEND"))
            .collect();
        assert_eq!(rows.len(), 3, "{table}");
        let state_column = rows[0].find("STATE").unwrap();
        assert_eq!(&rows[1][state_column..state_column + 2], "up");
        assert_eq!(&rows[2][state_column..state_column + 4], "down");
        assert!(rows[2].ends_with("<b>connection refused</b>"));
    }

    #[test]
    fn a_backend_s_own_text_cannot_drive_the_terminal_or_add_rows() {
        let mut report = report();
        report.backends[1].last_failure = Some("refused\n\x1b[2Jhttps://fake  up".into());
        let table = report.table();
        assert!(!table.contains('\x1b'), "{table:?}");
        assert!(
            table.ends_with("refused\\n\\u{1b}[2Jhttps://fake  up\n"),
            "{table}"
        );
        // Nor can any other text of the report.
        let hostile = "\x1b]0;pwned\x07\nx";
        report.role = hostile.into();
        report.listen = hostile.into();
        report.version = hostile.into();
        report.discovery = Some(hostile.into());
        report.backends[0].state = hostile.into();
        let table = report.table();
        assert!(!table.contains(['\x1b', '\x07']), "{table:?}");
        assert_eq!(table.matches("\\u{1b}]0;pwned").count(), 5, "{table}");
    }

    #[test]
    fn the_report_survives_a_json_round_trip() {
        let report = report();
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<StatusReport>(&json).unwrap(), report);
    }
}
