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

/// libpq's default CA file, `~/.postgresql/root.crt`, if it exists.
fn default_root() -> Option<std::path::PathBuf> {
    std::env::var_os("HOME")
        .map(|h| Path::new(&h).join(".postgresql/root.crt"))
        .filter(|p| p.exists())
}

/// Trust anchors: `sslrootcert`, else `~/.postgresql/root.crt` (libpq's default), else the
/// system store.
fn roots(rootcert: Option<&Path>) -> Result<RootCertStore, WireError> {
    let mut store = RootCertStore::empty();
    let file = rootcert.map(Path::to_path_buf).or_else(default_root);
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
        // libpq's prefer encrypts without checking who answers; so does require, unless a
        // CA file is given (or ~/.postgresql/root.crt exists): then it checks like verify-ca.
        SslMode::Require if rootcert.is_some() || default_root().is_some() => Arc::new(ChainOnly(
            WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(rootcert)?),
                provider.clone(),
            )
            .build()
            .map_err(|e| WireError::Tls(e.to_string()))?,
        )),
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

/// The `tls-server-end-point` channel binding data (RFC 5929) of a server certificate: its
/// hash with the hash function of its signature algorithm (SHA-256 for MD5 and SHA-1), as
/// PostgreSQL computes it. None for algorithms without a single hash (RSA-PSS, EdDSA). The
/// certificate's DER is read with `der`/`spki` (already in the tree through `sqlx`).
pub fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
    use der::asn1::{AnyRef, ObjectIdentifier as Oid};
    use der::{Decode, Reader, SliceReader};
    use sha2::Digest;
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm AlgorithmIdentifier, … }
    let mut r = SliceReader::new(cert).ok()?;
    let alg = r
        .sequence(|r| {
            AnyRef::decode(r)?;
            let alg = spki::AlgorithmIdentifierRef::decode(r)?;
            AnyRef::decode(r)?;
            Ok(alg)
        })
        .ok()?;
    const MD5_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.4");
    const SHA1_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.5");
    const SHA256_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.11");
    const SHA384_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.12");
    const SHA512_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.13");
    const SHA224_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.14");
    const SHA1_ECDSA: Oid = Oid::new_unwrap("1.2.840.10045.4.1");
    const SHA224_ECDSA: Oid = Oid::new_unwrap("1.2.840.10045.4.3.1");
    const SHA256_ECDSA: Oid = Oid::new_unwrap("1.2.840.10045.4.3.2");
    const SHA384_ECDSA: Oid = Oid::new_unwrap("1.2.840.10045.4.3.3");
    const SHA512_ECDSA: Oid = Oid::new_unwrap("1.2.840.10045.4.3.4");
    let bits = match alg.oid {
        MD5_RSA | SHA1_RSA | SHA256_RSA | SHA1_ECDSA | SHA256_ECDSA => 256,
        SHA224_RSA | SHA224_ECDSA => 224,
        SHA384_RSA | SHA384_ECDSA => 384,
        SHA512_RSA | SHA512_ECDSA => 512,
        _ => return None,
    };
    Some(match bits {
        224 => sha2::Sha224::digest(cert).to_vec(),
        256 => sha2::Sha256::digest(cert).to_vec(),
        384 => sha2::Sha384::digest(cert).to_vec(),
        _ => sha2::Sha512::digest(cert).to_vec(),
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_point_hash_reads_the_signature_algorithm_and_never_panics() {
        // A skeleton certificate: SEQUENCE { tbs SEQUENCE {}, SEQUENCE { OID }, BIT STRING }.
        let cert = |oid: &[u8]| {
            let mut alg = vec![0x06, oid.len() as u8];
            alg.extend_from_slice(oid);
            let mut alg_seq = vec![0x30, alg.len() as u8];
            alg_seq.extend(alg);
            let mut body = vec![0x30, 0x00];
            body.extend(alg_seq);
            body.extend([0x03, 0x01, 0x00]);
            let mut c = vec![0x30, body.len() as u8];
            c.extend(body);
            c
        };
        let sha256_rsa = cert(&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0B]);
        assert_eq!(end_point_hash(&sha256_rsa).map(|h| h.len()), Some(32));
        let sha1_rsa = cert(&[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x05]);
        assert_eq!(
            end_point_hash(&sha1_rsa).map(|h| h.len()),
            Some(32),
            "SHA-1 → SHA-256"
        );
        let ecdsa384 = cert(&[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x03]);
        assert_eq!(end_point_hash(&ecdsa384).map(|h| h.len()), Some(48));
        let ed25519 = cert(&[0x2B, 0x65, 0x70]);
        assert_eq!(end_point_hash(&ed25519), None);
        for n in 0..sha256_rsa.len() {
            let _ = end_point_hash(&sha256_rsa[..n]);
        }
        assert_eq!(end_point_hash(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(end_point_hash(b""), None);
    }
}
