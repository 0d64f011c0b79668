//! The chain anchor documents the daemon and the agent exchange (ledger checkpoints and the
//! anchor transactions recorded for them). The daemon's `ledger::anchor` stores them.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// keccak256("Anchored(bytes32,uint64,bytes32,address)"): topic 0 of the contract's event.
pub const ANCHORED_TOPIC: &str = "7196d6002b555d592bc808cc522b6e167501be1b6185fd206cd187b7330acf7a";

/// The log id on chain: SHA-256 of the origin line.
pub fn log_id(origin: &str) -> [u8; 32] {
    Sha256::digest(origin.as_bytes()).into()
}

/// The newest checkpoint, for the agent to anchor (`size` 0: the log is empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    pub origin: String,
    /// SHA-256 of the origin, hex.
    pub log_id: String,
    pub size: u64,
    /// Root hash, hex.
    pub root: String,
}

/// An anchor transaction about to be broadcast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewAnchor {
    pub size: u64,
    pub root: String,
    pub chain_id: u64,
    pub contract: String,
    pub nonce: u64,
    pub tx_hash: String,
    /// The signed transaction (EIP-2718 bytes, hex), to re-broadcast after a restart.
    pub raw_tx: String,
}

/// What became of an anchor transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnchorUpdate {
    /// `confirmed` or `dropped`.
    pub state: String,
    pub block_number: Option<u64>,
}

/// An anchor as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnchorRow {
    pub id: i64,
    pub size: u64,
    pub root: String,
    pub chain_id: u64,
    pub contract: String,
    pub nonce: u64,
    pub tx_hash: String,
    pub raw_tx: String,
    pub block_number: Option<u64>,
    /// `sent` (recorded, maybe broadcast), `confirmed`, `dropped`.
    pub state: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// The anchors the agent must know about: every `sent` one, and the newest `confirmed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnchorsView {
    pub open: Vec<AnchorRow>,
    pub last_confirmed: Option<AnchorRow>,
}
