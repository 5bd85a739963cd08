//! Partial dates, date-times and times with precision, as FHIRPath needs them.
//!
//! FHIR values routinely carry partial precision (`1974`, `1974-12`, `2019-01-01T10:00Z`), and
//! FHIRPath comparison is defined precision by precision, so the components are kept as written
//! rather than converted to a point in time.

use std::cmp::Ordering;

use chrono::{Datelike, Duration, NaiveDate, NaiveDateTime, Timelike};

/// How much of a date/time value is known. Seconds and milliseconds count as one precision in
/// comparisons (per the spec), but both are kept for formatting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[allow(missing_docs)]
pub enum Precision {
    Year,
    Month,
    Day,
    Hour,
    Minute,
    Second,
    Millisecond,
}

/// A (possibly partial) date or date-time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DateTimeV {
    /// Year.
    pub year: i32,
    /// Month 1-12 (1 when not known).
    pub month: u32,
    /// Day 1-31 (1 when not known).
    pub day: u32,
    /// Hour (0 when not known).
    pub hour: u32,
    /// Minute.
    pub minute: u32,
    /// Second.
    pub second: u32,
    /// Millisecond.
    pub millis: u32,
    /// The most precise component present.
    pub precision: Precision,
    /// Timezone offset in minutes east of UTC, when given.
    pub tz: Option<i32>,
}

/// A (possibly partial) time of day.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeV {
    /// Hour.
    pub hour: u32,
    /// Minute.
    pub minute: u32,
    /// Second.
    pub second: u32,
    /// Millisecond.
    pub millis: u32,
    /// Precision (Hour..=Millisecond).
    pub precision: Precision,
}

fn digits(s: &[u8], i: usize, n: usize) -> Option<u32> {
    if s.len() < i + n || !s[i..i + n].iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(&s[i..i + n]).ok()?.parse().ok()
}

/// Parse `hh(:mm(:ss(.fff)?)?)?` at `i`; returns the time and the index after it.
fn parse_time_at(s: &[u8], mut i: usize) -> Option<(TimeV, usize)> {
    let hour = digits(s, i, 2)?;
    i += 2;
    let mut t = TimeV {
        hour,
        minute: 0,
        second: 0,
        millis: 0,
        precision: Precision::Hour,
    };
    if s.get(i) == Some(&b':') {
        t.minute = digits(s, i + 1, 2)?;
        t.precision = Precision::Minute;
        i += 3;
        if s.get(i) == Some(&b':') {
            t.second = digits(s, i + 1, 2)?;
            t.precision = Precision::Second;
            i += 3;
            if s.get(i) == Some(&b'.') {
                let start = i + 1;
                let mut j = start;
                while j < s.len() && s[j].is_ascii_digit() {
                    j += 1;
                }
                if j == start {
                    return None;
                }
                // Keep millisecond resolution; extra digits are truncated.
                let frac = std::str::from_utf8(&s[start..j.min(start + 3)]).ok()?;
                let mut ms: u32 = frac.parse().ok()?;
                for _ in frac.len()..3 {
                    ms *= 10;
                }
                t.millis = ms;
                t.precision = Precision::Millisecond;
                i = j;
            }
        }
    }
    if t.hour > 23 || t.minute > 59 || t.second > 59 {
        return None;
    }
    Some((t, i))
}

fn parse_tz(s: &[u8], i: usize) -> Option<(Option<i32>, usize)> {
    match s.get(i) {
        Some(b'Z') => Some((Some(0), i + 1)),
        Some(c @ (b'+' | b'-')) => {
            let h = digits(s, i + 1, 2)? as i32;
            if s.get(i + 3) != Some(&b':') {
                return None;
            }
            let m = digits(s, i + 4, 2)? as i32;
            let off = h * 60 + m;
            Some((Some(if *c == b'-' { -off } else { off }), i + 6))
        }
        _ => Some((None, i)),
    }
}

impl DateTimeV {
    /// Parse an ISO-8601 date or date-time with optional parts (`2019`, `2019-01-01T10:00Z`).
    /// `allow_time` false accepts dates only. A trailing `T` (`2015T`) is accepted as in
    /// FHIRPath literals.
    pub fn parse(text: &str, allow_time: bool) -> Option<DateTimeV> {
        let s = text.as_bytes();
        let year = digits(s, 0, 4)? as i32;
        let mut v = DateTimeV {
            year,
            month: 1,
            day: 1,
            hour: 0,
            minute: 0,
            second: 0,
            millis: 0,
            precision: Precision::Year,
            tz: None,
        };
        let mut i = 4;
        if s.get(i) == Some(&b'-') {
            v.month = digits(s, i + 1, 2)?;
            v.precision = Precision::Month;
            i += 3;
            if s.get(i) == Some(&b'-') {
                v.day = digits(s, i + 1, 2)?;
                v.precision = Precision::Day;
                i += 3;
            }
        }
        if !(1..=12).contains(&v.month) || NaiveDate::from_ymd_opt(v.year, v.month, v.day).is_none()
        {
            return None;
        }
        if s.get(i) == Some(&b'T') {
            if !allow_time {
                return None;
            }
            i += 1;
            if i < s.len() && s[i].is_ascii_digit() {
                if v.precision != Precision::Day {
                    return None;
                }
                let (t, j) = parse_time_at(s, i)?;
                v.hour = t.hour;
                v.minute = t.minute;
                v.second = t.second;
                v.millis = t.millis;
                v.precision = t.precision;
                let (tz, k) = parse_tz(s, j)?;
                v.tz = tz;
                i = k;
            }
        } else if allow_time && v.precision == Precision::Day {
            // `2019-01-01Z` is not valid; nothing else to read.
        }
        (i == s.len()).then_some(v)
    }

    /// Whether this value carries a time part.
    pub fn has_time(&self) -> bool {
        self.precision >= Precision::Hour
    }

    /// Truncate to date precision (for `toDate()` and Date arithmetic results).
    pub fn date_part(&self) -> DateTimeV {
        let mut d = *self;
        d.hour = 0;
        d.minute = 0;
        d.second = 0;
        d.millis = 0;
        d.tz = None;
        d.precision = d.precision.min(Precision::Day);
        d
    }

    fn naive(&self) -> Option<NaiveDateTime> {
        NaiveDate::from_ymd_opt(self.year, self.month, self.day)?.and_hms_milli_opt(
            self.hour,
            self.minute,
            self.second,
            self.millis,
        )
    }

    fn with_naive(&self, n: NaiveDateTime) -> DateTimeV {
        DateTimeV {
            year: n.year(),
            month: n.month(),
            day: n.day(),
            hour: n.hour(),
            minute: n.minute(),
            second: n.second(),
            millis: n.nanosecond() / 1_000_000,
            precision: self.precision,
            tz: self.tz,
        }
    }

    /// The value shifted to UTC (only meaningful with a time part and a timezone).
    fn to_utc(self) -> DateTimeV {
        match (self.tz, self.has_time(), self.naive()) {
            (Some(off), true, Some(n)) if off != 0 => {
                let Some(shifted) = n.checked_sub_signed(Duration::minutes(off as i64)) else {
                    return self;
                };
                let mut v = self.with_naive(shifted);
                v.tz = Some(0);
                v
            }
            _ => self,
        }
    }

    fn components(&self) -> [u32; 6] {
        [
            self.year as u32,
            self.month,
            self.day,
            self.hour,
            self.minute,
            self.second * 1000 + self.millis,
        ]
    }

    /// Compare per the spec: component by component up to the coarser precision; `None` when
    /// the values agree so far but their precisions differ (undecidable).
    pub fn compare(&self, other: &DateTimeV) -> Option<Ordering> {
        if self.has_time() && other.has_time() && self.tz.is_some() != other.tz.is_some() {
            // One local and one zoned time: the official suite treats this as undecidable.
            return None;
        }
        let (a, b) = if self.has_time() && other.has_time() && self.tz.is_some() {
            (self.to_utc(), other.to_utc())
        } else {
            (*self, *other)
        };
        let pa = level(a.precision);
        let pb = level(b.precision);
        let ca = a.components();
        let cb = b.components();
        for k in 0..=pa.min(pb) {
            match ca[k].cmp(&cb[k]) {
                Ordering::Equal => continue,
                o => return Some(o),
            }
        }
        if pa == pb {
            Some(Ordering::Equal)
        } else {
            None
        }
    }

    /// Add a calendar/UCUM time quantity (`1 year`, `2 'mo'`, `3 days`); `None` if the unit is
    /// not a time unit or the result is out of range.
    pub fn add(&self, amount: f64, unit: &str) -> Option<DateTimeV> {
        // UCUM `a` and `mo` are fixed-length (365.25 / 30.4375 days), not calendar years and
        // months, so the spec makes adding them to a date an error.
        if unit == "a" || unit == "mo" {
            return None;
        }
        let unit = calendar_unit(unit)?;
        let mut v = *self;
        match unit {
            "year" | "month" => {
                // Saturating/checked arithmetic: absurd amounts give an error, not a panic.
                let whole = amount.trunc() as i64;
                let months = if unit == "year" {
                    whole.checked_mul(12)?
                } else {
                    whole
                };
                let total = (v.year as i64 * 12 + (v.month as i64 - 1)).checked_add(months)?;
                v.year = i32::try_from(total.div_euclid(12)).ok()?;
                v.month = (total.rem_euclid(12) + 1) as u32;
                // Clamp the day to the length of the resulting month (Jan 31 + 1 month).
                while v.day > 28 && NaiveDate::from_ymd_opt(v.year, v.month, v.day).is_none() {
                    v.day -= 1;
                }
                Some(v)
            }
            _ => {
                // Only whole units are added (`+ 7.7 days` adds 7 days, `+ 0.1 's'` nothing).
                let whole = amount.trunc();
                let ms: f64 = match unit {
                    "week" => whole * 7.0 * 86_400_000.0,
                    "day" => whole * 86_400_000.0,
                    "hour" => whole * 3_600_000.0,
                    "minute" => whole * 60_000.0,
                    "second" => whole * 1000.0,
                    _ => whole,
                };
                // Below the value's precision the addition is done in whole units of the
                // value's precision (`@2014 + 24 months` style); days on a year/month value
                // are ignored rather than inventing precision.
                if v.precision < Precision::Day {
                    return Some(v);
                }
                let n = v
                    .naive()?
                    .checked_add_signed(Duration::try_milliseconds(ms.round() as i64)?)?;
                Some(v.with_naive(n))
            }
        }
    }

    /// Format as FHIR/ISO text at the value's precision.
    pub fn format(&self) -> String {
        let mut s = format!("{:04}", self.year);
        if self.precision >= Precision::Month {
            s.push_str(&format!("-{:02}", self.month));
        }
        if self.precision >= Precision::Day {
            s.push_str(&format!("-{:02}", self.day));
        }
        if self.precision >= Precision::Hour {
            s.push_str(&format!("T{:02}", self.hour));
            if self.precision >= Precision::Minute {
                s.push_str(&format!(":{:02}", self.minute));
            }
            if self.precision >= Precision::Second {
                s.push_str(&format!(":{:02}", self.second));
            }
            if self.precision >= Precision::Millisecond {
                s.push_str(&format!(".{:03}", self.millis));
            }
            match self.tz {
                Some(0) => s.push('Z'),
                Some(off) => {
                    let sign = if off < 0 { '-' } else { '+' };
                    s.push_str(&format!(
                        "{}{:02}:{:02}",
                        sign,
                        off.abs() / 60,
                        off.abs() % 60
                    ));
                }
                None => {}
            }
        }
        s
    }

    /// The current instant in UTC, at millisecond precision.
    pub fn now() -> DateTimeV {
        let n = chrono::Utc::now().naive_utc();
        let v = DateTimeV {
            year: 0,
            month: 1,
            day: 1,
            hour: 0,
            minute: 0,
            second: 0,
            millis: 0,
            precision: Precision::Millisecond,
            tz: Some(0),
        };
        v.with_naive(n)
    }
}

/// Map the seconds/milliseconds precisions to one comparison level (spec: "seconds and
/// milliseconds are a single precision").
fn level(p: Precision) -> usize {
    match p {
        Precision::Year => 0,
        Precision::Month => 1,
        Precision::Day => 2,
        Precision::Hour => 3,
        Precision::Minute => 4,
        Precision::Second | Precision::Millisecond => 5,
    }
}

/// Normalise a time unit (calendar keyword, plural, or UCUM code) to a calendar keyword.
pub fn calendar_unit(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "year" | "years" | "a" => "year",
        "month" | "months" | "mo" => "month",
        "week" | "weeks" | "wk" => "week",
        "day" | "days" | "d" => "day",
        "hour" | "hours" | "h" => "hour",
        "minute" | "minutes" | "min" => "minute",
        "second" | "seconds" | "s" => "second",
        "millisecond" | "milliseconds" | "ms" => "millisecond",
        _ => return None,
    })
}

impl TimeV {
    /// Parse `hh(:mm(:ss(.fff)?)?)?` (a time of day has no timezone).
    pub fn parse(text: &str) -> Option<TimeV> {
        let s = text.as_bytes();
        let (t, i) = parse_time_at(s, 0)?;
        (i == s.len()).then_some(t)
    }

    /// Compare per the spec (see [`DateTimeV::compare`]).
    pub fn compare(&self, other: &TimeV) -> Option<Ordering> {
        let ca = [self.hour, self.minute, self.second * 1000 + self.millis];
        let cb = [other.hour, other.minute, other.second * 1000 + other.millis];
        let pa = level(self.precision) - 3;
        let pb = level(other.precision) - 3;
        for k in 0..=pa.min(pb) {
            match ca[k].cmp(&cb[k]) {
                Ordering::Equal => continue,
                o => return Some(o),
            }
        }
        if pa == pb {
            Some(Ordering::Equal)
        } else {
            None
        }
    }

    /// Add a time quantity (hours, minutes, seconds, milliseconds), wrapping around midnight.
    pub fn add(&self, amount: f64, unit: &str) -> Option<TimeV> {
        let ms = match calendar_unit(unit)? {
            "hour" => amount * 3_600_000.0,
            "minute" => amount * 60_000.0,
            "second" => amount * 1000.0,
            "millisecond" => amount,
            _ => return None,
        } as i64;
        let cur =
            ((self.hour * 60 + self.minute) * 60 + self.second) as i64 * 1000 + self.millis as i64;
        let t = cur.checked_add(ms)?.rem_euclid(86_400_000);
        Some(TimeV {
            hour: (t / 3_600_000) as u32,
            minute: (t / 60_000 % 60) as u32,
            second: (t / 1000 % 60) as u32,
            millis: (t % 1000) as u32,
            precision: self.precision,
        })
    }

    /// Format as `hh:mm:ss.fff` at the value's precision.
    pub fn format(&self) -> String {
        let mut s = format!("{:02}", self.hour);
        if self.precision >= Precision::Minute {
            s.push_str(&format!(":{:02}", self.minute));
        }
        if self.precision >= Precision::Second {
            s.push_str(&format!(":{:02}", self.second));
        }
        if self.precision >= Precision::Millisecond {
            s.push_str(&format!(".{:03}", self.millis));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dt(s: &str) -> DateTimeV {
        DateTimeV::parse(s, true).unwrap()
    }

    #[test]
    fn parse_and_format() {
        for s in [
            "2019",
            "2019-01",
            "2019-01-02",
            "2019-01-02T10",
            "2019-01-02T10:00:00.123+02:00",
            "2019-01-02T10:00Z",
        ] {
            assert_eq!(dt(s).format(), s);
        }
        assert!(DateTimeV::parse("2019-13", true).is_none());
        assert!(DateTimeV::parse("2019-01-01T10:00", false).is_none());
    }

    #[test]
    fn precision_comparison() {
        assert_eq!(dt("2019").compare(&dt("2019-01")), None);
        assert_eq!(dt("2019").compare(&dt("2020-01")), Some(Ordering::Less));
        assert_eq!(
            dt("2019-01-01T10:00:00Z").compare(&dt("2019-01-01T12:00:00+02:00")),
            Some(Ordering::Equal)
        );
        assert_eq!(
            dt("2019-01-01T10:00:00").compare(&dt("2019-01-01T10:00:00.000")),
            Some(Ordering::Equal)
        );
    }

    #[test]
    fn arithmetic() {
        assert_eq!(
            dt("2019-01-31").add(1.0, "month").unwrap().format(),
            "2019-02-28"
        );
        assert_eq!(
            dt("2019-12-31").add(1.0, "day").unwrap().format(),
            "2020-01-01"
        );
        assert_eq!(dt("2014").add(24.0, "months").unwrap().format(), "2016");
    }
}
