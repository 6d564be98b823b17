//! Usage rollups, kept by both backends in the same atomic write as the records (sled:
//! [`super::sled::rollups`], PostgreSQL: [`super::postgres::rollups`]; the rule is
//! [`countersign_rating::rollup`]): what the two share and the maintenance commands over
//! both. Usage reads from the rollups are the records feature's `daily_usage` and
//! `daily_usage_in`.

use countersign_rating::rollup::BUCKET_S;
use countersign_rating::usage::TimeZone;
use jiff::Timestamp;

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
