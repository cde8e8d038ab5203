use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use cin_edge::config::Config;
use clap::{Parser, Subcommand};

/// CIN edge: an ingestion point of presence for file uploads.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the POP: accept uploads, serve filelinks, replicate to final storage.
    Serve {
        /// TOML configuration file (defaults apply to anything it leaves out).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on, e.g. 0.0.0.0:8080; port 0 picks a free port.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Directory for metadata, part files and the local origin store.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Base URL clients reach this POP at (for filelinks and upload URLs).
        #[arg(long)]
        public_url: Option<String>,
    },
}

// Many threads allocate and free request buffers concurrently: glibc's malloc
// spent a tenth of the request threads' time there, and mimalloc held twice the
// memory; jemalloc does neither.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            config,
            listen,
            data_dir,
            public_url,
        } => {
            let mut config = Config::load(config.as_deref()).context("loading configuration")?;
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            if let Some(dir) = data_dir {
                config.server.data_dir = dir;
            }
            if let Some(url) = public_url {
                config.server.public_url = url;
            }
            cin_edge::telemetry::init(&config.log);
            let listener = tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| format!("binding {}", config.server.listen))?;
            cin_edge::run(listener, config, shutdown_signal()).await
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
