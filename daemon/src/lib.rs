//! hms-edged: the LAN side of the hms-edge appliance. See `ARCHITECTURE.md` for the map.

pub mod config;
pub mod keys;
pub mod store;
