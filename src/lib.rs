//! The securemesh gRPC API, generated from `proto/securemesh/v1/data.proto`.
//!
//! Every other crate speaks to the network through these types. The encoded
//! file descriptor set is exported so that servers and the coordinator can
//! offer server reflection (grpcurl needs it to call us without proto files).

/// Version 1 of the `securemesh` protobuf package.
pub mod v1 {
    tonic::include_proto!("securemesh.v1");

    /// Fully qualified name of the data service, as health checks name it.
    pub const DATA_SERVICE_NAME: &str = "securemesh.v1.DataService";

    /// The path of `Submit`, as gRPC routes it and metrics and audit lines
    /// name it.
    pub const SUBMIT_METHOD: &str = "/securemesh.v1.DataService/Submit";
}

pub mod frame;

/// The encoded `FileDescriptorSet` of every securemesh proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/securemesh_descriptor.bin"));

/// The largest request message health checks and reflection accept (a
/// service name, a symbol, a file name). tonic sets aside room for a
/// message as soon as its 5-byte prefix declares its length: at tonic's
/// default of 4 MiB, any peer of the CA could make a process set aside
/// that much on every stream it opens, and send the rest slowly.
pub const MAX_SMALL_REQUEST_BYTES: usize = 4096;

/// A number that differs from call to call and from process to process:
/// enough to tell calls apart or to spread processes out (jitter, a first
/// etcd member), not a secret.
pub fn distinct_number() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // std's hasher keys are seeded at random per process.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    if let Ok(elapsed) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(elapsed.as_nanos());
    }
    hasher.finish()
}

/// Request ids: one per call, carried in `x-request-id` by client,
/// coordinator and server, so that a call can be followed across processes.
pub mod request_id {
    /// The metadata header that carries the request id.
    pub const HEADER: &str = "x-request-id";

    /// A new request id: 16 hex digits, unique within this process and
    /// unlikely to repeat across processes (it is not a secret).
    pub fn new() -> String {
        format!("{:016x}", crate::distinct_number())
    }

    /// A caller's request id, if it is one we are willing to log: 1 to 128
    /// printable ASCII characters without spaces, and without the `"`,
    /// `\` and `=` that would let it pose as more fields of a text log
    /// line (it is logged bare, as ids are).
    pub fn accept(value: &str) -> Option<&str> {
        let ok = !value.is_empty()
            && value.len() <= 128
            && value
                .bytes()
                .all(|byte| byte.is_ascii_graphic() && !matches!(byte, b'"' | b'\\' | b'='));
        ok.then_some(value)
    }

    /// The request id of `metadata`, or a new one.
    pub fn of(metadata: &tonic::metadata::MetadataMap) -> String {
        given_or_new(metadata.get(HEADER).and_then(|value| value.to_str().ok()))
    }

    /// The request id a caller gave (`value` of its header), if it is
    /// one we accept, or a new one.
    pub fn given_or_new(value: Option<&str>) -> String {
        value.and_then(accept).map_or_else(new, str::to_owned)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn ids_that_could_forge_log_fields_are_replaced() {
            for taken in ["4067a372f6172b7b", "req-1:a/b.c_d", &"x".repeat(128)] {
                assert_eq!(super::accept(taken), Some(taken));
                assert_eq!(super::given_or_new(Some(taken)), taken);
            }
            for refused in [
                "",
                "a b",
                "a\"",
                "x\" caller=admin",
                "a=b",
                "a\\b",
                "é",
                "a\n",
                &"x".repeat(129),
            ] {
                assert_eq!(super::accept(refused), None, "{refused:?}");
                let replaced = super::given_or_new(Some(refused));
                assert_eq!(replaced.len(), 16, "{replaced}");
                assert!(replaced.bytes().all(|byte| byte.is_ascii_hexdigit()));
            }
        }
    }
}

/// Ports for processes started by the benchmark and by tests, which must
/// name a server's port before the server binds it (and may restart it on
/// the same port).
pub mod ports {
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The lowest port handed out.
    const LOWEST: u32 = 10_000;

    /// A port on 127.0.0.1 that nobody listens on right now.
    ///
    /// It comes from below the kernel's range for outgoing connections,
    /// so that no connection (of this process or of the ones it started)
    /// can take it between this check and the server's `bind`, as a port
    /// from `bind(0)` could. Threads of one process get distinct ports from
    /// a shared counter; processes start at different places, by their
    /// process id.
    pub fn free_loopback_port() -> std::io::Result<u16> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let below = ephemeral_range_start().max(LOWEST + 1_000);
        let span = below - LOWEST;
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            let Ok(port) = u16::try_from(LOWEST + offset) else {
                continue;
            };
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("no free port on 127.0.0.1 between {LOWEST} and {below}"),
        ))
    }

    /// The first port of the kernel's range for outgoing connections.
    fn ephemeral_range_start() -> u32 {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn ports_are_free_distinct_and_outside_the_ephemeral_range() {
            let ports: Vec<u16> = (0..50).map(|_| free_loopback_port().unwrap()).collect();
            let mut distinct = ports.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), ports.len());
            for port in ports {
                assert!(u32::from(port) < ephemeral_range_start().max(LOWEST + 1_000));
                assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
            }
        }
    }
}

/// Places counted by key (a client identity, ...), a few to each: who may
/// hold how many connections, how many password checks.
pub mod places {
    use std::collections::HashMap;
    use std::hash::Hash;
    use std::sync::{Arc, Mutex, MutexGuard};

    /// How many places each key holds; a key holding none has no entry.
    #[derive(Debug)]
    pub struct PlacesByKey<K: Hash + Eq>(Arc<Mutex<HashMap<K, usize>>>);

    impl<K: Hash + Eq> Default for PlacesByKey<K> {
        fn default() -> Self {
            Self(Arc::default())
        }
    }

    impl<K: Hash + Eq> Clone for PlacesByKey<K> {
        fn clone(&self) -> Self {
            Self(Arc::clone(&self.0))
        }
    }

    impl<K: Hash + Eq + Clone> PlacesByKey<K> {
        /// One more place for `key`, unless it holds `most` already.
        pub fn take(&self, key: K, most: usize) -> Option<Place<K>> {
            {
                let mut held = self.lock();
                let places = held.entry(key.clone()).or_default();
                if *places >= most {
                    return None;
                }
                *places += 1;
            }
            Some(Place {
                places: self.clone(),
                key,
            })
        }

        /// How many keys hold a place.
        pub fn keys(&self) -> usize {
            self.lock().len()
        }

        fn lock(&self) -> MutexGuard<'_, HashMap<K, usize>> {
            self.0.lock().unwrap_or_else(|poison| poison.into_inner())
        }
    }

    /// A place of its key, given back when dropped.
    #[derive(Debug)]
    pub struct Place<K: Hash + Eq + Clone> {
        places: PlacesByKey<K>,
        key: K,
    }

    impl<K: Hash + Eq + Clone> Drop for Place<K> {
        fn drop(&mut self) {
            let mut held = self.places.lock();
            if let Some(places) = held.get_mut(&self.key) {
                *places -= 1;
                if *places == 0 {
                    held.remove(&self.key);
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_key_holds_at_most_its_share_and_leaves_no_entry_behind() {
            let places = PlacesByKey::default();
            let first = places.take("a", 2).unwrap();
            let _second = places.take("a", 2).unwrap();
            assert!(places.take("a", 2).is_none());
            let other = places.take("b", 2).unwrap();
            assert_eq!(places.keys(), 2);
            drop(first);
            let _again = places.take("a", 2).unwrap();
            drop(other);
            assert_eq!(places.keys(), 1);
        }
    }
}

/// The processes a lab starts (the demo's and the benchmark's servers,
/// coordinator and nginx): how they are kept apart from the caller's
/// settings and from outliving the lab.
pub mod children {
    use std::process::Command;

    /// Makes `command` a lab process:
    ///
    /// - it inherits none of the caller's `SECUREMESH_*` variables (a
    ///   certificate, a server id, a metrics port, a registry...), which
    ///   would change how the lab runs behind its back;
    /// - on Linux, it gets SIGTERM when the thread that starts it ends, the
    ///   whole lab killed by SIGKILL included, so that a killed demo or
    ///   benchmark leaves no server holding its port. Start it from a
    ///   thread that lives as long as the lab (the main thread, a runtime
    ///   worker), not from a pool thread that may end when idle;
    /// - on Linux, it runs in a process group of its own, so that Ctrl-C in
    ///   the terminal reaches the lab's starter alone: the lab process then
    ///   gets one SIGTERM (above) and drains, where the terminal's SIGINT
    ///   and then that SIGTERM made a second signal that stops at once.
    pub fn for_lab(command: &mut Command) -> &mut Command {
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("SECUREMESH_") {
                command.env_remove(name);
            }
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt as _;
            command.process_group(0);
            let parent = nix::unistd::getpid();
            // SAFETY: between fork and exec only async-signal-safe calls
            // are allowed; prctl and getppid are single system calls that
            // neither allocate nor lock.
            unsafe {
                command.pre_exec(move || {
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
                    // The parent may have ended before the line above.
                    if nix::unistd::getppid() != parent {
                        // No allocation here: an OS error code.
                        return Err(nix::errno::Errno::ESRCH.into());
                    }
                    Ok(())
                });
            }
        }
        command
    }

    #[cfg(all(test, target_os = "linux"))]
    mod tests {
        use super::*;
        use std::os::unix::process::ExitStatusExt as _;
        use std::time::{Duration, Instant};

        #[test]
        fn a_lab_process_has_a_process_group_of_its_own() {
            let output = for_lab(Command::new("sh").args(["-c", "cut -d' ' -f5 /proc/$$/stat"]))
                .output()
                .unwrap();
            let group: i32 = String::from_utf8(output.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_ne!(group, nix::unistd::getpgrp().as_raw());
        }

        #[test]
        fn a_lab_process_ends_with_the_thread_that_started_it() {
            let mut child =
                std::thread::spawn(|| for_lab(Command::new("sleep").arg("30")).spawn().unwrap())
                    .join()
                    .unwrap();
            let started = Instant::now();
            let status = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                if started.elapsed() > Duration::from_secs(5) {
                    let _ = child.kill();
                    panic!("the lab process outlived its parent thread");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let sigterm = nix::sys::signal::Signal::SIGTERM as i32;
            assert_eq!(status.signal(), Some(sigterm));
        }

        #[test]
        fn a_lab_process_inherits_no_securemesh_setting() {
            std::env::set_var("SECUREMESH_CHILDREN_TEST_SETTING", "set by the caller");
            let output = for_lab(Command::new("env").env("SECUREMESH_OWN", "the lab's"))
                .output()
                .unwrap();
            let environment = String::from_utf8(output.stdout).unwrap();
            assert!(!environment.contains("SECUREMESH_CHILDREN_TEST_SETTING"));
            assert!(environment.contains("SECUREMESH_OWN=the lab's"));
            assert!(environment.contains("PATH="));
            std::env::remove_var("SECUREMESH_CHILDREN_TEST_SETTING");
        }
    }
}

/// Text from others (a caller's payload, a peer's error message, a
/// registration in etcd) made safe to show on one line of a log or a
/// terminal.
pub mod text {
    /// `text` with its control characters escaped (`\n`, `\u{1b}`...), so
    /// that it can neither start a forged log line nor drive a terminal;
    /// so are the characters that break a line or reorder or hide text in
    /// a viewer that honours Unicode (line and paragraph separators,
    /// bidirectional controls, invisible formatting characters).
    pub fn printable(text: &str) -> String {
        let mut shown = String::with_capacity(text.len());
        for c in text.chars() {
            if c.is_control() || is_invisible_format(c) {
                shown.extend(c.escape_default());
            } else {
                shown.push(c);
            }
        }
        shown
    }

    /// [`printable`] text as the value of a `key=value` log field: in
    /// double quotes (with `"` and `\` escaped) when it is empty or holds
    /// a space, `=`, `"` or `\`, so that it cannot pose as more fields of
    /// a text log line; bare otherwise, as a JSON log carries it best.
    pub fn field(text: &str) -> String {
        let shown = printable(text);
        let plain = !shown.is_empty()
            && !shown
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '=' | '"' | '\\'));
        if plain {
            return shown;
        }
        let mut quoted = String::with_capacity(shown.len() + 2);
        quoted.push('"');
        for c in shown.chars() {
            if matches!(c, '"' | '\\') {
                quoted.push('\\');
            }
            quoted.push(c);
        }
        quoted.push('"');
        quoted
    }

    /// Line and paragraph separators and Unicode's format characters that
    /// move or hide text: the bidirectional embeddings, overrides and
    /// isolates, zero-width spaces and marks, the byte order mark, tags
    /// (which hide text, though subdivision flag emoji use them). The
    /// zero-width joiners stay: emoji and many scripts need them.
    fn is_invisible_format(c: char) -> bool {
        matches!(
            c,
            '\u{00ad}'
                | '\u{061c}'
                | '\u{180e}'
                | '\u{200b}'
                | '\u{200e}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{feff}'
                | '\u{fff9}'..='\u{fffb}'
                | '\u{e0000}'..='\u{e007f}'
        )
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn control_characters_are_escaped_and_the_rest_kept() {
            assert_eq!(
                super::printable("a\nb\x1b[31m é\u{9b}"),
                "a\\nb\\u{1b}[31m é\\u{9b}"
            );
        }

        #[test]
        fn separators_and_bidirectional_controls_are_escaped() {
            assert_eq!(
                super::printable("ok\u{2028}INFO audit\u{202e}txt.exe\u{200b}"),
                "ok\\u{2028}INFO audit\\u{202e}txt.exe\\u{200b}"
            );
            // Letters of right-to-left scripts are text, not controls, and
            // joiners make emoji and words.
            assert_eq!(super::printable("שלום مرحبا"), "שלום مرحبا");
            assert_eq!(
                super::printable("👩\u{200d}💻 می\u{200c}خواهم"),
                "👩\u{200d}💻 می\u{200c}خواهم"
            );
            assert_eq!(super::printable("a\u{e0041}"), "a\\u{e0041}");
        }

        #[test]
        fn a_field_value_cannot_pose_as_more_fields() {
            assert_eq!(super::field("/p/server-1"), "/p/server-1");
            assert_eq!(
                super::field("s1 url=https://10.6.6.6:5001"),
                "\"s1 url=https://10.6.6.6:5001\""
            );
            assert_eq!(super::field("a\"b\\c"), "\"a\\\"b\\\\c\"");
            // The escape's own backslash is escaped in turn.
            assert_eq!(super::field("x\ny"), r#""x\\ny""#);
            assert_eq!(super::field(""), "\"\"");
        }
    }
}

/// Errors as people read them.
pub mod error_text {
    /// `error` and each cause after it, joined by `: `, leaving out a cause
    /// whose text is said already: many errors (ours and the crates') quote
    /// their source in their own message, others (tonic's "transport
    /// error") say nothing without it.
    pub fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
        let mut text = String::new();
        let mut next = Some(error);
        while let Some(cause) = next {
            let said = cause.to_string();
            if !text.contains(&said) {
                if !text.is_empty() {
                    text.push_str(": ");
                }
                text.push_str(&said);
            }
            next = cause.source();
        }
        text
    }
}

/// Reading a `tonic::Status` the way securemesh callers need to.
pub mod status {
    use std::error::Error as _;

    use tonic::{Code, Status};

    /// Whether `status` was raised locally by the transport (connection
    /// refused or reset, TLS handshake refused, ...) rather than sent by the
    /// peer: only such statuses carry a source error.
    pub fn is_transport_failure(status: &Status) -> bool {
        status.source().is_some()
    }

    /// The gRPC retry pushback header: a negative value tells the caller
    /// not to retry (gRPC proposal A6).
    pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

    /// Marks `status` "do not retry": the peer already retried elsewhere,
    /// and a retry by the caller would only multiply load.
    pub fn with_no_retry(mut status: Status) -> Status {
        status.metadata_mut().insert(
            RETRY_PUSHBACK,
            tonic::metadata::MetadataValue::from_static("-1"),
        );
        status
    }

    /// Whether the peer asked not to be retried: a pushback that is
    /// negative or not a number.
    pub fn forbids_retry(status: &Status) -> bool {
        match status.metadata().get(RETRY_PUSHBACK) {
            None => false,
            Some(value) => value
                .to_str()
                .ok()
                .and_then(|value| value.trim().parse::<i64>().ok())
                .is_none_or(|millis| millis < 0),
        }
    }

    /// Whether the peer could not serve the call: `UNAVAILABLE` (unless the
    /// peer asked not to be retried: then it answered, after retrying
    /// itself), or any local transport failure but an expired deadline.
    /// That includes `CANCELLED` raised by the transport: hyper cancels a
    /// request whose connection closed before it was sent (a caller that
    /// gives up drops the call and never sees a status).
    pub fn is_unavailable(status: &Status) -> bool {
        (status.code() == Code::Unavailable && !forbids_retry(status))
            || (is_transport_failure(status) && status.code() != Code::DeadlineExceeded)
    }

    /// A one-line reason: the status message and, for transport failures,
    /// the deepest cause (e.g. "Connection refused", or the TLS alert).
    pub fn describe(status: &Status) -> String {
        let mut deepest: Option<&(dyn std::error::Error + 'static)> = status.source();
        while let Some(next) = deepest.and_then(|error| error.source()) {
            deepest = Some(next);
        }
        match deepest.map(ToString::to_string) {
            Some(cause) if !status.message().contains(&cause) => {
                format!("{}: {cause}", status.message())
            }
            _ => status.message().to_owned(),
        }
    }

    /// The canonical upper-case name of `code` (`UNAVAILABLE`, ...), as
    /// grpcurl and the gRPC specification print it.
    pub fn code_name(code: Code) -> &'static str {
        match code {
            Code::Ok => "OK",
            Code::Cancelled => "CANCELLED",
            Code::Unknown => "UNKNOWN",
            Code::InvalidArgument => "INVALID_ARGUMENT",
            Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
            Code::NotFound => "NOT_FOUND",
            Code::AlreadyExists => "ALREADY_EXISTS",
            Code::PermissionDenied => "PERMISSION_DENIED",
            Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
            Code::FailedPrecondition => "FAILED_PRECONDITION",
            Code::Aborted => "ABORTED",
            Code::OutOfRange => "OUT_OF_RANGE",
            Code::Unimplemented => "UNIMPLEMENTED",
            Code::Internal => "INTERNAL",
            Code::Unavailable => "UNAVAILABLE",
            Code::DataLoss => "DATA_LOSS",
            Code::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// `OK`, or the status name of a failed call, for audit lines.
    pub fn outcome_name<T>(outcome: &Result<T, Status>) -> &'static str {
        match outcome {
            Ok(_) => "OK",
            Err(status) => code_name(status.code()),
        }
    }

    /// Statuses the peer sent pass unchanged; a local transport failure
    /// becomes `UNAVAILABLE` with its cause in the message, as grpc-go
    /// reports a refused handshake.
    pub fn normalize(status: Status) -> Status {
        if is_transport_failure(&status) && is_unavailable(&status) {
            Status::unavailable(describe(&status))
        } else {
            status
        }
    }
}
