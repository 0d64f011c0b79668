//! Admission of connections per source address, before the caller has proven anything.
//!
//! A listener's slots are the box's capacity for real clients: a modality's association, a ward
//! workstation's HTTPS connection. A caller that opens hundreds of silent TCP connections must
//! not take them. So every accepted socket first needs a [`GatePermit`]: at most
//! `max_per_address` from one source address and `max_total` in all. Sockets over either limit
//! are closed at once (never queued, so the accept loop keeps taking the next caller), and a
//! permit is given back when its connection ends or moves on to a slot of its own.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts connections per source address; cheap to share (`Arc`).
#[derive(Debug)]
pub struct ConnGate {
    /// What the gate guards, for logs and metrics (`dicom`, `https`).
    pub name: &'static str,
    max_total: usize,
    max_per_address: usize,
    state: Mutex<GateState>,
}

#[derive(Debug, Default)]
struct GateState {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// Why the gate refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This source address already holds `max_per_address` connections.
    PerAddress,
    /// The gate already holds `max_total` connections.
    Total,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::PerAddress => "per-address limit",
            Refusal::Total => "total limit",
        }
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct GatePermit {
    gate: Arc<ConnGate>,
    addr: IpAddr,
}

impl ConnGate {
    pub fn new(name: &'static str, max_total: usize, max_per_address: usize) -> Arc<Self> {
        Arc::new(ConnGate {
            name,
            max_total: max_total.max(1),
            max_per_address: max_per_address.max(1),
            state: Mutex::new(GateState::default()),
        })
    }

    /// Admits one connection from `addr`, or says which limit it hit.
    pub fn try_admit(self: &Arc<Self>, addr: IpAddr) -> Result<GatePermit, Refusal> {
        let addr = canonical(addr);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.total >= self.max_total {
            return Err(Refusal::Total);
        }
        let n = st.per_address.entry(addr).or_insert(0);
        if *n >= self.max_per_address {
            return Err(Refusal::PerAddress);
        }
        *n += 1;
        st.total += 1;
        Ok(GatePermit { gate: self.clone(), addr })
    }

    /// Connections currently admitted.
    pub fn admitted(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for GatePermit {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
        st.total = st.total.saturating_sub(1);
        if let Some(n) = st.per_address.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                st.per_address.remove(&self.addr);
            }
        }
    }
}

/// An IPv4 address mapped into IPv6 counts as that IPv4 address (the gate and the DICOM
/// allow-list compare addresses this way).
pub fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_address_and_in_total_and_frees_on_drop() {
        let gate = ConnGate::new("t", 3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let p1 = gate.try_admit(a).unwrap();
        let _p2 = gate.try_admit(a).unwrap();
        assert_eq!(gate.try_admit(a).unwrap_err(), Refusal::PerAddress);
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(gate.try_admit(mapped).unwrap_err(), Refusal::PerAddress);
        let _p3 = gate.try_admit(b).unwrap();
        assert_eq!(gate.try_admit(b).unwrap_err(), Refusal::Total);
        drop(p1);
        assert_eq!(gate.admitted(), 2);
        let _p4 = gate.try_admit(a).unwrap();
    }
}
