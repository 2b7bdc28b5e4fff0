//! What each subcommand does: turn arguments into library calls.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use base64::Engine as _;
use securemesh_admin::{BackendStatus, StatusReport};
use securemesh_client::load::{self, LoadOptions};
use securemesh_client::Client;
use securemesh_coordinator::{BackendOptions, BalanceOptions, Coordinator, EjectionPolicy};
use securemesh_crypto::KeyRing;
use securemesh_server::DataHandler;
use securemesh_tls::{Authorization, ReloadableConfig};
use std::sync::Arc;

use crate::args::{
    key_file, ClientArgs, ClientCredentials, Command, CoordinatorArgs, CredentialsCommand,
    DecryptArgs, EncryptArgs, KeygenArgs, PkiCommand, ServerArgs,
};

/// The lab's servers, the coordinator's backends when none are named.
const LAB_BACKENDS: [&str; 2] = ["https://127.0.0.1:5001", "https://127.0.0.1:5002"];

/// How long a stopping server waits for etcd to confirm its deregistration.
const DEREGISTER_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs one subcommand to completion.
pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Pki(PkiCommand::Init(args)) => {
            let written = securemesh_pki::init(&securemesh_pki::InitOptions {
                dir: args.output.pki.dir,
                days: args.output.days,
                extra_clients: args.clients,
                sans: args.sans,
                force: args.output.force,
            })?;
            print_written(&written);
        }
        Command::Pki(PkiCommand::Issue(args)) => {
            let written = securemesh_pki::issue(&securemesh_pki::IssueOptions {
                dir: args.output.pki.dir,
                name: args.name,
                role: args.role,
                sans: args.sans,
                days: args.output.days,
                force: args.output.force,
            })?;
            print_written(&written);
        }
        Command::Pki(PkiCommand::Revoke(args)) => {
            let revocation = securemesh_pki::revoke(&args.pki.dir, &args.name)?;
            let what = if revocation.newly_revoked {
                "revoked"
            } else {
                "already revoked"
            };
            crate::output::line(format_args!(
                "{what} {}: wrote {} (send SIGHUP to running servers and coordinators)",
                args.name,
                revocation.crl.display()
            ));
        }
        Command::Pki(PkiCommand::Renew(args)) => {
            let dir = &args.certificate.pki.dir;
            let written = securemesh_pki::renew(dir, &args.certificate.name, args.days)?;
            print_written(&written);
        }
        Command::Pki(PkiCommand::RefreshCrl(args)) => {
            let (crl, next_update) = securemesh_pki::refresh_crl(&args.dir)?;
            crate::output::line(format_args!(
                "signed {} again, valid until {next_update} (send SIGHUP to running servers and \
                 coordinators)",
                crl.display()
            ));
        }
        Command::Pki(PkiCommand::Show(args)) => {
            crate::output::text(securemesh_pki::show(&args.file)?);
        }
        Command::Credentials(CredentialsCommand::AddUser(args)) => {
            let password = match args.password {
                Some(password) => password,
                None => crate::prompt::new_password(&args.name)?,
            };
            anyhow::ensure!(
                !password.is_empty(),
                "an empty password is not a credential"
            );
            let file = args.file.path();
            securemesh_credentials::add_user(&file, &args.name, &password)?;
            crate::output::line(format_args!(
                "added user {} to {} (send SIGHUP to running servers and coordinators)",
                args.name,
                file.display()
            ));
        }
        Command::Credentials(CredentialsCommand::AddToken(args)) => {
            let file = args.file.path();
            let token = securemesh_credentials::add_token(&file, &args.name)?;
            eprintln!(
                "added token {} to {} (send SIGHUP to running servers and coordinators); \
                 it is shown once:",
                args.name,
                file.display()
            );
            if let Err(error) = crate::output::try_line(&token) {
                anyhow::bail!(
                    "the token {} is in {} but could not be shown ({error}): nobody knows it; \
                     delete its line and add it again",
                    args.name,
                    file.display()
                );
            }
        }
        Command::Keygen(args) => keygen(args)?,
        Command::Server(args) => server(args).await?,
        Command::Coordinator(args) => coordinator(args).await?,
        Command::Client(args) => return client(args).await,
        Command::Encrypt(args) => encrypt(args)?,
        Command::Decrypt(args) => decrypt(args)?,
        Command::Demo(args) => {
            // Ctrl-C (or SIGTERM) ends the demo here, so that its
            // processes are killed as it is dropped, on every system (on
            // Linux they would also get SIGTERM when the demo dies).
            let mut stop = StopSignals::new();
            return tokio::select! {
                ran = crate::demo::run(args) => ran,
                _ = stop.next() => {
                    anyhow::bail!("interrupted: the demo's servers and coordinator were stopped")
                }
            };
        }
        Command::Bench(args) => return bench(args).await,
        Command::Status(args) => {
            let address = securemesh_admin::parse_listen_address(&args.admin)?;
            let report = securemesh_admin::fetch_status(address).await?;
            if args.json {
                crate::output::line(serde_json::to_string_pretty(&report)?);
            } else {
                crate::output::text(report.table());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_written(paths: &[std::path::PathBuf]) {
    for path in paths {
        crate::output::line(format_args!("wrote {}", path.display()));
    }
}

fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    use securemesh_crypto::{edit_key_file, KeyFileEdit};
    let out = key_file(&args.out, &args.certs);
    let edit = if args.rotate {
        KeyFileEdit::Rotate
    } else if args.stage {
        KeyFileEdit::Stage
    } else if args.promote {
        KeyFileEdit::Promote
    } else if let Some(count) = args.keep {
        KeyFileEdit::Keep(count)
    } else {
        securemesh_crypto::write_new_key_file(&out, args.force)?;
        crate::output::line(format_args!("wrote {}", out.display()));
        return Ok(());
    };
    let keys = edit_key_file(&out, edit)?;
    let out = out.display();
    match edit {
        KeyFileEdit::Rotate => crate::output::line(format_args!(
            "rotated {out}: a new key first, {} older kept (send SIGHUP to every server before \
             clients use the new key, or use --stage then --promote)",
            keys - 1
        )),
        KeyFileEdit::Stage => crate::output::line(format_args!(
            "staged a new key second in {out}: send SIGHUP to every server, then run keygen \
             --promote"
        )),
        KeyFileEdit::Promote => crate::output::line(format_args!(
            "promoted the staged key of {out}: clients that load the file encrypt under it; \
             the former first key still decrypts"
        )),
        KeyFileEdit::Keep(_) => crate::output::line(format_args!(
            "{out} keeps {keys} key(s): tokens under the dropped ones stop decrypting when \
             servers reload"
        )),
    }
    Ok(())
}

/// `SECUREMESH_LISTEN` was shared by servers and coordinators and is read
/// no more: refusing to start beats listening somewhere else than asked.
fn refuse_the_old_listen_variable(instead: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        std::env::var_os("SECUREMESH_LISTEN").is_none(),
        "SECUREMESH_LISTEN is not read any more: set {instead} instead (and unset \
         SECUREMESH_LISTEN)"
    );
    Ok(())
}

async fn server(args: ServerArgs) -> anyhow::Result<()> {
    // From here on, SIGTERM starts a drain and SIGHUP a reload, whenever
    // they come: their default actions would end the process mid-start.
    let (stop_signals, hangups) = (StopSignals::new(), Hangups::listen());
    refuse_the_old_listen_variable("SECUREMESH_SERVER_LISTEN")?;
    crate::args::warn_about_bare_identities(&args.allow);
    let address = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], args.port.unwrap_or(5001))));
    let tls_args = args.tls.clone();
    let tls = ReloadableConfig::new(securemesh_tls::server_config(
        &tls_args.files("server"),
        tls_args.crl().as_deref(),
    )?);
    let key_file = args.tls.encryption_key(&args.encryption_key);
    let keys = KeyRing::from_file(&key_file)?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let address = listener.local_addr()?;
    let server_id = args.server_id.clone().unwrap_or_else(|| {
        args.advertise
            .as_deref()
            .and_then(authority_of)
            .unwrap_or_else(|| address.to_string())
    });
    // Everything that can fail at start comes before the server announces
    // itself and registers: a server that then exits would stay in etcd
    // until its lease expired.
    if args.register.is_none() {
        args.etcd.warn_if_unused("--register");
    }
    let registering = match &args.register {
        Some(etcd) => {
            let etcd = args.etcd.apply(etcd.clone(), args.tls.crl_to_follow())?;
            let url = match &args.advertise {
                Some(url) => {
                    check_advertised(url, &tls_args.files("server"))?;
                    url.clone()
                }
                None if address.ip().is_unspecified() => anyhow::bail!(
                    "listening on {address}: say with --advertise which URL coordinators should dial"
                ),
                None => format!("https://{address}"),
            };
            let record = securemesh_discovery::ServerRecord {
                server_id: server_id.clone(),
                url,
            };
            Some((etcd, record))
        }
        None => None,
    };
    let authorization = args
        .serve
        .with_credentials(Authorization::server_default(args.allow.clone()))?;
    let token_ttl = Some(args.token_ttl).filter(|ttl| !ttl.is_zero());
    let handler =
        DataHandler::new(keys, server_id.clone(), !args.hide_plaintext).with_token_ttl(token_ttl);
    if let Some(admin) = &args.serve.metrics_listen {
        let discovery = args.register.as_ref().map(ToString::to_string);
        start_admin(
            admin,
            "server",
            address,
            discovery,
            handler.stats().clone(),
            Vec::new,
        )
        .await?;
    }
    tracing::info!(%address, %server_id, "Server listening on {address} (mutual TLS)");
    let registration = registering.map(|(etcd, record)| {
        tracing::info!(key = %etcd.key_of(&server_id), url = %record.url, "registering in etcd");
        securemesh_discovery::register(etcd, record, args.register_ttl)
    });
    reload_on_sighup(hangups, {
        let (tls, handler, authorization) = (tls.clone(), handler.clone(), authorization.clone());
        let serve_args = args.serve.clone();
        let checked_crl = AtomicBool::new(tls_args.crl().is_some());
        move || {
            // Read and check everything first; change nothing on a failure.
            let crl = tls_args.crl_on_reload(checked_crl.load(Ordering::Relaxed))?;
            let new_tls = securemesh_tls::server_tls(&tls_args.files("server"), crl.as_deref())?;
            let new_keys = KeyRing::from_file(&key_file)?;
            let new_credentials = serve_args.load_credentials()?;
            tls.replace(new_tls);
            handler.replace_keys(new_keys);
            if let Some(credentials) = new_credentials {
                authorization.replace_credentials(credentials);
            }
            checked_crl.store(crl.is_some(), Ordering::Relaxed);
            Ok(())
        }
    });
    // Its allowed callers have places that others cannot take.
    let mut options = args.serve.options();
    options.reserved_for = std::iter::once(securemesh_tls::COORDINATOR_IDENTITY.to_owned())
        .chain(args.allow.iter().cloned())
        .collect();
    securemesh_tls::serve_mtls(
        listener,
        tls,
        securemesh_tls::authorized_data_service(handler, authorization, args.max_message_size),
        options,
        async {
            shutdown_signal(stop_signals).await;
            // Leave the registry first: coordinators stop sending new calls
            // here while the calls in flight drain.
            if let Some(registration) = registration {
                registration.withdraw(DEREGISTER_LIMIT).await;
            }
        },
    )
    .await?;
    tracing::info!("server stopped");
    Ok(())
}

async fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    // As for a server: signals are caught from the start.
    let (stop_signals, hangups) = (StopSignals::new(), Hangups::listen());
    refuse_the_old_listen_variable("SECUREMESH_COORDINATOR_LISTEN")?;
    crate::args::warn_about_bare_identities(&args.allow);
    let tls_args = args.tls.clone();
    let server_tls = ReloadableConfig::new(securemesh_tls::server_config(
        &tls_args.files("coordinator"),
        tls_args.crl().as_deref(),
    )?);

    let client_tls =
        securemesh_tls::client_tls(&args.tls.files("coordinator"), args.tls.crl().as_deref())?;
    let mut backends = BackendOptions::new(client_tls);
    backends.connect_timeout = args.connect_timeout;
    backends.attempt_timeout = args.attempt_timeout;
    backends.health_interval = args.health_interval;
    backends.health_timeout = args.health_timeout;
    backends.keepalive_interval = args.keepalive_interval;
    backends.keepalive_timeout = args.keepalive_timeout;
    backends.ejection = EjectionPolicy {
        consecutive_failures: args.eject_after,
        base_time: args.ejection_time,
        max_time: args.max_ejection_time,
    };
    if let Some(delay) = args
        .hedge_after
        .0
        .filter(|delay| *delay >= args.attempt_timeout)
    {
        tracing::warn!(
            hedge_after_ms = delay.as_millis() as u64,
            attempt_timeout_ms = args.attempt_timeout.as_millis() as u64,
            "--hedge-after is not shorter than --attempt-timeout: a slow attempt times out before it is hedged"
        );
    }
    let coordinator = Coordinator::new(
        backends,
        BalanceOptions {
            max_retries: args.max_retries,
            hedge_after: args.hedge_after.0,
            ..BalanceOptions::default()
        },
        args.request_timeout,
    );
    let backends = if args.backends.is_empty() && args.discovery.is_none() {
        LAB_BACKENDS.iter().map(|url| (*url).to_owned()).collect()
    } else {
        args.backends.clone()
    };
    for url in &backends {
        coordinator.pool().add(url)?;
    }
    if args.discovery.is_none() {
        args.etcd.warn_if_unused("--discovery");
    }
    // Held until the coordinator stops.
    let _discovery = match &args.discovery {
        Some(etcd) => {
            let etcd = args.etcd.apply(etcd.clone(), args.tls.crl_to_follow())?;
            tracing::info!(endpoints = ?etcd.endpoints, prefix = %etcd.prefix, "following the servers registered in etcd");
            Some(securemesh_discovery::follow(
                etcd,
                coordinator.pool().clone(),
            ))
        }
        None => None,
    };
    let authorization = args.serve.with_credentials(if args.allow.is_empty() {
        Authorization::any_identity()
    } else {
        Authorization::only(args.allow.iter().cloned())
    })?;
    reload_on_sighup(hangups, {
        let (server_tls, pool) = (server_tls.clone(), coordinator.pool().clone());
        let (authorization, serve_args) = (authorization.clone(), args.serve.clone());
        let loaded_identity = std::sync::Mutex::new(identity_bytes(
            &tls_args.files("coordinator"),
            tls_args.crl().as_deref(),
        ));
        let checked_crl = AtomicBool::new(tls_args.crl().is_some());
        move || {
            // Read and check everything first; change nothing on a failure.
            let files = tls_args.files("coordinator");
            let crl = tls_args.crl_on_reload(checked_crl.load(Ordering::Relaxed))?;
            let new_server_tls = securemesh_tls::server_tls(&files, crl.as_deref())?;
            let identity = identity_bytes(&files, crl.as_deref());
            let new_client_tls = securemesh_tls::client_tls(&files, crl.as_deref())?;
            let new_credentials = serve_args.load_credentials()?;
            // New connections to every backend (new handshakes): only
            // when our certificate or the CRL changed. First, as the one
            // step that could still fail (the balancer gone, as the
            // process stops).
            let mut loaded = loaded_identity
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if *loaded != identity {
                pool.replace_tls(new_client_tls)?;
                *loaded = identity;
            }
            server_tls.replace(new_server_tls);
            if let Some(credentials) = new_credentials {
                authorization.replace_credentials(credentials);
            }
            checked_crl.store(crl.is_some(), Ordering::Relaxed);
            Ok(())
        }
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    if let Some(admin) = &args.serve.metrics_listen {
        let pool = coordinator.pool().clone();
        let discovery = args.discovery.as_ref().map(ToString::to_string);
        start_admin(
            admin,
            "coordinator",
            address,
            discovery,
            coordinator.stats().clone(),
            move || {
                pool.snapshot()
                    .into_iter()
                    .map(|backend| BackendStatus {
                        state: BackendStatus::state_of(backend.in_rotation, backend.ejected).into(),
                        url: backend.url,
                        healthy: backend.healthy,
                        ejected: backend.ejected,
                        in_flight: backend.in_flight,
                        recent: backend.recent,
                        last_failure: backend.last_failure,
                    })
                    .collect()
            },
        )
        .await?;
    }
    tracing::info!(%address, static_backends = ?backends, "Coordinator listening on {address} (mutual TLS)");
    // Callers it admits by --allow have places that others cannot take.
    let mut options = args.serve.options();
    options.reserved_for = args.allow.clone();
    securemesh_coordinator::serve(
        listener,
        server_tls,
        coordinator,
        authorization,
        args.max_message_size,
        options,
        shutdown_signal(stop_signals),
    )
    .await?;
    tracing::info!("coordinator stopped");
    Ok(())
}

async fn client(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let tls =
        securemesh_tls::client_tls(&args.tls.files(&args.identity), args.tls.crl().as_deref())?;
    let keys = KeyRing::from_file(&args.tls.encryption_key(&args.encryption_key))?;
    let authorization = match args.credentials()? {
        Some(ClientCredentials::Basic { user, password }) => {
            Some(securemesh_credentials::basic_header(&user, &password))
        }
        Some(ClientCredentials::Bearer(token)) => {
            // A header cannot carry a control character: the call would go
            // out without credentials and be refused for lacking them.
            // (The token is not quoted: it is a secret.)
            anyhow::ensure!(
                !token.is_empty() && token.bytes().all(|byte| byte.is_ascii_graphic()),
                "the token holds a space, a control character (such as the carriage return \
                 of a file saved on Windows) or a character outside ASCII: give the token alone"
            );
            Some(securemesh_credentials::bearer_header(&token))
        }
        None => None,
    };
    let balance = BalanceOptions {
        hedge_after: args.hedge_after.0,
        ..BalanceOptions::default()
    };
    let clients = (0..args.connections)
        .map(|_| {
            Ok(Client::with_balance(
                &args.targets,
                tls.clone(),
                keys.clone(),
                args.timeout,
                balance.clone(),
                true,
            )?
            .with_authorization(authorization.clone()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = &clients[0];
    let concurrency = args.load_concurrency();
    let message = args
        .message
        .unwrap_or_else(|| format!("Sensitive data from {}", args.name));

    let requests = match (args.requests, args.duration) {
        (Some(requests), _) => requests,
        (None, Some(_)) => usize::MAX,
        (None, None) => {
            let request_id = securemesh::request_id::new();
            let answer = client.submit_as(message.as_bytes(), &request_id).await;
            let succeeded = answer.is_ok();
            match (answer, args.json) {
                (Ok(reply), false) => crate::output::line(format_args!(
                    "[{}] Success: result={} server={}",
                    args.name, reply.result, reply.server_id
                )),
                (Err(error), false) => crate::output::line(format_args!(
                    "[{}] Failed: {error} (request id {request_id})",
                    args.name
                )),
                (Ok(reply), true) => crate::output::line(serde_json::json!({
                    "ok": true,
                    "result": reply.result,
                    "server": reply.server_id,
                    "request_id": request_id,
                })),
                (Err(error), true) => crate::output::line(serde_json::json!({
                    "ok": false,
                    "error": error.to_string(),
                    "request_id": request_id,
                })),
            }
            return Ok(if succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    };

    // A Ctrl-C (or SIGTERM) ends the run early with its summary; a second
    // one ends the process at once.
    let stop = Arc::new(AtomicBool::new(false));
    let mut signals = StopSignals::new();
    let stopped_by = Arc::new(std::sync::atomic::AtomicI32::new(0));
    let watcher = tokio::spawn({
        let (stop, stopped_by, name) = (stop.clone(), stopped_by.clone(), args.name.clone());
        async move {
            let status = signals.next().await;
            stopped_by.store(status, Ordering::Relaxed);
            stop.store(true, Ordering::Relaxed);
            eprintln!("[{name}] stopping: the calls in flight finish, then the summary");
            std::process::exit(signals.next().await);
        }
    });
    let options = LoadOptions {
        requests,
        concurrency,
        duration: args.duration,
        rate: args.rate,
        timeline: args.timeline,
        message,
        progress: args.requests.is_some() && !args.json && std::io::stderr().is_terminal(),
        stop: Some(stop),
    };
    let (summary, first_error) = load::run(&clients, &options).await;
    watcher.abort();
    if args.json {
        crate::output::line(serde_json::to_string(&summary)?);
    } else {
        crate::output::text(&summary);
    }
    if let Some(error) = first_error {
        eprintln!("[{}] first error: {error}", args.name);
    }
    let stopped_by = stopped_by.load(Ordering::Relaxed);
    Ok(if stopped_by != 0 {
        // As a shell shows a process that signal ended.
        ExitCode::from(u8::try_from(stopped_by).unwrap_or(1))
    } else if summary.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Refuses an `--advertise` URL that coordinators could not use: not
/// `https://HOST[:PORT]`, or a HOST the server certificate does not name
/// (every coordinator would refuse the handshake).
fn check_advertised(url: &str, files: &securemesh_tls::TlsFiles) -> anyhow::Result<()> {
    let authority = url
        .strip_prefix("https://")
        .and_then(|_| authority_of(url))
        .with_context(|| format!("--advertise {url}: expected https://HOST[:PORT]"))?;
    let host = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => authority.as_str(),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if files.certificate_covers(host)? {
        return Ok(());
    }
    anyhow::bail!(
        "--advertise {url}: {host} is not among the names of {} ({}), so coordinators would \
         refuse it; issue a certificate with `securemesh pki issue NAME --role server --san {host}`",
        files.cert.display(),
        files.dialling_names()?.join(", ")
    )
}

/// The `host:port` of a URL such as `https://10.0.0.5:5001/`: the one
/// name of a server that is unique across hosts (a listen address such as
/// `0.0.0.0:5001` is the same on every host).
fn authority_of(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    (!authority.is_empty()).then(|| authority.to_owned())
}

fn encrypt(args: EncryptArgs) -> anyhow::Result<()> {
    let keys = KeyRing::from_file(&key_file(&args.encryption_key, &args.certs))?;
    let message = if args.message == "-" {
        read_standard_input()?
    } else {
        args.message.into_bytes()
    };
    let token = keys.encrypt(&message);
    if args.json_bytes {
        crate::output::line(format_args!(
            "{}",
            base64::engine::general_purpose::STANDARD.encode(&token)
        ));
    } else {
        crate::output::line(format_args!("{}", String::from_utf8_lossy(&token)));
    }
    Ok(())
}

fn decrypt(args: DecryptArgs) -> anyhow::Result<()> {
    let keys = KeyRing::from_file(&key_file(&args.encryption_key, &args.certs))?;
    let token = if args.token == "-" {
        // A token is text without spaces: a newline after it is no part.
        let mut read = read_standard_input()?;
        read.truncate(read.trim_ascii_end().len());
        read
    } else {
        args.token.into_bytes()
    };
    let plaintext = keys.decrypt(&token)?;
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        // Shown on a terminal: escaped, so that a payload cannot drive it.
        crate::output::line(securemesh::text::printable(&String::from_utf8_lossy(
            &plaintext,
        )));
    } else {
        // Into a file or a pipe: the plaintext exactly as it was sent.
        crate::output::bytes(&plaintext);
    }
    Ok(())
}

/// Everything standard input holds, for a command's `-`.
fn read_standard_input() -> anyhow::Result<Vec<u8>> {
    let mut read = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut read)
        .context("cannot read standard input")?;
    Ok(read)
}

/// Binds the admin listener at `address` and serves it in the background
/// until the process exits, for a process of `role` listening on `listen`:
/// its calls are `stats`, its backends (none for a server) come from
/// `backends`.
async fn start_admin(
    address: &str,
    role: &'static str,
    listen: std::net::SocketAddr,
    discovery: Option<String>,
    stats: securemesh_telemetry::CallStats,
    backends: impl Fn() -> Vec<BackendStatus> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let status: securemesh_admin::StatusSource = Arc::new(move || StatusReport {
        role: role.into(),
        listen: listen.to_string(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_seconds: started.elapsed().as_secs(),
        in_flight: stats.in_flight(),
        recent: stats.recent(),
        discovery: discovery.clone(),
        backends: backends(),
    });
    let address = securemesh_admin::parse_listen_address(address)?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address} for metrics"))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "admin listening on http://{address}: /metrics, /status, /");
    tokio::spawn(async move {
        if let Err(error) = securemesh_admin::serve(listener, status, std::future::pending()).await
        {
            tracing::warn!(%error, "the admin listener stopped");
        }
    });
    Ok(())
}

/// The CA, certificate, key and CRL files of a client, to tell whether
/// they changed.
fn identity_bytes(files: &securemesh_tls::TlsFiles, crl: Option<&std::path::Path>) -> Vec<u8> {
    let mut bytes = std::fs::read(&files.ca).unwrap_or_default();
    bytes.extend(std::fs::read(&files.cert).unwrap_or_default());
    bytes.extend(std::fs::read(&files.key).unwrap_or_default());
    if let Some(crl) = crl {
        bytes.extend(std::fs::read(crl).unwrap_or_default());
    }
    bytes
}

/// SIGHUP, listened for from creation on: one that arrives before the
/// reloads are set up waits for them instead of ending the process.
struct Hangups {
    #[cfg(unix)]
    listener: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listener = signal(SignalKind::hangup())
                .inspect_err(|_| tracing::warn!("cannot listen for SIGHUP: reloading is off"))
                .ok();
            Self { listener }
        }
        #[cfg(not(unix))]
        Self {}
    }
}

/// On every SIGHUP, runs `reload` (read certificates, CRL and keys again)
/// on tokio's blocking pool, since it reads files; if it fails, the process
/// keeps what it had and says why.
fn reload_on_sighup(
    hangups: Hangups,
    reload: impl Fn() -> anyhow::Result<()> + Send + Sync + 'static,
) {
    #[cfg(unix)]
    tokio::spawn(async move {
        let Some(mut hangups) = hangups.listener else {
            return;
        };
        let reload = Arc::new(reload);
        while hangups.recv().await.is_some() {
            let reloading = reload.clone();
            let reloaded = tokio::task::spawn_blocking(move || reloading())
                .await
                .unwrap_or_else(|failed| {
                    Err(anyhow::anyhow!("the reload did not finish: {failed}"))
                });
            match reloaded {
                Ok(()) => tracing::info!("reloaded certificates, revocation list and keys"),
                Err(error) => tracing::warn!(
                    error = %crate::errors::describe(&error),
                    "reload failed: keeping the current certificates and keys"
                ),
            }
        }
    });
}

/// How long a process on its way out waits for its last log lines and
/// message to be written.
pub const LAST_WORDS_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Completes on the first Ctrl-C or SIGTERM `signals` catch; a second one
/// ends the process at once.
async fn shutdown_signal(mut signals: StopSignals) {
    signals.next().await;
    tracing::info!("shutdown requested");
    // A second signal means "now": an operator who does not want to wait
    // out the drain delay and grace period. The listeners exist already,
    // so a signal sent before this task first runs is not lost.
    tokio::spawn(async move {
        let status = signals.next().await;
        tracing::warn!("second shutdown signal: stopping at once, without draining");
        crate::logging::finish_and_say(
            "securemesh: second shutdown signal: stopping at once".to_owned(),
            LAST_WORDS_LIMIT,
        );
        std::process::exit(status);
    });
}

/// Ctrl-C and SIGTERM, listened for from creation on: one that arrives
/// while nobody waits is kept for the next wait.
struct StopSignals {
    #[cfg(unix)]
    listeners: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl StopSignals {
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listeners = match (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
            ) {
                (Ok(interrupt), Ok(terminate)) => Some((interrupt, terminate)),
                _ => {
                    tracing::warn!("cannot listen for SIGTERM: only Ctrl-C stops the process");
                    None
                }
            };
            Self { listeners }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Completes on the next Ctrl-C or SIGTERM, with the exit status a
    /// shell shows for a process that signal ended (130 or 143), so that a
    /// supervisor can tell them apart.
    async fn next(&mut self) -> i32 {
        const INTERRUPTED: i32 = 128 + 2;
        const TERMINATED: i32 = 128 + 15;
        #[cfg(unix)]
        if let Some((interrupt, terminate)) = &mut self.listeners {
            return tokio::select! {
                _ = interrupt.recv() => INTERRUPTED,
                _ = terminate.recv() => TERMINATED,
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        INTERRUPTED
    }
}

async fn bench(args: crate::args::BenchArgs) -> anyhow::Result<ExitCode> {
    use securemesh_bench::{report, BenchOptions};
    let binary = std::env::current_exe()?;
    let temporary = tempfile::tempdir()?;
    let dir = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            // nginx reads the paths in its configuration from its own
            // prefix directory, not ours.
            std::path::absolute(dir)?
        }
        None => temporary.path().to_owned(),
    };
    let options = if args.quick {
        BenchOptions::quick(binary, dir)
    } else {
        BenchOptions::full(binary, dir)
    };
    // Named before the run: the report and its picture, written at the
    // end, would make the tree look changed.
    let code = code_version();
    let report = report_path(args.quick, args.out.clone());
    // Where the results go is made before the run, not found missing
    // after ten minutes of it.
    let mut outputs: Vec<std::path::PathBuf> = args.json.iter().cloned().collect();
    if let Some(out) = &report {
        outputs.push(out.clone());
        outputs.push(securemesh_fs::directory_of(out).join(&args.picture));
    }
    for output in &outputs {
        if let Some(parent) = output
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot make {}", parent.display()))?;
        }
    }
    // Ctrl-C (or SIGTERM) ends the run here, so that the lab is dropped:
    // each of its processes is continued (one may be SIGSTOPped just then)
    // and killed, instead of being left with a pending SIGTERM.
    let mut stop = StopSignals::new();
    let results = tokio::select! {
        results = securemesh_bench::run(&options) => results?,
        _ = stop.next() => anyhow::bail!("interrupted: the lab was stopped, no report written"),
    };

    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&results)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    for line in report::ratios(&results) {
        crate::output::line(line);
    }
    let Some(out) = report else {
        crate::output::line(
            "a quick run writes no report unless asked to (--out): BENCHMARKS.md is left as it was",
        );
        return Ok(ExitCode::SUCCESS);
    };
    let report_dir = securemesh_fs::directory_of(&out);
    let picture = report_dir.join(&args.picture);
    std::fs::write(
        &picture,
        securemesh_bench::svg::failover_picture(&results.timelines),
    )
    .with_context(|| format!("cannot write {}", picture.display()))?;
    let profile = std::fs::read_to_string(&args.profile_notes).unwrap_or_default();
    // Not `args()`, which panics on an argument that is not Unicode (a
    // path may be any bytes), after the whole run.
    let command: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|argument| argument.to_string_lossy().into_owned())
        .collect();
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let machine = report::Machine::read();
    let markdown = report::markdown(
        &results,
        &report::Provenance {
            command: &format!("securemesh {}", command.join(" ")),
            date: &date,
            picture: &args.picture.display().to_string(),
            machine: &machine,
            code: &code,
        },
        &profile,
    );
    std::fs::write(&out, markdown)?;
    crate::output::line(format_args!(
        "wrote {} and {}",
        out.display(),
        picture.display()
    ));
    Ok(ExitCode::SUCCESS)
}

/// The code a report measured, as `git describe` names it in the working
/// directory (`-dirty` with uncommitted changes, which `cargo run` built
/// in); "unknown" outside a git checkout.
fn code_version() -> String {
    std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|described| described.trim().to_owned())
        .filter(|described| !described.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Where `bench` writes its report: `out`, or BENCHMARKS.md for a full
/// run. A quick run's numbers (a smoke, fractions of a second per route)
/// must not replace the last full run's unless asked for.
fn report_path(quick: bool, out: Option<std::path::PathBuf>) -> Option<std::path::PathBuf> {
    match out {
        Some(out) => Some(out),
        None if quick => None,
        None => Some("BENCHMARKS.md".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_full_benchmark_writes_its_report_unasked() {
        assert_eq!(report_path(false, None), Some("BENCHMARKS.md".into()));
        assert_eq!(report_path(true, None), None);
        for quick in [false, true] {
            assert_eq!(
                report_path(quick, Some("elsewhere.md".into())),
                Some("elsewhere.md".into())
            );
        }
    }

    #[test]
    fn an_advertised_url_must_be_https_and_named_by_the_server_certificate() {
        let dir = tempfile::tempdir().unwrap();
        securemesh_pki::init(&securemesh_pki::InitOptions {
            dir: dir.path().to_path_buf(),
            days: 1,
            extra_clients: Vec::new(),
            sans: vec!["10.1.2.3".into(), "data-1.example".into()],
            force: false,
        })
        .unwrap();
        let files = securemesh_tls::TlsFiles::in_dir(dir.path(), "server");
        for usable in [
            "https://127.0.0.1:5001",
            "https://localhost:5001",
            "https://10.1.2.3:5001/",
            "https://DATA-1.example",
            "https://[::1]:5001",
        ] {
            let checked = check_advertised(usable, &files);
            assert!(checked.is_ok(), "{usable}: {checked:?}");
        }
        for unusable in [
            "10.1.2.3:5001",
            "http://10.1.2.3:5001",
            "https://",
            "https://127.0.0.2:5001",
            "https://data-2.example:5001",
        ] {
            assert!(check_advertised(unusable, &files).is_err(), "{unusable}");
        }
        let error = check_advertised("https://127.0.0.2:5001", &files).unwrap_err();
        assert!(error.to_string().contains("--san 127.0.0.2"), "{error}");
    }

    #[test]
    fn a_servers_default_name_is_the_host_and_port_it_advertises() {
        assert_eq!(
            authority_of("https://10.0.0.5:5001").as_deref(),
            Some("10.0.0.5:5001")
        );
        assert_eq!(
            authority_of("https://data-1.example:5001/").as_deref(),
            Some("data-1.example:5001")
        );
        assert_eq!(
            authority_of("https://[::1]:5001?x").as_deref(),
            Some("[::1]:5001")
        );
        assert_eq!(authority_of("https:///path"), None);
        assert_eq!(authority_of("10.0.0.5:5001"), None);
    }
}
