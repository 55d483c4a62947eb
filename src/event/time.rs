//! Civil-time conversions for UTC epoch values.
//!
//! Written by hand (Howard Hinnant's `days_from_civil` / `civil_from_days`)
//! rather than pulling in `chrono`: the pipeline only needs UTC epoch <-> ISO-8601
//! for a few formats, and these 60 lines are exact for every proleptic Gregorian date.

/// Microseconds in one day.
pub const MICROS_PER_DAY: i64 = 86_400_000_000;

/// The wall clock in epoch milliseconds (0 before 1970, which no clock here reads).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Days since 1970-01-01 for a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) for days since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Formats a date (days since epoch) as `YYYY-MM-DD`.
pub fn format_date(days: i64) -> String {
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Formats UTC epoch microseconds as ISO-8601 with `digits` fractional digits
/// (0, 3 or 6) and a trailing `Z`, e.g. `2026-01-05T08:10:00Z`.
pub fn format_timestamp(micros: i64, digits: u8) -> String {
    let days = micros.div_euclid(MICROS_PER_DAY);
    let rem = micros.rem_euclid(MICROS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    let secs = rem / 1_000_000;
    let frac = rem % 1_000_000;
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    match digits {
        0 => format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z"),
        3 => format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{:03}Z", frac / 1000),
        _ => format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{frac:06}Z"),
    }
}

/// Formats microseconds since midnight as `HH:MM:SS[.ffffff]`.
pub fn format_time(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let v = micros.unsigned_abs();
    let secs = v / 1_000_000;
    let frac = v % 1_000_000;
    let base = format!("{sign}{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if frac == 0 {
        base
    } else {
        format!("{base}.{frac:06}")
    }
}

fn digits(s: &[u8]) -> Option<i64> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut v: i64 = 0;
    for c in s {
        v = v.checked_mul(10)?.checked_add(i64::from(c - b'0'))?;
    }
    Some(v)
}

/// Parses `YYYY-MM-DD` into days since epoch.
pub fn parse_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, m, d) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    Some(days_from_civil(y, m as u32, d as u32))
}

/// Parses an ISO-8601 UTC timestamp, `YYYY-MM-DD[T ]HH:MM:SS[.f{1,9}][Z]`, into
/// epoch microseconds (digits past the sixth are truncated). Offsets other than
/// `Z` are rejected: Debezium's `ZonedTimestamp` for MySQL is always UTC.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z').unwrap_or(s);
    let b = s.as_bytes();
    if b.len() < 19 || (b[10] != b'T' && b[10] != b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let days = parse_date(s.get(..10)?)?;
    let (hh, mm, ss) = (digits(&b[11..13])?, digits(&b[14..16])?, digits(&b[17..19])?);
    if hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    let mut frac = 0i64;
    if b.len() > 19 {
        if b[19] != b'.' || b.len() == 20 || b.len() > 29 {
            return None;
        }
        let f = &b[20..];
        let mut scaled = digits(f)?;
        for _ in f.len()..6 {
            scaled *= 10;
        }
        for _ in 6..f.len() {
            scaled /= 10;
        }
        frac = scaled;
    }
    Some(days * MICROS_PER_DAY + (hh * 3600 + mm * 60 + ss) * 1_000_000 + frac)
}

/// Parses `[-]HH:MM:SS[.ffffff]` (HH may exceed 23, as MySQL TIME allows) into micros.
pub fn parse_time(s: &str) -> Option<i64> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (hms, frac) = match s.split_once('.') {
        Some((a, f)) => (a, Some(f)),
        None => (s, None),
    };
    let mut parts = hms.split(':');
    let hh = digits(parts.next()?.as_bytes())?;
    let mm = digits(parts.next()?.as_bytes())?;
    let ss = digits(parts.next()?.as_bytes())?;
    if parts.next().is_some() || mm > 59 || ss > 59 {
        return None;
    }
    let mut f = 0;
    if let Some(fr) = frac {
        if fr.len() > 6 {
            return None;
        }
        f = digits(fr.as_bytes())?;
        for _ in fr.len()..6 {
            f *= 10;
        }
    }
    let v = (hh * 3600 + mm * 60 + ss) * 1_000_000 + f;
    Some(if neg { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_dates_across_eras() {
        for days in [-719_468, -1, 0, 1, 19_000, 20_458, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(format_date(0), "1970-01-01");
        assert_eq!(parse_date("2026-01-05"), Some(20_458));
    }

    #[test]
    fn formats_windows_like_the_reference() {
        // 2026-01-05T08:10:00Z, the example in shared/workload/README.md
        let micros = 1_767_600_600_000 * 1000;
        assert_eq!(format_timestamp(micros, 0), "2026-01-05T08:10:00Z");
        assert_eq!(parse_timestamp("2026-01-05T08:10:00Z"), Some(micros));
        assert_eq!(parse_timestamp("2026-01-05 08:10:00.5"), Some(micros + 500_000));
        assert_eq!(format_timestamp(micros + 123_456, 6), "2026-01-05T08:10:00.123456Z");
        assert_eq!(parse_timestamp("2026-13-05T08:10:00Z"), None);
    }

    #[test]
    fn parses_mysql_time_ranges() {
        assert_eq!(
            parse_time("838:59:59"),
            Some(838 * 3_600_000_000 + 59 * 60_000_000 + 59_000_000)
        );
        assert_eq!(parse_time("-00:00:01.5"), Some(-1_500_000));
        assert_eq!(format_time(-1_500_000), "-00:00:01.500000");
    }
}
