//! The caller's deadline, from the `grpc-timeout` header.
//!
//! The coordinator aims a little before the caller's own deadline, so that
//! the caller gets the coordinator's `DEADLINE_EXCEEDED` (the status the
//! gRPC specification asks for) rather than a call its own timer cut short,
//! and so that no attempt runs on for an answer nobody waits for.

use std::time::Duration;

use tokio::time::Instant;

/// Parses a `grpc-timeout` value: at most eight digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (&unit, digits) = value.as_bytes().split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The deadline of a call received at `now`: the caller's `grpc-timeout`
/// (less 2%, at least 1 ms, to answer before tonic cancels), bounded by
/// `ceiling`.
pub fn call_deadline(grpc_timeout: Option<&str>, ceiling: Duration, now: Instant) -> Instant {
    let asked = grpc_timeout
        .and_then(parse_grpc_timeout)
        .map(|timeout| timeout.saturating_sub((timeout / 50).max(Duration::from_millis(1))));
    now + asked.map_or(ceiling, |asked| asked.min(ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_refuses_malformed_values() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(parse_grpc_timeout("9n"), Some(Duration::from_nanos(9)));
        // The last two end in a character of more than one byte.
        for bad in ["", "m", "5", "5x", "123456789S", "-5S", "1.5S", "5é", "é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_deadline_is_the_callers_less_a_margin_within_the_ceiling() {
        let now = Instant::now();
        let ceiling = Duration::from_secs(10);
        assert_eq!(call_deadline(None, ceiling, now), now + ceiling);
        assert_eq!(
            call_deadline(Some("1S"), ceiling, now),
            now + Duration::from_millis(980)
        );
        assert_eq!(
            call_deadline(Some("20m"), ceiling, now),
            now + Duration::from_millis(19)
        );
        assert_eq!(call_deadline(Some("1H"), ceiling, now), now + ceiling);
        assert_eq!(call_deadline(Some("junk"), ceiling, now), now + ceiling);
    }
}
