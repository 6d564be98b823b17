//! Reconciliation: device-counted usage against the carrier's, per SIM and day, under a
//! per-provider model of overhead and rounding. Pure: figures in, classified SIM-days out.
//!
//! # The model
//!
//! What the carrier should bill for a SIM-day on which the device counted `d` bytes is a range
//! `[low, high]`:
//!
//! - `overhead = ⌈d / mean_packet_bytes⌉ × per_packet_overhead_bytes` — headers the carrier
//!   counts and the modem does not (outer tunnel headers, ≈50–54 B per packet on some
//!   networks; 0 when the carrier counts inside the tunnel, as the modem does);
//! - `low = max(minimum_per_sim_day_bytes, d + overhead)`;
//! - `high = max(minimum, d + overhead + sessions × (session_rounding_bytes − 1))`, because
//!   rounding each session up to the increment adds between 0 and increment − 1 bytes.
//!   `sessions` comes from the carrier's session records when imported, otherwise the
//!   provider's typical sessions per day (1NCE force-closes sessions at least every 24 h).
//!
//! The tolerance is the larger of an absolute number of bytes and a share of `low` in basis
//! points (1 bp = 0.01 %).
//!
//! # Classes
//!
//! | class             | when                                                          |
//! | ----------------- | ------------------------------------------------------------- |
//! | `matched`         | carrier inside `[low − tolerance, high + tolerance]`, or one side absent and the other 0 |
//! | `device_over`     | carrier below `low − tolerance`                                |
//! | `carrier_over`    | carrier above `high + tolerance`                               |
//! | `missing_device`  | carrier counted bytes, no device report that day               |
//! | `missing_carrier` | device counted bytes, no carrier record that day               |
//!
//! Every result carries the numbers that explain it. SIM-days absent on both sides are not
//! listed: nothing was counted by anyone.

use std::collections::BTreeMap;

use serde::Serialize;
use time::Date;

use crate::carrier::CarrierDay;
use crate::usage::DateRange;

/// Largest tolerance in basis points (100 %).
pub const TOLERANCE_BP_MAX: u32 = 10_000;
/// Largest session rounding increment a provider model may have: 1 MiB.
pub const SESSION_ROUNDING_BYTES_MAX: u64 = 1 << 20;
/// Largest per-packet overhead a provider model may have, bytes.
pub const PACKET_OVERHEAD_BYTES_MAX: u64 = 1024;
/// Most SIM-days one reconciliation may produce.
pub const SIM_DAYS_MAX: usize = 10_000_000;
/// Providers with a built-in model.
pub const PROVIDERS: &[&str] = &["1nce", "exact"];

/// Why a reconciliation could not be made. None is recoverable by retrying.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReconcileError {
    /// The provider has no built-in model.
    #[error("unknown provider '{0}' (known: 1nce, exact)")]
    UnknownProvider(String),
    /// A model or tolerance parameter is out of range; names the parameter.
    #[error("{0}: out of range")]
    OutOfRange(&'static str),
    /// More than [`SIM_DAYS_MAX`] SIM-days.
    #[error("more than {SIM_DAYS_MAX} SIM-days")]
    TooManySimDays,
    /// A figure left 64 bits.
    #[error("arithmetic overflow in {0}")]
    Overflow(&'static str),
    /// The carrier listed the same SIM-day twice.
    #[error("carrier data lists iccid {iccid} on {date} twice")]
    DuplicateCarrierDay {
        /// The SIM.
        iccid: u64,
        /// The day, YYYY-MM-DD.
        date: String,
    },
    /// The CSV writer failed.
    #[error("csv output failed: {0}")]
    Csv(String),
}

/// How a provider's bill relates to what the modem counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProviderModel {
    /// The provider's name.
    pub name: String,
    /// Each session is rounded up to a multiple of this (1 = no rounding).
    pub session_rounding_bytes: u64,
    /// Sessions per SIM-day assumed when the carrier data has no session count.
    pub sessions_per_day: u32,
    /// Bytes per packet the carrier counts beyond what the modem counts.
    pub per_packet_overhead_bytes: u64,
    /// Mean packet size, to estimate packets from bytes.
    pub mean_packet_bytes: u64,
    /// Smallest amount billed for a SIM-day with usage.
    pub minimum_per_sim_day_bytes: u64,
}

impl ProviderModel {
    /// The built-in model for `name`: `1nce` (inside-tunnel counting, so no overhead; each
    /// session rounded up to 1 KB = 1024 B; at least one session a day) or `exact` (no
    /// overhead, no rounding).
    pub fn builtin(name: &str) -> Result<Self, ReconcileError> {
        match name {
            "1nce" => Ok(Self {
                name: name.into(),
                session_rounding_bytes: 1024,
                sessions_per_day: 1,
                per_packet_overhead_bytes: 0,
                mean_packet_bytes: 512,
                minimum_per_sim_day_bytes: 0,
            }),
            "exact" => Ok(Self {
                name: name.into(),
                session_rounding_bytes: 1,
                sessions_per_day: 1,
                per_packet_overhead_bytes: 0,
                mean_packet_bytes: 512,
                minimum_per_sim_day_bytes: 0,
            }),
            other => Err(ReconcileError::UnknownProvider(other.into())),
        }
    }

    fn check(&self) -> Result<(), ReconcileError> {
        if self.session_rounding_bytes == 0 || self.session_rounding_bytes > SESSION_ROUNDING_BYTES_MAX {
            return Err(ReconcileError::OutOfRange("session_rounding_bytes"));
        }
        if self.per_packet_overhead_bytes > PACKET_OVERHEAD_BYTES_MAX {
            return Err(ReconcileError::OutOfRange("per_packet_overhead_bytes"));
        }
        if self.mean_packet_bytes == 0 {
            return Err(ReconcileError::OutOfRange("mean_packet_bytes"));
        }
        Ok(())
    }

    /// The range `[low, high]` the carrier should bill for `device_bytes` over `sessions`.
    pub fn expected(&self, device_bytes: u64, sessions: u32) -> Result<(u64, u64), ReconcileError> {
        let ovf = || ReconcileError::Overflow("expected carrier bytes");
        let packets = device_bytes.div_ceil(self.mean_packet_bytes.max(1));
        let overhead = packets.checked_mul(self.per_packet_overhead_bytes).ok_or_else(ovf)?;
        let low = device_bytes.checked_add(overhead).ok_or_else(ovf)?;
        let slack =
            u64::from(sessions).checked_mul(self.session_rounding_bytes.saturating_sub(1)).ok_or_else(ovf)?;
        let high = low.checked_add(slack).ok_or_else(ovf)?;
        let min = self.minimum_per_sim_day_bytes;
        Ok((low.max(min), high.max(min)))
    }
}

/// Allowed distance from the model: the larger of `bytes` and `basis_points` of the expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Tolerance {
    /// Absolute tolerance, bytes.
    pub bytes: u64,
    /// Relative tolerance, basis points of the expected bytes.
    pub basis_points: u32,
}

impl Tolerance {
    /// The tolerance in bytes around `expected`.
    pub fn bytes_for(&self, expected: u64) -> u64 {
        let relative = u128::from(expected) * u128::from(self.basis_points) / u128::from(TOLERANCE_BP_MAX);
        self.bytes.max(u64::try_from(relative).unwrap_or(u64::MAX))
    }
}

/// The class of one SIM-day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Within the model and tolerance.
    Matched,
    /// The device counted more than the carrier billed.
    DeviceOver,
    /// The carrier billed more than the model allows.
    CarrierOver,
    /// Carrier usage without a device report.
    MissingDevice,
    /// Device usage without a carrier record.
    MissingCarrier,
}

impl Class {
    /// The class's snake_case name.
    pub fn name(self) -> &'static str {
        match self {
            Class::Matched => "matched",
            Class::DeviceOver => "device_over",
            Class::CarrierOver => "carrier_over",
            Class::MissingDevice => "missing_device",
            Class::MissingCarrier => "missing_carrier",
        }
    }
}

/// One classified SIM-day with the numbers that explain it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SimDay {
    /// The SIM, a decimal string in JSON.
    #[serde(serialize_with = "crate::text::json_iccid::serialize")]
    pub iccid: u64,
    /// The day.
    #[serde(serialize_with = "crate::text::json_date::serialize")]
    pub date: Date,
    /// The class.
    pub class: Class,
    /// Bytes the device counted, `null` without a device report.
    pub device_bytes: Option<u64>,
    /// Lower end of what the carrier should bill, `null` without a device report.
    pub expected_low_bytes: Option<u64>,
    /// Upper end of what the carrier should bill.
    pub expected_high_bytes: Option<u64>,
    /// Bytes the carrier counted, `null` without a carrier record.
    pub carrier_bytes: Option<u64>,
    /// Sessions assumed in the model (carrier's count, else the provider's default).
    pub sessions: u32,
    /// `carrier − device`, when both exist.
    pub difference_bytes: Option<i64>,
    /// Signed distance of the carrier figure outside `[low, high]`; 0 inside.
    pub outside_model_bytes: Option<i64>,
    /// The tolerance applied, bytes.
    pub tolerance_bytes: u64,
}

/// Counts per class.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// `matched` SIM-days.
    pub matched: u64,
    /// `device_over` SIM-days.
    pub device_over: u64,
    /// `carrier_over` SIM-days.
    pub carrier_over: u64,
    /// `missing_device` SIM-days.
    pub missing_device: u64,
    /// `missing_carrier` SIM-days.
    pub missing_carrier: u64,
}

/// A reconciliation: the model and tolerance used, every SIM-day, and the counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Reconciliation {
    /// The provider model.
    pub provider: ProviderModel,
    /// The tolerance.
    pub tolerance: Tolerance,
    /// How carrier MB strings became bytes.
    pub carrier_mb_rounding: &'static str,
    /// SIM-days by ICCID then date.
    pub sim_days: Vec<SimDay>,
    /// Counts per class.
    pub summary: Summary,
    /// What could not be reconciled, and why (not counted in `summary`).
    pub unreconciled: Vec<Unreconciled>,
}

/// A SIM or SIM-day left out of a reconciliation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Unreconciled {
    /// The SIM.
    #[serde(serialize_with = "crate::text::json_iccid::serialize")]
    pub iccid: u64,
    /// The day; `null` for the whole SIM.
    #[serde(serialize_with = "crate::text::json_opt_date::serialize")]
    pub date: Option<Date>,
    /// Why.
    pub reason: String,
}

fn signed(a: u64, b: u64) -> Result<i64, ReconcileError> {
    i64::try_from(i128::from(a) - i128::from(b)).map_err(|_| ReconcileError::Overflow("difference"))
}

/// Classifies every SIM-day in `range` present on either side.
pub fn reconcile(
    device: &BTreeMap<(u64, Date), u64>,
    carrier: &[CarrierDay],
    model: &ProviderModel,
    tolerance: Tolerance,
    range: DateRange,
) -> Result<Reconciliation, ReconcileError> {
    model.check()?;
    if tolerance.basis_points > TOLERANCE_BP_MAX {
        return Err(ReconcileError::OutOfRange("tolerance basis_points"));
    }
    let mut carrier_by_day = BTreeMap::<(u64, Date), &CarrierDay>::new();
    for c in carrier.iter().filter(|c| range.contains(c.date)) {
        if carrier_by_day.insert((c.iccid, c.date), c).is_some() {
            return Err(ReconcileError::DuplicateCarrierDay {
                iccid: c.iccid,
                date: crate::text::format_date(c.date),
            });
        }
    }
    let mut keys: Vec<(u64, Date)> = device.keys().filter(|(_, d)| range.contains(*d)).copied().collect();
    keys.extend(carrier_by_day.keys().copied());
    keys.sort_unstable();
    keys.dedup();
    if keys.len() > SIM_DAYS_MAX {
        return Err(ReconcileError::TooManySimDays);
    }
    let mut summary = Summary::default();
    let mut sim_days = Vec::with_capacity(keys.len());
    let one_day = |key: (u64, Date)| -> Result<SimDay, ReconcileError> {
        let dev = device.get(&key).copied();
        let car = carrier_by_day.get(&key).copied();
        let sessions = car.and_then(|c| c.sessions).unwrap_or(model.sessions_per_day);
        let carrier_bytes = car.map(|c| c.total_bytes);
        let (mut low, mut high, mut tol) = (None, None, tolerance.bytes);
        let mut outside = None;
        let class = match (dev, carrier_bytes) {
            (Some(d), Some(c)) => {
                let (l, h) = model.expected(d, sessions)?;
                let t = tolerance.bytes_for(l);
                (low, high, tol) = (Some(l), Some(h), t);
                let out = if c < l {
                    signed(c, l)?
                } else if c > h {
                    signed(c, h)?
                } else {
                    0
                };
                outside = Some(out);
                if out.unsigned_abs() <= t {
                    Class::Matched
                } else if out < 0 {
                    Class::DeviceOver
                } else {
                    Class::CarrierOver
                }
            }
            (Some(d), None) => {
                let (l, h) = model.expected(d, sessions)?;
                (low, high) = (Some(l), Some(h));
                if d == 0 {
                    Class::Matched
                } else {
                    Class::MissingCarrier
                }
            }
            (None, Some(0)) => Class::Matched,
            (None, _) => Class::MissingDevice,
        };
        let difference_bytes = match (dev, carrier_bytes) {
            (Some(d), Some(c)) => Some(signed(c, d)?),
            _ => None,
        };
        Ok(SimDay {
            iccid: key.0,
            date: key.1,
            class,
            device_bytes: dev,
            expected_low_bytes: low,
            expected_high_bytes: high,
            carrier_bytes,
            sessions,
            difference_bytes,
            outside_model_bytes: outside,
            tolerance_bytes: tol,
        })
    };
    let mut unreconciled = Vec::new();
    for key in keys {
        match one_day(key) {
            Ok(day) => {
                let counter = match day.class {
                    Class::Matched => &mut summary.matched,
                    Class::DeviceOver => &mut summary.device_over,
                    Class::CarrierOver => &mut summary.carrier_over,
                    Class::MissingDevice => &mut summary.missing_device,
                    Class::MissingCarrier => &mut summary.missing_carrier,
                };
                *counter += 1;
                sim_days.push(day);
            }
            // Figures too large for the model's arithmetic: this SIM-day alone is listed as
            // not reconciled, the others are.
            Err(e @ ReconcileError::Overflow(_)) => {
                tracing::warn!(iccid = key.0, date = %key.1, error = %e, "sim-day not reconciled");
                unreconciled.push(Unreconciled { iccid: key.0, date: Some(key.1), reason: e.to_string() });
            }
            Err(e) => return Err(e),
        }
    }
    tracing::info!(?summary, provider = %model.name, "reconciled");
    Ok(Reconciliation {
        provider: model.clone(),
        tolerance,
        carrier_mb_rounding: crate::carrier::MB_ROUNDING,
        sim_days,
        summary,
        unreconciled,
    })
}

/// SIMs (or SIM-days) a reconciliation could not classify: the device side cannot derive
/// the SIM's usage (see `/v1/admin/faults`), or its figures overflow the model's arithmetic.
pub fn mark_underivable(r: &mut Reconciliation, iccid: u64, reason: String) {
    for d in r.sim_days.iter().filter(|d| d.iccid == iccid) {
        let counter = match d.class {
            Class::Matched => &mut r.summary.matched,
            Class::DeviceOver => &mut r.summary.device_over,
            Class::CarrierOver => &mut r.summary.carrier_over,
            Class::MissingDevice => &mut r.summary.missing_device,
            Class::MissingCarrier => &mut r.summary.missing_carrier,
        };
        *counter = counter.saturating_sub(1);
    }
    r.sim_days.retain(|d| d.iccid != iccid);
    r.unreconciled.push(Unreconciled { iccid, date: None, reason });
}

/// The SIM-days as CSV, one row each, with a header; empty cells for absent figures.
pub fn to_csv(r: &Reconciliation) -> Result<String, ReconcileError> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let csv_err = |e: csv::Error| ReconcileError::Csv(e.to_string());
    w.write_record([
        "iccid",
        "date",
        "class",
        "device_bytes",
        "expected_low_bytes",
        "expected_high_bytes",
        "carrier_bytes",
        "sessions",
        "difference_bytes",
        "outside_model_bytes",
        "tolerance_bytes",
    ])
    .map_err(csv_err)?;
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    let opt_i = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_default();
    for d in &r.sim_days {
        w.write_record([
            d.iccid.to_string(),
            crate::text::format_date(d.date),
            d.class.name().to_owned(),
            opt(d.device_bytes),
            opt(d.expected_low_bytes),
            opt(d.expected_high_bytes),
            opt(d.carrier_bytes),
            d.sessions.to_string(),
            opt_i(d.difference_bytes),
            opt_i(d.outside_model_bytes),
            d.tolerance_bytes.to_string(),
        ])
        .map_err(csv_err)?;
    }
    let bytes = w.into_inner().map_err(|e| ReconcileError::Csv(e.to_string()))?;
    String::from_utf8(bytes).map_err(|e| ReconcileError::Csv(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::carrier::parse_1nce_daily_json;
    use proptest::prelude::*;
    use time::macros::date;

    const A: u64 = 8_988_280_666_000_000_001;
    const B: u64 = 8_988_280_666_000_000_002;

    fn cday(iccid: u64, date: Date, total: u64) -> CarrierDay {
        CarrierDay { iccid, date, rx_bytes: None, tx_bytes: None, total_bytes: total, sessions: None }
    }

    #[test]
    fn every_class_with_its_numbers_golden() {
        let d1 = date!(2026 - 11 - 01);
        let d2 = date!(2026 - 11 - 02);
        let d3 = date!(2026 - 11 - 03);
        let device: BTreeMap<(u64, Date), u64> =
            [((A, d1), 16_000), ((A, d2), 100_000), ((A, d3), 50_000), ((B, d1), 0), ((B, d2), 9_000)].into();
        let mut carrier = parse_1nce_daily_json(
            A,
            r#"{"stats":[{"date":"2026-11-01","data":{"volume":"0.015482"}},
                         {"date":"2026-11-02","data":{"volume":"0.080000"}},
                         {"date":"2026-11-03","data":{"volume":"0.060000"}}]}"#,
        )
        .unwrap();
        carrier.push(cday(B, d3, 2048));
        let model = ProviderModel::builtin("1nce").unwrap();
        let tol = Tolerance { bytes: 1024, basis_points: 100 };
        let r = reconcile(&device, &carrier, &model, tol, DateRange::default()).unwrap();
        let classes: Vec<&str> = r.sim_days.iter().map(|d| d.class.name()).collect();
        assert_eq!(
            classes,
            ["matched", "device_over", "carrier_over", "matched", "missing_carrier", "missing_device"]
        );
        assert_eq!(
            r.summary,
            Summary { matched: 2, device_over: 1, carrier_over: 1, missing_device: 1, missing_carrier: 1 }
        );
        assert_eq!(
            to_csv(&r).unwrap(),
            "iccid,date,class,device_bytes,expected_low_bytes,expected_high_bytes,carrier_bytes,sessions,difference_bytes,outside_model_bytes,tolerance_bytes\n\
             8988280666000000001,2026-11-01,matched,16000,16000,17023,16234,1,234,0,1024\n\
             8988280666000000001,2026-11-02,device_over,100000,100000,101023,83886,1,-16114,-16114,1024\n\
             8988280666000000001,2026-11-03,carrier_over,50000,50000,51023,62915,1,12915,11892,1024\n\
             8988280666000000002,2026-11-01,matched,0,0,1023,,1,,,1024\n\
             8988280666000000002,2026-11-02,missing_carrier,9000,9000,10023,,1,,,1024\n\
             8988280666000000002,2026-11-03,missing_device,,,,2048,1,,,1024\n"
        );
        let json = serde_json::to_string(&r.sim_days[1]).unwrap();
        assert_eq!(
            json,
            r#"{"iccid":"8988280666000000001","date":"2026-11-02","class":"device_over","device_bytes":100000,"expected_low_bytes":100000,"expected_high_bytes":101023,"carrier_bytes":83886,"sessions":1,"difference_bytes":-16114,"outside_model_bytes":-16114,"tolerance_bytes":1024}"#
        );
        // A range narrows both sides.
        let one = DateRange { from: Some(d3), to: Some(d3) };
        assert_eq!(reconcile(&device, &carrier, &model, tol, one).unwrap().sim_days.len(), 2);
    }

    #[test]
    fn one_sim_day_beyond_the_arithmetic_leaves_the_others_reconciled() {
        let model = ProviderModel::builtin("1nce").unwrap();
        let tol = Tolerance { bytes: 1024, basis_points: 0 };
        let d = date!(2026 - 11 - 01);
        let device = [((A, d), u64::MAX), ((B, d), 16_000)].into();
        let carrier = [cday(A, d, 1), cday(B, d, 16_234)];
        let mut r = reconcile(&device, &carrier, &model, tol, DateRange::default()).unwrap();
        assert_eq!(r.sim_days.len(), 1);
        assert_eq!((r.sim_days[0].iccid, r.sim_days[0].class), (B, Class::Matched));
        assert_eq!(r.unreconciled.len(), 1);
        assert_eq!((r.unreconciled[0].iccid, r.unreconciled[0].date), (A, Some(d)));
        assert_eq!(r.summary.matched, 1);
        mark_underivable(&mut r, B, "faulty".into());
        assert!(r.sim_days.is_empty());
        assert_eq!(r.summary, Summary::default());
        assert_eq!(r.unreconciled[1], Unreconciled { iccid: B, date: None, reason: "faulty".into() });
    }

    #[test]
    fn overhead_minimum_sessions_and_percent_tolerance() {
        let m = ProviderModel {
            name: "outer-headers".into(),
            session_rounding_bytes: 1024,
            sessions_per_day: 1,
            per_packet_overhead_bytes: 52,
            mean_packet_bytes: 100,
            minimum_per_sim_day_bytes: 102_400,
        };
        // 1000 bytes in ⌈1000/100⌉ = 10 packets: +520, then the 100 KB minimum.
        assert_eq!(m.expected(1000, 1), Ok((102_400, 102_400)));
        assert_eq!(m.expected(1_000_000, 3), Ok((1_520_000, 1_520_000 + 3 * 1023)));
        let t = Tolerance { bytes: 10, basis_points: 50 };
        assert_eq!(t.bytes_for(1_000_000), 5_000);
        assert_eq!(t.bytes_for(100), 10);
        let mut sessions = cday(A, date!(2026 - 11 - 01), 1_523_069);
        sessions.sessions = Some(3);
        let device = [((A, date!(2026 - 11 - 01)), 1_000_000)].into();
        let r = reconcile(&device, &[sessions], &m, t, DateRange::default()).unwrap();
        assert_eq!((r.sim_days[0].class, r.sim_days[0].outside_model_bytes), (Class::Matched, Some(0)));
        assert!(matches!(ProviderModel::builtin("acme"), Err(ReconcileError::UnknownProvider(_))));
        let dup = [cday(A, date!(2026 - 11 - 01), 1), cday(A, date!(2026 - 11 - 01), 2)];
        assert!(matches!(
            reconcile(&device, &dup, &m, t, DateRange::default()),
            Err(ReconcileError::DuplicateCarrierDay { .. })
        ));
    }

    proptest! {
        /// The model: a carrier figure the model could produce is always matched; one beyond
        /// the tolerance never is, and its sign decides the class.
        #[test]
        fn classification_follows_the_model(
            device in 0u64..1 << 40, sessions in 1u32..50, rounding_each in proptest::collection::vec(0u64..1024, 50),
            tol_bytes in 0u64..10_000, bp in 0u32..500, shift in 1u64..1 << 20, up: bool,
        ) {
            let model = ProviderModel::builtin("1nce").unwrap();
            let tol = Tolerance { bytes: tol_bytes, basis_points: bp };
            // A carrier that rounds each session up by some amount below the increment.
            let carrier = device + rounding_each.iter().take(sessions as usize).sum::<u64>();
            let mut day = cday(A, date!(2026 - 11 - 01), carrier);
            day.sessions = Some(sessions);
            let dev = [((A, date!(2026 - 11 - 01)), device)].into();
            let r = reconcile(&dev, &[day], &model, tol, DateRange::default()).unwrap();
            prop_assert_eq!(r.sim_days[0].class, Class::Matched);
            let (low, high) = model.expected(device, sessions).unwrap();
            let t = tol.bytes_for(low);
            let off = if up { high + t + shift } else { low.saturating_sub(t + shift) };
            day.total_bytes = off;
            let r = reconcile(&dev, &[day], &model, tol, DateRange::default()).unwrap();
            let expected = if up { Class::CarrierOver } else if low > t { Class::DeviceOver } else { Class::Matched };
            if up || low >= t + shift { prop_assert_eq!(r.sim_days[0].class, expected); }
        }
    }
}
