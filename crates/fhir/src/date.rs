//! FHIR date/dateTime/instant values as half-open millisecond ranges `[lo, hi)`, which is what
//! date search compares: `2026` is the whole year, `2026-03-01T10:00` one minute.

/// Milliseconds since 1970-01-01T00:00:00Z.
pub type Millis = i64;

/// Far past/future for open-ended periods.
pub const MIN: Millis = i64::MIN / 4;
pub const MAX: Millis = i64::MAX / 4;

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    // Howard Hinnant's algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

const DAY: i64 = 86_400_000;

/// Parses a FHIR date, dateTime or instant (any precision) into its range. Values without a
/// time zone are taken as UTC.
pub fn parse_range(s: &str) -> Option<(Millis, Millis)> {
    let s = s.trim();
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) { t.parse().ok() } else { None }
    };
    if b.len() < 4 {
        return None;
    }
    let y = num(0..4)?;
    if b.len() == 4 {
        let lo = days_from_civil(y, 1, 1) * DAY;
        return Some((lo, days_from_civil(y + 1, 1, 1) * DAY));
    }
    if b.get(4) != Some(&b'-') {
        return None;
    }
    let m = num(5..7)?;
    if !(1..=12).contains(&m) {
        return None;
    }
    if b.len() == 7 {
        let lo = days_from_civil(y, m, 1) * DAY;
        return Some((lo, lo + days_in_month(y, m) * DAY));
    }
    if b.get(7) != Some(&b'-') {
        return None;
    }
    let d = num(8..10)?;
    if d < 1 || d > days_in_month(y, m) {
        return None;
    }
    let day = days_from_civil(y, m, d) * DAY;
    if b.len() == 10 {
        return Some((day, day + DAY));
    }
    if b.get(10) != Some(&b'T') {
        return None;
    }
    let hh = num(11..13)?;
    if b.get(13) != Some(&b':') {
        return None;
    }
    let mi = num(14..16)?;
    let mut pos = 16;
    let mut sec = 0i64;
    let mut ms = 0i64;
    let mut precision = 60_000i64;
    if b.get(pos) == Some(&b':') {
        sec = num(17..19)?;
        pos = 19;
        precision = 1000;
        if b.get(pos) == Some(&b'.') {
            let start = pos + 1;
            let mut end = start;
            while end < b.len() && b[end].is_ascii_digit() {
                end += 1;
            }
            if end == start {
                return None;
            }
            let frac = &s[start..end]; // ASCII digits only: char boundaries
            let digits = frac.len().min(3);
            ms = frac[..digits].parse::<i64>().ok()? * 10i64.pow(3 - digits as u32);
            precision = 10i64.pow(3 - digits as u32).max(1);
            pos = end;
        }
    }
    if hh > 24 || mi > 59 || sec > 60 {
        return None;
    }
    // Byte-wise from here on: the rest is untrusted and may hold any UTF-8 (slicing a `str`
    // inside a multi-byte character panics).
    let offset_ms = match b.get(pos..)? {
        b"" | b"Z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let two = |a: u8, b: u8| -> Option<i64> {
                (a.is_ascii_digit() && b.is_ascii_digit())
                    .then(|| i64::from(a - b'0') * 10 + i64::from(b - b'0'))
            };
            let (oh, om) = (two(*h1, *h2)?, two(*m1, *m2)?);
            if oh > 14 || om > 59 {
                return None;
            }
            let sign = if *sign == b'-' { -1 } else { 1 };
            sign * (oh * 3_600_000 + om * 60_000)
        }
        _ => return None,
    };
    let lo = day + hh * 3_600_000 + mi * 60_000 + sec * 1000 + ms - offset_ms;
    Some((lo, lo + precision))
}

/// RFC 3339 UTC instant with milliseconds, as FHIR `meta.lastUpdated` wants.
pub fn format_instant(ms: Millis) -> String {
    let days = ms.div_euclid(DAY);
    let rem = ms.rem_euclid(DAY);
    // civil_from_days
    let z = days + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_utf8_in_the_time_zone_is_refused_not_a_panic() {
        for s in [
            "2000-01-01T10:00+0\u{e9}00",
            "2000-01-01T10:00+\u{e9}:00",
            "2000-01-01T10:00:00.5+01:\u{e9}",
            "2000-01-01T10:00\u{1F600}",
            "2000-01-01T10:00:00.\u{e9}",
            "2000-\u{e9}-01",
            "2000-01-01T10:00+01:00\u{e9}",
            "2000-01-01T10:00+15:00",
        ] {
            assert_eq!(parse_range(s), None, "{s}");
        }
        assert!(parse_range("2000-01-01T10:00+14:00").is_some());
        assert!(parse_range("2000-01-01T10:00-03:30").is_some());
    }

    proptest::proptest! {
        /// No string makes the parser panic.
        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = parse_range(&s);
        }
    }

    #[test]
    fn ranges_follow_precision() {
        let (lo, hi) = parse_range("2026").unwrap();
        assert_eq!(format_instant(lo), "2026-01-01T00:00:00.000Z");
        assert_eq!(format_instant(hi), "2027-01-01T00:00:00.000Z");
        let (lo, hi) = parse_range("2024-02").unwrap();
        assert_eq!(
            (format_instant(lo).as_str(), format_instant(hi).as_str()),
            ("2024-02-01T00:00:00.000Z", "2024-03-01T00:00:00.000Z")
        );
        let (lo, hi) = parse_range("2026-03-01T10:00:00+02:00").unwrap();
        assert_eq!(format_instant(lo), "2026-03-01T08:00:00.000Z");
        assert_eq!(hi - lo, 1000);
        let (lo, hi) = parse_range("2026-03-01T10:00:00.12Z").unwrap();
        assert_eq!(format_instant(lo), "2026-03-01T10:00:00.120Z");
        assert_eq!(hi - lo, 10);
        for bad in [
            "",
            "20",
            "2026-13",
            "2026-02-30",
            "2026-01-01T",
            "2026-01-01T10",
            "x026",
            "2026-01-01T10:00:00+0200",
        ] {
            assert!(parse_range(bad).is_none(), "{bad}");
        }
    }
}
