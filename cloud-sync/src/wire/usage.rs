//! Usage on the wire: one SIM day by day, every SIM's total, SIM-days in a time zone, the
//! settlement ledger, and the SIMs left out of an answer because their usage cannot be
//! derived. Knows nothing of axum or the store.

use serde::{Deserialize, Serialize};
use time::Date;

use crate::text::{json_date, json_iccid, json_opt_date, json_opt_iccid};
use crate::usage::{Derived, SimFault};

/// Path of the per-SIM usage query.
pub const USAGE_PATH: &str = "/v1/usage";
/// Path of the all-SIMs usage query.
pub const USAGE_SIMS_PATH: &str = "/v1/usage/sims";
/// Path of usage per SIM-day in a time zone.
pub const USAGE_DAYS_PATH: &str = "/v1/usage/days";
/// Path of the settlement ledger.
pub const USAGE_LEDGER_PATH: &str = "/v1/usage/ledger";

/// One day of one SIM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayUsage {
    /// The UTC day, `YYYY-MM-DD` in JSON.
    #[serde(with = "json_date")]
    pub date: Date,
    /// Bytes sent by the device.
    pub up_bytes: u64,
    /// Bytes received by the device.
    pub down_bytes: u64,
    /// `up_bytes + down_bytes`.
    pub total_bytes: u64,
}

/// Answer of `GET /v1/usage`: one SIM, day by day, and its total.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimUsage {
    /// The SIM, a decimal string in JSON (19 digits do not fit a JavaScript number).
    #[serde(with = "json_iccid")]
    pub iccid: u64,
    /// First day included, as asked; `null` when unbounded.
    #[serde(with = "json_opt_date")]
    pub from: Option<Date>,
    /// Last day included, as asked; `null` when unbounded.
    #[serde(with = "json_opt_date")]
    pub to: Option<Date>,
    /// Days on which the SIM reported, in date order (zero days included).
    pub days: Vec<DayUsage>,
    /// Bytes sent over the range.
    pub up_bytes: u64,
    /// Bytes received over the range.
    pub down_bytes: u64,
    /// `up_bytes + down_bytes`.
    pub total_bytes: u64,
}

/// One SIM's total in [`SimsUsage`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimTotal {
    /// The SIM, a decimal string in JSON.
    #[serde(with = "json_iccid")]
    pub iccid: u64,
    /// Bytes sent over the range.
    pub up_bytes: u64,
    /// Bytes received over the range.
    pub down_bytes: u64,
    /// `up_bytes + down_bytes`.
    pub total_bytes: u64,
}

/// Answer of `GET /v1/usage/sims`: one page of the SIMs with usage in the range, by ICCID.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimsUsage {
    /// First day included, as asked; `null` when unbounded.
    #[serde(with = "json_opt_date")]
    pub from: Option<Date>,
    /// Last day included, as asked; `null` when unbounded.
    #[serde(with = "json_opt_date")]
    pub to: Option<Date>,
    /// The page's SIMs that reported in the range, sorted by ICCID.
    pub sims: Vec<SimTotal>,
    /// Bytes sent by the page's SIMs (128 bits: a sum over SIMs is not bounded by one SIM's).
    pub up_bytes: u128,
    /// Bytes received by the page's SIMs.
    pub down_bytes: u128,
    /// `up_bytes + down_bytes`.
    pub total_bytes: u128,
    /// SIMs among the ICCIDs the page covers left out because their usage cannot be derived.
    #[serde(default)]
    pub underivable: Vec<UnderivableSim>,
    /// Pass as `after` for the next page; `null` on the last page.
    #[serde(default, with = "json_opt_iccid")]
    pub next_after: Option<u64>,
}

/// A SIM left out of an answer because its usage cannot be derived (see
/// [`crate::usage::SimFault`]); every other SIM in the answer is exact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderivableSim {
    /// The SIM, a decimal string in JSON.
    #[serde(with = "json_iccid")]
    pub iccid: u64,
    /// The record that made it underivable, `meter-epoch-seq`.
    pub record: String,
    /// Stable code: `time_out_of_range`, `counter_ceiling` or `overflow`.
    pub code: String,
    /// Why, for people.
    pub reason: String,
}

impl From<&SimFault> for UnderivableSim {
    fn from(f: &SimFault) -> Self {
        Self {
            iccid: f.iccid,
            record: format!("{}-{}-{}", f.record.meter_id, f.record.epoch, f.record.seq),
            code: f.reason.code().to_owned(),
            reason: f.reason.to_string(),
        }
    }
}

/// The underivable SIMs of a derivation, by ICCID.
pub fn underivable(d: &Derived) -> Vec<UnderivableSim> {
    d.faults.values().map(UnderivableSim::from).collect()
}

/// One SIM-day in [`ZoneDays`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneDay {
    /// The SIM, a decimal string in JSON.
    #[serde(with = "json_iccid")]
    pub iccid: u64,
    /// The day in the asked zone.
    #[serde(with = "json_date")]
    pub date: Date,
    /// Bytes sent by the device.
    pub up_bytes: u64,
    /// Bytes received by the device.
    pub down_bytes: u64,
    /// `up_bytes + down_bytes`.
    pub total_bytes: u64,
}

/// Answer of `GET /v1/usage/days`: current (unsettled) figures per SIM-day in `tz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneDays {
    /// The IANA zone days were cut in.
    pub tz: String,
    /// SIM-days by ICCID, then date (without `iccid`: of one page of SIMs).
    pub days: Vec<ZoneDay>,
    /// SIMs left out because their usage cannot be derived.
    #[serde(default)]
    pub underivable: Vec<UnderivableSim>,
    /// Without `iccid`: pass as `after` for the next page; `null` on the last page.
    #[serde(default, with = "json_opt_iccid")]
    pub next_after: Option<u64>,
}

/// One adjustment in [`LedgerReply`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdjustmentJson {
    /// 1, 2, … per day.
    pub seq: u32,
    /// Uplink bytes added (negative: removed).
    pub delta_up_bytes: i64,
    /// Downlink bytes added.
    pub delta_down_bytes: i64,
    /// When it was booked, Unix seconds.
    pub made_at_s: i64,
}

/// One settled SIM-day in [`LedgerReply`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerDayJson {
    /// The SIM.
    #[serde(with = "json_iccid")]
    pub iccid: u64,
    /// The day in the ledger's zone.
    #[serde(with = "json_date")]
    pub date: Date,
    /// Uplink bytes settled when the day closed (never changed).
    pub settled_up_bytes: u64,
    /// Downlink bytes settled.
    pub settled_down_bytes: u64,
    /// When it was settled, Unix seconds.
    pub settled_at_s: i64,
    /// Corrections booked since, in order.
    pub adjustments: Vec<AdjustmentJson>,
    /// Settled plus adjustments, both directions.
    pub booked_total_bytes: i64,
}

/// Answer of `GET /v1/usage/ledger`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerReply {
    /// The ledger's zone, `null` before the first settlement.
    pub tz: Option<String>,
    /// Settled SIM-days by ICCID, then date (without `iccid`: of one page of SIMs).
    pub days: Vec<LedgerDayJson>,
    /// Without `iccid`: pass as `after` for the next page; `null` on the last page.
    #[serde(default, with = "json_opt_iccid")]
    pub next_after: Option<u64>,
}
