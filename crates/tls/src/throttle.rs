//! Log lines that anyone who can reach a port can cause at will (refused
//! connections, failed handshakes), at most one a second of each kind.
//! Without a limit, a flood of connections becomes a flood of log lines
//! that fills the disk and buries everything else; the metrics count every
//! event anyway. A line that is let through says how many of its kind were
//! held back since the last one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One line per kind per interval.
#[derive(Debug)]
pub(crate) struct LogThrottle {
    interval: Duration,
    kinds: Mutex<Vec<(&'static str, Window)>>,
}

/// The last line of one kind and what was held back since.
#[derive(Debug)]
struct Window {
    logged_at: Instant,
    held_back: u64,
}

impl LogThrottle {
    pub(crate) const fn new(interval: Duration) -> Self {
        Self {
            interval,
            kinds: Mutex::new(Vec::new()),
        }
    }

    /// `Some(lines of this kind held back since the last one)` when a line
    /// of `kind` may be logged now; `None` (counted) when it may not.
    pub(crate) fn admit(&self, kind: &'static str) -> Option<u64> {
        let now = Instant::now();
        let mut kinds = self
            .kinds
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let Some((_, window)) = kinds.iter_mut().find(|(known, _)| *known == kind) else {
            kinds.push((
                kind,
                Window {
                    logged_at: now,
                    held_back: 0,
                },
            ));
            return Some(0);
        };
        if now.duration_since(window.logged_at) < self.interval {
            window.held_back += 1;
            return None;
        }
        window.logged_at = now;
        Some(std::mem::take(&mut window.held_back))
    }
}

/// The throttle of the connection-level log lines of this process.
pub(crate) static CONNECTION_EVENTS: LogThrottle = LogThrottle::new(Duration::from_secs(1));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_interval_then_the_count_of_those_held_back() {
        let throttle = LogThrottle::new(Duration::from_millis(200));
        assert_eq!(throttle.admit("refused"), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.admit("refused"), None);
        }
        // Another kind has its own allowance.
        assert_eq!(throttle.admit("timeout"), Some(0));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(throttle.admit("refused"), Some(5));
        assert_eq!(throttle.admit("refused"), None);
        assert_eq!(throttle.admit("timeout"), Some(0));
    }
}
