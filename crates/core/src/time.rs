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
        match chrono::DateTime::from_timestamp_millis(self.0) {
            Some(t) => t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            None => format!("@{}ms", self.0),
        }
    }
}

/// In JSON (case records, escalation notices) an instant is its RFC 3339 text.
impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_rfc3339())
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
