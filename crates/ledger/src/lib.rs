//! The integrity ledger's formats, with no I/O and no store: the leaf commitments
//! ([`Record`]), the RFC 6962 Merkle tree ([`tree`]), C2SP signed-note checkpoints ([`note`]) and
//! the proof document that `$verify` returns and `hms-edge verify` checks ([`proof`]). An outside
//! auditor can check a proof with this crate alone.
//!
//! The daemon's `ledger` module appends leaves in the store transaction of their record, makes
//! checkpoints and serves proofs; see its documentation for the invariants.

use hmac::{Hmac, Mac};

pub mod note;
pub mod proof;
pub mod tree;

pub use hms_edge_wire::anchor::log_id;

/// Leaf format version byte.
pub const LEAF_VERSION: u8 = 1;
/// Length of a leaf.
pub const LEAF_LEN: usize = 34;

/// What a leaf commits to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafKind {
    Audit = 1,
    Fhir = 2,
    Dicom = 3,
}

impl LeafKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LeafKind::Audit => "audit",
            LeafKind::Fhir => "fhir",
            LeafKind::Dicom => "dicom",
        }
    }

    pub fn parse(s: &str) -> Option<LeafKind> {
        match s {
            "audit" => Some(LeafKind::Audit),
            "fhir" => Some(LeafKind::Fhir),
            "dicom" => Some(LeafKind::Dicom),
            _ => None,
        }
    }

    pub fn from_byte(b: u8) -> Option<LeafKind> {
        [LeafKind::Audit, LeafKind::Fhir, LeafKind::Dicom].into_iter().find(|k| *k as u8 == b)
    }
}

/// A record the ledger commits to, as stored (the row id is part of the commitment, so a row
/// moved to another position or swapped with another is detected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Audit {
        seq: i64,
        at: i64,
        actor: String,
        source: String,
        action: String,
        entity: String,
        outcome: String,
        detail: Option<String>,
    },
    Fhir {
        seq: i64,
        rtype: String,
        id: String,
        version: i64,
        last_updated: i64,
        method: String,
        json: Option<String>,
    },
    Dicom {
        pk: i64,
        sop_uid: String,
        version: i64,
        series_uid: String,
        sop_class_uid: String,
        transfer_syntax: String,
        size: i64,
        dataset_sha256: String,
        blob: String,
    },
}

/// Canonical, unambiguous encoding into the HMAC: each field as u64 big-endian length + bytes
/// (`u64::MAX` for an absent value), integers as 8 bytes big-endian.
struct Enc(Hmac<sha2::Sha256>);

impl Enc {
    fn new(key: &[u8; 32], domain: &str) -> Enc {
        let mut e = Enc(Hmac::new_from_slice(key).expect("HMAC takes any key length"));
        e.s(domain);
        e
    }
    fn b(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            Some(b) => {
                self.0.update(&(b.len() as u64).to_be_bytes());
                self.0.update(b);
            }
            None => self.0.update(&u64::MAX.to_be_bytes()),
        }
        self
    }
    fn s(&mut self, v: &str) -> &mut Self {
        self.b(Some(v.as_bytes()))
    }
    fn o(&mut self, v: Option<&str>) -> &mut Self {
        self.b(v.map(str::as_bytes))
    }
    fn i(&mut self, v: i64) -> &mut Self {
        self.b(Some(&v.to_be_bytes()))
    }
    fn finish(self) -> [u8; 32] {
        self.0.finalize().into_bytes().into()
    }
}

impl Record {
    pub fn kind(&self) -> LeafKind {
        match self {
            Record::Audit { .. } => LeafKind::Audit,
            Record::Fhir { .. } => LeafKind::Fhir,
            Record::Dicom { .. } => LeafKind::Dicom,
        }
    }

    /// Row id in the record's own table (`audit_events.seq`, `fhir_history.seq`,
    /// `dicom_instances.pk`).
    pub fn row_id(&self) -> i64 {
        match self {
            Record::Audit { seq, .. } | Record::Fhir { seq, .. } => *seq,
            Record::Dicom { pk, .. } => *pk,
        }
    }

    /// How reports and errors name the record.
    pub fn name(&self) -> String {
        match self {
            Record::Audit { seq, action, entity, .. } => {
                format!("audit event #{seq} ({action} {entity})")
            }
            Record::Fhir { rtype, id, version, .. } => format!("{rtype}/{id}/_history/{version}"),
            Record::Dicom { sop_uid, version, .. } => {
                format!("DICOM instance {sop_uid} (version {version})")
            }
        }
    }

    /// The keyed commitment to this record.
    pub fn commitment(&self, key: &[u8; 32]) -> [u8; 32] {
        match self {
            Record::Audit { seq, at, actor, source, action, entity, outcome, detail } => {
                let mut e = Enc::new(key, "hms-edge/ledger/audit-event/v1");
                e.i(*seq)
                    .i(*at)
                    .s(actor)
                    .s(source)
                    .s(action)
                    .s(entity)
                    .s(outcome)
                    .o(detail.as_deref());
                e.finish()
            }
            Record::Fhir { seq, rtype, id, version, last_updated, method, json } => {
                let mut e = Enc::new(key, "hms-edge/ledger/fhir-version/v1");
                e.i(*seq).s(rtype).s(id).i(*version).i(*last_updated).s(method).o(json.as_deref());
                e.finish()
            }
            Record::Dicom {
                pk,
                sop_uid,
                version,
                series_uid,
                sop_class_uid,
                transfer_syntax,
                size,
                dataset_sha256,
                blob,
            } => {
                let mut e = Enc::new(key, "hms-edge/ledger/dicom-instance/v1");
                e.i(*pk)
                    .s(sop_uid)
                    .i(*version)
                    .s(series_uid)
                    .s(sop_class_uid)
                    .s(transfer_syntax)
                    .i(*size)
                    .s(dataset_sha256)
                    .s(blob);
                e.finish()
            }
        }
    }

    /// The leaf: version, kind, commitment.
    pub fn leaf(&self, key: &[u8; 32]) -> [u8; LEAF_LEN] {
        let mut out = [0u8; LEAF_LEN];
        out[0] = LEAF_VERSION;
        out[1] = self.kind() as u8;
        out[2..].copy_from_slice(&self.commitment(key));
        out
    }
}
