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
    /// Make a development CA and a certificate signed by it, for trying HTTPS
    /// locally: point `server.tls_cert`/`server.tls_key` at the files and make
    /// clients trust `ca.pem`. Never for production.
    DevCert {
        /// Directory to write `ca.pem`, `cert.pem` and `key.pem` into.
        #[arg(long, default_value = "./dev-cert")]
        dir: PathBuf,
        /// Names the certificate is for: DNS names or IP addresses.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])]
        names: Vec<String>,
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
        Command::DevCert { dir, names } => write_dev_cert(&dir, &names),
    }
}

fn write_dev_cert(dir: &std::path::Path, names: &[String]) -> anyhow::Result<()> {
    let made = cin_edge::tls::dev_certificate(names)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, pem) in [
        ("ca.pem", &made.ca_pem),
        ("cert.pem", &made.cert_pem),
        ("key.pem", &made.key_pem),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
    }
    // The key is a secret, even a development one.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = dir.join("key.pem");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", key.display()))?;
    }
    println!(
        "wrote {dir}/ca.pem, cert.pem and key.pem for {names}\n\
         serve with:   CIN__SERVER__TLS_CERT={dir}/cert.pem CIN__SERVER__TLS_KEY={dir}/key.pem cin-edge serve\n\
         trust with:   curl --cacert {dir}/ca.pem, REQUESTS_CA_BUNDLE={dir}/ca.pem, NODE_EXTRA_CA_CERTS={dir}/ca.pem",
        dir = dir.display(),
        names = names.join(", "),
    );
    Ok(())
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
