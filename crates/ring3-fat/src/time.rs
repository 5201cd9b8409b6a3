//! FAT timestamps ⇄ `SystemTime`.
//!
//! FAT stores local date and time without a zone. ring3-fat reads and writes them as UTC
//! (like Linux's vfat with `tz=UTC`), so that a volume looks the same on every host whatever
//! its `TZ`. Dates before 1980 or after 2107 are clamped to the range FAT can hold.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fatfs::{Date, DateTime, Time, TimeProvider};

/// The clock fatfs stamps new and written entries with: the current time in UTC.
#[derive(Debug)]
pub(crate) struct UtcClock;

pub(crate) static UTC_CLOCK: UtcClock = UtcClock;

impl TimeProvider for UtcClock {
    fn get_current_date(&self) -> Date {
        to_fat(SystemTime::now()).date
    }

    fn get_current_date_time(&self) -> DateTime {
        to_fat(SystemTime::now())
    }
}

const SECONDS_PER_DAY: i64 = 86_400;

/// Days since 1970-01-01 of a proleptic Gregorian date (the usual era-based computation).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = i64::from((month + 9) % 12); // March = 0
    let day_of_year = (153 * month_index + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date (year, month 1–12, day 1–31) of a day counted from 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A FAT date and time as a `SystemTime`. Out-of-range fields (a corrupt entry) are clamped
/// rather than trusted.
pub(crate) fn from_fat(date_time: DateTime) -> SystemTime {
    let date = date_time.date;
    let time = date_time.time;
    let month = u32::from(date.month).clamp(1, 12);
    let day = u32::from(date.day).clamp(1, 31);
    let days = days_from_civil(i64::from(date.year), month, day);
    let seconds = days * SECONDS_PER_DAY
        + i64::from(time.hour.min(23)) * 3600
        + i64::from(time.min.min(59)) * 60
        + i64::from(time.sec.min(59));
    let millis = u64::from(time.millis.min(999));
    match u64::try_from(seconds) {
        Ok(seconds) => UNIX_EPOCH + Duration::from_secs(seconds) + Duration::from_millis(millis),
        Err(_) => UNIX_EPOCH,
    }
}

/// A FAT date alone (access dates have no time) as a `SystemTime` at midnight UTC.
pub(crate) fn from_fat_date(date: Date) -> SystemTime {
    from_fat(DateTime {
        date,
        time: Time {
            hour: 0,
            min: 0,
            sec: 0,
            millis: 0,
        },
    })
}

/// A `SystemTime` as a FAT date and time, clamped to 1980-01-01 … 2107-12-31 23:59:59.
pub(crate) fn to_fat(time: SystemTime) -> DateTime {
    let first = days_from_civil(1980, 1, 1) * SECONDS_PER_DAY;
    let last = (days_from_civil(2107, 12, 31) + 1) * SECONDS_PER_DAY - 1;
    let (seconds, millis) = match time.duration_since(UNIX_EPOCH) {
        Ok(since) => (
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
            since.subsec_millis(),
        ),
        Err(_) => (first, 0),
    };
    let (seconds, millis) = if seconds < first {
        (first, 0)
    } else if seconds > last {
        (last, 0)
    } else {
        (seconds, millis)
    };
    let (year, month, day) = civil_from_days(seconds.div_euclid(SECONDS_PER_DAY));
    let second_of_day = seconds.rem_euclid(SECONDS_PER_DAY);
    // The clamping above keeps every field within u16.
    DateTime {
        date: Date {
            year: year as u16,
            month: month as u16,
            day: day as u16,
        },
        time: Time {
            hour: (second_of_day / 3600) as u16,
            min: (second_of_day / 60 % 60) as u16,
            sec: (second_of_day % 60) as u16,
            millis: millis as u16,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        let t = to_fat(UNIX_EPOCH + Duration::from_secs(1_700_000_000)); // 2023-11-14 22:13:20
        assert_eq!((t.date.year, t.date.month, t.date.day), (2023, 11, 14));
        assert_eq!((t.time.hour, t.time.min, t.time.sec), (22, 13, 20));
    }

    #[test]
    fn out_of_range_times_are_clamped() {
        assert_eq!(to_fat(UNIX_EPOCH).date.year, 1980);
        let far = UNIX_EPOCH + Duration::from_secs(10_000_000_000);
        assert_eq!(to_fat(far).date.year, 2107);
        let corrupt = DateTime {
            date: Date {
                year: 1980,
                month: 0,
                day: 40,
            },
            time: Time {
                hour: 30,
                min: 70,
                sec: 70,
                millis: 5000,
            },
        };
        let _ = from_fat(corrupt);
    }

    proptest! {
        #[test]
        fn round_trips_within_fat_range(seconds in 315_532_800u64..4_354_819_199u64) {
            let time = UNIX_EPOCH + Duration::from_secs(seconds);
            prop_assert_eq!(from_fat(to_fat(time)), time);
        }
    }
}
