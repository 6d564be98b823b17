//! Verified reports, stored once by record id, and the usage derived from them: the
//! records feature of [`StoreBackend`] over both backends.

use countersign_meter::RecordId;

use super::rollups::{SimPage, UsagePage};
use super::{blocking, InsertOutcome, NewRecord, StoreBackend, StoreError, StoredRecord};
use countersign_rating::usage::{DateRange, Derived, TimeZone};

impl StoreBackend {
    /// Stores a batch's verified records; durable when this returns. One outcome per input.
    pub async fn insert_batch(
        &self,
        gateway_id: u64,
        records: Vec<NewRecord>,
    ) -> Result<Vec<InsertOutcome>, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.insert_batch(gateway_id, &records)).await
            }
            Self::Postgres(p) => p.insert_batch(gateway_id, &records).await,
        }
    }

    /// The stored record with this id.
    pub async fn record(&self, id: RecordId) -> Result<Option<StoredRecord>, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.record(id)).await
            }
            Self::Postgres(p) => p.record(id).await,
        }
    }

    /// Number of stored records: O(records), for tests and tools.
    pub async fn record_count(&self) -> Result<u64, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || {
                    u64::try_from(s.record_count()).map_err(|_| StoreError::Corrupt("record count".into()))
                })
                .await
            }
            Self::Postgres(p) => p.record_count().await,
        }
    }

    /// Bytes per (ICCID, UTC day) from the rollups of either store; with `iccid`, only that
    /// SIM's days; only the days in `range`.
    pub async fn daily_usage(&self, iccid: Option<u64>, range: DateRange) -> Result<Derived, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.rollup_daily_in(iccid, &TimeZone::UTC, range)).await
            }
            Self::Postgres(p) => p.daily_usage(iccid, range).await,
        }
    }

    /// One page of SIMs' usage per day in `tz` over `range`, in ICCID order (see
    /// [`SimPage`]); costs the page's SIMs and days, not the fleet or its history.
    pub async fn usage_page(
        &self,
        tz: TimeZone,
        range: DateRange,
        page: SimPage,
    ) -> Result<UsagePage, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.rollup_page_in(&tz, range, page)).await
            }
            Self::Postgres(p) => p.rollup_page_in(&tz, range, page).await,
        }
    }

    /// Bytes per (ICCID, day in `tz`); with `iccid`, only that SIM's days, exact (an epoch's
    /// running maximum spans SIM swaps, so its meters' other records are derived too).
    pub async fn daily_usage_in(
        &self,
        iccid: Option<u64>,
        tz: TimeZone,
        range: DateRange,
    ) -> Result<Derived, StoreError> {
        let mut daily = match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.rollup_daily_in(iccid, &tz, range)).await?
            }
            Self::Postgres(p) => p.daily_usage_in(iccid, &tz, range).await?,
        };
        if let Some(sim) = iccid {
            daily.retain_sim(sim);
        }
        Ok(daily)
    }
}
