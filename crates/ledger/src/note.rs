//! Signed checkpoints in the C2SP formats: `tlog-checkpoint` body (origin line, decimal tree size,
//! base64 root hash) inside a `signed-note` with an Ed25519 signature line
//! (`— <key name> <base64(4-byte key hash || 64-byte signature)>`). The verifier key is written
//! as `<name>+<hex key hash>+<base64(0x01 || public key)>`, the Go `note` package's vkey.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2_011::{Digest, Sha256};

use super::tree::Hash;

/// Signature type byte of Ed25519 in C2SP signed notes.
const ALG_ED25519: u8 = 0x01;

/// A checkpoint: what the log committed to at one size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

impl Checkpoint {
    /// The note body (three lines, each ending in a newline).
    pub fn body(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root))
    }

    /// Parses a note body.
    pub fn parse_body(body: &str) -> Result<Checkpoint, String> {
        let mut lines = body.split('\n');
        let origin = lines.next().filter(|l| !l.is_empty()).ok_or("checkpoint has no origin")?;
        let size = lines
            .next()
            .and_then(|l| l.parse::<u64>().ok())
            .ok_or("checkpoint size is not a decimal number")?;
        let root = lines
            .next()
            .and_then(|l| B64.decode(l).ok())
            .and_then(|b| <Hash>::try_from(b).ok())
            .ok_or("checkpoint root is not a base64 SHA-256 hash")?;
        Ok(Checkpoint { origin: origin.to_owned(), size, root })
    }
}

/// The log's checkpoint signer: an Ed25519 key derived from the master key (HKDF label
/// `hms-edge/v1/ledger-signing`), so it needs no storage of its own and never leaves the box.
pub struct NoteSigner {
    name: String,
    key: SigningKey,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoteSigner").field("name", &self.name).finish_non_exhaustive()
    }
}

impl NoteSigner {
    /// The signer for `name` from the store's signing seed (the daemon derives it from the master key).
    pub fn from_seed(seed: &[u8; 32], name: &str) -> NoteSigner {
        NoteSigner { name: name.to_owned(), key: SigningKey::from_bytes(seed) }
    }

    /// The verifier key string (`name+hash+base64`), safe to publish.
    pub fn vkey(&self) -> String {
        vkey_string(&self.name, &self.key.verifying_key())
    }

    /// Signs a checkpoint: the complete signed note text.
    pub fn sign(&self, cp: &Checkpoint) -> String {
        let body = cp.body();
        let sig = self.key.sign(body.as_bytes());
        let mut blob = key_hash(&self.name, &self.key.verifying_key()).to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        format!("{body}\n\u{2014} {} {}\n", self.name, B64.encode(blob))
    }
}

fn key_hash(name: &str, pk: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(pk.as_bytes());
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

fn vkey_string(name: &str, pk: &VerifyingKey) -> String {
    let mut k = vec![ALG_ED25519];
    k.extend_from_slice(pk.as_bytes());
    format!("{name}+{}+{}", hex::encode(key_hash(name, pk)), B64.encode(k))
}

/// A parsed verifier key.
#[derive(Debug, Clone)]
pub struct VKey {
    pub name: String,
    hash: [u8; 4],
    key: VerifyingKey,
}

impl VKey {
    pub fn parse(s: &str) -> Result<VKey, String> {
        let mut parts = s.trim().splitn(3, '+');
        let (Some(name), Some(h), Some(k)) = (parts.next(), parts.next(), parts.next()) else {
            return Err("verifier key must be name+hash+key".into());
        };
        let raw = B64.decode(k).map_err(|_| "verifier key is not base64")?;
        if raw.len() != 33 || raw[0] != ALG_ED25519 {
            return Err("verifier key is not an Ed25519 key".into());
        }
        let key = VerifyingKey::from_bytes(raw[1..].try_into().expect("32 bytes"))
            .map_err(|_| "verifier key is not a valid Ed25519 point")?;
        let hash = key_hash(name, &key);
        if hex::encode(hash) != h {
            return Err("verifier key hash does not match its name and key".into());
        }
        Ok(VKey { name: name.to_owned(), hash, key })
    }

    /// Verifies a signed note and returns its checkpoint. At least one signature line must be by
    /// this key (lines by other keys are ignored, as C2SP says).
    pub fn open(&self, note: &str) -> Result<Checkpoint, String> {
        let (body, sigs) = note.rsplit_once("\n\n").ok_or("note has no signature block")?;
        let body = format!("{body}\n");
        for line in sigs.lines() {
            let Some(rest) = line.strip_prefix("\u{2014} ") else {
                return Err(format!("malformed signature line {line:?}"));
            };
            let Some((name, b64)) = rest.split_once(' ') else { continue };
            if name != self.name {
                continue;
            }
            let blob = B64.decode(b64).map_err(|_| "signature is not base64")?;
            if blob.len() != 68 || blob[..4] != self.hash {
                continue;
            }
            let sig = Signature::from_slice(&blob[4..]).map_err(|_| "malformed signature")?;
            self.key
                .verify(body.as_bytes(), &sig)
                .map_err(|_| format!("checkpoint signature by {name} does not verify"))?;
            return Checkpoint::parse_body(&body);
        }
        Err(format!("checkpoint is not signed by {}", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_note_round_trip_and_tamper() {
        let s = NoteSigner::from_seed(&[3; 32], "hms-edge/t/s");
        let cp = Checkpoint { origin: "hms-edge/t/s".into(), size: 42, root: [7; 32] };
        let note = s.sign(&cp);
        assert!(note.starts_with("hms-edge/t/s\n42\nBwcH"), "{note}");
        assert!(note.contains("\n\n\u{2014} hms-edge/t/s "), "{note}");
        let vk = VKey::parse(&s.vkey()).unwrap();
        assert_eq!(vk.open(&note).unwrap(), cp);
        let forged = note.replacen("\n42\n", "\n43\n", 1);
        assert!(vk.open(&forged).unwrap_err().contains("does not verify"));
        let other = NoteSigner::from_seed(&[4; 32], "hms-edge/t/s");
        assert!(VKey::parse(&other.vkey()).unwrap().open(&note).is_err());
    }

    /// The C2SP signed-note example key and note (from the specification) verify.
    #[test]
    fn c2sp_example_note_verifies() {
        let vkey = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";
        let note = "If you think cryptography is the answer to your problem,\n\
                    then you don't know what your problem is.\n\
                    \n\
                    \u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
        let vk = VKey::parse(vkey).unwrap();
        let (body, _) = note.rsplit_once("\n\n").unwrap();
        let blob = B64
            .decode("x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=")
            .unwrap();
        let sig = Signature::from_slice(&blob[4..]).unwrap();
        assert_eq!(blob[..4], vk.hash);
        vk.key.verify(format!("{body}\n").as_bytes(), &sig).unwrap();
    }
}
