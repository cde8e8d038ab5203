//! HTTPS in the POP: the certificate it serves (read from PEM files, and read
//! again when they change or on SIGHUP, without a restart), the TLS acceptor
//! (HTTP/2 by ALPN beside HTTP/1.1), and development certificates for trying
//! it locally (`cin-edge dev-cert`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::worker::{Worker, WorkerState};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading the TLS certificate chain {path}: {message}")]
    Certificate { path: PathBuf, message: String },
    #[error("reading the TLS private key {path}: {message}")]
    Key { path: PathBuf, message: String },
    #[error("the TLS private key {key} does not match the certificate {cert}: {message}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("setting up TLS: {0}")]
    Setup(String),
    #[error("making a development certificate: {0}")]
    DevCertificate(String),
}

/// The certificate the POP serves, swapped in place when its files change.
pub struct Certificates {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    /// What the files looked like when last loaded (modification time, length).
    loaded_from: Mutex<[Option<(SystemTime, u64)>; 2]>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

impl Certificates {
    /// Reads the certificate chain and private key (PEM).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Certificates>, TlsError> {
        let stamps = [file_stamp(cert_path), file_stamp(key_path)];
        let key = read_certified_key(cert_path, key_path)?;
        Ok(Arc::new(Certificates {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: RwLock::new(Arc::new(key)),
            loaded_from: Mutex::new(stamps),
        }))
    }

    /// Reads the files again if they changed since they were last loaded.
    /// Returns whether a new certificate is served. A pair that does not load
    /// (half written, say) leaves the current one in place and is tried again.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let stamps = [file_stamp(&self.cert_path), file_stamp(&self.key_path)];
        if *self.loaded_from.lock().unwrap_or_else(|e| e.into_inner()) == stamps {
            return Ok(false);
        }
        self.reload_with(stamps)?;
        Ok(true)
    }

    /// Reads the files again, changed or not.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = [file_stamp(&self.cert_path), file_stamp(&self.key_path)];
        self.reload_with(stamps)
    }

    fn reload_with(&self, stamps: [Option<(SystemTime, u64)>; 2]) -> Result<(), TlsError> {
        let key = read_certified_key(&self.cert_path, &self.key_path)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        *self.loaded_from.lock().unwrap_or_else(|e| e.into_inner()) = stamps;
        Ok(())
    }

    /// The acceptor for the POP's listener: TLS 1.2 and 1.3, HTTP/2 or
    /// HTTP/1.1 as the client offers (ALPN).
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

fn read_certified_key(cert_path: &Path, key_path: &Path) -> Result<CertifiedKey, TlsError> {
    let cert_error = |message: String| TlsError::Certificate {
        path: cert_path.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| cert_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_error(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error(
            "no CERTIFICATE block in it: give the server's certificate first, then its chain"
                .into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| TlsError::Key {
        path: key_path.to_owned(),
        message: format!("{e} (PKCS#8, PKCS#1 or SEC1 PEM expected)"),
    })?;
    let certified =
        CertifiedKey::from_der(chain, key, &provider()).map_err(|e| TlsError::Mismatch {
            cert: cert_path.to_owned(),
            key: key_path.to_owned(),
            message: e.to_string(),
        })?;
    Ok(certified)
}

/// Reads the certificate again when its files change (checked every
/// `interval`) and at once on SIGHUP.
pub struct CertificateWatch {
    certificates: Arc<Certificates>,
    interval: Duration,
    hangup: Option<tokio::signal::unix::Signal>,
    /// A SIGHUP arrived: reload even if the files look the same.
    forced: bool,
}

impl CertificateWatch {
    pub fn new(certificates: Arc<Certificates>, interval: Duration) -> Self {
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(e) => {
                tracing::warn!(error = %e, "SIGHUP cannot be caught: the certificate is reloaded when its files change only");
                None
            }
        };
        CertificateWatch {
            certificates,
            interval,
            hangup,
            forced: false,
        }
    }
}

#[async_trait]
impl Worker for CertificateWatch {
    fn name(&self) -> &'static str {
        "certificate watch"
    }

    async fn work(&mut self) -> WorkerState {
        let reloaded = if std::mem::take(&mut self.forced) {
            self.certificates.reload().map(|()| true)
        } else {
            self.certificates.reload_if_changed()
        };
        match reloaded {
            Ok(true) => tracing::info!(
                cert = %self.certificates.cert_path.display(),
                "serving the TLS certificate read again from its files"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the TLS certificate could not be read again; still serving the previous one")
            }
        }
        WorkerState::Idle(self.interval)
    }

    async fn wait_for_work(&mut self, idle: Duration) {
        match &mut self.hangup {
            Some(hangup) => tokio::select! {
                _ = tokio::time::sleep(idle) => {}
                _ = hangup.recv() => self.forced = true,
            },
            None => tokio::time::sleep(idle).await,
        }
    }
}

/// A development certificate authority and a server certificate it signed.
pub struct DevCertificate {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A CA and a certificate for `names` (DNS names or IP addresses), for trying
/// HTTPS locally and for tests, never for production.
pub fn dev_certificate(names: &[String]) -> Result<DevCertificate, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let failed = |e: rcgen::Error| TlsError::DevCertificate(e.to_string());
    let ca_key = KeyPair::generate().map_err(failed)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "CIN edge development CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(failed)?;

    let key = KeyPair::generate().map_err(failed)?;
    let mut server = CertificateParams::new(names.to_vec()).map_err(failed)?;
    server.distinguished_name.push(
        DnType::CommonName,
        names.first().map_or("localhost", String::as_str),
    );
    server.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    let cert = server.signed_by(&key, &ca_cert, &ca_key).map_err(failed)?;
    Ok(DevCertificate {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}
