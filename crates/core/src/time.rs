//! Instants and spans as the core sees them: whole milliseconds since the Unix epoch, passed
//! in by the caller. The core never reads a clock; this module only parses and formats.

use std::fmt;
use std::str::FromStr;

/// An instant, in milliseconds since 1970-01-01T00:00:00Z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Parses an RFC 3339 timestamp (`2026-11-22T12:00:00Z`, `2026-11-22T13:00:00.250+01:00`).
    /// Sub-millisecond digits are truncated.
    pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
        chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|t| Timestamp(t.timestamp_millis()))
    }

    /// Milliseconds since the epoch.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// This instant moved by `span` (saturating).
    pub fn plus(self, span: Span) -> Timestamp {
        Timestamp(self.0.saturating_add(span.0))
    }

    /// This instant moved back by `span` (saturating).
    pub fn minus(self, span: Span) -> Timestamp {
        Timestamp(self.0.saturating_sub(span.0))
    }

    /// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-22T12:00:00.000Z`.
    pub fn to_rfc3339(self) -> String {
        match self.rfc3339_in_years_0_to_9999() {
            Some(text) => text.as_str().to_owned(),
            None => match chrono::DateTime::from_timestamp_millis(self.0) {
                Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                None => format!("@{}ms", self.0),
            },
        }
    }

    /// [`Timestamp::to_rfc3339`]'s text for the years 0000-9999, written into a buffer on the
    /// stack (every instant of every case record, delta and alert is written this way; chrono's
    /// general formatter was 2.5 % of an end-to-end run's CPU). `None` for other years.
    fn rfc3339_in_years_0_to_9999(self) -> Option<Rfc3339> {
        const DAY_MS: i64 = 86_400_000;
        let (year, month, day) = civil_date(self.0.div_euclid(DAY_MS));
        if !(0..=9999).contains(&year) {
            return None;
        }
        let in_day = self.0.rem_euclid(DAY_MS);
        let (hour, minute) = (in_day / 3_600_000, in_day / 60_000 % 60);
        let (second, milli) = (in_day / 1000 % 60, in_day % 1000);
        let mut text = *b"0000-00-00T00:00:00.000Z";
        let mut put = |at: usize, digits: usize, mut value: i64| {
            for i in (at..at + digits).rev() {
                text[i] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, hour);
        put(14, 2, minute);
        put(17, 2, second);
        put(20, 3, milli);
        Some(Rfc3339(text))
    }
}

/// RFC 3339 text of an instant in years 0000-9999, on the stack.
#[derive(Debug, PartialEq, Eq)]
struct Rfc3339([u8; 24]);

impl Rfc3339 {
    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("digits and separators are ASCII")
    }
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_date(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// In JSON (case records, escalation notices) an instant is its RFC 3339 text.
impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.rfc3339_in_years_0_to_9999() {
            Some(text) => serializer.serialize_str(text.as_str()),
            None => serializer.serialize_str(&self.to_rfc3339()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Timestamp, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Timestamp::parse_rfc3339(&text)
            .ok_or_else(|| serde::de::Error::custom("not an RFC 3339 timestamp"))
    }
}

/// A length of time in whole milliseconds, written as `<number><unit>` with unit
/// `ms`, `s`, `m`, `h`, `d` or `w` (`90s`, `1h`, `7d`). It displays in the largest unit up to
/// days that divides it (`60m` shows as `1h`, `2w` as `14d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Span(pub i64);

const UNITS: [(&str, i64); 6] = [
    ("w", 7 * 86_400_000),
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1_000),
    ("ms", 1),
];

impl Span {
    /// A span of whole seconds.
    pub const fn seconds(s: i64) -> Span {
        Span(s * 1_000)
    }

    /// A span of whole minutes.
    pub const fn minutes(m: i64) -> Span {
        Span(m * 60_000)
    }

    /// A span of whole hours.
    pub const fn hours(h: i64) -> Span {
        Span(h * 3_600_000)
    }

    /// A span of whole days.
    pub const fn days(d: i64) -> Span {
        Span(d * 86_400_000)
    }

    /// The span in milliseconds.
    pub fn millis(self) -> i64 {
        self.0
    }
}

/// Why a span did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanParseError(String);

impl fmt::Display for SpanParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a duration: expected a whole number and a unit (ms, s, m, h, d, w), e.g. 7d",
            self.0
        )
    }
}

impl std::error::Error for SpanParseError {}

impl FromStr for Span {
    type Err = SpanParseError;

    fn from_str(text: &str) -> Result<Span, SpanParseError> {
        let error = || SpanParseError(text.to_owned());
        let trimmed = text.trim();
        let digits_end = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(error)?;
        let (number, unit) = trimmed.split_at(digits_end);
        let number: i64 = number.parse().map_err(|_| error())?;
        let (_, unit_ms) = UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .ok_or_else(error)?;
        number.checked_mul(*unit_ms).map(Span).ok_or_else(error)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0s");
        }
        let (name, unit_ms) = UNITS[1..]
            .iter()
            .find(|(_, unit_ms)| self.0 % unit_ms == 0)
            .expect("every span is a whole number of milliseconds");
        write!(f, "{}{}", self.0 / unit_ms, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// chrono's RFC 3339 text, the reference.
    fn chrono_text(ms: i64) -> String {
        chrono::DateTime::from_timestamp_millis(ms)
            .expect("in range")
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    }

    /// 0000-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z.
    const YEAR_0: i64 = -62_167_219_200_000;
    const YEAR_9999_END: i64 = 253_402_300_799_999;

    #[test]
    fn instants_are_written_as_chrono_writes_them_at_the_edges() {
        for ms in [
            0,
            -1,
            1,
            YEAR_0,
            YEAR_0 + 1,
            YEAR_9999_END,
            951_782_400_000,   // 2000-02-29
            4_107_542_400_000, // 2100-03-01
            -2_203_891_200_001,
            1_800_000_000_000,
        ] {
            assert_eq!(Timestamp(ms).to_rfc3339(), chrono_text(ms), "{ms}");
            let json = serde_json::to_string(&Timestamp(ms)).expect("JSON");
            assert_eq!(json, format!("\"{}\"", chrono_text(ms)));
        }
        assert_eq!(Timestamp(YEAR_0 - 1).rfc3339_in_years_0_to_9999(), None);
        assert_eq!(
            Timestamp(YEAR_9999_END + 1).rfc3339_in_years_0_to_9999(),
            None
        );
        assert_eq!(
            Timestamp(YEAR_9999_END + 1).to_rfc3339(),
            chrono_text(YEAR_9999_END + 1)
        );
        assert_eq!(Timestamp(i64::MAX).to_rfc3339(), format!("@{}ms", i64::MAX));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]
        #[test]
        fn instants_are_written_as_chrono_writes_them(ms in YEAR_0..=YEAR_9999_END) {
            prop_assert_eq!(Timestamp(ms).to_rfc3339(), chrono_text(ms));
            prop_assert_eq!(Timestamp::parse_rfc3339(&Timestamp(ms).to_rfc3339()), Some(Timestamp(ms)));
        }
    }

    #[test]
    fn spans_parse_and_display_canonically() {
        for (text, ms, shown) in [
            ("1h", 3_600_000, "1h"),
            ("24h", 86_400_000, "1d"),
            ("7d", 604_800_000, "7d"),
            ("28d", 2_419_200_000, "28d"),
            ("2w", 1_209_600_000, "14d"),
            ("60m", 3_600_000, "1h"),
            ("90s", 90_000, "90s"),
            ("250ms", 250, "250ms"),
        ] {
            let span: Span = text.parse().expect(text);
            assert_eq!(span.millis(), ms, "{text}");
            assert_eq!(span.to_string(), shown, "{text}");
        }
        for bad in ["", "h", "1", "1y", "-1h", "1.5h", "99999999999999999w"] {
            assert!(bad.parse::<Span>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn timestamps_parse_rfc3339_with_offsets() {
        let utc = Timestamp::parse_rfc3339("2026-11-22T12:00:00Z").expect("valid");
        let offset = Timestamp::parse_rfc3339("2026-11-22T13:00:00.000+01:00").expect("valid");
        assert_eq!(utc, offset);
        assert_eq!(utc.to_rfc3339(), "2026-11-22T12:00:00.000Z");
        let fraction = Timestamp::parse_rfc3339("2026-11-22T12:00:00.2509Z").expect("valid");
        assert_eq!(fraction.millis() - utc.millis(), 250);
        for bad in [
            "",
            "2026-11-22",
            "2026-11-22T12:00:00",
            "yesterday",
            "2026-13-01T00:00:00Z",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(bad), None, "{bad:?} parsed");
        }
    }
}
