//! Dates as periods: a FHIR `date`, `dateTime` or `instant` denotes the whole interval implied by its
//! precision (`2020` is the year 2020, `2020-03-04T10:00` that minute), and a `Period` the interval from
//! its start to its end. Intervals are half-open `[start, end)` in milliseconds since the Unix epoch, so
//! "same day" comparisons fall out of plain integer comparisons.

use chrono::NaiveDate;
use serde_json::Value;

/// Start of an open-ended period (Medplum uses year "0000"; any value before every real date works).
pub const MIN_MS: i64 = i64::MIN / 4;
/// End of an open-ended period (Medplum uses year "9999").
pub const MAX_MS: i64 = i64::MAX / 4;

/// A half-open interval `[start, end)` in epoch milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    /// Inclusive start.
    pub start: i64,
    /// Exclusive end.
    pub end: i64,
}

/// Parses a FHIR date, dateTime or instant (`YYYY`, `YYYY-MM`, `YYYY-MM-DD`,
/// `YYYY-MM-DDThh:mm[:ss[.fff]][Z|±hh:mm]`) into the period its precision covers.
///
/// A time without a timezone is taken as UTC (FHIR leaves it unspecified; the server stores UTC).
/// Minutes-only times are accepted because users write them in criteria. Returns `None` for anything
/// else.
pub fn parse_period(s: &str) -> Option<Period> {
    let b = s.as_bytes();
    if b.len() > 40 {
        return None;
    }
    let num = |from: usize, len: usize| -> Option<u32> {
        let part = b.get(from..from + len)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let year = num(0, 4)? as i32;
    if b.len() == 4 {
        let start = day_ms(year, 1, 1)?;
        return Some(Period {
            start,
            end: day_ms(year + 1, 1, 1)?,
        });
    }
    if b.get(4) != Some(&b'-') {
        return None;
    }
    let month = num(5, 2)?;
    if b.len() == 7 {
        let start = day_ms(year, month, 1)?;
        let end = if month == 12 {
            day_ms(year + 1, 1, 1)?
        } else {
            day_ms(year, month + 1, 1)?
        };
        return Some(Period { start, end });
    }
    if b.get(7) != Some(&b'-') {
        return None;
    }
    let day = num(8, 2)?;
    let day_start = day_ms(year, month, day)?;
    if b.len() == 10 {
        return Some(Period {
            start: day_start,
            end: day_start + 86_400_000,
        });
    }
    if b.get(10) != Some(&b'T') {
        return None;
    }
    let hour = num(11, 2)?;
    if b.get(13) != Some(&b':') {
        return None;
    }
    let minute = num(14, 2)?;
    if hour > 23 || minute > 59 {
        return None;
    }
    let mut pos = 16;
    let mut ms = i64::from(hour) * 3_600_000 + i64::from(minute) * 60_000;
    let mut width = 60_000;
    if b.get(pos) == Some(&b':') {
        let sec = num(pos + 1, 2)?;
        if sec > 60 {
            return None;
        }
        ms += i64::from(sec) * 1000;
        width = 1000;
        pos += 3;
        if b.get(pos) == Some(&b'.') {
            let digits = b[pos + 1..]
                .iter()
                .take_while(|c| c.is_ascii_digit())
                .count();
            if digits == 0 || digits > 9 {
                return None;
            }
            // Precision below a millisecond is not representable; a fraction means "that millisecond".
            let mut frac = 0i64;
            for (i, d) in b[pos + 1..pos + 1 + digits.min(3)].iter().enumerate() {
                frac += i64::from(d - b'0') * [100, 10, 1][i];
            }
            ms += frac;
            width = 1;
            pos += 1 + digits;
        }
    }
    let offset_ms = match b.get(pos) {
        None => 0,
        Some(b'Z') if pos + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if pos + 6 == b.len() && b[pos + 3] == b':' => {
            let oh = num(pos + 1, 2)?;
            let om = num(pos + 4, 2)?;
            if oh > 14 || om > 59 {
                return None;
            }
            let off = i64::from(oh) * 3_600_000 + i64::from(om) * 60_000;
            if sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let start = day_start + ms - offset_ms;
    Some(Period {
        start,
        end: start + width,
    })
}

fn day_ms(year: i32, month: u32, day: u32) -> Option<i64> {
    let date = NaiveDate::from_ymd_opt(year, month, day)?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

/// Converts a resource value of a date search parameter into periods.
///
/// Handles date/dateTime/instant strings, `Period` (missing start = open start, missing end = open end,
/// like Medplum's "0000"/"9999"; a period with neither, or with an unparsable bound, yields nothing) and
/// `Timing` (each `event`). Anything else yields nothing, so it never matches.
pub fn value_periods(fhir_type: Option<&str>, json: &Value, out: &mut Vec<Period>) {
    match json {
        Value::String(s) => {
            if let Some(p) = parse_period(s) {
                out.push(p);
            }
        }
        Value::Object(obj) => {
            let is_timing =
                fhir_type == Some("Timing") || (fhir_type.is_none() && obj.contains_key("event"));
            if is_timing {
                for e in obj
                    .get("event")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(p) = e.as_str().and_then(parse_period) {
                        out.push(p);
                    }
                }
                return;
            }
            let start = obj.get("start");
            let end = obj.get("end");
            if start.is_none() && end.is_none() {
                return;
            }
            let start = match start {
                None => MIN_MS,
                Some(v) => match v.as_str().and_then(parse_period) {
                    Some(p) => p.start,
                    None => return,
                },
            };
            let end = match end {
                None => MAX_MS,
                Some(v) => match v.as_str().and_then(parse_period) {
                    Some(p) => p.end,
                    None => return,
                },
            };
            out.push(Period { start, end });
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn precision_sets_the_width() {
        let p = parse_period("2020").unwrap();
        assert_eq!(
            (p.start, p.end),
            (ms("2020-01-01T00:00:00Z"), ms("2021-01-01T00:00:00Z"))
        );
        let p = parse_period("2020-12").unwrap();
        assert_eq!(
            (p.start, p.end),
            (ms("2020-12-01T00:00:00Z"), ms("2021-01-01T00:00:00Z"))
        );
        let p = parse_period("2020-02-29").unwrap();
        assert_eq!(
            (p.start, p.end),
            (ms("2020-02-29T00:00:00Z"), ms("2020-03-01T00:00:00Z"))
        );
        let p = parse_period("2020-02-29T10:30").unwrap();
        assert_eq!(p.end - p.start, 60_000);
        let p = parse_period("2020-02-29T10:30:05Z").unwrap();
        assert_eq!(
            (p.start, p.end - p.start),
            (ms("2020-02-29T10:30:05Z"), 1000)
        );
        let p = parse_period("2020-02-29T10:30:05.123456+02:00").unwrap();
        assert_eq!(
            (p.start, p.end - p.start),
            (ms("2020-02-29T08:30:05.123Z"), 1)
        );
        let p = parse_period("2020-02-29T10:30:05-05:30").unwrap();
        assert_eq!(p.start, ms("2020-02-29T16:00:05Z"));
        assert_eq!(
            parse_period("0000").unwrap().end,
            ms("0001-01-01T00:00:00Z")
        );
    }

    #[test]
    fn rejects_invalid() {
        for s in [
            "",
            "20",
            "2020-13",
            "2020-02-30",
            "2020-1-01",
            "2020/01/01",
            "2020-01-01T25:00",
            "2020-01-01T10",
            "2020-01-01T10:00:00+0200",
            "2020-01-01T10:00:00ZZ",
            "abcd",
            "2020-01-01 10:00",
            "2020-01-01T10:00:00.",
            "１９９０",
            "2020-01-01T10:00:00+15:00",
        ] {
            assert!(parse_period(s).is_none(), "{s}");
        }
    }

    #[test]
    fn periods_and_timing() {
        let mut out = Vec::new();
        value_periods(
            Some("Period"),
            &json!({"start": "2020-01-01", "end": "2020-01-02"}),
            &mut out,
        );
        assert_eq!(
            out[0],
            Period {
                start: ms("2020-01-01T00:00:00Z"),
                end: ms("2020-01-03T00:00:00Z")
            }
        );
        out.clear();
        value_periods(Some("Period"), &json!({"end": "2020-01-02"}), &mut out);
        assert_eq!(out[0].start, MIN_MS);
        out.clear();
        value_periods(Some("Period"), &json!({"start": "2020-01-02"}), &mut out);
        assert_eq!(out[0].end, MAX_MS);
        out.clear();
        value_periods(Some("Period"), &json!({"start": "bad"}), &mut out);
        value_periods(Some("Period"), &json!({}), &mut out);
        value_periods(Some("dateTime"), &json!("yesterday"), &mut out);
        assert!(out.is_empty());
        value_periods(
            Some("Timing"),
            &json!({"event": ["2020-01-01", "2021-01-01"]}),
            &mut out,
        );
        assert_eq!(out.len(), 2);
    }
}
