//! The FHIR R4 cache: the ward workstations' REST API on the LAN, backed by the encrypted store.
//!
//! Boundaries: the pure protocol code (`params`/`params_r4`, `fhirpath`, `index`, `date`, search
//! parsing, resource checks) is the `hms-edge-fhir` crate, re-exported here; `storage` is the
//! only module with SQL on the FHIR tables, besides the read-only search planner `search_sql`;
//! `http` is the only one with HTTP.

pub mod bundle;
pub mod http;
pub mod imaging;
pub mod search_sql;
pub mod storage;

use serde_json::{Value, json};

pub use hms_edge_fhir::resource::{parse_resource, validate_resource};
pub use hms_edge_fhir::{
    R4_RESOURCE_TYPES, READ_ONLY_TYPES, auth, date, fhirpath, index, is_resource_type, params,
    params_r4, search, valid_id,
};

impl From<hms_edge_fhir::auth::AuthError> for FhirError {
    fn from(e: hms_edge_fhir::auth::AuthError) -> Self {
        match e {
            hms_edge_fhir::auth::AuthError::Unauthorized(m) => FhirError::Unauthorized(m),
            hms_edge_fhir::auth::AuthError::Forbidden(m) => FhirError::Forbidden(m),
        }
    }
}

impl From<hms_edge_fhir::Invalid> for FhirError {
    fn from(e: hms_edge_fhir::Invalid) -> Self {
        match e {
            hms_edge_fhir::Invalid::BadRequest(m) => FhirError::BadRequest(m),
            hms_edge_fhir::Invalid::Unprocessable(m) => FhirError::Unprocessable(m),
        }
    }
}

/// A server-assigned id: a UUIDv7 (48-bit millisecond time, then random bits). Time-ordered ids
/// make the primary key, the owner indexes and the reference target index grow at their end
/// instead of touching a random page (decrypted and re-encrypted by SQLCipher) per insert.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    rand::fill(&mut b);
    let ms = (crate::store::now_ms().max(0) as u64).to_be_bytes();
    b[..6].copy_from_slice(&ms[2..]);
    b[6] = (b[6] & 0x0f) | 0x70;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// What a caller is told when its query ran past the store's SQL deadline.
pub const QUERY_DEADLINE_MESSAGE: &str =
    "the query took too long and was stopped; narrow the search and try again";

/// Every failure of the FHIR layer, each with its HTTP status and an OperationOutcome.
#[derive(Debug, thiserror::Error)]
pub enum FhirError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Gone(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("the store cannot take the write now: {0}")]
    Unavailable(String),
    /// 507: the disk is below the floor for this write (see `store::space`); reads still work.
    #[error("{0}")]
    InsufficientStorage(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<rusqlite::Error> for FhirError {
    fn from(e: rusqlite::Error) -> Self {
        if crate::store::is_interrupted(&e) {
            return FhirError::Unavailable(QUERY_DEADLINE_MESSAGE.into());
        }
        FhirError::Internal(e.to_string())
    }
}

impl From<crate::store::space::NoSpace> for FhirError {
    fn from(e: crate::store::space::NoSpace) -> Self {
        FhirError::InsufficientStorage(e.to_string())
    }
}

impl From<crate::store::StoreError> for FhirError {
    fn from(e: crate::store::StoreError) -> Self {
        use crate::store::StoreError;
        match e {
            StoreError::Rejected(m) => FhirError::BadRequest(m),
            e if e.is_disk_full() => FhirError::InsufficientStorage(
                "the edge store's disk is full; the write was not stored, try again later".into(),
            ),
            StoreError::Closed => FhirError::Unavailable("shutting down".into()),
            e if e.is_deadline() => FhirError::Unavailable(QUERY_DEADLINE_MESSAGE.into()),
            StoreError::WriterDown => FhirError::Unavailable("the store writer has stopped".into()),
            e if e.is_io_failure() => FhirError::Unavailable(format!(
                "the disk failed under the write ({e}); it was not acknowledged, try again"
            )),
            e => FhirError::Internal(e.to_string()),
        }
    }
}

impl FhirError {
    pub fn status(&self) -> u16 {
        match self {
            FhirError::BadRequest(_) => 400,
            FhirError::Unauthorized(_) => 401,
            FhirError::Forbidden(_) => 403,
            FhirError::NotFound(_) => 404,
            FhirError::MethodNotAllowed(_) => 405,
            FhirError::NotAcceptable(_) => 406,
            FhirError::Conflict(_) => 409,
            FhirError::Gone(_) => 410,
            FhirError::PreconditionFailed(_) => 412,
            FhirError::PayloadTooLarge(_) => 413,
            FhirError::RequestTimeout(_) => 408,
            FhirError::UnsupportedMediaType(_) => 415,
            FhirError::Unprocessable(_) => 422,
            FhirError::Unavailable(_) => 503,
            FhirError::InsufficientStorage(_) => 507,
            FhirError::Internal(_) => 500,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            FhirError::BadRequest(_) | FhirError::Unprocessable(_) => "invalid",
            FhirError::Unauthorized(_) => "login",
            FhirError::Forbidden(_) => "forbidden",
            FhirError::NotFound(_) | FhirError::Gone(_) => "not-found",
            FhirError::Conflict(_) | FhirError::PreconditionFailed(_) => "conflict",
            FhirError::PayloadTooLarge(_) => "too-costly",
            FhirError::RequestTimeout(_) => "timeout",
            FhirError::MethodNotAllowed(_)
            | FhirError::UnsupportedMediaType(_)
            | FhirError::NotAcceptable(_) => "not-supported",
            FhirError::Unavailable(_) => "transient",
            FhirError::InsufficientStorage(_) => "no-store",
            FhirError::Internal(_) => "exception",
        }
    }

    /// The OperationOutcome body for this error.
    pub fn outcome(&self) -> Value {
        operation_outcome("error", self.code(), &self.to_string())
    }
}

/// An OperationOutcome with one issue.
pub fn operation_outcome(severity: &str, code: &str, text: &str) -> Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": text}]
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn type_list_is_sorted_for_binary_search() {
        let mut sorted = super::R4_RESOURCE_TYPES.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, super::R4_RESOURCE_TYPES);
        for t in super::params::indexed_types() {
            assert!(super::is_resource_type(t), "{t}");
        }
    }
}
