//! The broker's TLS configuration (rustls with the `ring` provider), from PEM files the
//! administrator gives with `--tls-cert` and `--tls-key`.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate chain {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("cannot read the TLS private key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("the TLS certificate {cert} and key {key} do not make a server configuration: {reason}")]
    Config { cert: String, key: String, reason: String },
}

impl crate::error::Kind for TlsError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind as K;
        // The certificate and key are files the administrator named.
        match self {
            TlsError::Cert { .. } | TlsError::Key { .. } | TlsError::Config { .. } => K::Invalid,
        }
    }
}

pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let (cp, kp) = (cert.display().to_string(), key.display().to_string());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| TlsError::Cert { path: cp.clone(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Cert { path: cp, reason: "no CERTIFICATE in it".into() });
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key { path: kp.clone(), reason: e.to_string() })?;
    let config = |reason: String| TlsError::Config { cert: cp.clone(), key: kp.clone(), reason };
    let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| config(e.to_string()))?;
    // WebSockets (the HTML5 console) upgrade HTTP/1.1 connections.
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}
