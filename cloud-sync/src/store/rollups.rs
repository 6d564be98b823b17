//! Usage rollups, kept by both backends in the same atomic write as the records (sled:
//! [`super::sled::rollups`], PostgreSQL: [`super::postgres::rollups`]; the rule is
//! [`countersign_rating::rollup`]): what the two share and the maintenance commands over
//! both. Usage reads from the rollups are the records feature's `daily_usage` and
//! `daily_usage_in`.

use countersign_rating::rollup::BUCKET_S;
use countersign_rating::usage::{day_start, DateRange, Derived, TimeZone};
use jiff::Timestamp;
use time::Date;

use super::{blocking, StoreBackend, StoreError};

/// What a rollups check (`StoreBackend::check_rollups`) found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RollupCheck {
    /// Records compared.
    pub records: u64,
    /// Differences found.
    pub differences: u64,
    /// The first differences, described.
    pub described: Vec<String>,
}

/// Most SIMs one page of an all-SIMs usage read may ask for.
pub const USAGE_PAGE_SIMS_MAX: usize = 10_000;
/// SIMs in a page when the caller does not say.
pub const USAGE_PAGE_SIMS_DEFAULT: usize = 1_000;

/// One page of an all-SIMs usage read: the SIMs after `after` (exclusive) in ICCID order, at
/// most `limit` of them. ICCID order is unsigned numeric order on both stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimPage {
    /// The last ICCID of the previous page; `None` for the first page.
    pub after: Option<u64>,
    /// SIMs in the page, 1 through [`USAGE_PAGE_SIMS_MAX`].
    pub limit: usize,
}

impl SimPage {
    /// The first ICCID the page may hold; `None` when `after` is the last possible ICCID.
    pub fn first_iccid(&self) -> Option<u64> {
        match self.after {
            None => Some(0),
            Some(a) => a.checked_add(1),
        }
    }
}

/// A page of usage: the page's SIMs, and where the next page starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsagePage {
    /// Usage of the page's SIMs in the range asked for, and the faulty SIMs among the ICCIDs
    /// the page covers (from its first ICCID through `next_after`, or to the end).
    pub derived: Derived,
    /// The ICCID to pass as `after` for the next page; `None` when this is the last.
    pub next_after: Option<u64>,
}

impl UsagePage {
    /// A page cut from a full derivation (the answer for zones whose days are not on bucket
    /// boundaries, which are read from the records anyway).
    pub(crate) fn cut(mut all: Derived, page: SimPage) -> Self {
        let Some(first) = page.first_iccid() else { return Self::default() };
        let sims: std::collections::BTreeSet<u64> =
            all.daily.keys().map(|(i, _)| *i).filter(|i| *i >= first).take(page.limit + 1).collect();
        let next_after =
            (sims.len() > page.limit).then(|| sims.iter().nth(page.limit - 1).copied()).flatten();
        let last = next_after.unwrap_or(u64::MAX);
        all.daily.retain(|(i, _), _| (first..=last).contains(i));
        all.faults.retain(|i, _| (first..=last).contains(i));
        Self { derived: all, next_after }
    }
}

/// The UTC days (rows) that can hold a bucket of `range`'s days in `tz`: a zone's day lies
/// within a day of UTC's, so one row of margin each side; unbounded ends stay unbounded.
pub(crate) fn rows_of_range(tz: &TimeZone, range: DateRange) -> (u32, u32) {
    let utc_day = |d: Date| -> Option<u32> {
        let t = day_start(d, tz)?;
        u32::try_from(u64::try_from(t.as_second()).ok()? / 86_400).ok()
    };
    let first_row = range.from.and_then(utc_day).map_or(0, |d| d.saturating_sub(1));
    let last_row = range.to.and_then(utc_day).map_or(u32::MAX, |d| d.saturating_add(2));
    (first_row, last_row)
}

/// Whether every day boundary of `tz` between two UTC days falls on a bucket boundary
/// (true of every zone since 1972; checked through the zone's transitions in the span).
pub(crate) fn rows_on_buckets(tz: &TimeZone, first_row: u32, last_row: u32) -> bool {
    let start = i64::from(first_row).saturating_mul(86_400);
    // Beyond today's rules nothing changes: bound the walk at 2200.
    let end = i64::from(last_row).saturating_add(1).saturating_mul(86_400).min(7_258_118_400);
    let on_quarter = |t: Timestamp| tz.to_offset(t).seconds() % BUCKET_S as i32 == 0;
    let Ok(first) = Timestamp::from_second(start.min(end)) else { return false };
    if !on_quarter(first) {
        return false;
    }
    let mut transitions = tz.following(first);
    loop {
        match transitions.next() {
            Some(t) if t.timestamp().as_second() <= end => {
                if t.offset().seconds() % BUCKET_S as i32 != 0 {
                    return false;
                }
            }
            _ => return true,
        }
    }
}

impl StoreBackend {
    /// Derives the rollups again from the records (see
    /// [`super::sled::Store::rebuild_rollups`] and
    /// [`super::postgres::PgStore::rebuild_rollups`]); returns the records seen.
    pub async fn rebuild_rollups(&self) -> Result<u64, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.rebuild_rollups()).await
            }
            Self::Postgres(p) => p.rebuild_rollups().await,
        }
    }

    /// Compares the rollups with a derivation from the records (see
    /// [`super::sled::Store::check_rollups`]).
    pub async fn check_rollups(&self, limit: usize) -> Result<RollupCheck, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.check_rollups(limit)).await
            }
            Self::Postgres(p) => p.check_rollups(limit).await,
        }
    }
}
