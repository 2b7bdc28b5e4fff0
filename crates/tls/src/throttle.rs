//! Log lines that anyone who can reach a port can cause at will (refused
//! connections, failed handshakes), at most one a second of each kind.
//! Without a limit, a flood of connections becomes a flood of log lines
//! that fills the disk and buries everything else; the metrics count every
//! event anyway. A line that is let through says how many of its kind were
//! held back since the last one; when a burst ends with lines held back
//! and no line comes to report them, a summary line does, an interval
//! after the last one was held back.

use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

// tokio's clock, which is std's but for tests that pause time.
use tokio::time::Instant;
use tracing::Level;

/// One line per kind per interval. Clones share their windows.
#[derive(Debug, Clone)]
pub(crate) struct LogThrottle {
    interval: Duration,
    kinds: Arc<Mutex<Vec<(&'static str, Window)>>>,
}

/// The last line of one kind and what was held back since.
#[derive(Debug)]
struct Window {
    logged_at: Instant,
    held_back: u64,
    /// When the last line of this kind was held back.
    last_held_back_at: Instant,
    /// Whether a task will report what is held back if no line does.
    summary_due: bool,
}

impl LogThrottle {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            kinds: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// `Some(lines of this kind held back since the last one)` when a line
    /// of `kind` may be logged now; `None` (counted) when it may not. A
    /// summary of what is held back is logged at `level` if no line of the
    /// kind is let through after the burst (only within a tokio runtime).
    pub(crate) fn admit(&self, kind: &'static str, level: Level) -> Option<u64> {
        let now = Instant::now();
        let mut kinds = self.lock();
        let Some((_, window)) = kinds.iter_mut().find(|(known, _)| *known == kind) else {
            kinds.push((
                kind,
                Window {
                    logged_at: now,
                    held_back: 0,
                    last_held_back_at: now,
                    summary_due: false,
                },
            ));
            return Some(0);
        };
        if now.duration_since(window.logged_at) < self.interval {
            window.held_back += 1;
            window.last_held_back_at = now;
            if !window.summary_due {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    window.summary_due = true;
                    // Unlocked first: a runtime that is shutting down
                    // drops the task at once, and its guard locks.
                    drop(kinds);
                    let due = SummaryDue {
                        throttle: self.clone(),
                        kind,
                        armed: true,
                    };
                    runtime.spawn(self.clone().summarize(kind, level, due));
                }
            }
            return None;
        }
        window.logged_at = now;
        Some(std::mem::take(&mut window.held_back))
    }

    /// Waits until `kind` has had no line held back for an interval, then
    /// logs how many are held back, unless a line of the kind took the
    /// count first.
    ///
    /// It says it is done under the same lock that reads the count, so
    /// that a line held back just after is owed a summary of its own; if
    /// the task is dropped instead (unpolled, with its runtime), `due` says
    /// so on its way.
    async fn summarize(self, kind: &'static str, level: Level, mut due: SummaryDue) {
        let mut wake_at = Instant::now() + self.interval;
        loop {
            tokio::time::sleep_until(wake_at).await;
            let now = Instant::now();
            let mut kinds = self.lock();
            let Some((_, window)) = kinds.iter_mut().find(|(known, _)| *known == kind) else {
                return;
            };
            if window.held_back == 0 {
                window.summary_due = false;
                due.armed = false;
                return;
            }
            let quiet_until = window.last_held_back_at + self.interval;
            if now < quiet_until {
                wake_at = quiet_until;
                continue;
            }
            // The summary does not count as the kind's line: the next
            // event is logged in full.
            let held_back = std::mem::take(&mut window.held_back);
            window.summary_due = false;
            due.armed = false;
            drop(kinds);
            if level <= Level::WARN {
                tracing::warn!(kind, held_back, "log lines of this kind held back");
            } else {
                tracing::info!(kind, held_back, "log lines of this kind held back");
            }
            return;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(&'static str, Window)>> {
        self.kinds
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

/// Clears its kind's `summary_due` when the task that owes the summary is
/// dropped before it is done (its runtime ended).
struct SummaryDue {
    throttle: LogThrottle,
    kind: &'static str,
    /// Until the task clears `summary_due` itself.
    armed: bool,
}

impl Drop for SummaryDue {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut kinds = self.throttle.lock();
        if let Some((_, window)) = kinds.iter_mut().find(|(known, _)| *known == self.kind) {
            window.summary_due = false;
        }
    }
}

/// Whether a log line of `kind` that anyone who can reach the process may
/// cause at will (a refused token, ...) may be logged now, at `level`:
/// `Some(lines of this kind held back since the last one)`, or `None`
/// (counted, and summed up later). One throttle for the whole process.
pub fn admit_log_line(kind: &'static str, level: Level) -> Option<u64> {
    CONNECTION_EVENTS.admit(kind, level)
}

/// The throttle of the connection-level log lines of this process.
pub(crate) static CONNECTION_EVENTS: LazyLock<LogThrottle> =
    LazyLock::new(|| LogThrottle::new(Duration::from_secs(1)));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_interval_then_the_count_of_those_held_back() {
        let throttle = LogThrottle::new(Duration::from_millis(200));
        assert_eq!(throttle.admit("refused", Level::WARN), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.admit("refused", Level::WARN), None);
        }
        // Another kind has its own allowance.
        assert_eq!(throttle.admit("timeout", Level::INFO), Some(0));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(throttle.admit("refused", Level::WARN), Some(5));
        assert_eq!(throttle.admit("refused", Level::WARN), None);
        assert_eq!(throttle.admit("timeout", Level::INFO), Some(0));
    }

    #[test]
    fn a_summary_lost_with_its_runtime_is_owed_again_by_the_next_burst() {
        let throttle = LogThrottle::new(Duration::from_millis(50));
        let burst = || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(async {
                throttle.admit("refused", Level::WARN);
                throttle.admit("refused", Level::WARN);
            });
            // The runtime ends with the summary task unfinished.
        };
        let summary_due = || throttle.lock()[0].1.summary_due;
        burst();
        assert!(!summary_due());
        std::thread::sleep(Duration::from_millis(60));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            assert_eq!(throttle.admit("refused", Level::WARN), Some(1));
            assert_eq!(throttle.admit("refused", Level::WARN), None);
            assert!(summary_due(), "the next burst owes a summary again");
        });
    }

    #[tokio::test(start_paused = true)]
    async fn what_a_burst_held_back_is_reported_once_it_is_over() {
        let written = tempfile::NamedTempFile::new().unwrap();
        let _logging = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_writer(Mutex::new(written.reopen().unwrap()))
                .with_ansi(false)
                .finish(),
        );
        // Other tests, on other threads, may have had tracing cache that
        // nobody listens to these lines.
        tracing::callsite::rebuild_interest_cache();
        let captured = || std::fs::read_to_string(written.path()).unwrap();
        let interval = Duration::from_millis(200);
        let throttle = LogThrottle::new(interval);
        assert_eq!(throttle.admit("refused", Level::WARN), Some(0));
        // A burst that lasts longer than an interval: its lines after the
        // first are let through once an interval, the rest held back.
        let mut let_through = Vec::new();
        for _ in 0..29 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let_through.extend(throttle.admit("refused", Level::WARN));
        }
        assert_eq!(let_through.len(), 2, "{let_through:?}");
        assert!(
            !captured().contains("held back"),
            "no summary while the burst goes on: {}",
            captured()
        );
        tokio::time::sleep(2 * interval).await;
        let text = captured();
        let summaries: Vec<&str> = text.lines().filter(|l| l.contains("held back")).collect();
        assert_eq!(summaries.len(), 1, "{text}");
        let held_back = 29 - let_through.len() as u64 - let_through.iter().sum::<u64>();
        assert!(held_back > 0);
        assert!(
            summaries[0].contains("WARN")
                && summaries[0].contains("kind=\"refused\"")
                && summaries[0].contains(&format!("held_back={held_back}")),
            "{text}"
        );
        // The summary took the count: the next line reports none.
        tokio::time::sleep(interval).await;
        assert_eq!(throttle.admit("refused", Level::WARN), Some(0));
        // A kind whose held-back lines a later line reported gets no summary.
        assert_eq!(throttle.admit("timeout", Level::INFO), Some(0));
        assert_eq!(throttle.admit("timeout", Level::INFO), None);
        tokio::time::sleep(interval).await;
        assert_eq!(throttle.admit("timeout", Level::INFO), Some(1));
        tokio::time::sleep(3 * interval).await;
        assert!(!captured().contains("kind=\"timeout\""), "{}", captured());
    }
}
