//! Carrier usage import: 1NCE-style daily JSON, daily CSV and session-record CSV → bytes per
//! SIM and day. Pure: text in, figures out.
//!
//! # Volumes
//!
//! Carriers state volumes as **MB decimal strings with 1 MB = 1024 KB = 1 048 576 bytes**
//! (1NCE: `"0.015482"`). They are parsed exactly as decimals — never through a float — and
//! converted to bytes by `digits × 1 048 576 / 10^fraction_digits`, rounded **half up to the
//! byte** ([`MB_ROUNDING`]). Six fraction digits of an MB are 1.05 bytes, so the carrier's own
//! figure carries ±0.5 byte of uncertainty per value before ours.
//!
//! # Directions
//!
//! `volume_rx` is traffic **to** the SIM (the device's downlink), `volume_tx` traffic **from**
//! it (uplink). `volume` is the carrier's total and is what reconciliation compares; when it is
//! absent it is `volume_rx + volume_tx`.
//!
//! # Formats
//!
//! - 1NCE daily JSON, one file per ICCID (the ICCID is in the API path, not the body), as
//!   1NCE publishes it ([`parse_1nce_daily_json`]):
//!   `{"stats":[{"date":"2021-06-30T00:00:00.000Z","data":{"volume":"0.002803","volume_tx":"0.001321","volume_rx":"0.001482",…},"sms":{…}}]}`.
//!   `sms` and unknown keys are ignored; a day without `data` counts zero bytes.
//! - 1NCE Data Streamer usage records ([`parse_1nce_streamer_usage`]): `start_timestamp`,
//!   `end_timestamp`, `sim.iccid`, `traffic_type`, `volume: {total, rx, tx}` (MB numbers),
//!   summed per SIM and day of `end_timestamp`, SMS records and retransmitted ids skipped.
//! - Daily CSV with a header naming the columns, in any order: `iccid`, `date`, and `volume`
//!   and/or `volume_rx` + `volume_tx` (MB strings). Other columns are ignored.
//! - Session CSV: `iccid`, `start`, `end` (RFC 3339), `volume_rx`, `volume_tx`, optional
//!   `volume_total` (MB strings). A session is attributed to the day of its **end** in the
//!   chosen time zone — the carrier's record is written when a session (or its interim
//!   slice) closes, just as a device report counts bytes when it is made — and the day keeps
//!   the number of sessions, which the rounding model needs.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use time::Date;

use crate::text::{iccid_from_text, parse_date};

/// Bytes in the carriers' MB: 1 MB = 1024 KB = 1024 × 1024 bytes.
pub const MB_BYTES: u64 = 1024 * 1024;
/// Fraction digits accepted in an MB string (1NCE sends 6).
pub const MB_FRACTION_DIGITS_MAX: usize = 12;
/// Integer digits accepted in an MB string (10⁹ MB per value is far beyond a SIM-day).
pub const MB_INTEGER_DIGITS_MAX: usize = 9;
/// Largest carrier file accepted, bytes.
pub const CARRIER_FILE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Most rows (days or sessions) one carrier file may hold.
pub const CARRIER_ROWS_MAX: usize = 1_000_000;
/// How MB strings become bytes, as stated in reports.
pub const MB_ROUNDING: &str = "half_up_to_1_byte";

/// Why a carrier file was refused. None is recoverable by retrying: the file must change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CarrierError {
    /// The file is larger than [`CARRIER_FILE_BYTES_MAX`] or has more than [`CARRIER_ROWS_MAX`] rows.
    #[error("carrier file exceeds {0}")]
    TooLarge(&'static str),
    /// The file is not the expected JSON or CSV shape.
    #[error("carrier file is malformed: {0}")]
    Malformed(String),
    /// A field of one row is wrong; `row` counts from 1 (data rows; JSON: position in `stats`).
    #[error("row {row}, {field}: {reason}")]
    Field {
        /// The row.
        row: usize,
        /// The field's name.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// One SIM-day as the carrier counted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CarrierDay {
    /// The SIM.
    pub iccid: u64,
    /// The day.
    pub date: Date,
    /// Bytes to the SIM (`volume_rx`), `None` when the carrier did not split directions.
    pub rx_bytes: Option<u64>,
    /// Bytes from the SIM (`volume_tx`).
    pub tx_bytes: Option<u64>,
    /// The carrier's total (`volume`, else rx + tx).
    pub total_bytes: u64,
    /// Data sessions ending that day, when imported from session records.
    pub sessions: Option<u32>,
}

/// Parses an MB decimal string into bytes exactly, rounding half up to the byte.
pub fn parse_mb(text: &str) -> Result<u64, String> {
    let bad = || {
        format!("'{text}' is not an MB decimal (digits, optional '.' and up to {MB_FRACTION_DIGITS_MAX} fraction digits)")
    };
    let (int, frac) = text.split_once('.').unwrap_or((text, ""));
    if int.is_empty()
        || int.len() > MB_INTEGER_DIGITS_MAX
        || frac.len() > MB_FRACTION_DIGITS_MAX
        || (text.contains('.') && frac.is_empty())
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    // ≤ 21 digits fit u128 comfortably; × 2^20 stays below 2^91.
    let mut digits: u128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        digits = digits * 10 + u128::from(b - b'0');
    }
    let den = 10u128.pow(u32::try_from(frac.len()).map_err(|_| bad())?);
    let num = digits * u128::from(MB_BYTES);
    let bytes = num / den + u128::from(2 * (num % den) >= den);
    u64::try_from(bytes).map_err(|_| bad())
}

fn field<T>(row: usize, name: &'static str, r: Result<T, String>) -> Result<T, CarrierError> {
    r.map_err(|reason| CarrierError::Field { row, field: name, reason })
}

fn date_field(row: usize, text: &str) -> Result<Date, CarrierError> {
    field(row, "date", parse_date(text).ok_or_else(|| format!("'{text}' is not YYYY-MM-DD")))
}

fn total_of(
    row: usize,
    name: &'static str,
    volume: Option<&str>,
    rx: Option<u64>,
    tx: Option<u64>,
) -> Result<u64, CarrierError> {
    match (volume, rx, tx) {
        (Some(v), _, _) => field(row, name, parse_mb(v)),
        (None, Some(r), Some(t)) => {
            field(row, name, r.checked_add(t).ok_or_else(|| "rx + tx overflows".to_owned()))
        }
        _ => Err(CarrierError::Field {
            row,
            field: name,
            reason: "missing, and volume_rx + volume_tx are not both given".into(),
        }),
    }
}

fn opt_mb(row: usize, name: &'static str, v: Option<&str>) -> Result<Option<u64>, CarrierError> {
    v.filter(|s| !s.is_empty()).map(|s| field(row, name, parse_mb(s))).transpose()
}

/// The date of a 1NCE `Daily` row: the published schema gives an ISO datetime at UTC midnight
/// (`2021-06-30T00:00:00.000Z`); a bare `YYYY-MM-DD` is accepted too. A time that is not a
/// UTC day boundary is refused: the row would not be one UTC day.
fn once_date(row: usize, text: &str) -> Result<Date, CarrierError> {
    if let Some(d) = parse_date(text) {
        return Ok(d);
    }
    let at = text.parse::<Timestamp>().map_err(|_| CarrierError::Field {
        row,
        field: "date",
        reason: format!("'{text}' is neither an ISO 8601 datetime with offset nor YYYY-MM-DD"),
    })?;
    let civil = at.to_zoned(TimeZone::UTC).datetime();
    if civil.time() != jiff::civil::Time::midnight() {
        return Err(CarrierError::Field {
            row,
            field: "date",
            reason: format!("'{text}' is not at a UTC day boundary (00:00:00Z): not one UTC day"),
        });
    }
    let d = civil.date();
    let month = time::Month::try_from(u8::try_from(d.month()).unwrap_or(0));
    month
        .ok()
        .and_then(|m| Date::from_calendar_date(i32::from(d.year()), m, u8::try_from(d.day()).ok()?).ok())
        .ok_or_else(|| CarrierError::Field {
            row,
            field: "date",
            reason: format!("'{text}' is out of range"),
        })
}

/// A string member of a JSON object; absent and `null` are `None`, any other type an error.
pub(crate) fn json_str<'a>(
    row: usize,
    obj: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
    field_name: &'static str,
) -> Result<Option<&'a str>, CarrierError> {
    match obj.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(CarrierError::Field {
            row,
            field: field_name,
            reason: format!("expected a string, got {}", json_kind(other)),
        }),
    }
}

pub(crate) fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The `date` of a summary row that sums the other rows. 1NCE's published schema does not
/// name it; Countersign issue 14 reports that client libraries skip such a row, so it is
/// skipped here too rather than refused (no published source was found for it).
pub const ONCE_TOTAL_ROW_DATE: &str = "TOTAL";
/// The only data unit 1NCE's `TrafficTypeData.unit` documents.
pub const ONCE_DATA_UNIT: &str = "MB";

/// Parses one SIM's 1NCE daily usage answer, Management API v1 `GET /v1/sims/{iccid}/usage`
/// (schema `DailyUsage` → `stats: [Daily]`, `Daily` = `date`, `data` (`Data`), `sms`).
///
/// Source: 1NCE's published OpenAPI "SIM Management" (openapi 3.0.1, info.version v2.0), as
/// 1NCE ships it in github.com/1NCE-GmbH/1nce-mcp-server, `sim.json`, commit
/// 593e74a5ca8aad6a2f3b18db5372dc79a970e607; the same schemas in 1NCE's "SIM Usage API" file
/// mirrored at github.com/api-evangelist/1nce `openapi/1nce-sim-usage-api-openapi.yml`
/// (commit 2133124f1600268fea30f83dcead08382a900e5a); fixtures: `tests/fixtures/1nce/`.
/// What it says and what is done here:
///
/// - `date`: a string, example `2021-06-30T00:00:00.000Z` — a datetime at UTC midnight is that
///   UTC day; `YYYY-MM-DD` is accepted too; any other time of day is refused (row, `date`).
///   A row whose `date` is `TOTAL` (a summary row, see [`ONCE_TOTAL_ROW_DATE`]) is skipped.
/// - `data.volume`, `data.volume_rx`, `data.volume_tx`: strings, "data volume in MB"
///   (`traffic_type.unit` example `"MB"`), RX received by the SIM, TX sent by it; parsed by
///   [`parse_mb`]. A `traffic_type.unit` other than `MB` is refused rather than misread.
/// - `data.cost`, `data.currency`, `data.traffic_type` (id, description) carry no volume and
///   are ignored, as are `sms` (message counts, not bytes), members the schema does not name
///   and a `data` that is absent or `null` (zero bytes that day).
///
/// Every refusal names the row (its position in `stats`, from 1) and the field; the caller
/// names the file.
pub fn parse_1nce_daily_json(iccid: u64, text: &str) -> Result<Vec<CarrierDay>, CarrierError> {
    if text.len() > CARRIER_FILE_BYTES_MAX {
        return Err(CarrierError::TooLarge("the file size limit"));
    }
    let doc: serde_json::Value =
        serde_json::from_str(text).map_err(|e| CarrierError::Malformed(e.to_string()))?;
    let stats =
        doc.as_object().and_then(|o| o.get("stats")).and_then(serde_json::Value::as_array).ok_or_else(
            || CarrierError::Malformed("expected an object with a 'stats' array (DailyUsage)".into()),
        )?;
    if stats.len() > CARRIER_ROWS_MAX {
        return Err(CarrierError::TooLarge("the row limit"));
    }
    let mut out = Vec::with_capacity(stats.len());
    for (i, s) in stats.iter().enumerate() {
        let row = i + 1;
        let s = s.as_object().ok_or_else(|| CarrierError::Field {
            row,
            field: "stats",
            reason: format!("expected a Daily object, got {}", json_kind(s)),
        })?;
        let date_text = json_str(row, s, "date", "date")?.ok_or_else(|| CarrierError::Field {
            row,
            field: "date",
            reason: "missing".into(),
        })?;
        if date_text == ONCE_TOTAL_ROW_DATE {
            continue;
        }
        let date = once_date(row, date_text)?;
        let (rx, tx, total) = match s.get("data") {
            None | Some(serde_json::Value::Null) => (None, None, 0),
            Some(serde_json::Value::Object(d)) => {
                let unit = match d.get("traffic_type") {
                    None | Some(serde_json::Value::Null) => None,
                    Some(serde_json::Value::Object(t)) => json_str(row, t, "unit", "data.traffic_type.unit")?,
                    Some(other) => {
                        return Err(CarrierError::Field {
                            row,
                            field: "data.traffic_type",
                            reason: format!("expected an object, got {}", json_kind(other)),
                        })
                    }
                };
                if let Some(u) = unit.filter(|u| *u != ONCE_DATA_UNIT) {
                    return Err(CarrierError::Field {
                        row,
                        field: "data.traffic_type.unit",
                        reason: format!("'{u}': only {ONCE_DATA_UNIT} is documented for data"),
                    });
                }
                let rx = opt_mb(row, "data.volume_rx", json_str(row, d, "volume_rx", "data.volume_rx")?)?;
                let tx = opt_mb(row, "data.volume_tx", json_str(row, d, "volume_tx", "data.volume_tx")?)?;
                let volume = json_str(row, d, "volume", "data.volume")?.filter(|v| !v.is_empty());
                (rx, tx, total_of(row, "data.volume", volume, rx, tx)?)
            }
            Some(other) => {
                return Err(CarrierError::Field {
                    row,
                    field: "data",
                    reason: format!("expected a Data object, got {}", json_kind(other)),
                })
            }
        };
        out.push(CarrierDay { iccid, date, rx_bytes: rx, tx_bytes: tx, total_bytes: total, sessions: None });
    }
    Ok(out)
}

/// The Data Streamer's traffic type id for data (its `traffic_type.id`: 5 = Data, 6 = SMS).
pub const ONCE_STREAMER_DATA: u64 = 5;
/// The Data Streamer's traffic type id for SMS.
pub const ONCE_STREAMER_SMS: u64 = 6;
/// Fraction digits of the Data Streamer's volumes (documented as DECIMAL(14,6)).
pub const ONCE_STREAMER_FRACTION_DIGITS: usize = 6;

/// An MB volume of a Data Streamer record: a JSON number of at most
/// [`ONCE_STREAMER_FRACTION_DIGITS`] fraction digits (DECIMAL(14,6), at most 8 integer digits,
/// so a double holds it exactly enough to print it back digit for digit), or a decimal string.
fn streamer_mb(row: usize, name: &'static str, v: &serde_json::Value) -> Result<u64, CarrierError> {
    let bad = |reason: String| CarrierError::Field { row, field: name, reason };
    match v {
        serde_json::Value::String(s) => field(row, name, parse_mb(s)),
        serde_json::Value::Number(n) => {
            let x = n.as_f64().filter(|x| x.is_finite() && *x >= 0.0 && *x < 1e8).ok_or_else(|| {
                bad(format!("{n} is not a DECIMAL(14,6) volume (0 up to 10^8 MB, 6 fraction digits)"))
            })?;
            let text = format!("{x:.prec$}", prec = ONCE_STREAMER_FRACTION_DIGITS);
            // The decimal printed must be the number given: else it had more fraction digits.
            if text.parse::<f64>().ok() != Some(x) {
                return Err(bad(format!(
                    "{n} has more than {ONCE_STREAMER_FRACTION_DIGITS} fraction digits"
                )));
            }
            field(row, name, parse_mb(&text))
        }
        other => Err(bad(format!("expected a number, got {}", json_kind(other)))),
    }
}

/// Parses 1NCE Data Streamer usage records and sums the data records per SIM and day of
/// their `end_timestamp` in `tz`.
///
/// Source: 1NCE's documentation "Usage Records" of the Data Streamer,
/// <https://help.1nce.com/docs/platform-services/platform-services-data-streamer/data-streamer-usage-records>
/// (examples `05_Data_Usage_Record`, `06_SMS_Usage_Record`, tables "Usage Data Properties",
/// "Traffic Type Object", "Volume Object"); fixtures in `tests/fixtures/1nce/`. What it says
/// and what is done here:
///
/// - A stream delivers JSON objects, a REST message "an array of one or more objects": the
///   file is such an array, one object, or one object per line (a log of messages).
/// - `id`: 64-bit, unique per record; "duplicate received event IDs indicate possible
///   retransmissions" — a repeated id with the same content is skipped, with other content
///   refused.
/// - `start_timestamp`, `end_timestamp`: ISO 8601 UTC. A record is attributed to the day of
///   its end in `tz`, like the session CSV. Both must parse; their order is not checked (the
///   published data example itself ends before it starts).
/// - `traffic_type.id`: 5 = Data, 6 = SMS (SMS records count messages, not bytes: skipped);
///   any other type is refused.
/// - `volume.total`, `volume.rx`, `volume.tx`: DECIMAL(14,6), data in MB, `total` = `tx` +
///   `rx`, `tx` upstream sent by the endpoint, `rx` downstream received; parsed exactly as
///   [`parse_mb`] does.
/// - `sim.iccid`: a string, 19 digits or 20 with the Luhn digit
///   ([`crate::text::iccid_from_text`]).
/// - A record is one slice of a data session (one at most every 15 minutes while more than
///   100 kB flows, one at its close), not a session: `sessions` stays `None` and
///   reconciliation uses the provider's sessions per day.
///
/// Every refusal names the row (position in the array or line, from 1) and the field.
pub fn parse_1nce_streamer_usage(text: &str, tz: &TimeZone) -> Result<Vec<CarrierDay>, CarrierError> {
    if text.len() > CARRIER_FILE_BYTES_MAX {
        return Err(CarrierError::TooLarge("the file size limit"));
    }
    if text.trim().is_empty() {
        return Err(CarrierError::Malformed("empty: no usage record".into()));
    }
    let records: Vec<(usize, serde_json::Value)> = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Array(a)) => a.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect(),
        Ok(v @ serde_json::Value::Object(_)) => vec![(1, v)],
        Ok(other) => {
            return Err(CarrierError::Malformed(format!("expected usage records, got {}", json_kind(&other))))
        }
        Err(_) => {
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let v = serde_json::from_str(line)
                    .map_err(|e| CarrierError::Malformed(format!("line {}: {e}", i + 1)))?;
                out.push((i + 1, v));
            }
            out
        }
    };
    if records.len() > CARRIER_ROWS_MAX {
        return Err(CarrierError::TooLarge("the row limit"));
    }
    let mut seen = BTreeMap::<u64, (u64, Timestamp, u64)>::new();
    let mut days = BTreeMap::<(u64, Date), CarrierDay>::new();
    for (row, rec) in &records {
        let row = *row;
        let err = |field: &'static str, reason: String| CarrierError::Field { row, field, reason };
        let r = rec
            .as_object()
            .ok_or_else(|| err("record", format!("expected an object, got {}", json_kind(rec))))?;
        let id = match r.get("id") {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().ok_or_else(|| err("id", format!("{n} is not a 64-bit id")))?
            }
            Some(other) => return Err(err("id", format!("expected a number, got {}", json_kind(other)))),
            None => return Err(err("id", "missing".into())),
        };
        let kind = r
            .get("traffic_type")
            .and_then(serde_json::Value::as_object)
            .and_then(|t| t.get("id"))
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| err("traffic_type.id", "missing or not a number".into()))?;
        match kind {
            ONCE_STREAMER_DATA => {}
            ONCE_STREAMER_SMS => continue,
            other => {
                return Err(err(
                    "traffic_type.id",
                    format!("{other}: only 5 (Data) and 6 (SMS) are documented"),
                ))
            }
        }
        let ts = |name: &'static str| -> Result<Timestamp, CarrierError> {
            let s = json_str(row, r, name, name)?.ok_or_else(|| err(name, "missing".into()))?;
            s.parse::<Timestamp>()
                .map_err(|e| err(name, format!("'{s}' is not an ISO 8601 time with offset: {e}")))
        };
        let (_start, end) = (ts("start_timestamp")?, ts("end_timestamp")?);
        let sim = r
            .get("sim")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| err("sim", "missing or not an object".into()))?;
        let iccid_text =
            json_str(row, sim, "iccid", "sim.iccid")?.ok_or_else(|| err("sim.iccid", "missing".into()))?;
        let iccid = iccid_from_text(iccid_text).map_err(|e| err("sim.iccid", e.to_string()))?;
        let volume = r
            .get("volume")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| err("volume", "missing or not an object".into()))?;
        let part = |key: &str, name: &'static str| -> Result<Option<u64>, CarrierError> {
            volume.get(key).filter(|v| !v.is_null()).map(|v| streamer_mb(row, name, v)).transpose()
        };
        let rx = part("rx", "volume.rx")?;
        let tx = part("tx", "volume.tx")?;
        let total = match part("total", "volume.total")? {
            Some(t) => t,
            None => rx.zip(tx).and_then(|(a, b)| a.checked_add(b)).ok_or_else(|| {
                err("volume.total", "missing, and volume.rx + volume.tx are not both given".into())
            })?,
        };
        match seen.get(&id) {
            Some(&prev) if prev == (iccid, end, total) => continue,
            Some(_) => return Err(err("id", format!("{id} was given before with other content"))),
            None => {
                seen.insert(id, (iccid, end, total));
            }
        }
        let date =
            crate::usage::zone_date(end, tz).ok_or_else(|| err("end_timestamp", "out of range".into()))?;
        let d = days.entry((iccid, date)).or_insert(CarrierDay {
            iccid,
            date,
            rx_bytes: Some(0),
            tx_bytes: Some(0),
            total_bytes: 0,
            sessions: None,
        });
        let add = |a: Option<u64>, b: Option<u64>| a.zip(b).and_then(|(a, b)| a.checked_add(b));
        d.rx_bytes = add(d.rx_bytes, rx);
        d.tx_bytes = add(d.tx_bytes, tx);
        d.total_bytes = d
            .total_bytes
            .checked_add(total)
            .ok_or_else(|| err("volume.total", "day total overflows".into()))?;
    }
    Ok(days.into_values().collect())
}

/// Column name → index, from the header row.
type Columns = BTreeMap<String, usize>;

fn csv_reader(text: &str) -> Result<(csv::Reader<&[u8]>, Columns), CarrierError> {
    if text.len() > CARRIER_FILE_BYTES_MAX {
        return Err(CarrierError::TooLarge("the file size limit"));
    }
    let mut reader = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(text.as_bytes());
    let headers = reader.headers().map_err(|e| CarrierError::Malformed(e.to_string()))?;
    let columns = headers.iter().enumerate().map(|(i, h)| (h.to_ascii_lowercase(), i)).collect();
    Ok((reader, columns))
}

fn require(columns: &BTreeMap<String, usize>, name: &'static str) -> Result<usize, CarrierError> {
    columns.get(name).copied().ok_or_else(|| CarrierError::Malformed(format!("no '{name}' column")))
}

/// An ICCID column: 19 digits, or 20 with the Luhn check digit (checked, then dropped; see
/// [`crate::text::iccid_from_text`]).
fn iccid_field(row: usize, text: &str) -> Result<u64, CarrierError> {
    field(row, "iccid", iccid_from_text(text).map_err(|e| e.to_string()))
}

fn csv_rows(
    text: &str,
    mut each: impl FnMut(usize, &csv::StringRecord, &BTreeMap<String, usize>) -> Result<(), CarrierError>,
) -> Result<(), CarrierError> {
    let (mut reader, columns) = csv_reader(text)?;
    for (i, rec) in reader.records().enumerate() {
        let row = i + 1;
        if row > CARRIER_ROWS_MAX {
            return Err(CarrierError::TooLarge("the row limit"));
        }
        let rec = rec.map_err(|e| CarrierError::Malformed(e.to_string()))?;
        each(row, &rec, &columns)?;
    }
    Ok(())
}

fn col<'a>(rec: &'a csv::StringRecord, columns: &BTreeMap<String, usize>, name: &str) -> Option<&'a str> {
    columns.get(name).and_then(|i| rec.get(*i))
}

/// Parses daily usage CSV (see the module docs for the columns).
pub fn parse_daily_csv(text: &str) -> Result<Vec<CarrierDay>, CarrierError> {
    let mut out = Vec::new();
    csv_rows(text, |row, rec, columns| {
        require(columns, "iccid")?;
        require(columns, "date")?;
        let iccid = iccid_field(row, col(rec, columns, "iccid").unwrap_or(""))?;
        let date = date_field(row, col(rec, columns, "date").unwrap_or(""))?;
        let rx = opt_mb(row, "volume_rx", col(rec, columns, "volume_rx"))?;
        let tx = opt_mb(row, "volume_tx", col(rec, columns, "volume_tx"))?;
        let volume = col(rec, columns, "volume").filter(|s| !s.is_empty());
        let total = total_of(row, "volume", volume, rx, tx)?;
        out.push(CarrierDay { iccid, date, rx_bytes: rx, tx_bytes: tx, total_bytes: total, sessions: None });
        Ok(())
    })?;
    Ok(out)
}

/// Parses session-record CSV and sums it per SIM and day of the session's end in `tz`.
pub fn parse_sessions_csv(text: &str, tz: &TimeZone) -> Result<Vec<CarrierDay>, CarrierError> {
    let mut days = BTreeMap::<(u64, Date), CarrierDay>::new();
    csv_rows(text, |row, rec, columns| {
        for c in ["iccid", "start", "end", "volume_rx", "volume_tx"] {
            require(columns, c)?;
        }
        let iccid = iccid_field(row, col(rec, columns, "iccid").unwrap_or(""))?;
        let ts = |name: &'static str| -> Result<Timestamp, CarrierError> {
            let s = col(rec, columns, name).unwrap_or("");
            field(
                row,
                name,
                s.parse::<Timestamp>().map_err(|e| format!("'{s}' is not an RFC 3339 time: {e}")),
            )
        };
        let (start, end) = (ts("start")?, ts("end")?);
        if end < start {
            return Err(CarrierError::Field { row, field: "end", reason: "before start".into() });
        }
        let rx = opt_mb(row, "volume_rx", col(rec, columns, "volume_rx"))?;
        let tx = opt_mb(row, "volume_tx", col(rec, columns, "volume_tx"))?;
        let total = total_of(
            row,
            "volume_total",
            col(rec, columns, "volume_total").filter(|s| !s.is_empty()),
            rx,
            tx,
        )?;
        let date =
            field(row, "end", crate::usage::zone_date(end, tz).ok_or_else(|| "out of range".to_owned()))?;
        let d = days.entry((iccid, date)).or_insert(CarrierDay {
            iccid,
            date,
            rx_bytes: Some(0),
            tx_bytes: Some(0),
            total_bytes: 0,
            sessions: Some(0),
        });
        let add = |a: Option<u64>, b: Option<u64>| a.zip(b).and_then(|(a, b)| a.checked_add(b));
        let overflow =
            || CarrierError::Field { row, field: "volume_total", reason: "day total overflows".into() };
        d.rx_bytes = add(d.rx_bytes, rx);
        d.tx_bytes = add(d.tx_bytes, tx);
        d.total_bytes = d.total_bytes.checked_add(total).ok_or_else(overflow)?;
        d.sessions = d.sessions.and_then(|s| s.checked_add(1));
        Ok(())
    })?;
    Ok(days.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    const SIM: u64 = 8_988_280_666_000_000_001;

    #[test]
    fn mb_strings_parse_exactly() {
        // 0.015482 MB × 1 048 576 = 16 233.79 bytes → 16 234.
        assert_eq!(parse_mb("0.015482"), Ok(16_234));
        assert_eq!(parse_mb("0.005100"), Ok(5_348)); // 5 347.74
        assert_eq!(parse_mb("0.010382"), Ok(10_886)); // 10 886.06
        assert_eq!(parse_mb("1"), Ok(1_048_576));
        assert_eq!(parse_mb("500.000000"), Ok(500 * 1_048_576));
        // An exact half byte needs 21 fraction digits (1/2^21 MB), more than allowed; around it:
        assert!(parse_mb("0.000000476837158203125").is_err());
        assert_eq!(parse_mb("0.000000476837"), Ok(0)); // 0.49999 bytes
        assert_eq!(parse_mb("0.000000476838"), Ok(1)); // 0.50000 bytes
        assert_eq!(parse_mb("0.000000953674"), Ok(1)); // 0.99999 bytes
        for bad in ["", ".5", "1.", "-1", "1e-3", "0,5", " 1", "1234567890", "NaN"] {
            assert!(parse_mb(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn once_daily_json_golden() {
        let text = r#"{"stats":[
            {"date":"2026-11-01","data":{"volume":"0.015482","volume_tx":"0.005100","volume_rx":"0.010382"},"sms":{"volume":"2","volume_tx":"1","volume_rx":"1"}},
            {"date":"2026-11-02","data":{"volume_tx":"1.000000","volume_rx":"0.500000"}},
            {"date":"2026-11-03"}
        ]}"#;
        let days = parse_1nce_daily_json(SIM, text).unwrap();
        assert_eq!(
            days,
            vec![
                CarrierDay {
                    iccid: SIM,
                    date: date!(2026 - 11 - 01),
                    rx_bytes: Some(10_886),
                    tx_bytes: Some(5_348),
                    total_bytes: 16_234,
                    sessions: None
                },
                CarrierDay {
                    iccid: SIM,
                    date: date!(2026 - 11 - 02),
                    rx_bytes: Some(524_288),
                    tx_bytes: Some(1_048_576),
                    total_bytes: 1_572_864,
                    sessions: None
                },
                CarrierDay {
                    iccid: SIM,
                    date: date!(2026 - 11 - 03),
                    rx_bytes: None,
                    tx_bytes: None,
                    total_bytes: 0,
                    sessions: None
                },
            ]
        );
        let e = parse_1nce_daily_json(SIM, r#"{"stats":[{"date":"2026-11-01","data":{"volume":"0.1x"}}]}"#)
            .unwrap_err();
        assert!(e.to_string().starts_with("row 1, data.volume: "), "{e}");
        let e = parse_1nce_daily_json(SIM, r#"{"stats":[{"date":"2026-13-01","data":{}}]}"#).unwrap_err();
        assert!(e.to_string().starts_with("row 1, date: "), "{e}");
        assert!(matches!(parse_1nce_daily_json(SIM, "[]"), Err(CarrierError::Malformed(_))));
    }

    /// 1NCE's published example `Daily` (fixtures/1nce/README.md names the source).
    const PUBLISHED_EXAMPLE: &str = include_str!("../tests/fixtures/1nce/v1-usage-published-example.json");
    const THREE_DAYS: &str = include_str!("../tests/fixtures/1nce/v1-usage-three-days.json");

    #[test]
    fn once_v1_usage_as_published() {
        let days = parse_1nce_daily_json(SIM, PUBLISHED_EXAMPLE).unwrap();
        // 0.002803 MB = 2 939.16 B, rx 0.001482 = 1 553.99 B, tx 0.001321 = 1 385.17 B.
        assert_eq!(
            days,
            vec![CarrierDay {
                iccid: SIM,
                date: date!(2021 - 06 - 30),
                rx_bytes: Some(1_554),
                tx_bytes: Some(1_385),
                total_bytes: 2_939,
                sessions: None
            }]
        );
        let days = parse_1nce_daily_json(SIM, THREE_DAYS).unwrap();
        let got: Vec<(Date, u64)> = days.iter().map(|d| (d.date, d.total_bytes)).collect();
        // SMS never counts as data; the TOTAL row is skipped (it would double the month).
        assert_eq!(
            got,
            vec![(date!(2021 - 06 - 28), 16_234), (date!(2021 - 06 - 29), 0), (date!(2021 - 06 - 30), 2_939)]
        );
    }

    fn one_row(stat: &str) -> Result<Vec<CarrierDay>, CarrierError> {
        parse_1nce_daily_json(SIM, &format!(r#"{{"page":1,"stats":[{stat}]}}"#))
    }

    #[test]
    fn once_v1_dates_are_utc_days() {
        for (text, day) in [
            ("2021-06-30T00:00:00.000Z", date!(2021 - 06 - 30)),
            ("2021-06-30T00:00:00Z", date!(2021 - 06 - 30)),
            ("2021-06-30T02:00:00+02:00", date!(2021 - 06 - 30)),
            ("2021-06-30", date!(2021 - 06 - 30)),
        ] {
            let d = one_row(&format!(r#"{{"date":"{text}","data":{{"volume":"1"}}}}"#)).unwrap();
            assert_eq!(d[0].date, day, "{text}");
        }
        for (text, why) in [
            ("2021-06-30T00:00:00.001Z", "not at a UTC day boundary"),
            ("2021-06-30T12:00:00Z", "not at a UTC day boundary"),
            ("2021-06-30T00:00:00+02:00", "not at a UTC day boundary"),
            ("2021-06-30T00:00:00", "neither an ISO 8601 datetime"),
            ("30.06.2021", "neither an ISO 8601 datetime"),
            ("total", "neither an ISO 8601 datetime"),
        ] {
            let e = one_row(&format!(r#"{{"date":"{text}","data":{{"volume":"1"}}}}"#)).unwrap_err();
            let e = e.to_string();
            assert!(e.starts_with("row 1, date: ") && e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn once_v1_refusals_name_row_and_field() {
        let ok = r#"{"date":"2021-06-30T00:00:00.000Z","data":{"volume":"1"}}"#;
        for (bad, field) in [
            (r#"{"data":{"volume":"1"}}"#, "date"),
            (r#"{"date":20210630,"data":{"volume":"1"}}"#, "date"),
            (r#"{"date":"2021-06-30T00:00:00.000Z","data":"1"}"#, "data"),
            (r#"{"date":"2021-06-30T00:00:00.000Z","data":{"volume":0.5}}"#, "data.volume"),
            (r#"{"date":"2021-06-30T00:00:00.000Z","data":{"volume_rx":"1"}}"#, "data.volume"),
            (
                r#"{"date":"2021-06-30T00:00:00.000Z","data":{"volume":"1","volume_tx":"-1"}}"#,
                "data.volume_tx",
            ),
            (
                r#"{"date":"2021-06-30T00:00:00.000Z","data":{"volume":"1","traffic_type":{"unit":"KB"}}}"#,
                "data.traffic_type.unit",
            ),
            (
                r#"{"date":"2021-06-30T00:00:00.000Z","data":{"volume":"1","traffic_type":[]}}"#,
                "data.traffic_type",
            ),
            ("7", "stats"),
        ] {
            let e = one_row(&format!("{ok},{bad}")).unwrap_err();
            assert!(e.to_string().starts_with(&format!("row 2, {field}: ")), "{bad}: {e}");
        }
        // An SMS record in any shape never matters for data.
        let d = one_row(
            r#"{"date":"2021-06-30T00:00:00.000Z","sms":{"volume":7,"traffic_type":{"unit":"SMS"}}}"#,
        )
        .unwrap();
        assert_eq!(d[0].total_bytes, 0);
        for bad in ["{}", r#"{"stats":{}}"#, "[]", "null"] {
            assert!(matches!(parse_1nce_daily_json(SIM, bad), Err(CarrierError::Malformed(_))), "{bad}");
        }
    }

    #[test]
    fn csv_iccids_with_luhn_digit() {
        // 8988280666000000001 with its Luhn check digit 0 appended: the same SIM.
        let text = "iccid,date,volume\n89882806660000000010,2026-11-01,1\n8988280666000000001,2026-11-02,1\n";
        let days = parse_daily_csv(text).unwrap();
        assert!(days.iter().all(|d| d.iccid == SIM), "{days:?}");
        let e = parse_daily_csv(
            "iccid,date,volume\n8988280666000000001,2026-11-02,1\n89882806660000000013,2026-11-01,1\n",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "row 2, iccid: '89882806660000000013' fails the Luhn check: its check digit should be 0"
        );
    }

    const STREAMER_PUBLISHED: &str =
        include_str!("../tests/fixtures/1nce/streamer-usage-published-examples.json");
    const STREAMER_NIGHT: &str = include_str!("../tests/fixtures/1nce/streamer-usage-night.ndjson");

    #[test]
    fn once_streamer_records_as_published() {
        // The data example: 0.001176 MB up (1 233.1 B), nothing down; the SMS example is skipped.
        let days = parse_1nce_streamer_usage(STREAMER_PUBLISHED, &TimeZone::UTC).unwrap();
        assert_eq!(
            days,
            vec![CarrierDay {
                iccid: SIM,
                date: date!(2021 - 08 - 09),
                rx_bytes: Some(0),
                tx_bytes: Some(1_233),
                total_bytes: 1_233,
                sessions: None
            }]
        );
        // One record per line, a retransmission skipped, days cut by end time in the zone.
        let utc = parse_1nce_streamer_usage(STREAMER_NIGHT, &TimeZone::UTC).unwrap();
        assert_eq!(utc.len(), 1);
        assert_eq!(
            (utc[0].total_bytes, utc[0].rx_bytes, utc[0].tx_bytes),
            (MB_BYTES + 3 * MB_BYTES / 4, Some(MB_BYTES), Some(3 * MB_BYTES / 4))
        );
        // Berlin is UTC+2 in August: 22:30Z and 23:10Z are already 10 August.
        let berlin =
            parse_1nce_streamer_usage(STREAMER_NIGHT, &TimeZone::get("Europe/Berlin").unwrap()).unwrap();
        let got: Vec<(Date, u64)> = berlin.iter().map(|d| (d.date, d.total_bytes)).collect();
        assert_eq!(
            got,
            vec![(date!(2021 - 08 - 09), MB_BYTES / 2), (date!(2021 - 08 - 10), 5 * MB_BYTES / 4)]
        );
    }

    #[test]
    fn once_streamer_refusals_name_row_and_field() {
        let first = STREAMER_NIGHT.lines().next().unwrap();
        let base: serde_json::Value = serde_json::from_str(first).unwrap();
        let with = |path: &[&str], v: serde_json::Value| {
            let mut r = base.clone();
            let mut at = &mut r;
            for p in &path[..path.len() - 1] {
                at = &mut at[*p];
            }
            at[path[path.len() - 1]] = v;
            r
        };
        for (bad, field) in [
            (with(&["volume", "total"], serde_json::json!(0.0000001)), "volume.total"),
            (with(&["volume", "total"], serde_json::json!(-1)), "volume.total"),
            (with(&["volume", "rx"], serde_json::json!("1e3")), "volume.rx"),
            (with(&["volume", "tx"], serde_json::json!(true)), "volume.tx"),
            (with(&["traffic_type", "id"], serde_json::json!(7)), "traffic_type.id"),
            (with(&["end_timestamp"], serde_json::json!("2021-08-09 12:51")), "end_timestamp"),
            (with(&["start_timestamp"], serde_json::Value::Null), "start_timestamp"),
            (with(&["sim", "iccid"], serde_json::json!("89882806660000000013")), "sim.iccid"),
            (with(&["sim", "iccid"], serde_json::json!(8988280666000000001u64)), "sim.iccid"),
            (with(&["id"], serde_json::json!("1")), "id"),
            (with(&["volume"], serde_json::json!([])), "volume"),
            // Same id, other content: not a retransmission.
            (with(&["volume", "total"], serde_json::json!(0.4)), "id"),
        ] {
            let text = serde_json::json!([base, bad]).to_string();
            let e = parse_1nce_streamer_usage(&text, &TimeZone::UTC).unwrap_err();
            assert!(e.to_string().starts_with(&format!("row 2, {field}: ")), "{field}: {e}");
        }
        // Numbers and strings of six fraction digits are exact.
        let r = with(&["volume"], serde_json::json!({"total": 99999999.999999, "rx": "0.000001", "tx": 1}));
        let d = parse_1nce_streamer_usage(&r.to_string(), &TimeZone::UTC).unwrap();
        assert_eq!(d[0].total_bytes, parse_mb("99999999.999999").unwrap());
        assert_eq!((d[0].rx_bytes, d[0].tx_bytes), (Some(1), Some(MB_BYTES)));
        for bad in ["", "7", "[1]", "{\"id\":1}\nnot json"] {
            assert!(parse_1nce_streamer_usage(bad, &TimeZone::UTC).is_err(), "{bad}");
        }
    }

    #[test]
    fn daily_csv_golden() {
        let text = "date,iccid,volume_rx,volume_tx,volume,extra\n\
                    2026-11-01,8988280666000000001,0.010382,0.005100,0.015482,x\n\
                    2026-11-02 , 8988280666000000002,1,1,,\n";
        let days = parse_daily_csv(text).unwrap();
        assert_eq!(days.len(), 2);
        assert_eq!(days[0].total_bytes, 16_234);
        assert_eq!((days[1].iccid, days[1].total_bytes), (8_988_280_666_000_000_002, 2 * MB_BYTES));
        let e = parse_daily_csv("iccid,date,volume\nabc,2026-11-01,1\n").unwrap_err();
        assert_eq!(e.to_string(), "row 1, iccid: 'abc' is not an ICCID (decimal digits only)");
        let e = parse_daily_csv("iccid,volume\n1,1\n").unwrap_err();
        assert_eq!(e.to_string(), "carrier file is malformed: no 'date' column");
    }

    #[test]
    fn sessions_csv_sums_by_end_day_in_the_zone() {
        let text = "iccid,start,end,volume_rx,volume_tx,volume_total\n\
                    8988280666000000001,2026-11-01T10:00:00Z,2026-11-01T11:00:00Z,0.5,0.5,1\n\
                    8988280666000000001,2026-11-01T20:00:00Z,2026-11-01T23:30:00Z,0.25,0.25,\n\
                    8988280666000000001,2026-11-01T23:40:00Z,2026-11-02T00:10:00Z,0.25,0,\n";
        let utc = parse_sessions_csv(text, &TimeZone::UTC).unwrap();
        assert_eq!(utc.len(), 2);
        assert_eq!((utc[0].total_bytes, utc[0].sessions), (MB_BYTES + MB_BYTES / 2, Some(2)));
        assert_eq!((utc[1].date, utc[1].sessions), (date!(2026 - 11 - 02), Some(1)));
        // In Berlin (UTC+1 in November) 23:30Z is already the next day.
        let berlin = parse_sessions_csv(text, &TimeZone::get("Europe/Berlin").unwrap()).unwrap();
        assert_eq!(berlin.len(), 2);
        assert_eq!((berlin[0].total_bytes, berlin[0].sessions), (MB_BYTES, Some(1)));
        assert_eq!((berlin[1].total_bytes, berlin[1].sessions), (MB_BYTES / 2 + MB_BYTES / 4, Some(2)));
        let e = parse_sessions_csv(
            "iccid,start,end,volume_rx,volume_tx\n8988280666000000001,2026-11-01T10:00:00Z,2026-11-01T09:00:00Z,0,0\n",
            &TimeZone::UTC,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "row 1, end: before start");
    }
}
