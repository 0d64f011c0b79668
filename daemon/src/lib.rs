//! hms-edged: the LAN side of the hms-edge appliance. See `ARCHITECTURE.md` for the map.

pub mod admin;
pub mod audit;
pub mod conn_gate;
pub mod dicom;
pub mod dicomweb;
pub mod fhir;
pub mod http_caller;
pub mod https;
pub mod ledger;
pub mod ops;
pub mod server;
pub mod site_status;
pub mod store;
pub mod sync;
pub mod tls;

pub use hms_edge_config as config;
pub use hms_edge_config::{keys, logging};
