//! Durations as configurations write them (`release_cooldown: "30s"`): Go's `time.ParseDuration`
//! syntax restricted to what a cooldown needs, one or more `<integer><unit>` terms with the units `ms`,
//! `s`, `m` and `h` (`"90s"`, `"1m30s"`, `"1h"`), or a bare `0`. Fractions, signs and microsecond units
//! are refused rather than guessed at.

use std::time::Duration;

use thiserror::Error;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DurationError {
    /// Nothing was written.
    #[error("empty duration")]
    Empty,
    /// A term has no number before its unit, or the string ends in a number without a unit.
    #[error("expected <number><unit> terms such as \"30s\" or \"1m30s\" (units: ms, s, m, h)")]
    Malformed,
    /// A term names a unit that is not `ms`, `s`, `m` or `h`.
    #[error("unknown unit {0:?} (units: ms, s, m, h)")]
    UnknownUnit(String),
    /// The total does not fit in 64-bit milliseconds.
    #[error("too long")]
    Overflow,
}

/// Parses a duration such as `"30s"`, `"1m30s"` or `"500ms"`.
pub fn parse_duration(written: &str) -> Result<Duration, DurationError> {
    if written.is_empty() {
        return Err(DurationError::Empty);
    }
    if written == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = written;
    let mut total_ms: u64 = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::Malformed);
        }
        let number: u64 = rest[..digits].parse().map_err(|_| DurationError::Overflow)?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = rest.split_at(unit_len);
        let scale: u64 = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "" => return Err(DurationError::Malformed),
            other => return Err(DurationError::UnknownUnit(other.to_string())),
        };
        total_ms = number
            .checked_mul(scale)
            .and_then(|ms| total_ms.checked_add(ms))
            .ok_or(DurationError::Overflow)?;
        rest = after;
    }
    Ok(Duration::from_millis(total_ms))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepted() {
        for (written, ms) in [
            ("0", 0),
            ("0s", 0),
            ("30s", 30_000),
            ("500ms", 500),
            ("1m30s", 90_000),
            ("2h", 7_200_000),
            ("1h1m1s1ms", 3_661_001),
            ("90s", 90_000),
        ] {
            assert_eq!(parse_duration(written), Ok(Duration::from_millis(ms)), "{written}");
        }
    }

    #[test]
    fn refused() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        for written in ["s", "30", "1.5s", "-5s", "+5s", "5 s", " 5s", "1m30"] {
            assert!(parse_duration(written).is_err(), "{written}");
        }
        assert_eq!(parse_duration("3d"), Err(DurationError::UnknownUnit("d".into())));
        assert_eq!(parse_duration("5us"), Err(DurationError::UnknownUnit("us".into())));
        assert_eq!(parse_duration("99999999999999999999h"), Err(DurationError::Overflow));
        assert_eq!(parse_duration("9999999999999999h"), Err(DurationError::Overflow));
    }

    proptest! {
        /// Any sum of terms parses to the sum of its terms, in any unit order.
        #[test]
        fn terms_add_up(terms in proptest::collection::vec((0u64..100_000, 0usize..4), 1..5)) {
            let units = [("ms", 1u64), ("s", 1_000), ("m", 60_000), ("h", 3_600_000)];
            let written: String = terms.iter().map(|(n, u)| format!("{n}{}", units[*u].0)).collect();
            let expected: u64 = terms.iter().map(|(n, u)| n * units[*u].1).sum();
            prop_assert_eq!(parse_duration(&written), Ok(Duration::from_millis(expected)));
        }

        #[test]
        fn never_panics(written in ".{0,24}") {
            let _ = parse_duration(&written);
        }

        /// Whatever parses is made only of digits and the known unit letters.
        #[test]
        fn only_digits_and_units_parse(written in "[0-9a-z.+-]{0,12}") {
            if parse_duration(&written).is_ok() {
                prop_assert!(written.chars().all(|c| c.is_ascii_digit() || "mshm".contains(c)), "{}", written);
            }
        }
    }
}
