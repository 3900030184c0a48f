//! Human units for tables: ages like kubectl (`45s`, `3m`, `2h5m`, `4d`),
//! byte counts (`1.5KiB`), round-trip times (`1.2ms`) and RFC 3339 UTC
//! timestamps for documents. Pure functions of their inputs; the caller
//! passes `now`.

/// Formats a duration in seconds the way kubectl's `HumanDuration` does:
/// more precision for short durations, less for long ones.
pub(crate) fn duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".to_string();
    }
    if seconds < 0 {
        return "0s".to_string();
    }
    if seconds < 2 * 60 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 3 * 60 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{days}d")
        } else {
            format!("{days}d{h}h")
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if hours < 24 * 365 * 8 {
        let d = days % 365;
        return if d == 0 {
            format!("{years}y")
        } else {
            format!("{years}y{d}d")
        };
    }
    format!("{years}y")
}

/// The age of something that happened at Unix second `at`, `<unknown>` when
/// the time is not set.
pub(crate) fn age(at: i64, now: i64) -> String {
    if at <= 0 {
        "<unknown>".to_string()
    } else {
        duration(now - at)
    }
}

/// A byte count in binary units: `512B`, `1.5KiB`, `3.0MiB`.
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    // Precision loss above 2^53 bytes does not matter for one decimal.
    #[allow(clippy::cast_precision_loss)]
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

/// A round-trip time given in microseconds, as milliseconds with one
/// decimal; `-` when unknown (0).
pub(crate) fn rtt(us: u32) -> String {
    if us == 0 {
        "-".to_string()
    } else {
        format!("{:.1}ms", f64::from(us) / 1000.0)
    }
}

/// Unix seconds as an RFC 3339 UTC timestamp, e.g. `2024-05-01T12:00:00Z`.
pub(crate) fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
/// Howard Hinnant's `civil_from_days` (chrono-compatible algorithms).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_like_kubectl() {
        for (secs, want) in [
            (-5, "<invalid>"),
            (-1, "0s"),
            (0, "0s"),
            (45, "45s"),
            (119, "119s"),
            (120, "2m"),
            (3 * 60 + 20, "3m20s"),
            (3 * 60, "3m"),
            (9 * 60 + 59, "9m59s"),
            (10 * 60 + 30, "10m"),
            (179 * 60, "179m"),
            (3 * 3600, "3h"),
            (2 * 3600 + 5 * 60, "125m"),
            (3 * 3600 + 5 * 60, "3h5m"),
            (7 * 3600 + 59 * 60, "7h59m"),
            (8 * 3600 + 30 * 60, "8h"),
            (47 * 3600, "47h"),
            (4 * 86_400, "4d"),
            (4 * 86_400 + 5 * 3600, "4d5h"),
            (30 * 86_400, "30d"),
            (3 * 365 * 86_400, "3y"),
            (3 * 365 * 86_400 + 10 * 86_400, "3y10d"),
            (10 * 365 * 86_400 + 10 * 86_400, "10y"),
        ] {
            assert_eq!(duration(secs), want, "{secs}s");
        }
    }

    #[test]
    fn ages() {
        assert_eq!(age(0, 1_000), "<unknown>");
        assert_eq!(age(955, 1_000), "45s");
        assert_eq!(age(1_001, 1_000), "0s");
    }

    #[test]
    fn byte_counts() {
        assert_eq!(bytes(0), "0B");
        assert_eq!(bytes(1023), "1023B");
        assert_eq!(bytes(1024), "1.0KiB");
        assert_eq!(bytes(1536), "1.5KiB");
        assert_eq!(bytes(3 * 1024 * 1024 + 1024 * 1024 / 10), "3.1MiB");
        assert_eq!(bytes(5 << 30), "5.0GiB");
        assert_eq!(bytes(u64::MAX), "16.0EiB");
    }

    #[test]
    fn round_trip_times() {
        assert_eq!(rtt(0), "-");
        assert_eq!(rtt(1234), "1.2ms");
        assert_eq!(rtt(250), "0.2ms");
        assert_eq!(rtt(45_678), "45.7ms");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_714_564_800), "2024-05-01T12:00:00Z");
        assert_eq!(rfc3339(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }
}
