//! The settlement ledger: settled SIM-days and their numbered adjustments, on both
//! backends. The decisions (what a run books, what becomes an adjustment) are the rating
//! core's [`settle`](countersign_rating::usage::settle); the backends read the booked state
//! and write a run's outcome atomically, one run at a time (a lock of the sled store; a
//! transaction advisory lock on PostgreSQL).

use countersign_rating::usage::{Adjustment, DateRange, SettledDay, Settlement, UsageError};
use jiff::Timestamp;

use super::rollups::SimPage;
use super::sled::ledger::Ledger;
use super::{blocking, StoreBackend, StoreError};

/// Why a ledger operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store failed; recoverable when the store error is.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The derivation or settlement refused the input. Not recoverable by retrying.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// The ledger was settled in another time zone. Not recoverable: use that zone.
    #[error("the ledger settles in time zone '{ledger}', not '{asked}'")]
    ZoneMismatch {
        /// The ledger's zone.
        ledger: String,
        /// The zone asked for.
        asked: String,
    },
}

impl From<::sled::Error> for LedgerError {
    fn from(e: ::sled::Error) -> Self {
        LedgerError::Store(e.into())
    }
}

/// One SIM-day in the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerDay {
    /// The settled figure.
    pub settled: SettledDay,
    /// Its adjustments in order.
    pub adjustments: Vec<Adjustment>,
}

impl StoreBackend {
    /// The settlement ledger's zone (`None` before its first settlement) and its booked
    /// SIM-days, one SIM or all, inside `range`.
    pub async fn ledger(
        &self,
        iccid: Option<u64>,
        range: DateRange,
    ) -> Result<(Option<String>, Vec<LedgerDay>), LedgerError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || {
                    let ledger = Ledger::open(&s)?;
                    Ok((ledger.zone()?, ledger.days(iccid, range)?))
                })
                .await
            }
            Self::Postgres(p) => p.ledger_days(iccid, range).await,
        }
    }

    /// The ledger's zone and the booked SIM-days of one page of SIMs in ICCID order inside
    /// `range`, with the next page's cursor (see [`SimPage`]); costs the page's SIMs and days.
    pub async fn ledger_page(
        &self,
        range: DateRange,
        page: SimPage,
    ) -> Result<(Option<String>, Vec<LedgerDay>, Option<u64>), LedgerError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || {
                    let ledger = Ledger::open(&s)?;
                    let (days, next) = ledger.days_page(range, page)?;
                    Ok((ledger.zone()?, days, next))
                })
                .await
            }
            Self::Postgres(p) => p.ledger_days_page(range, page).await,
        }
    }

    /// A settlement run (see [`usage::settle`](countersign_rating::usage::settle)): days closed by `now`
    /// are booked once, changes to booked days become numbered adjustments; durable when it
    /// returns. On PostgreSQL safe from any number of processes at once.
    pub async fn settle(
        &self,
        tz_name: String,
        settlement_hours: u32,
        now: Timestamp,
    ) -> Result<Settlement, LedgerError> {
        match self {
            Self::Sled(s) => {
                let s = s.clone();
                blocking(move || Ledger::open(&s)?.settle(&tz_name, settlement_hours, now)).await
            }
            Self::Postgres(p) => p.ledger_settle(&tz_name, settlement_hours, now).await,
        }
    }
}
