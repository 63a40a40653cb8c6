//! TLS client settings for the five libpq `sslmode`s that negotiate TLS (rustls, ring).

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::WireError;
use crate::source::postgres::conn::SslMode;

fn provider() -> Arc<CryptoProvider> {
    // Explicit: other crates in the tree enable a second rustls provider, so the process-wide
    // default is ambiguous.
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Trust anchors: `sslrootcert`, else `~/.postgresql/root.crt` (libpq's default), else the
/// system store.
fn roots(rootcert: Option<&Path>) -> Result<RootCertStore, WireError> {
    let mut store = RootCertStore::empty();
    let default = std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(".postgresql/root.crt"))
        .filter(|p| p.exists());
    let file = rootcert.map(Path::to_path_buf).or(default);
    match file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(&path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    WireError::Tls(format!("cannot read sslrootcert {}: {e}", path.display()))
                })?;
            for c in certs {
                store
                    .add(c)
                    .map_err(|e| WireError::Tls(format!("sslrootcert {}: {e}", path.display())))?;
            }
        }
        None => {
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(c);
            }
        }
    }
    if store.is_empty() {
        return Err(WireError::Tls(
            "no trusted root certificates (set sslrootcert)".into(),
        ));
    }
    Ok(store)
}

/// The rustls client configuration for `mode` (None for `disable`).
pub fn client_config(
    mode: SslMode,
    rootcert: Option<&Path>,
) -> Result<Option<Arc<rustls::ClientConfig>>, WireError> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Disable => return Ok(None),
        // libpq's prefer/require encrypt without checking who answers.
        SslMode::Prefer | SslMode::Require => Arc::new(AnyServer(provider.clone())),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let inner = WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(rootcert)?),
                provider.clone(),
            )
            .build()
            .map_err(|e| WireError::Tls(e.to_string()))?;
            if mode == SslMode::VerifyCa {
                Arc::new(ChainOnly(inner))
            } else {
                inner
            }
        }
    };
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WireError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(Arc::new(cfg)))
}

/// The name rustls checks the certificate against (verify-full) and sends as SNI.
pub fn server_name(host: &str) -> Result<ServerName<'static>, WireError> {
    ServerName::try_from(host.to_string())
        .map_err(|_| WireError::Tls(format!("{host:?} is not a valid TLS server name")))
}

/// `sslmode=require`: the channel is encrypted, the certificate is not checked.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The name is checked only after the chain verified, so a name error means the
        // chain is good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
