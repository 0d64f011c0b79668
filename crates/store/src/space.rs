//! Free space on the store's file system, and the admission of writes against the site's floors.
//!
//! Two floors of free space, checked *before* a write takes any space: below `critical_free`
//! images are refused (a C-STORE answers A700 before its data set is read, STOW-RS 507); below
//! the smaller `records_reserve` every write is refused (FHIR 507), so charts can still be written
//! for a while after images stop. Reads never look here. Above the high watermark of used space
//! the gate wakes whoever waits on [`SpaceGate::pressure_rises`] (the daemon's eviction task).
//! A file system that cannot be measured admits everything: the real ENOSPC path stays the last
//! line of defence, and it rolls back cleanly.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use hms_edge_config::space::human_bytes;
use hms_edge_config::{SpaceLimit, StorageConfig};

/// Size and free space of a file system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Size in bytes.
    pub total: u64,
    /// Bytes available to an unprivileged user (what the service user can still write).
    pub free: u64,
}

impl Space {
    /// Bytes not available to us (used, or reserved for root).
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.free)
    }
}

/// Measures the file system holding `path`.
pub fn measure(path: &Path) -> std::io::Result<Space> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    let frag = s.fragment_size() as u64;
    Ok(Space { total: s.blocks() as u64 * frag, free: s.blocks_available() as u64 * frag })
}

/// The site's limits (the `[storage]` settings that concern space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpacePolicy {
    pub high_watermark: SpaceLimit,
    pub low_watermark: SpaceLimit,
    pub critical_free: SpaceLimit,
    pub records_reserve: SpaceLimit,
}

impl SpacePolicy {
    /// The limits of a configuration (with the deprecated `admin.min_free_disk_mb` applied).
    pub fn from_config(storage: &StorageConfig, critical_free: SpaceLimit) -> Self {
        SpacePolicy {
            high_watermark: storage.high_watermark,
            low_watermark: storage.low_watermark,
            critical_free,
            records_reserve: storage.records_reserve,
        }
    }

    /// The records reserve in bytes on a file system of `total` bytes: never above the critical
    /// floor (a site that lowered the floor lowered the reserve with it).
    pub fn reserve_bytes(&self, total: u64) -> u64 {
        self.records_reserve.bytes_of(total).min(self.critical_free.bytes_of(total))
    }

    /// How full `s` is, in the policy's terms.
    pub fn pressure(&self, s: Space) -> Pressure {
        if s.free < self.reserve_bytes(s.total) {
            Pressure::Exhausted
        } else if s.free < self.critical_free.bytes_of(s.total) {
            Pressure::Critical
        } else if s.used() > self.high_watermark.bytes_of(s.total) {
            Pressure::High
        } else {
            Pressure::Normal
        }
    }

    /// Whether eviction may stop: used space at or below the low watermark.
    pub fn at_or_below_low(&self, s: Space) -> bool {
        s.used() <= self.low_watermark.bytes_of(s.total)
    }

    /// Bytes to free to reach the low watermark (0 when already there).
    pub fn bytes_above_low(&self, s: Space) -> u64 {
        s.used().saturating_sub(self.low_watermark.bytes_of(s.total))
    }
}

impl Default for SpacePolicy {
    fn default() -> Self {
        let c = StorageConfig::default();
        SpacePolicy::from_config(&c, c.critical_free)
    }
}

/// How full the file system is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pressure {
    /// Below the high watermark.
    Normal,
    /// Above the high watermark: eviction runs; every write is still admitted.
    High,
    /// Less free than `critical_free`: images are refused, other writes admitted.
    Critical,
    /// Less free than `records_reserve`: every write is refused.
    Exhausted,
}

impl Pressure {
    pub fn as_str(self) -> &'static str {
        match self {
            Pressure::Normal => "normal",
            Pressure::High => "above the high watermark",
            Pressure::Critical => "below the critical floor: images refused",
            Pressure::Exhausted => "below the records reserve: all writes refused",
        }
    }
}

/// What a write is, for admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteClass {
    /// DICOM instances (C-STORE, STOW-RS): refused below `critical_free`.
    Images,
    /// Everything else (FHIR resources, sync state): refused below `records_reserve`.
    Records,
}

/// A write refused for lack of space. The message is for the caller (an Error Comment, an
/// OperationOutcome) and names the amounts.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("the edge store is out of disk space: {} free, {} kept in reserve; try again later", human_bytes(*.free), human_bytes(*.floor))]
pub struct NoSpace {
    pub free: u64,
    pub floor: u64,
}

/// Admission of writes against the floors, shared by every listener (see the module docs).
#[derive(Debug)]
pub struct SpaceGate {
    root: PathBuf,
    policy: RwLock<SpacePolicy>,
    wake: tokio::sync::Notify,
    refused_images: AtomicU64,
    refused_records: AtomicU64,
}

impl SpaceGate {
    pub fn new(root: &Path) -> Self {
        SpaceGate {
            root: root.to_owned(),
            policy: RwLock::new(SpacePolicy::default()),
            wake: tokio::sync::Notify::new(),
            refused_images: AtomicU64::new(0),
            refused_records: AtomicU64::new(0),
        }
    }

    /// Sets the limits (at start and on SIGHUP).
    pub fn set_policy(&self, p: SpacePolicy) {
        *self.policy.write().expect("space policy lock") = p;
    }

    pub fn policy(&self) -> SpacePolicy {
        *self.policy.read().expect("space policy lock")
    }

    /// The file system's space now.
    pub fn measure(&self) -> std::io::Result<Space> {
        measure(&self.root)
    }

    /// Admits a write of `class`, or says why not. Above the high watermark it also wakes the
    /// eviction task.
    pub fn admit(&self, class: WriteClass) -> Result<(), NoSpace> {
        let Ok(s) = self.measure() else { return Ok(()) };
        let p = self.policy();
        let pressure = p.pressure(s);
        if pressure >= Pressure::High {
            self.wake.notify_one();
        }
        let (floor, refused) = match class {
            WriteClass::Images => (p.critical_free.bytes_of(s.total), &self.refused_images),
            WriteClass::Records => (p.reserve_bytes(s.total), &self.refused_records),
        };
        if s.free < floor {
            refused.fetch_add(1, Ordering::Relaxed);
            return Err(NoSpace { free: s.free, floor });
        }
        Ok(())
    }

    /// Resolves when a write found the file system above the high watermark (or when
    /// [`SpaceGate::nudge`] was called).
    pub async fn pressure_rises(&self) {
        self.wake.notified().await
    }

    /// Wakes the eviction task now (a manual request, a test).
    pub fn nudge(&self) {
        self.wake.notify_one();
    }

    /// Writes refused so far: (images, records).
    pub fn refused(&self) -> (u64, u64) {
        (self.refused_images.load(Ordering::Relaxed), self.refused_records.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn policy() -> SpacePolicy {
        SpacePolicy {
            high_watermark: SpaceLimit::Share(8500),
            low_watermark: SpaceLimit::Share(7500),
            critical_free: SpaceLimit::Bytes(GIB),
            records_reserve: SpaceLimit::Bytes(GIB / 4),
        }
    }

    #[test]
    fn pressure_follows_the_watermarks_and_floors() {
        let p = policy();
        let at = |free: u64| p.pressure(Space { total: 100 * GIB, free });
        assert_eq!(at(50 * GIB), Pressure::Normal);
        assert_eq!(at(15 * GIB), Pressure::Normal, "exactly at the high watermark");
        assert_eq!(at(14 * GIB), Pressure::High);
        assert_eq!(at(GIB - 1), Pressure::Critical);
        assert_eq!(at(GIB / 4 - 1), Pressure::Exhausted);
        assert!(p.at_or_below_low(Space { total: 100 * GIB, free: 25 * GIB }));
        assert!(!p.at_or_below_low(Space { total: 100 * GIB, free: 24 * GIB }));
        assert_eq!(p.bytes_above_low(Space { total: 100 * GIB, free: 20 * GIB }), 5 * GIB);
    }

    #[test]
    fn the_gate_refuses_below_each_floor_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let gate = SpaceGate::new(dir.path());
        let free = gate.measure().unwrap().free;
        assert_eq!(gate.admit(WriteClass::Images), Ok(()), "default floors on a roomy disk");
        gate.set_policy(SpacePolicy {
            critical_free: SpaceLimit::Bytes(free + (1 << 40)),
            ..policy()
        });
        let err = gate.admit(WriteClass::Images).unwrap_err();
        assert!(err.to_string().contains("out of disk space"), "{err}");
        assert_eq!(gate.admit(WriteClass::Records), Ok(()), "records still fit the reserve");
        gate.set_policy(SpacePolicy {
            critical_free: SpaceLimit::Share(10_000),
            records_reserve: SpaceLimit::Share(10_000),
            ..policy()
        });
        assert!(gate.admit(WriteClass::Records).is_err());
        assert_eq!(gate.refused(), (1, 1));
    }
}
