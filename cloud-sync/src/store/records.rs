//! Verified reports, stored once by record id, and the usage derived from them: the
//! records feature of [`StoreBackend`] over both backends.

use countersign_meter::RecordId;

use super::{blocking, InsertOutcome, NewRecord, StoreBackend, StoreError, StoredRecord};
use countersign_rating::usage::{DateRange, Derived, TimeZone};

use super::sled::rollups::RollupCheck;

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

    /// Bytes per (ICCID, UTC day); with `iccid`, at least that SIM's days are exact (others
    /// may be absent). Days outside `range` may be absent (sled reads only the range's rows;
    /// PostgreSQL derives them all and leaves the filtering to the caller).
    pub async fn daily_usage(&self, iccid: Option<u64>, range: DateRange) -> Result<Derived, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.rollup_daily_in(iccid, &TimeZone::UTC, range)).await
            }
            Self::Postgres(p) => p.daily_usage(iccid).await,
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
            Self::Postgres(p) => p.daily_usage_in(iccid, &tz).await?,
        };
        if let Some(sim) = iccid {
            daily.retain_sim(sim);
        }
        Ok(daily)
    }

    /// Derives the rollups again from the records (see
    /// [`super::sled::rollups::Store::rebuild_rollups`]); returns the records seen. The
    /// PostgreSQL store keeps no rollups yet and says so.
    pub async fn rebuild_rollups(&self) -> Result<u64, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.rebuild_rollups()).await
            }
            Self::Postgres(_) => Err(StoreError::Unsupported {
                what: "rollups on the postgresql store (it derives usage from its daily table)",
            }),
        }
    }

    /// Compares the rollups with a derivation from the records (see
    /// [`super::sled::rollups::Store::check_rollups`]).
    pub async fn check_rollups(&self, limit: usize) -> Result<RollupCheck, StoreError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || s.check_rollups(limit)).await
            }
            Self::Postgres(_) => Err(StoreError::Unsupported {
                what: "rollups on the postgresql store (it derives usage from its daily table)",
            }),
        }
    }
}
