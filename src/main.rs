//! The `tokenrelay` binary: parses the command line and calls the library.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokenrelay::auth::KeyHash;
use tokenrelay::config::Config;

/// mimalloc instead of glibc malloc: the forward path allocates and frees
/// many small buffers across worker threads, where glibc's arena locks and
/// fastbin consolidation showed up at ~15% of the profile (issue 6).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "tokenrelay",
    version,
    about = "Network-token vault and forward-injection proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// Config file.
        #[arg(long, default_value = "config/tokenrelay.toml")]
        config: PathBuf,
    },
    /// Validate a config file and exit 0 (valid) or 1 (invalid).
    CheckConfig {
        /// Config file.
        #[arg(long, default_value = "config/tokenrelay.toml")]
        config: PathBuf,
    },
    /// Read an API key on stdin and print the hash for the config.
    HashKey,
    /// Re-encrypt every vault record under the active master key (the last
    /// one listed), in batches, while the service keeps running.
    RotateKey {
        /// Config file.
        #[arg(long, default_value = "config/tokenrelay.toml")]
        config: PathBuf,
        /// Records per batch.
        #[arg(long, default_value_t = 500)]
        batch: usize,
    },
    /// Run the whole flow locally: sandbox acquirer, provision, reference,
    /// forward; prints each step with secrets masked.
    Demo {
        /// Serve the example checkout page instead (tokenrelay at SAQ-A, a
        /// merchant-backend stand-in): type a test card in a browser.
        #[arg(long)]
        browser: bool,
        /// With --browser: the stand-in's address (loopback only; port 0
        /// picks a free one, printed).
        #[arg(long, default_value = "127.0.0.1:8000", requires = "browser")]
        listen: std::net::SocketAddr,
    },
    /// Run the sandbox acquirer alone (TLS with a generated certificate).
    SandboxAcquirer {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// Where to write the generated CA certificate (PEM), for the
        /// `ca_file` of a destination rule.
        #[arg(long, default_value = "data/sandbox-acquirer-ca.pem")]
        ca_out: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => check_config(config),
        Command::HashKey => hash_key(),
        Command::Demo { browser, listen } => demo(browser.then_some(listen)),
        Command::RotateKey { config, batch } => rotate_key(config, batch),
        Command::SandboxAcquirer { listen, ca_out } => sandbox_acquirer(listen, ca_out),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenrelay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn check_config(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    // Everything `serve` builds short of the stores and the ports; the
    // vault is not opened, so checking never creates a database or a key.
    runtime()?.block_on(tokenrelay::check(&config))?;
    println!("{}: ok", path.display());
    Ok(())
}

fn hash_key() -> anyhow::Result<()> {
    let mut key = String::new();
    std::io::stdin()
        .read_to_string(&mut key)
        .context("reading the key from stdin")?;
    let key = key.trim_end_matches(['\n', '\r']);
    anyhow::ensure!(!key.is_empty(), "empty key on stdin");
    println!("{}", KeyHash::of(key.as_bytes()).to_config_string());
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn rotate_key(path: PathBuf, batch: usize) -> anyhow::Result<()> {
    anyhow::ensure!(batch > 0, "--batch must be at least 1");
    let config = Config::load(&path)?;
    runtime()?.block_on(async move {
        let keys = tokenrelay::vault::load_keys(&config.vault)?;
        let store = tokenrelay::vault::open(&config.vault, Some(keys.clone())).await?;
        println!("re-encrypting under key {:?}", keys.active_id());
        let mut cursor = tokenrelay::vault::RotationCursor::default();
        let (mut total, mut unreadable) = (0, Vec::new());
        loop {
            let step = store.rotate_batch(&mut cursor, batch).await?;
            if step.visited == 0 {
                break;
            }
            total += step.rotated;
            for row in step.unreadable {
                eprintln!("  cannot re-encrypt {row}");
                unreadable.push(row);
            }
            println!("  {total} records re-encrypted");
        }
        anyhow::ensure!(
            unreadable.is_empty(),
            "{total} records re-encrypted, but {} could not be opened and are still under \
             their old keys (listed above): keep those keys in the key file until each \
             row is restored from a backup or deleted",
            unreadable.len()
        );
        println!(
            "done: {total} records re-encrypted; every record is under {:?}",
            keys.active_id()
        );
        anyhow::Ok(())
    })
}

fn demo(browser: Option<std::net::SocketAddr>) -> anyhow::Result<()> {
    let rt = runtime()?;
    match browser {
        None => rt.block_on(tokenrelay::demo::run()),
        Some(listen) => rt.block_on(tokenrelay::demo::browser::run(listen)),
    }
    .map_err(|e| anyhow::anyhow!("demo failed: {e}"))
}

fn sandbox_acquirer(listen: std::net::SocketAddr, ca_out: PathBuf) -> anyhow::Result<()> {
    let _log_guard = tokenrelay::telemetry::init_logging();
    runtime()?.block_on(async move {
        let pki = tokenrelay::sandbox_acquirer::generate_pki()
            .map_err(|e| anyhow::anyhow!("generating certificates: {e}"))?;
        if let Some(dir) = ca_out.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(&ca_out, &pki.ca_pem)
            .with_context(|| format!("writing {}", ca_out.display()))?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let acq = tokenrelay::sandbox_acquirer::SandboxAcquirer::spawn(
            listener,
            pki.server_config,
            tokenrelay::tsp::sandbox::DEFAULT_SANDBOX_KEY,
        )?;
        println!(
            "sandbox acquirer on https://{}/v1/authorizations; CA certificate in {}",
            acq.addr,
            ca_out.display()
        );
        tokio::signal::ctrl_c()
            .await
            .context("waiting for ctrl-c")?;
        anyhow::Ok(())
    })
}

fn serve(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let log_guard = tokenrelay::telemetry::init_logging_with(config.log_buffer_bytes);
    // The listener's connections run on the workers, each a single-threaded
    // runtime; this thread's runtime accepts, serves the admin listener and
    // drives the stores' connections.
    let workers = tokenrelay::server::Workers::start(config.workers)
        .context("starting the worker threads")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let served = workers.clone();
    let result = runtime.block_on(async move {
        let state = tokenrelay::AppState::build(config).await?;
        let listener = tokio::net::TcpListener::bind(state.config.listen)
            .await
            .with_context(|| format!("binding listen {}", state.config.listen))?;
        let admin = tokio::net::TcpListener::bind(state.config.admin_listen)
            .await
            .with_context(|| format!("binding admin_listen {}", state.config.admin_listen))?;
        // The bound addresses, not the configured ones: with port 0 (tests)
        // this line is where the ports are learnt.
        tracing::info!(
            listen = %listener.local_addr().unwrap_or(state.config.listen),
            admin_listen = %admin.local_addr().unwrap_or(state.config.admin_listen),
            compliance_level = ?state.config.compliance_level,
            "tokenrelay ready"
        );
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown signal received; draining");
            let _ = tx.send(true);
        });
        tokenrelay::run_on(state, listener, admin, Some(served), rx).await?;
        anyhow::Ok(())
    });
    // Stopping the workers and dropping the runtime cancel what the drain
    // cut off; their access lines are written then, before the log is
    // flushed.
    workers.stop();
    drop(runtime);
    if result.is_ok() {
        tracing::info!("stopped");
    }
    drop(log_guard);
    result
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
