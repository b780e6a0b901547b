//! `shiva-node`: parses flags, sets up logging and signals, runs the node.

use std::io::IsTerminal;
use std::process::ExitCode;

use shiva_node::NodeConfig;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    // Shim mode: one process per run (see `shiva_node::shim`).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|arg| arg == shiva_node::shim::SHIM_ARG) {
        // The configuration comes on stdin; a node of the previous version (running while this
        // binary replaced its own) still passes it as the one argument.
        let legacy = argv.get(2).and_then(|arg| arg.to_str());
        return ExitCode::from(shiva_node::shim::main(legacy));
    }
    // The binary by the path it was started from, read before anything could replace it (a
    // reload re-executes what is installed there then).
    // `argv[0]` when it is a path (a link an upgrade flips stays a link), else the resolved one.
    let named = argv.first().map(std::path::PathBuf::from).filter(|path| path.components().count() > 1);
    let exe = match named.map_or_else(std::env::current_exe, std::path::absolute) {
        Ok(exe) => exe,
        Err(err) => {
            eprintln!("shiva-node: cannot find its own executable: {err}");
            return ExitCode::FAILURE;
        }
    };
    let default_config = std::path::Path::new(shiva_node::config::DEFAULT_CONFIG);
    let args = match shiva_node::config::args_from(&argv, default_config) {
        Ok(args) => args,
        Err(shiva_node::config::ArgsError::Flags(err)) => err.exit(),
        Err(shiva_node::config::ArgsError::Config(why)) => {
            eprintln!("shiva-node: {why}");
            return ExitCode::from(2);
        }
    };
    let json_logs = args.log_format == shiva_node::config::LogFormat::Json;
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHIVA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let logger = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match args.log_format {
        shiva_node::config::LogFormat::Json => {
            logger.json().flatten_event(true).with_current_span(false).init()
        }
        shiva_node::config::LogFormat::Text => logger.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    // A panic is contained at its task's boundary (see `shiva_node::fault`); it is logged as a
    // structured event, with where it happened.
    std::panic::set_hook(Box::new(|info| {
        let location = info.location().map(|at| at.to_string()).unwrap_or_default();
        let message = shiva_node::fault::internal_error(info.payload());
        tracing::error!(%location, %message, "panic");
    }));
    if std::env::var_os("SHIVA_TEST_NEXT_PROTOCOL").is_some_and(|value| value == "1") {
        // Test-only: stand in for a node of the next protocol version (mixed-cluster tests).
        shiva_proto::records::write_next_protocol_for_tests();
        tracing::warn!(
            protocol = shiva_proto::protocol(),
            "SHIVA_TEST_NEXT_PROTOCOL: writing the next protocol version"
        );
    }
    if let Some(offset) =
        std::env::var("SHIVA_TEST_CLOCK_OFFSET_MS").ok().and_then(|ms| ms.parse::<i64>().ok())
    {
        // Test-only: stand in for a machine whose wall clock is off (clock tests).
        shiva_proto::wall::shift_for_tests(offset);
        tracing::warn!(offset_ms = offset, "SHIVA_TEST_CLOCK_OFFSET_MS: this node's wall clock is shifted");
    }
    let check_only = args.check_config;
    let config = match NodeConfig::from_args(args) {
        Ok(config) if check_only => {
            println!("shiva-node: the flags and the configuration are valid");
            print!("{}", shiva_node::config::Identity::of(&config).lines());
            return ExitCode::SUCCESS;
        }
        Ok(config) => config,
        Err(err) => {
            // In JSON mode every line on stderr is an event.
            if json_logs {
                tracing::error!(error = format!("{err:#}"), "invalid flags");
            } else {
                eprintln!("shiva-node: {err:#}");
            }
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("shiva-node: failed to start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let reload = shiva_node::node::Reload { requested: Default::default(), exe };
    runtime.spawn(watch_signals(shutdown.clone(), reload.requested.clone()));
    // The node's loop runs on the runtime's workers, not on this thread: a timer or a channel
    // wakes the worker that polls it, not a worker and then this thread (fewer thread switches
    // per heartbeat: docs/benchmarks.md).
    let node = runtime.spawn(shiva_node::run(config, shutdown, reload.clone()));
    let ended = runtime.block_on(node).unwrap_or_else(|err| match err.try_into_panic() {
        Ok(panic) => std::panic::resume_unwind(panic),
        Err(err) => Err(anyhow::anyhow!("the node's loop was cancelled: {err}")),
    });
    match ended {
        Ok(shiva_node::node::Ending::Left) => ExitCode::SUCCESS,
        Ok(shiva_node::node::Ending::Reexec) => {
            // The runtime is left as it is: `execv` replaces the whole process (every thread),
            // and the runs' shims, children of this pid, stay children of the next binary.
            let err = reexec(&reload.exe, &argv);
            tracing::error!(exe = %reload.exe.display(), error = %err, "cannot re-execute the node; its runs stop when their leases run out unless it is started again");
            ExitCode::FAILURE
        }
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "node stopped");
            if !json_logs {
                eprintln!("shiva-node: {err:#}");
            }
            // The bus refuses this node (TLS, authentication, ACL): restarting cannot help.
            let refused = err
                .chain()
                .any(|cause| matches!(cause.downcast_ref(), Some(shiva_bus::BusError::Refused { .. })));
            if refused { ExitCode::from(3) } else { ExitCode::FAILURE }
        }
    }
}

/// Replaces this process with `exe`, given the same arguments (and environment); returns only
/// on failure.
fn reexec(exe: &std::path::Path, argv: &[std::ffi::OsString]) -> nix::errno::Errno {
    use std::os::unix::ffi::OsStrExt;
    let cstring = |bytes: &[u8]| std::ffi::CString::new(bytes.to_vec());
    let Ok(path) = cstring(exe.as_os_str().as_bytes()) else { return nix::errno::Errno::EINVAL };
    let Ok(args) = argv.iter().map(|arg| cstring(arg.as_bytes())).collect::<Result<Vec<_>, _>>() else {
        return nix::errno::Errno::EINVAL;
    };
    // The environment as it is, and whether this process found systemd scopes usable (the next
    // one then does not probe again).
    let mut env: Vec<std::ffi::CString> = std::env::vars_os()
        .filter(|(key, _)| key != shiva_node::tree::PROBED_ENV)
        .filter_map(|(key, value)| {
            let mut pair = key.as_bytes().to_vec();
            pair.push(b'=');
            pair.extend_from_slice(value.as_bytes());
            cstring(&pair).ok()
        })
        .collect();
    if shiva_node::tree::SCOPES_PROBED.load(std::sync::atomic::Ordering::SeqCst)
        && let Ok(marker) = cstring(format!("{}=1", shiva_node::tree::PROBED_ENV).as_bytes())
    {
        env.push(marker);
    }
    match nix::unistd::execve(&path, &args, &env) {
        Ok(never) => match never {},
        Err(err) => err,
    }
}

/// First SIGTERM or SIGINT: orderly shutdown. Second: exit at once (children die with the node).
/// SIGHUP: reload (re-execute the binary, leaving the runs to their shims).
async fn watch_signals(shutdown: CancellationToken, reload: std::sync::Arc<tokio::sync::Notify>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading (re-executing the node's binary; its runs go on)");
                reload.notify_one();
            }
        }
    }
    tracing::info!("signal received; shutting down (send it again to exit at once)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    std::process::exit(130);
}
