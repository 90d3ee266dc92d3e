//! Device identity: a long-lived key pair, a self-signed certificate, a device id and a name.
//!
//! The [`DeviceId`] is the BLAKE3 hash of the certificate's public key (SubjectPublicKeyInfo
//! DER), rendered Syncthing-style: base32, four groups of 13 characters each followed by a Luhn
//! mod-32 check character, shown as eight dash-separated groups of seven. Pinning is by this
//! key hash, so a re-issued certificate for the same key stays trusted.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const KEY_FILE: &str = "device-key.pem";
const CERT_FILE: &str = "device-cert.pem";
const NAME_FILE: &str = "device-name";
/// Longest accepted device name, in bytes.
pub const MAX_DEVICE_NAME: usize = 64;

/// Error loading or creating an [`Identity`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// Reading or writing the identity files failed.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The stored key or certificate could not be parsed, or generation failed.
    #[error("identity key/certificate: {0}")]
    Crypto(String),
    /// The device name is empty or too long.
    #[error("device name must be 1..={MAX_DEVICE_NAME} bytes")]
    BadName,
}

/// Error parsing a [`DeviceId`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeviceIdError {
    /// Wrong number of characters after removing dashes.
    #[error("device id must have 56 base32 characters")]
    Length,
    /// A character outside the base32 alphabet.
    #[error("device id contains a character that is not base32")]
    Alphabet,
    /// A Luhn check character does not match: a typo.
    #[error("device id check character mismatch (typo?)")]
    Check,
}

/// A device's identity: BLAKE3 of its public key, with a human-checkable rendering.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId([u8; 32]);

const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

fn luhn32(chars: &[u8]) -> Option<u8> {
    let mut factor = 1;
    let mut sum = 0u32;
    for c in chars {
        let cp = B32.iter().position(|b| b == c)? as u32;
        let addend = factor * cp;
        factor = if factor == 2 { 1 } else { 2 };
        sum += addend / 32 + addend % 32;
    }
    let check = (32 - sum % 32) % 32;
    B32.get(check as usize).copied()
}

impl DeviceId {
    /// The id of a public key given as SubjectPublicKeyInfo DER.
    pub fn from_spki(spki_der: &[u8]) -> Self {
        Self(*blake3::hash(spki_der).as_bytes())
    }

    /// The id of the key inside a DER certificate.
    pub fn from_cert(cert: &CertificateDer<'_>) -> Result<Self, IdentityError> {
        let ee = rustls::server::ParsedCertificate::try_from(cert)
            .map_err(|e| IdentityError::Crypto(format!("certificate: {e}")))?;
        Ok(Self::from_spki(ee.subject_public_key_info().as_ref()))
    }

    /// The raw 32-byte key fingerprint.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Builds an id from a raw fingerprint.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The first group only, for compact display (not for authentication).
    pub fn short(&self) -> String {
        self.to_string().chars().take(7).collect()
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b32 = data_encoding::BASE32_NOPAD.encode(&self.0); // 52 chars
        let mut with_checks = Vec::with_capacity(56);
        for chunk in b32.as_bytes().chunks(13) {
            with_checks.extend_from_slice(chunk);
            with_checks.push(luhn32(chunk).unwrap_or(b'A'));
        }
        for (i, group) in with_checks.chunks(7).enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            f.write_str(std::str::from_utf8(group).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({self})")
    }
}

impl FromStr for DeviceId {
    type Err = DeviceIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > 128 {
            return Err(DeviceIdError::Length);
        }
        let chars: Vec<u8> = s
            .bytes()
            .filter(|b| *b != b'-' && *b != b' ')
            .map(|b| b.to_ascii_uppercase())
            .collect();
        if chars.len() != 56 {
            return Err(DeviceIdError::Length);
        }
        if !chars.iter().all(|c| B32.contains(c)) {
            return Err(DeviceIdError::Alphabet);
        }
        let mut b32 = Vec::with_capacity(52);
        for chunk in chars.chunks(14) {
            let (data, check) = chunk.split_at(13);
            if luhn32(data) != Some(check[0]) {
                return Err(DeviceIdError::Check);
            }
            b32.extend_from_slice(data);
        }
        let bytes = data_encoding::BASE32_NOPAD
            .decode(&b32)
            .map_err(|_| DeviceIdError::Alphabet)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| DeviceIdError::Length)?;
        Ok(Self(arr))
    }
}

impl serde::Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// This device's key pair, certificate and name.
pub struct Identity {
    key_der: Vec<u8>,
    cert: CertificateDer<'static>,
    id: DeviceId,
    name: String,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            key_der: self.key_der.clone(),
            cert: self.cert.clone(),
            id: self.id,
            name: self.name.clone(),
        }
    }
}

/// The form of a device name that is stored, sent and shown: control characters (tab, newline,
/// escape…) become spaces, invisible formatting and bidirectional overrides (which could make
/// a name look like another on screen) are dropped, surrounding space is trimmed, and the
/// result is cut to [`MAX_DEVICE_NAME`] bytes on a character boundary. Idempotent.
///
/// A device sanitises its own name once (when it is set or loaded), so the name it sends and
/// the one it hashes into the pairing transcript are the same bytes; a name received from a
/// peer is sanitised again before it is stored or shown, since the peer may not have.
pub fn sanitize_device_name(name: &str) -> String {
    let mapped: String = name
        .chars()
        .filter(|c| !is_invisible_format(*c))
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let trimmed = mapped.trim();
    let mut end = trimmed.len().min(MAX_DEVICE_NAME);
    while !trimmed.is_char_boundary(end) {
        end -= 1;
    }
    trimmed[..end].trim_end().to_string()
}

/// Zero-width and bidirectional formatting characters (Unicode category Cf, the ones that
/// change how surrounding text is displayed).
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2069}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

fn check_name(name: &str) -> Result<(), IdentityError> {
    if name.trim().is_empty() || name.len() > MAX_DEVICE_NAME {
        return Err(IdentityError::BadName);
    }
    Ok(())
}

impl Identity {
    /// A fresh identity held only in memory (tests, throwaway endpoints).
    pub fn generate(name: &str) -> Result<Self, IdentityError> {
        check_name(name)?;
        let name = &sanitize_device_name(name);
        check_name(name)?;
        let key = rcgen::KeyPair::generate().map_err(|e| IdentityError::Crypto(e.to_string()))?;
        Self::from_key(key, name)
    }

    fn from_key(key: rcgen::KeyPair, name: &str) -> Result<Self, IdentityError> {
        let params = rcgen::CertificateParams::new(vec!["ferry.invalid".to_string()])
            .map_err(|e| IdentityError::Crypto(e.to_string()))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Crypto(e.to_string()))?;
        Ok(Self {
            key_der: key.serialize_der(),
            cert: cert.der().clone(),
            id: DeviceId::from_spki(&rcgen::PublicKeyData::subject_public_key_info(&key)),
            name: name.to_string(),
        })
    }

    /// Loads the identity from `config_dir`, creating it (key, certificate, name) on first use.
    ///
    /// Files are written owner-only (0600) in an owner-only (0700) directory. `default_name` is
    /// used only when no name is stored yet.
    pub fn load_or_create(config_dir: &Path, default_name: &str) -> Result<Self, IdentityError> {
        ensure_private_dir(config_dir)?;
        let key_path = config_dir.join(KEY_FILE);
        let cert_path = config_dir.join(CERT_FILE);
        let name_path = config_dir.join(NAME_FILE);
        let name = match fs::read_to_string(&name_path) {
            // A name stored by an older version may hold control characters.
            Ok(n) => sanitize_device_name(&n),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let name = sanitize_device_name(default_name);
                check_name(&name)?;
                write_private(&name_path, name.as_bytes())?;
                name
            }
            Err(source) => {
                return Err(IdentityError::Io {
                    path: name_path,
                    source,
                })
            }
        };
        check_name(&name)?;
        match fs::read_to_string(&key_path) {
            Ok(pem) => {
                let key = rcgen::KeyPair::from_pem(&pem)
                    .map_err(|e| IdentityError::Crypto(format!("{}: {e}", key_path.display())))?;
                let id = DeviceId::from_spki(&rcgen::PublicKeyData::subject_public_key_info(&key));
                // Reuse the stored certificate if it carries this key; otherwise re-issue.
                let stored = fs::read_to_string(&cert_path)
                    .ok()
                    .and_then(|pem| pem_to_der(&pem));
                if let Some(der) = stored {
                    let cert = CertificateDer::from(der);
                    if DeviceId::from_cert(&cert).ok() == Some(id) {
                        return Ok(Self {
                            key_der: key.serialize_der(),
                            cert,
                            id,
                            name,
                        });
                    }
                }
                let me = Self::from_key(key, &name)?;
                write_private(&cert_path, der_to_pem(&me.cert).as_bytes())?;
                Ok(me)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key =
                    rcgen::KeyPair::generate().map_err(|e| IdentityError::Crypto(e.to_string()))?;
                write_private(&key_path, key.serialize_pem().as_bytes())?;
                let me = Self::from_key(key, &name)?;
                write_private(&cert_path, der_to_pem(&me.cert).as_bytes())?;
                Ok(me)
            }
            Err(source) => Err(IdentityError::Io {
                path: key_path,
                source,
            }),
        }
    }

    /// Changes the device name (and persists it when `config_dir` is given).
    /// The name is sanitised first ([`sanitize_device_name`]): that is the name stored and sent.
    pub fn set_name(&mut self, name: &str, config_dir: Option<&Path>) -> Result<(), IdentityError> {
        check_name(name)?;
        let name = &sanitize_device_name(name);
        check_name(name)?;
        if let Some(dir) = config_dir {
            write_private(&dir.join(NAME_FILE), name.as_bytes())?;
        }
        self.name = name.to_string();
        Ok(())
    }

    /// This device's id.
    pub fn device_id(&self) -> DeviceId {
        self.id
    }

    /// The user-chosen device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The self-signed certificate (DER).
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    pub(crate) fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

fn pem_to_der(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    data_encoding::BASE64.decode(body.trim().as_bytes()).ok()
}

fn der_to_pem(der: &CertificateDer<'_>) -> String {
    let b64 = data_encoding::BASE64.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Creates `dir` (and parents) and makes it owner-only.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: dir.to_path_buf(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    #[cfg(not(unix))]
    fs::create_dir_all(dir).map_err(io)?;
    Ok(())
}

/// Atomically writes an owner-only file (temp file + fsync + rename).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let io = |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitised_once_and_stay_so() {
        assert_eq!(sanitize_device_name("new\tphone"), "new phone");
        assert_eq!(sanitize_device_name(" a\x1b[31mred\n"), "a [31mred");
        assert_eq!(sanitize_device_name("evil\u{202E}gnp.exe"), "evilgnp.exe");
        let long = "é".repeat(100);
        let cut = sanitize_device_name(&long);
        assert!(cut.len() <= MAX_DEVICE_NAME && cut.chars().all(|c| c == 'é'));
        for n in ["new\tphone", "x\u{200B}\ty ", &long] {
            let once = sanitize_device_name(n);
            assert_eq!(sanitize_device_name(&once), once);
        }
        let mut id = Identity::generate("new\tphone").unwrap();
        assert_eq!(id.name(), "new phone");
        id.set_name("old\r\nphone", None).unwrap();
        assert_eq!(id.name(), "old  phone");
        assert!(Identity::generate("\t\u{202E}").is_err());
    }

    #[test]
    fn device_id_round_trip_and_typo_detection() {
        let id = Identity::generate("a").unwrap().device_id();
        let s = id.to_string();
        assert_eq!(s.len(), 63);
        assert_eq!(s.split('-').count(), 8);
        assert_eq!(s.parse::<DeviceId>().unwrap(), id);
        assert_eq!(s.to_lowercase().parse::<DeviceId>().unwrap(), id);
        // Change one data character: the check character catches it.
        let mut bad: Vec<u8> = s.into_bytes();
        bad[0] = if bad[0] == b'A' { b'B' } else { b'A' };
        let bad = String::from_utf8(bad).unwrap();
        assert_eq!(bad.parse::<DeviceId>(), Err(DeviceIdError::Check));
        assert_eq!("ABC".parse::<DeviceId>(), Err(DeviceIdError::Length));
    }

    #[test]
    fn persisted_identity_is_stable_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config");
        let a = Identity::load_or_create(&cfg, "Old phone").unwrap();
        let b = Identity::load_or_create(&cfg, "ignored").unwrap();
        assert_eq!(a.device_id(), b.device_id());
        assert_eq!(a.certificate(), b.certificate());
        assert_eq!(b.name(), "Old phone");
        assert_eq!(DeviceId::from_cert(a.certificate()).unwrap(), a.device_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&cfg), 0o700);
            assert_eq!(mode(&cfg.join(KEY_FILE)), 0o600);
            assert_eq!(mode(&cfg.join(CERT_FILE)), 0o600);
        }
    }
}
