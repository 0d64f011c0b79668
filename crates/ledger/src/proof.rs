//! The proof document returned by `$verify` and checked by `hms-edge verify`.
//!
//! ```json
//! { "format": "hms-edge-proof/v1",
//!   "subject": "Patient/p1/_history/2",
//!   "leaf": { "kind": "fhir", "index": 17, "data": "<hex, 34 bytes>", "hash": "<hex>" },
//!   "tree_size": 20,
//!   "inclusion": ["<hex>", …],
//!   "checkpoint": "<C2SP signed note>",
//!   "log_key": "<origin>+<key hash>+<base64 Ed25519 key>",
//!   "anchor": "pending" }
//! ```
//! Everything in it can be checked without the box: the leaf hashes up the inclusion path to the
//! root of the signed checkpoint. The leaf itself is a keyed commitment, so the document carries no
//! clinical content beyond the subject's reference.

use serde::{Deserialize, Serialize};

use super::note::VKey;
use super::tree::{self, Hash};
use crate::{LEAF_LEN, LEAF_VERSION, LeafKind};

/// Format tag of [`ProofDoc`].
pub const FORMAT: &str = "hms-edge-proof/v1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofLeaf {
    pub kind: String,
    pub index: u64,
    /// The leaf bytes, hex.
    pub data: String,
    /// RFC 6962 leaf hash, hex (informative; recomputed by the verifier).
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProofDoc {
    pub format: String,
    pub subject: String,
    pub leaf: ProofLeaf,
    pub tree_size: u64,
    /// Audit path, leaf to root, hex hashes.
    pub inclusion: Vec<String>,
    /// The signed checkpoint (C2SP signed note) at `tree_size`.
    pub checkpoint: String,
    /// The checkpoint verifier key.
    pub log_key: String,
    /// `"pending"` until anchored on chain; then the anchor's details.
    pub anchor: serde_json::Value,
}

/// What a successful verification established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub origin: String,
    pub key_name: String,
    pub tree_size: u64,
    pub root: Hash,
    pub leaf_index: u64,
    pub kind: String,
    /// The chain anchor the checkpoint was shown consistent with (None: pending).
    pub anchor: Option<Anchor>,
}

/// A chain anchor as carried in a proof document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Anchor {
    pub chain_id: u64,
    pub contract: String,
    pub tx_hash: String,
    pub block_number: u64,
    pub log_id: String,
    pub size: u64,
    pub root: String,
    /// Consistency proof from the checkpoint's tree to the anchored tree (hex hashes).
    pub consistency: Vec<String>,
}

impl ProofDoc {
    pub fn new(
        subject: String,
        leaf: &[u8],
        index: u64,
        tree_size: u64,
        path: &[Hash],
        note: &str,
        vkey: &str,
    ) -> ProofDoc {
        let kind =
            leaf.get(1).copied().and_then(LeafKind::from_byte).map_or("unknown", |k| k.as_str());
        ProofDoc {
            format: FORMAT.into(),
            subject,
            leaf: ProofLeaf {
                kind: kind.into(),
                index,
                data: hex::encode(leaf),
                hash: hex::encode(tree::leaf_hash(leaf)),
            },
            tree_size,
            inclusion: path.iter().map(hex::encode).collect(),
            checkpoint: note.to_owned(),
            log_key: vkey.to_owned(),
            anchor: serde_json::Value::String("pending".into()),
        }
    }

    /// Checks the document offline: the checkpoint's signature (by `pinned_key` when given,
    /// else by the key the document names), the leaf's form, and its inclusion in the checkpoint.
    pub fn verify(&self, pinned_key: Option<&str>) -> Result<Verified, String> {
        if self.format != FORMAT {
            return Err(format!("unknown proof format {:?}", self.format));
        }
        let vkey = VKey::parse(pinned_key.unwrap_or(&self.log_key))
            .map_err(|e| format!("log key: {e}"))?;
        let cp = vkey.open(&self.checkpoint)?;
        if cp.size != self.tree_size {
            return Err(format!(
                "proof is for tree size {} but the checkpoint is at {}",
                self.tree_size, cp.size
            ));
        }
        let leaf = hex::decode(&self.leaf.data).map_err(|_| "leaf data is not hex")?;
        if leaf.len() != LEAF_LEN || leaf[0] != LEAF_VERSION {
            return Err("leaf is not an hms-edge ledger leaf".into());
        }
        let kind = LeafKind::from_byte(leaf[1]).ok_or("leaf kind is unknown")?;
        if kind.as_str() != self.leaf.kind {
            return Err(format!(
                "leaf says {} but the document says {}",
                kind.as_str(),
                self.leaf.kind
            ));
        }
        let path = self
            .inclusion
            .iter()
            .map(|h| hex::decode(h).ok().and_then(|b| <Hash>::try_from(b).ok()))
            .collect::<Option<Vec<Hash>>>()
            .ok_or("inclusion path holds something that is not a SHA-256 hash")?;
        tree::verify_inclusion(&leaf, self.leaf.index, cp.size, &cp.root, &path)?;
        let anchor = if self.anchor.as_str() == Some("pending") {
            None
        } else {
            let a: Anchor = serde_json::from_value(self.anchor.clone())
                .map_err(|e| format!("malformed anchor: {e}"))?;
            if a.log_id != hex::encode(crate::log_id(&cp.origin)) {
                return Err("the anchor's log id is not this log's".into());
            }
            let root = hex::decode(&a.root)
                .ok()
                .and_then(|b| <Hash>::try_from(b).ok())
                .ok_or("anchored root is not a SHA-256 hash")?;
            let path = a
                .consistency
                .iter()
                .map(|h| hex::decode(h).ok().and_then(|b| <Hash>::try_from(b).ok()))
                .collect::<Option<Vec<Hash>>>()
                .ok_or("consistency proof holds something that is not a SHA-256 hash")?;
            tree::verify_consistency(cp.size, &cp.root, a.size, &root, &path)
                .map_err(|e| format!("checkpoint is not consistent with the anchor: {e}"))?;
            Some(a)
        };
        Ok(Verified {
            origin: cp.origin,
            key_name: vkey.name,
            tree_size: cp.size,
            root: cp.root,
            leaf_index: self.leaf.index,
            kind: self.leaf.kind.clone(),
            anchor,
        })
    }
}
