//! The master key and the sub-keys derived from it.
//!
//! Invariant: key bytes live only in [`Zeroizing`] buffers, have redacted `Debug`, and never enter
//! argv, logs or error messages. The master key comes from the systemd credential `master-key`
//! (`$CREDENTIALS_DIRECTORY/master-key`) or from a key file that only its owner can read.
//! Sub-keys are derived with HKDF-SHA256 and a fixed purpose label, so a leaked blob key says
//! nothing about the database key.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

/// Name of the systemd credential holding the master key.
pub const CREDENTIAL_NAME: &str = "master-key";
/// Master key file name in the development state folder.
pub const DEV_KEY_FILE: &str = "master.key";
/// Length of the master key and every sub-key, bytes.
pub const KEY_LEN: usize = 32;

/// What a derived sub-key is for. Each purpose has its own HKDF label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPurpose {
    /// SQLCipher database key.
    Database,
    /// Blob store AES-256-GCM key-derivation key.
    Blobs,
    /// HMAC key for audit events and record commitments.
    AuditHmac,
    /// Ed25519 seed of the integrity ledger's checkpoint signing key.
    LedgerSigning,
}

impl KeyPurpose {
    fn label(self) -> &'static [u8] {
        match self {
            KeyPurpose::Database => b"hms-edge/v1/database",
            KeyPurpose::Blobs => b"hms-edge/v1/blobs",
            KeyPurpose::AuditHmac => b"hms-edge/v1/audit-hmac",
            KeyPurpose::LedgerSigning => b"hms-edge/v1/ledger-signing",
        }
    }
}

/// A 256-bit secret. `Debug` never shows the bytes.
#[derive(Clone)]
pub struct Key(Zeroizing<[u8; KEY_LEN]>);

impl Key {
    /// Wraps raw bytes (tests and derivations).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Key(Zeroizing::new(bytes))
    }

    /// A fresh random key.
    pub fn random() -> Self {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        rand::fill(&mut k[..]);
        Key(k)
    }

    /// The secret bytes. Callers must not copy them into anything that is logged or persisted.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// HKDF-SHA256 derivation of a sub-key for `purpose`.
    pub fn derive(&self, purpose: KeyPurpose) -> Key {
        self.derive_with(purpose.label(), &[])
    }

    /// A public fingerprint of this key: 128 bits of an HKDF derivation under its own label, hex.
    /// It identifies the key (backup manifests, rotation reports) and reveals nothing about it
    /// or about any key derived for another purpose.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.derive_with(b"hms-edge/v1/key-fingerprint", &[]).expose()[..16])
    }

    /// HKDF-SHA256 derivation with an explicit label and salt (per-blob keys).
    pub fn derive_with(&self, label: &[u8], salt: &[u8]) -> Key {
        let hk = Hkdf::<Sha256>::new(Some(salt), &self.0[..]);
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        hk.expand(label, &mut out[..]).expect("32 bytes is a valid HKDF-SHA256 output length");
        Key(out)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// Why the master key could not be had. Messages name the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "master key file {path} is readable by group or others (mode {mode:04o}); \
         run `chmod 600 {path}` or use a systemd credential"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("master key file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("master key file {path} must hold 32 raw bytes or 64 hex digits")]
    BadFormat { path: PathBuf },
    #[error(
        "no master key at {path} and generation is disabled (keys.generate_if_missing = false)"
    )]
    Missing { path: PathBuf },
    #[error("cannot read master key {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Where the master key is taken from, after the fallbacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `$CREDENTIALS_DIRECTORY/master-key`: systemd decrypted it for us; never generated.
    Credential(PathBuf),
    /// A key file (configured, or the development default in the state folder).
    File(PathBuf),
}

impl KeySource {
    /// Resolves the source: configured file, else systemd credential, else `<state_dir>/master.key`.
    pub fn resolve(configured: &Path, state_dir: &Path) -> KeySource {
        if !configured.as_os_str().is_empty() {
            return KeySource::File(configured.to_owned());
        }
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let p = Path::new(&dir).join(CREDENTIAL_NAME);
            if p.exists() {
                return KeySource::Credential(p);
            }
        }
        KeySource::File(state_dir.join(DEV_KEY_FILE))
    }

    pub fn path(&self) -> &Path {
        match self {
            KeySource::Credential(p) | KeySource::File(p) => p,
        }
    }
}

/// Loads the master key, creating a random one (0600, never overwriting) when allowed and absent.
/// Returns the key and whether it was generated now.
pub fn load_or_generate(source: &KeySource, generate: bool) -> Result<(Key, bool), KeyError> {
    let path = source.path();
    if !path.exists() {
        if generate && matches!(source, KeySource::File(_)) {
            return generate_key_file(path).map(|k| (k, true));
        }
        return Err(KeyError::Missing { path: path.to_owned() });
    }
    load_key_file(path).map(|k| (k, false))
}

/// Reads a key file after checking that only its owner can read it.
pub fn load_key_file(path: &Path) -> Result<Key, KeyError> {
    let io = |source| KeyError::Io { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(KeyError::NotAFile { path: path.to_owned() });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen { path: path.to_owned(), mode });
    }
    let raw = Zeroizing::new(std::fs::read(path).map_err(io)?);
    parse_key(&raw).ok_or_else(|| KeyError::BadFormat { path: path.to_owned() })
}

/// Parses key material: 32 raw bytes or 64 hex digits (surrounding whitespace allowed).
pub fn parse_key(raw: &[u8]) -> Option<Key> {
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    if raw.len() == KEY_LEN {
        out.copy_from_slice(raw);
        return Some(Key(out));
    }
    let text = std::str::from_utf8(raw).ok()?.trim();
    if text.len() == 2 * KEY_LEN {
        hex::decode_to_slice(text, &mut out[..]).ok()?;
        return Some(Key(out));
    }
    None
}

fn generate_key_file(path: &Path) -> Result<Key, KeyError> {
    let io = |source| KeyError::Io { path: path.to_owned(), source };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    let key = Key::random();
    write_new_key_file(path, &key)?;
    Ok(key)
}

/// Writes `key` as hex to a new 0600 file (never overwriting one), fsynced with its folder.
pub fn write_new_key_file(path: &Path, key: &Key) -> Result<(), KeyError> {
    let io = |source| KeyError::Io { path: path.to_owned(), source };
    // create_new: never overwrite a key that appeared meanwhile.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    let hex = Zeroizing::new(hex::encode(key.expose()));
    f.write_all(hex.as_bytes()).map_err(io)?;
    f.write_all(b"\n").map_err(io)?;
    f.sync_all().map_err(io)?;
    crate::fsync::fsync_parent(path).map_err(io)?;
    Ok(())
}

/// Keeps key material out of core dumps (no core files, not dumpable, which also blocks ptrace
/// by other users' processes) and makes every file we create private (umask 0077).
pub fn harden_process() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    let _ = nix::sys::prctl::set_dumpable(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_keys_differ_by_purpose_and_are_stable() {
        let m = Key::from_bytes([7u8; 32]);
        let a = m.derive(KeyPurpose::Database);
        let b = m.derive(KeyPurpose::Blobs);
        assert_ne!(a.expose(), b.expose());
        assert_eq!(a.expose(), m.derive(KeyPurpose::Database).expose());
        assert_ne!(a.expose(), m.expose());
        assert_eq!(format!("{a:?}"), "Key(<redacted>)");
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, hex::encode([1u8; 32])).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_key_file(&p).unwrap_err().to_string();
        assert!(err.contains("readable by group or others") && err.contains("0644"), "{err}");
        assert!(!err.contains(&hex::encode([1u8; 32])), "error must not contain the key");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(load_key_file(&p), Err(KeyError::TooOpen { .. })));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_key_file(&p).unwrap().expose(), &[1u8; 32]);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load_key_file(&p).is_ok());
    }

    #[test]
    fn raw_and_hex_formats_are_accepted_others_not() {
        assert!(parse_key(&[9u8; 32]).is_some());
        assert!(parse_key(format!("{}\n", hex::encode([9u8; 32])).as_bytes()).is_some());
        assert!(parse_key(b"short").is_none());
        assert!(parse_key(&[b'z'; 64]).is_none());
    }

    #[test]
    fn generation_creates_0600_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let src = KeySource::File(dir.path().join("state/master.key"));
        let (k1, created) = load_or_generate(&src, true).unwrap();
        assert!(created);
        let mode = std::fs::metadata(src.path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, created) = load_or_generate(&src, true).unwrap();
        assert!(!created);
        assert_eq!(k1.expose(), k2.expose());
        let missing = KeySource::File(dir.path().join("none"));
        assert!(matches!(load_or_generate(&missing, false), Err(KeyError::Missing { .. })));
    }
}
