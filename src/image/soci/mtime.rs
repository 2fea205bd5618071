//! A zTOC's `mod_time`: the text Go's `time.Time.MarshalText` writes (RFC 3339 with
//! nanoseconds, trailing zeros of the fraction dropped, `Z` or a `±hh:mm` offset), or
//! the empty string where Go could not write the time (a year outside 0..=9999), which
//! Go reads back as its zero time.

/// Seconds from 0001-01-01T00:00:00Z (Go's zero time) to the epoch.
pub const GO_ZERO_TIME: i64 = -62_135_596_800;

const DAY: i64 = 86_400;

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The text Go writes for a time: always UTC here. `None` where Go writes nothing.
pub fn format(secs: i64, nsec: u32) -> Option<String> {
    let days = secs.div_euclid(DAY);
    let in_day = secs.rem_euclid(DAY);
    let (year, month, day) = civil_from_days(days);
    if !(0..=9999).contains(&year) || nsec >= 1_000_000_000 {
        return None;
    }
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        in_day / 3600,
        in_day / 60 % 60,
        in_day % 60
    );
    if nsec > 0 {
        let fraction = format!("{nsec:09}");
        text.push('.');
        text.push_str(fraction.trim_end_matches('0'));
    }
    text.push('Z');
    Some(text)
}

/// Reads `n` ASCII digits at `at`.
fn digits(text: &[u8], at: usize, n: usize) -> Option<u32> {
    let field = text.get(at..at + n)?;
    field.iter().try_fold(0u32, |v, &b| {
        b.is_ascii_digit().then(|| v * 10 + u32::from(b - b'0'))
    })
}

/// Seconds since the epoch and nanoseconds of a `mod_time` (untrusted); the empty
/// string is Go's zero time.
pub fn parse(text: &[u8]) -> Result<(i64, u32), String> {
    if text.is_empty() {
        return Ok((GO_ZERO_TIME, 0));
    }
    parse_rfc3339(text).ok_or_else(|| {
        format!(
            "mod_time {:?} is not an RFC 3339 time",
            String::from_utf8_lossy(text)
        )
    })
}

fn parse_rfc3339(t: &[u8]) -> Option<(i64, u32)> {
    let sep = |at: usize, c: u8| (t.get(at) == Some(&c)).then_some(());
    let year = i64::from(digits(t, 0, 4)?);
    sep(4, b'-')?;
    let month = digits(t, 5, 2)?;
    sep(7, b'-')?;
    let day = digits(t, 8, 2)?;
    sep(10, b'T')?;
    let (hour, min, sec) = (digits(t, 11, 2)?, digits(t, 14, 2)?, digits(t, 17, 2)?);
    sep(13, b':')?;
    sep(16, b':')?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return None;
    }
    if hour > 23 || min > 59 || sec > 59 {
        return None;
    }
    let mut at = 19;
    let mut nsec = 0u32;
    if t.get(at) == Some(&b'.') {
        let n = t[at + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if n == 0 || n > 9 {
            return None;
        }
        nsec = digits(t, at + 1, n)? * 10u32.pow(9 - n as u32);
        at += 1 + n;
    }
    let offset = match t.get(at..)? {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), ..] if t.len() == at + 6 => {
            let (h, m) = (digits(t, at + 1, 2)?, digits(t, at + 4, 2)?);
            sep(at + 3, b':')?;
            if h > 23 || m > 59 {
                return None;
            }
            let s = i64::from(h * 3600 + m * 60);
            if *sign == b'-' { -s } else { s }
        }
        _ => return None,
    };
    let local = days_from_civil(year, month, day) * DAY + i64::from(hour * 3600 + min * 60 + sec);
    Some((local - offset, nsec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn go_texts() {
        assert_eq!(format(0, 0).as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(
            format(1_700_000_000, 500_000_000).as_deref(),
            Some("2023-11-14T22:13:20.5Z")
        );
        assert_eq!(
            format(-1, 1).as_deref(),
            Some("1969-12-31T23:59:59.000000001Z")
        );
        assert_eq!(
            format(GO_ZERO_TIME, 0).as_deref(),
            Some("0001-01-01T00:00:00Z")
        );
        assert_eq!(format(300_000_000_000, 0), None, "year 11476");
        assert_eq!(
            parse(b"2023-11-14T23:13:20.5+01:00"),
            Ok((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse(b"1969-12-31T19:00:00-05:00"), Ok((0, 0)));
        assert_eq!(parse(b""), Ok((GO_ZERO_TIME, 0)));
        assert_eq!(
            parse(b"2024-02-29T00:00:00Z").map(|t| t.0),
            Ok(1_709_164_800)
        );
        for bad in [
            &b"2023-02-29T00:00:00Z"[..],
            b"2023-11-14 22:13:20Z",
            b"2023-11-14T22:13:20",
            b"2023-11-14T24:00:00Z",
            b"2023-11-14T22:13:20.Z",
            b"2023-11-14T22:13:20.1234567890Z",
            b"2023-11-14T22:13:20+01",
            b"\xff",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    proptest! {
        #[test]
        fn format_then_parse_is_identity(secs in GO_ZERO_TIME..253_402_300_799i64, nsec in 0u32..1_000_000_000) {
            let text = format(secs, nsec).expect("in range");
            prop_assert_eq!(parse(text.as_bytes()), Ok((secs, nsec)));
        }

        #[test]
        fn parse_never_panics(text in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = parse(&text);
        }
    }
}
