//! Anchoring of the integrity ledger's checkpoints on an Ethereum chain (alloy).
//!
//! Each round: reconcile the anchors recorded as `sent` (confirmed, re-broadcast, or dropped when
//! their nonce went to another transaction), then — when none is open, the log grew, and either
//! `chain.anchor_interval_secs` passed since the last anchor or `chain.anchor_every_leaves` leaves
//! were added — anchor the *newest* checkpoint: sign `anchor(root, treeSize, logId)`, record nonce,
//! hash and raw transaction in hms-edged **before** broadcasting, broadcast, and confirm after
//! `chain.confirmations` blocks. After an outage only the newest checkpoint is anchored; proofs
//! of older checkpoints reach it through consistency proofs. Only the root, the size and the log
//! id (SHA-256 of the origin) are sent: no patient data.

use std::path::Path;
use std::time::{Duration, Instant};

use alloy::eips::eip2718::Encodable2718;
use alloy::network::{EthereumWallet, NetworkTransactionBuilder, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, FixedBytes};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol;
use alloy::sol_types::SolCall;
use anyhow::{Context, anyhow, bail};
use hms_edge_config::ChainConfig;
use hms_edge_wire::anchor::{AnchorRow, AnchorUpdate, AnchorsView, CheckpointInfo, NewAnchor};
use hms_edge_wire::client::InternalClient;
use tokio_util::sync::CancellationToken;

sol! {
    /// The contract's only function and event (`agent/contracts/LedgerAnchor.sol`).
    function anchor(bytes32 root, uint64 treeSize, bytes32 logId);
    event Anchored(bytes32 indexed logId, uint64 treeSize, bytes32 root, address indexed submitter);
}

/// The contract's creation bytecode, compiled once (see `agent/contracts/README.md`).
pub const BYTECODE_HEX: &str = include_str!("../contracts/LedgerAnchor.bin");

/// Name of the systemd credential with the anchoring key.
pub const CREDENTIAL_NAME: &str = "chain-key";

/// Loads the anchoring key: `chain.key_file` (mode 0600 or stricter), else the systemd
/// credential `chain-key`. Never from the config or the command line.
pub fn load_signer(cfg: &ChainConfig) -> anyhow::Result<PrivateKeySigner> {
    let path = if !cfg.key_file.as_os_str().is_empty() {
        cfg.key_file.clone()
    } else {
        let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
            anyhow!(
                "no chain key: set chain.key_file or pass the systemd credential {CREDENTIAL_NAME}"
            )
        })?;
        Path::new(&dir).join(CREDENTIAL_NAME)
    };
    let key = hms_edge_config::keys::load_key_file(&path)?;
    PrivateKeySigner::from_bytes(&B256::from(*key.expose()))
        .map_err(|_| anyhow!("{} is not a valid secp256k1 private key", path.display()))
}

fn provider(url: &str) -> anyhow::Result<DynProvider> {
    let url = url.parse().with_context(|| format!("chain.rpc_url {url:?}"))?;
    Ok(ProviderBuilder::new().disable_recommended_fillers().connect_http(url).erased())
}

/// Signs a transaction with explicit nonce, gas and fees (nothing filled in behind our back).
async fn sign(
    p: &DynProvider,
    wallet: &EthereumWallet,
    from: Address,
    tx: TransactionRequest,
    nonce: u64,
) -> anyhow::Result<(B256, Vec<u8>)> {
    let chain_id = p.get_chain_id().await?;
    let fees = p.estimate_eip1559_fees().await?;
    let tx = tx.with_from(from).with_nonce(nonce).with_chain_id(chain_id);
    let gas = p.estimate_gas(tx.clone()).await?;
    let tx = tx
        .with_gas_limit(gas + gas / 5)
        .with_max_fee_per_gas(fees.max_fee_per_gas)
        .with_max_priority_fee_per_gas(fees.max_priority_fee_per_gas);
    let envelope = tx.build(wallet).await?;
    Ok((*envelope.tx_hash(), envelope.encoded_2718()))
}

/// `hms-edge-agent chain deploy`: deploys the contract and returns its address.
pub async fn deploy(cfg: &ChainConfig) -> anyhow::Result<(Address, u64)> {
    if cfg.rpc_url.is_empty() {
        bail!("chain.rpc_url is empty");
    }
    let signer = load_signer(cfg)?;
    let from = signer.address();
    let wallet = EthereumWallet::from(signer);
    let p = provider(&cfg.rpc_url)?;
    let code = Bytes::from(hex::decode(BYTECODE_HEX.trim()).context("contract bytecode")?);
    let nonce = p.get_transaction_count(from).pending().await?;
    let tx = TransactionRequest::default().with_deploy_code(code);
    let (hash, raw) = sign(&p, &wallet, from, tx, nonce).await?;
    let _pending = p.send_raw_transaction(&raw).await?;
    let receipt = wait_receipt(&p, hash, Duration::from_secs(120)).await?;
    let addr = receipt.contract_address.ok_or_else(|| anyhow!("no contract address"))?;
    Ok((addr, receipt.gas_used))
}

async fn wait_receipt(
    p: &DynProvider,
    hash: B256,
    timeout: Duration,
) -> anyhow::Result<alloy::rpc::types::TransactionReceipt> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(r) = p.get_transaction_receipt(hash).await? {
            if !r.status() {
                bail!("transaction {hash} reverted");
            }
            return Ok(r);
        }
        if Instant::now() > deadline {
            bail!("transaction {hash} not mined within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The anchoring loop's state.
pub struct Anchorer {
    cfg: ChainConfig,
    internal: InternalClient,
    signer_addr: Address,
    wallet: EthereumWallet,
    contract: Address,
    provider: DynProvider,
    last_anchor_at: Option<Instant>,
}

impl Anchorer {
    pub fn new(cfg: &ChainConfig, internal: InternalClient) -> anyhow::Result<Anchorer> {
        let signer = load_signer(cfg)?;
        let contract: Address =
            cfg.contract.parse().with_context(|| format!("chain.contract {:?}", cfg.contract))?;
        Ok(Anchorer {
            cfg: cfg.clone(),
            internal,
            signer_addr: signer.address(),
            wallet: EthereumWallet::from(signer),
            contract,
            provider: provider(&cfg.rpc_url)?,
            last_anchor_at: None,
        })
    }

    /// Runs rounds until cancelled; chain outages only delay anchors.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let every = Duration::from_secs(self.cfg.anchor_interval_secs.clamp(1, 5));
        let mut failures = 0u32;
        loop {
            match self.round().await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(error = %format!("{e:#}"), failures, "chain anchoring round failed");
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn update(&self, id: i64, state: &str, block: Option<u64>) -> anyhow::Result<AnchorRow> {
        let u = AnchorUpdate { state: state.into(), block_number: block };
        Ok(self.internal.post(&format!("/v1/ledger/anchors/{id}"), &u).await?)
    }

    /// Brings a recorded anchor to `confirmed` (or `dropped`); `Ok(false)`: still waiting.
    async fn reconcile(&self, a: &AnchorRow) -> anyhow::Result<bool> {
        let hash: B256 = a.tx_hash.parse().context("recorded tx hash")?;
        if let Some(r) = self.provider.get_transaction_receipt(hash).await? {
            let block = r.block_number.ok_or_else(|| anyhow!("receipt without block"))?;
            if !r.status() {
                self.update(a.id, "dropped", None).await?;
                tracing::warn!(tx = %hash, "anchor transaction reverted");
                return Ok(true);
            }
            let head = self.provider.get_block_number().await?;
            if head + 1 >= block + self.cfg.confirmations {
                self.update(a.id, "confirmed", Some(block)).await?;
                tracing::info!(size = a.size, tx = %hash, block, gas = r.gas_used, "checkpoint anchored");
                return Ok(true);
            }
            return Ok(false);
        }
        // Not mined: was the nonce used by another transaction? Then this one can never be.
        let mined_nonce = self.provider.get_transaction_count(self.signer_addr).latest().await?;
        if mined_nonce > a.nonce {
            self.update(a.id, "dropped", None).await?;
            tracing::warn!(tx = %hash, nonce = a.nonce, "anchor transaction dropped (nonce used)");
            return Ok(true);
        }
        // Maybe never broadcast (crash or outage right after recording it): send it (again).
        let raw = hex::decode(&a.raw_tx).context("recorded raw tx")?;
        if let Err(e) = self.provider.send_raw_transaction(&raw).await {
            let m = e.to_string();
            if !m.contains("already") && !m.contains("known") {
                return Err(e.into());
            }
        }
        Ok(false)
    }

    async fn round(&mut self) -> anyhow::Result<()> {
        let view: AnchorsView = self.internal.get("/v1/ledger/anchors").await?;
        let mut open = false;
        for a in &view.open {
            if !self.reconcile(a).await? {
                open = true;
            }
        }
        if open {
            return Ok(());
        }
        let view: AnchorsView = self.internal.get("/v1/ledger/anchors").await?;
        let last = view.last_confirmed.as_ref().map_or(0, |a| a.size);
        if self.last_anchor_at.is_none() {
            // After a restart, time the interval from the last confirmed anchor.
            self.last_anchor_at = view.last_confirmed.as_ref().map(|a| {
                let age = (crate::now_ms() - a.updated_at_ms).max(0) as u64;
                Instant::now().checked_sub(Duration::from_millis(age)).unwrap_or_else(Instant::now)
            });
        }
        let cp: CheckpointInfo = self.internal.post("/v1/ledger/checkpoint", &()).await?;
        if cp.size <= last {
            return Ok(());
        }
        let due = self
            .last_anchor_at
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(self.cfg.anchor_interval_secs))
            || cp.size - last >= self.cfg.anchor_every_leaves;
        if !due {
            return Ok(());
        }
        let root: FixedBytes<32> = cp.root.parse().context("checkpoint root")?;
        let log_id: FixedBytes<32> = cp.log_id.parse().context("log id")?;
        let data = anchorCall { root, treeSize: cp.size, logId: log_id }.abi_encode();
        let tx = TransactionRequest::default().with_to(self.contract).with_input(data);
        let nonce = self.provider.get_transaction_count(self.signer_addr).pending().await?;
        let (hash, raw) = sign(&self.provider, &self.wallet, self.signer_addr, tx, nonce).await?;
        let chain_id = self.provider.get_chain_id().await?;
        // Recorded before it leaves: a crash after this line is reconciled at the next start.
        let row: AnchorRow = self
            .internal
            .post(
                "/v1/ledger/anchors",
                &NewAnchor {
                    size: cp.size,
                    root: cp.root.clone(),
                    chain_id,
                    contract: format!("{:#x}", self.contract),
                    nonce,
                    tx_hash: format!("{hash:#x}"),
                    raw_tx: hex::encode(&raw),
                },
            )
            .await?;
        self.last_anchor_at = Some(Instant::now());
        tracing::info!(size = cp.size, tx = %hash, nonce, "anchoring checkpoint");
        let _pending = self.provider.send_raw_transaction(&raw).await?;
        // Confirm in this round when the chain is quick; otherwise the next round does.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.reconcile(&row).await? && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::sol_types::SolEvent;

    /// The daemon's `hms-edge verify --rpc` matches logs by this topic without an Ethereum
    /// library: it must be the event's real signature hash.
    #[test]
    fn anchored_topic_matches_the_daemons_constant() {
        assert_eq!(hex::encode(Anchored::SIGNATURE_HASH), hms_edge_wire::anchor::ANCHORED_TOPIC);
        assert_eq!(hex::encode(anchorCall::SELECTOR), "70c127c6");
        assert!(BYTECODE_HEX.trim().len() > 100 && hex::decode(BYTECODE_HEX.trim()).is_ok());
    }
}
