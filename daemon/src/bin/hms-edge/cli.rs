//! The command line's grammar (clap), one enum per command group.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about = "Administer an hms-edge box")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the embedded
    /// defaults), print the effective configuration with secrets redacted; non-zero exit on error.
    CheckConfig {
        /// The file to check.
        file: Option<PathBuf>,
    },
    /// Sync state as hms-edged knows it: per channel queue depth, age of the oldest unsynced
    /// change, parked changes, and what the agent last reported (link, last success, bytes sent).
    Status {
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Upstream sync: conflicts and parked changes.
    Sync {
        #[command(subcommand)]
        command: SyncCommand,
        /// Config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the defaults).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
    /// Check an integrity proof document (from `$verify`) offline: the checkpoint's Ed25519
    /// signature, the leaf, and its inclusion path up to the signed root. Exit 0 when it holds.
    Verify {
        /// The proof document (JSON file; `-` for standard input).
        proof: PathBuf,
        /// Pin the log's verifier key (`hms-edge audit key` prints it) instead of trusting the
        /// key named in the document.
        #[arg(long)]
        key: Option<String>,
        /// Also check the anchor on chain through this Ethereum JSON-RPC URL.
        #[arg(long)]
        rpc: Option<String>,
    },
    /// The integrity ledger's audit tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
        /// Config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the defaults).
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
    /// DICOM tools.
    Dicom {
        #[command(subcommand)]
        command: DicomCommand,
    },
    /// Back up the store into the new folder DEST while hms-edged runs: a consistent snapshot of
    /// the (still encrypted) database, the encrypted blob files it references, and a manifest of
    /// SHA-256 checksums. The master key is NOT in the backup: keep it separately.
    Backup {
        /// Destination folder (must not exist; created complete or not at all).
        dest: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Replace the store by a backup. hms-edged must be stopped. Checks the manifest's key
    /// fingerprint and every checksum before anything changes; the swap is atomic.
    Restore {
        /// The backup folder (made by `hms-edge backup`).
        src: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Give the store a new master key: the database is re-keyed, the blob and audit keys are
    /// re-wrapped, everything is verified under the new key, then the old key is destroyed.
    /// hms-edged must be stopped. Re-run it after an interruption: it finishes or undoes.
    RotateKey {
        #[command(flatten)]
        key: KeyArgs,
    },
}

/// Where the config and the master key are.
#[derive(Debug, clap::Args)]
pub struct KeyArgs {
    /// Config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the defaults).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The master key file (default: `keys.master_key_file`, else $CREDENTIALS_DIRECTORY/master-key,
    /// else <state_dir>/master.key if present, else the packaged key:
    /// /etc/hms-edge/credstore.encrypted/master-key (via systemd-creds) or /etc/hms-edge/master-key).
    #[arg(long, conflicts_with = "credential")]
    pub key_file: Option<PathBuf>,
    /// The master key as a systemd encrypted credential (read and written with systemd-creds).
    #[arg(long)]
    pub credential: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum DicomCommand {
    /// Write a stored instance as a DICOM Part 10 file: the File Meta Information of hms-edged
    /// followed by the data set exactly as it was received. Safe while hms-edged runs.
    Export {
        /// SOP Instance UID of the instance.
        sop_instance_uid: String,
        /// Destination file (written atomically).
        file: PathBuf,
        /// A given version (with `duplicate_policy = "keep-both"`); default: the newest.
        #[arg(long)]
        version: Option<i64>,
        /// Config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Keep a study on this box whatever the disk: eviction never takes a pinned study.
    /// Asks the running hms-edged; audited.
    Pin {
        /// Study Instance UID.
        study: String,
        /// Config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Let eviction take a pinned study again.
    Unpin {
        /// Study Instance UID.
        study: String,
        /// Config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Evict by hand: remove the image files of one study, or of every study last received or
    /// retrieved before a date, that the cloud PACS has confirmed (never a pinned study, one not
    /// yet confirmed upstream, or one with an active worklist order). The index keeps them.
    /// Asks the running hms-edged; audited. Prints each study and the bytes freed.
    Evict {
        /// Study Instance UID.
        #[arg(long, conflicts_with = "before", required_unless_present = "before")]
        study: Option<String>,
        /// Every study last used before this date (YYYY-MM-DD, or a date-time; UTC if no zone).
        #[arg(long)]
        before: Option<String>,
        /// Print what would go and the bytes it would free; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Config file (default: $HMS_EDGE_CONFIG, /etc/hms-edge/edge.toml, or the defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the integrity log from the stored records (read-only; needs the master key)
    /// and compare it with the stored leaves and every signed checkpoint. Lists each modified,
    /// deleted, moved or unlogged record by name and log position; exit 1 if any.
    Check,
    /// Write the audit trail as FHIR AuditEvent resources (IHE BALP style), one JSON object per
    /// line (NDJSON), oldest first. The export itself is recorded as an audit event.
    Export {
        /// Only events recorded at or after this FHIR date/dateTime (e.g. 2026-11-01).
        #[arg(long)]
        since: Option<String>,
        /// Write to this file (created 0600) instead of standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Print the log's checkpoint verifier key (public; give it to auditors for `verify --key`).
    Key,
}

#[derive(Debug, Subcommand)]
pub enum SyncCommand {
    /// List conflicts between edge and upstream changes (newest first).
    Conflicts {
        /// Only the ones waiting for a decision (policy "manual").
        #[arg(long)]
        open: bool,
    },
    /// Decide a held conflict: keep the edge's version (pushed over upstream's) or upstream's.
    Resolve {
        id: i64,
        #[arg(long, value_parser = ["local", "upstream"])]
        keep: String,
    },
    /// List changes parked after upstream refused them, with upstream's reason.
    Parked,
    /// Put parked changes back in the queue (all, or the given sequence numbers).
    Retry { seqs: Vec<i64> },
}
