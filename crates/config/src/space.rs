//! Amounts of disk space in the config: a share of the file system (`"85%"`) or a size
//! (`"500MiB"`, `"2TB"`, `"1073741824"`), resolved against the file system's size when used.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An amount of space: a share of the file system's size or a number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SpaceLimit {
    /// Hundredths of a percent of the file system's size (`"85.5%"` is 8550).
    Share(u32),
    /// Bytes.
    Bytes(u64),
}

impl SpaceLimit {
    /// The amount in bytes on a file system of `total` bytes.
    pub fn bytes_of(self, total: u64) -> u64 {
        match self {
            SpaceLimit::Share(hundredths) => {
                ((u128::from(total) * u128::from(hundredths)) / 10_000) as u64
            }
            SpaceLimit::Bytes(b) => b,
        }
    }
}

/// Binary and decimal size suffixes, longest first so that "MiB" is not read as "B".
const UNITS: &[(&str, u64)] = &[
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
    ("B", 1),
];

impl TryFrom<String> for SpaceLimit {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::str::FromStr for SpaceLimit {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let s = raw.trim();
        let bad = || {
            format!(
                "{raw:?} is not an amount of space: use a share like \"85%\" or a size like \"500MiB\""
            )
        };
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(0.0..=100.0).contains(&v) {
                return Err(format!("{raw:?}: a share must be between 0% and 100%"));
            }
            return Ok(SpaceLimit::Share((v * 100.0).round() as u32));
        }
        let (number, unit) = UNITS
            .iter()
            .find_map(|(suffix, mult)| s.strip_suffix(suffix).map(|n| (n.trim(), *mult)))
            .unwrap_or((s, 1));
        let v: f64 = number.parse().map_err(|_| bad())?;
        if !v.is_finite() || v < 0.0 {
            return Err(bad());
        }
        Ok(SpaceLimit::Bytes((v * unit as f64).round() as u64))
    }
}

impl fmt::Display for SpaceLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SpaceLimit::Share(h) if h % 100 == 0 => write!(f, "{}%", h / 100),
            SpaceLimit::Share(h) => write!(f, "{}.{:02}%", h / 100, h % 100),
            SpaceLimit::Bytes(b) => {
                for (suffix, mult) in [("TiB", 1u64 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)] {
                    if b >= mult && b % mult == 0 {
                        return write!(f, "{}{suffix}", b / mult);
                    }
                }
                write!(f, "{b}")
            }
        }
    }
}

impl From<SpaceLimit> for String {
    fn from(l: SpaceLimit) -> String {
        l.to_string()
    }
}

/// Bytes as a short human figure for logs and messages ("1.5 GiB").
pub fn human_bytes(b: u64) -> String {
    const STEPS: &[(&str, u64)] =
        &[("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in STEPS {
        if b >= *size {
            return format!("{:.1} {unit}", b as f64 / *size as f64);
        }
    }
    format!("{b} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_sizes_parse_and_print_back() {
        let p = |s: &str| s.parse::<SpaceLimit>();
        assert_eq!(p("85%"), Ok(SpaceLimit::Share(8500)));
        assert_eq!(p(" 2.5 %"), Ok(SpaceLimit::Share(250)));
        assert_eq!(p("1GiB"), Ok(SpaceLimit::Bytes(1 << 30)));
        assert_eq!(p("500 MiB"), Ok(SpaceLimit::Bytes(500 << 20)));
        assert_eq!(p("2TB"), Ok(SpaceLimit::Bytes(2_000_000_000_000)));
        assert_eq!(p("1.5GiB"), Ok(SpaceLimit::Bytes(3 << 29)));
        assert_eq!(p("4096"), Ok(SpaceLimit::Bytes(4096)));
        assert_eq!(p("4096B"), Ok(SpaceLimit::Bytes(4096)));
        assert!(p("101%").is_err());
        assert!(p("-1GiB").is_err());
        assert!(p("lots").is_err());
        assert!(p("1 PB").is_err());
        for s in ["85%", "2.50%", "1GiB", "512MiB", "3TiB", "1000"] {
            let l = p(s).unwrap();
            assert_eq!(p(&l.to_string()), Ok(l), "{s}");
        }
        assert_eq!(SpaceLimit::Share(2.5f64.mul_add(100.0, 0.0) as u32).to_string(), "2.50%");
    }

    #[test]
    fn limits_resolve_against_the_file_system_size() {
        assert_eq!(SpaceLimit::Share(8500).bytes_of(1000), 850);
        assert_eq!(SpaceLimit::Share(10_000).bytes_of(u64::MAX), u64::MAX);
        assert_eq!(SpaceLimit::Bytes(7).bytes_of(1000), 7);
    }
}
