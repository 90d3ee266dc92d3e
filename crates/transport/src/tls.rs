//! rustls configuration: self-signed certificates on both sides, keys checked by pinning.
//!
//! The client verifies the server's key against an expected [`DeviceId`] (from the peers file
//! or a ticket) or, when pairing by code alone, accepts any key: the pairing transcript then
//! binds both keys and the TLS session, so a relaying attacker cannot complete pairing. The
//! server requires a client certificate, checks the handshake signature, and leaves the
//! admission decision (pinned or pairing window open) to the endpoint after the handshake.
//! Only TLS 1.3 is offered (QUIC requires it). Provider: ring.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{DeviceId, Identity};
use crate::ALPN;

/// The name the client asks for; certificates are never checked against it.
pub(crate) const SERVER_NAME: &str = "ferry.invalid";

/// Error building a TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// rustls rejected the configuration (key or certificate unusable).
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The rustls configuration is not usable for QUIC.
    #[error("tls config not usable for QUIC: {0}")]
    Quic(String),
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug)]
struct PinnedServer {
    expected: Option<DeviceId>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = DeviceId::from_cert(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        match self.expected {
            Some(want) if want != id => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[derive(Debug)]
struct AnyClientKey {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Admission (pinned key or open pairing window) is decided after the handshake.
        DeviceId::from_cert(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// QUIC server crypto for `identity`: client certificates required, any key admitted to the
/// handshake (the endpoint decides admission afterwards).
pub fn server_crypto(
    identity: &Identity,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsConfigError> {
    quinn::crypto::rustls::QuicServerConfig::try_from(server_rustls(identity)?)
        .map_err(|e| TlsConfigError::Quic(e.to_string()))
}

/// The rustls side of [`server_crypto`]. No session resumption: the server keeps no sessions
/// and issues no tickets, so every connection presents and checks both certificates (a
/// resumed session would skip the client's certificate verifier).
fn server_rustls(identity: &Identity) -> Result<rustls::ServerConfig, TlsConfigError> {
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyClientKey { algs }))
        .with_single_cert(vec![identity.certificate().clone()], identity.private_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// QUIC client crypto for `identity`; the server's key must equal `expected` when given.
pub fn client_crypto(
    identity: &Identity,
    expected: Option<DeviceId>,
) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsConfigError> {
    quinn::crypto::rustls::QuicClientConfig::try_from(client_rustls(identity, expected)?)
        .map_err(|e| TlsConfigError::Quic(e.to_string()))
}

/// The rustls side of [`client_crypto`]. Resumption is disabled: a resumed session does not
/// run the certificate verifier, which is where the pinned key is checked.
fn client_rustls(
    identity: &Identity,
    expected: Option<DeviceId>,
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer { expected, algs }))
        .with_client_auth_cert(vec![identity.certificate().clone()], identity.private_key())?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// The [`DeviceId`] of the peer of an established connection.
pub fn peer_device_id(conn: &quinn::Connection) -> Option<DeviceId> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    DeviceId::from_cert(certs.first()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConnection, HandshakeKind, ServerConnection};

    /// One in-memory TLS 1.3 handshake (plus the tickets the server sends after it); returns
    /// how the client saw it.
    fn handshake(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> HandshakeKind {
        let name = ServerName::try_from(SERVER_NAME).unwrap();
        let mut c = ClientConnection::new(Arc::clone(client), name).unwrap();
        let mut s = ServerConnection::new(Arc::clone(server)).unwrap();
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets().unwrap();
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets().unwrap();
            if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
                break;
            }
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        c.handshake_kind().unwrap()
    }

    /// The server issues no tickets: a client that would resume (rustls' default cache) still
    /// gets a full handshake, with both certificates checked, the second time.
    #[test]
    fn server_issues_no_resumption_tickets() {
        let server_id = Identity::generate("server").unwrap();
        let server = Arc::new(server_rustls(&server_id).unwrap());
        let client_id = Identity::generate("client").unwrap();
        let mut eager = client_rustls(&client_id, Some(server_id.device_id())).unwrap();
        eager.resumption = rustls::client::Resumption::in_memory_sessions(16);
        let eager = Arc::new(eager);
        assert_eq!(handshake(&eager, &server), HandshakeKind::Full);
        assert_eq!(handshake(&eager, &server), HandshakeKind::Full);
    }

    /// The client never offers a stored session: against a server that would resume, the
    /// second connection with the same client configuration is a full handshake (so the pinned
    /// key is verified again).
    #[test]
    fn client_never_resumes() {
        let server_id = Identity::generate("server").unwrap();
        let mut eager = server_rustls(&server_id).unwrap();
        eager.session_storage = rustls::server::ServerSessionMemoryCache::new(16);
        eager.send_tls13_tickets = 2;
        let eager = Arc::new(eager);
        let client_id = Identity::generate("client").unwrap();
        let client = Arc::new(client_rustls(&client_id, Some(server_id.device_id())).unwrap());
        assert_eq!(handshake(&client, &eager), HandshakeKind::Full);
        assert_eq!(handshake(&client, &eager), HandshakeKind::Full);
        // Sanity: with resumption on both sides, this harness does see a resumed session.
        let mut resuming = client_rustls(&client_id, Some(server_id.device_id())).unwrap();
        resuming.resumption = rustls::client::Resumption::in_memory_sessions(16);
        let resuming = Arc::new(resuming);
        assert_eq!(handshake(&resuming, &eager), HandshakeKind::Full);
        assert_eq!(handshake(&resuming, &eager), HandshakeKind::Resumed);
    }
}
