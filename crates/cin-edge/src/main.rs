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

/// Where `serve` and `check-config` take their configuration from.
const CONFIG_HELP: &str = "\
Configuration, later sources overriding earlier ones:
  1. built-in defaults (config/default.toml in the source tree lists every setting with its default and meaning)
  2. --config FILE (TOML)
  3. environment variables CIN__SECTION__KEY, e.g. CIN__SERVER__LISTEN=0.0.0.0:8080,
     CIN__STORAGE__PROFILES__ACME__BUCKET=acme-uploads, CIN__LOG__FORMAT=json
  4. the flags --listen, --data-dir, --public-url
`cin-edge check-config` prints the configuration that results, secrets masked.";

/// The configuration sources `serve` and `check-config` share.
#[derive(clap::Args)]
struct ConfigArgs {
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
}

impl ConfigArgs {
    /// The effective configuration, validated.
    fn load(self) -> anyhow::Result<Config> {
        let source = match &self.config {
            Some(path) => format!("the configuration ({})", path.display()),
            None => "the configuration (built-in defaults and CIN__ variables)".to_owned(),
        };
        let mut config = Config::load(self.config.as_deref())
            .map_err(|e| anyhow::anyhow!("{source} is not valid:\n{e}"))?;
        if let Some(listen) = self.listen {
            config.server.listen = listen;
        }
        if let Some(dir) = self.data_dir {
            config.server.data_dir = dir;
        }
        if let Some(url) = self.public_url {
            config.server.public_url = url;
        }
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("{source} is not valid:\n{e}"))?;
        Ok(config)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the POP: accept uploads, serve filelinks, replicate to final storage.
    #[command(after_help = CONFIG_HELP)]
    Serve(ConfigArgs),
    /// Check the configuration `serve` would start with and print it (TOML,
    /// secrets masked); exits 1, saying what is wrong, when it is not valid.
    #[command(after_help = CONFIG_HELP)]
    CheckConfig(ConfigArgs),
    /// Ask a running POP about its files and act on failing replications
    /// (its admin API; needs its admin.key), or check its health.
    Admin(cin_edge::admin_cli::AdminArgs),
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
async fn main() -> std::process::ExitCode {
    match run(Cli::parse().command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The causes in words, one after another; no debug dump or backtrace.
            eprintln!("cin-edge: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => {
            let config = args.load()?;
            cin_edge::telemetry::init(&config.log);
            let listener = tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {}: another process may hold it; pick another with --listen or CIN__SERVER__LISTEN",
                        config.server.listen
                    )
                })?;
            cin_edge::run(listener, config, shutdown_signal()).await
        }
        Command::CheckConfig(args) => {
            let config = args.load()?;
            let text = config.to_masked_toml().map_err(anyhow::Error::msg)?;
            println!("# The configuration is valid. Effective settings (secrets masked):\n{text}");
            Ok(())
        }
        Command::DevCert { dir, names } => write_dev_cert(&dir, &names),
        Command::Admin(args) => Ok(cin_edge::admin_cli::run(args).await?),
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
