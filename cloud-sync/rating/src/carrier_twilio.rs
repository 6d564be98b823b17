//! A second carrier's published usage format: Twilio Super SIM `UsageRecords`, bytes per SIM
//! and UTC day. Pure: text in, figures out.
//!
//! Source: Twilio's published OpenAPI, github.com/twilio/twilio-oai, `spec/yaml/twilio_supersim_v1.yaml`
//! (commit d50069b44ea8cd23141385bdb6db48f16ff75bb5): `GET https://supersim.twilio.com/v1/UsageRecords`
//! answers `ListUsageRecordResponse` = `{usage_records: [supersim.v1.usage_record], meta}`, and
//! `GET /v1/Sims` answers `{sims: [supersim.v1.sim], meta}`. Fixtures in
//! `tests/fixtures/twilio/` are its published examples (`readDayGroupBySim`,
//! `readFullByFleetSid`). What the schema says and what is done here:
//!
//! - A usage record names its SIM by `sim_sid` (`HS` + 32 hex digits), present only when the
//!   records were asked for with `Group=sim` or `Sim=`; a `null` `sim_sid` is refused (the
//!   record is an aggregate over SIMs). The ICCID is not in the record: it comes from the
//!   `Sims` list answer ([`parse_twilio_sims`], `sid` → `iccid`), whose ICCIDs are checked like
//!   every other ([`crate::text::iccid_from_text`], Luhn digit included).
//! - `period.start_time` / `period.end_time`: ISO 8601, "all dates and times are presented in
//!   UTC" (Twilio's UsageRecord page). A record must lie within one UTC day (`Granularity=day`
//!   or `hour`); it counts on the UTC day of `start_time`, and the hours of a day are summed. A
//!   longer period (`Granularity=all`) is refused: it cannot be split into days.
//! - `data_upload`, `data_download`, `data_total`: int64 **bytes** (not MB), nullable;
//!   `data_total` is "Total of data_upload and data_download" and is checked against their sum
//!   when all three are given. Upload is traffic from the SIM (`tx`), download to it (`rx`).
//! - `data_total_billed`, `billed_unit`, `account_sid`, `fleet_sid`, `network_sid`,
//!   `iso_country`, `meta` carry no volume and are ignored. A file is one page; give every page.
//!
//! Every refusal names the row (position in `usage_records` or `sims`, from 1) and the field.

use std::collections::BTreeMap;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use time::Date;

use crate::carrier::{
    json_kind, json_str, CarrierDay, CarrierError, CARRIER_FILE_BYTES_MAX, CARRIER_ROWS_MAX,
};
use crate::text::iccid_from_text;

/// Characters of a Twilio SID: two letters and 32 hex digits.
pub const TWILIO_SID_CHARS: usize = 34;

/// Whether `s` is a SID of the given prefix (`HS`: a Sim).
fn is_sid(s: &str, prefix: &str) -> bool {
    s.len() == TWILIO_SID_CHARS && s.starts_with(prefix) && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn list<'a>(
    doc: &'a serde_json::Value,
    key: &str,
    what: &str,
) -> Result<&'a Vec<serde_json::Value>, CarrierError> {
    let rows =
        doc.as_object().and_then(|o| o.get(key)).and_then(serde_json::Value::as_array).ok_or_else(|| {
            CarrierError::Malformed(format!("expected an object with a '{key}' array ({what})"))
        })?;
    if rows.len() > CARRIER_ROWS_MAX {
        return Err(CarrierError::TooLarge("the row limit"));
    }
    Ok(rows)
}

fn parse_doc(text: &str) -> Result<serde_json::Value, CarrierError> {
    if text.len() > CARRIER_FILE_BYTES_MAX {
        return Err(CarrierError::TooLarge("the file size limit"));
    }
    serde_json::from_str(text).map_err(|e| CarrierError::Malformed(e.to_string()))
}

/// Reads a Super SIM `Sims` list answer (`{"sims":[{"sid","iccid",…}],"meta":…}`) into
/// `sid` → ICCID. A SID given twice with different ICCIDs is refused.
pub fn parse_twilio_sims(text: &str) -> Result<BTreeMap<String, u64>, CarrierError> {
    let doc = parse_doc(text)?;
    let mut out = BTreeMap::new();
    for (i, s) in list(&doc, "sims", "a Super SIM Sims list answer")?.iter().enumerate() {
        let row = i + 1;
        let err = |field: &'static str, reason: String| CarrierError::Field { row, field, reason };
        let s = s
            .as_object()
            .ok_or_else(|| err("sims", format!("expected a Sim object, got {}", json_kind(s))))?;
        let sid = json_str(row, s, "sid", "sid")?.ok_or_else(|| err("sid", "missing".into()))?;
        if !is_sid(sid, "HS") {
            return Err(err("sid", format!("'{sid}' is not a Sim SID (HS and 32 hex digits)")));
        }
        let iccid_text = json_str(row, s, "iccid", "iccid")?.ok_or_else(|| err("iccid", "missing".into()))?;
        let iccid = iccid_from_text(iccid_text).map_err(|e| err("iccid", e.to_string()))?;
        if let Some(prev) = out.insert(sid.to_owned(), iccid).filter(|p| *p != iccid) {
            return Err(err("iccid", format!("{sid} was given before with ICCID {prev}")));
        }
    }
    Ok(out)
}

/// Reads one page of Super SIM `UsageRecords` (grouped by SIM, `Granularity=day` or `hour`)
/// into bytes per SIM and UTC day; `sims` maps Sim SIDs to ICCIDs ([`parse_twilio_sims`]).
/// See the module docs for what each field means.
pub fn parse_twilio_supersim_usage(
    text: &str,
    sims: &BTreeMap<String, u64>,
) -> Result<Vec<CarrierDay>, CarrierError> {
    let doc = parse_doc(text)?;
    let mut days = BTreeMap::<(u64, Date), CarrierDay>::new();
    for (i, r) in list(&doc, "usage_records", "a Super SIM UsageRecords answer")?.iter().enumerate() {
        let row = i + 1;
        let err = |field: &'static str, reason: String| CarrierError::Field { row, field, reason };
        let r = r.as_object().ok_or_else(|| {
            err("usage_records", format!("expected a UsageRecord object, got {}", json_kind(r)))
        })?;
        let sid = json_str(row, r, "sim_sid", "sim_sid")?.ok_or_else(|| {
            err("sim_sid", "null: an aggregate over SIMs; ask with Group=sim (or Sim=)".into())
        })?;
        let iccid =
            *sims.get(sid).ok_or_else(|| err("sim_sid", format!("'{sid}' is not in the Sims list given")))?;
        let period = r
            .get("period")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| err("period", "missing or not an object".into()))?;
        let ts = |key: &str, name: &'static str| -> Result<Timestamp, CarrierError> {
            let s = json_str(row, period, key, name)?.ok_or_else(|| err(name, "missing".into()))?;
            s.parse::<Timestamp>().map_err(|e| err(name, format!("'{s}' is not an ISO 8601 time: {e}")))
        };
        let (start, end) = (ts("start_time", "period.start_time")?, ts("end_time", "period.end_time")?);
        if end <= start {
            return Err(err("period.end_time", "not after period.start_time".into()));
        }
        let date = crate::usage::zone_date(start, &TimeZone::UTC)
            .ok_or_else(|| err("period.start_time", "out of range".into()))?;
        let last = end.checked_sub(jiff::SignedDuration::from_nanos(1)).ok();
        if last.and_then(|l| crate::usage::zone_date(l, &TimeZone::UTC)) != Some(date) {
            return Err(err(
                "period",
                "spans more than one UTC day: ask with Granularity=day or hour".into(),
            ));
        }
        let bytes = |key: &str, name: &'static str| -> Result<Option<u64>, CarrierError> {
            match r.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Number(n)) => n
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| err(name, format!("{n} is not a whole, non-negative number of bytes"))),
                Some(other) => {
                    Err(err(name, format!("expected bytes (an integer), got {}", json_kind(other))))
                }
            }
        };
        let tx = bytes("data_upload", "data_upload")?;
        let rx = bytes("data_download", "data_download")?;
        let sum =
            rx.zip(tx).map(|(a, b)| a.checked_add(b).ok_or_else(|| err("data_total", "overflows".into())));
        let sum = sum.transpose()?;
        let total = match (bytes("data_total", "data_total")?, sum) {
            (Some(t), Some(s)) if t != s => {
                return Err(err("data_total", format!("{t} is not data_upload + data_download = {s}")))
            }
            (Some(t), _) => t,
            (None, Some(s)) => s,
            (None, None) => {
                return Err(err(
                    "data_total",
                    "null, and data_upload + data_download are not both given".into(),
                ))
            }
        };
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
            .ok_or_else(|| err("data_total", "day total overflows".into()))?;
    }
    Ok(days.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::parse_date;

    /// Twilio's published example `readDayGroupBySim`, as published.
    const USAGE_BY_SIM: &str = include_str!("../tests/fixtures/twilio/supersim-usage-day-by-sim.json");
    /// Twilio's published example `readFullByFleetSid` with a second SIM (see the README there).
    const SIMS: &str = include_str!("../tests/fixtures/twilio/supersim-sims.json");
    /// Hourly records of one SIM over a UTC midnight.
    const HOURLY: &str = include_str!("../tests/fixtures/twilio/supersim-usage-hour-by-sim.json");

    fn d(s: &str) -> Date {
        parse_date(s).unwrap()
    }

    fn usage(records: &str) -> String {
        format!(r#"{{"usage_records":[{records}],"meta":{{"key":"usage_records"}}}}"#)
    }

    const REC: &str = r#"{"period":{"start_time":"2019-05-03T00:00:00Z","end_time":"2019-05-04T00:00:00Z"},"sim_sid":"HSaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","data_upload":150000,"data_download":150000,"data_total":300000}"#;

    #[test]
    fn the_published_day_by_sim_example_is_bytes_per_sim_and_utc_day() {
        let sims = parse_twilio_sims(SIMS).unwrap();
        assert_eq!(sims.len(), 2);
        let days = parse_twilio_supersim_usage(USAGE_BY_SIM, &sims).unwrap();
        let a = sims["HSaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"];
        let b = sims["HSbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"];
        let expected = |iccid| CarrierDay {
            iccid,
            date: d("2019-05-03"),
            rx_bytes: Some(150_000),
            tx_bytes: Some(150_000),
            total_bytes: 300_000,
            sessions: None,
        };
        let mut want = vec![expected(a), expected(b)];
        want.sort_by_key(|c| c.iccid);
        assert_eq!(days, want);
    }

    #[test]
    fn hours_are_summed_per_utc_day() {
        let sims = parse_twilio_sims(SIMS).unwrap();
        let days = parse_twilio_supersim_usage(HOURLY, &sims).unwrap();
        let view: Vec<_> = days.iter().map(|c| (c.date, c.tx_bytes, c.rx_bytes, c.total_bytes)).collect();
        assert_eq!(
            view,
            vec![
                (d("2019-05-03"), Some(3_000), Some(7_000), 10_000),
                (d("2019-05-04"), Some(500), None, 1_200),
            ]
        );
    }

    #[test]
    fn the_published_sims_example_iccid_fails_its_luhn_digit() {
        let published =
            r#"{"sims":[{"sid":"HSaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","iccid":"89883070000123456789"}]}"#;
        let e = parse_twilio_sims(published).unwrap_err();
        assert!(
            matches!(&e, CarrierError::Field { row: 1, field: "iccid", reason } if reason.contains("Luhn")),
            "{e}"
        );
        // The 19-digit form has no check digit to check.
        let short =
            r#"{"sims":[{"sid":"HSaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","iccid":"8988307000012345678"}]}"#;
        assert_eq!(parse_twilio_sims(short).unwrap().len(), 1);
    }

    #[test]
    fn anything_else_names_row_and_field() {
        let sims = parse_twilio_sims(SIMS).unwrap();
        let cases: &[(&str, usize, &str)] = &[
            (&REC.replace("\"HSaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"", "null"), 2, "sim_sid"),
            (&REC.replace("HSaaaa", "HScccc"), 2, "sim_sid"),
            (&REC.replace("2019-05-04T00:00:00Z", "2019-05-05T00:00:00Z"), 2, "period"),
            (&REC.replace("2019-05-04T00:00:00Z", "2019-05-03T00:00:00Z"), 2, "period.end_time"),
            (&REC.replace("2019-05-03T00:00:00Z", "May 3"), 2, "period.start_time"),
            (&REC.replace("300000", "300001"), 2, "data_total"),
            (&REC.replace("\"data_upload\":150000", "\"data_upload\":-1"), 2, "data_upload"),
            (&REC.replace("\"data_download\":150000", "\"data_download\":\"150000\""), 2, "data_download"),
            (
                &REC.replace(",\"data_total\":300000", "").replace("\"data_upload\":150000,", ""),
                2,
                "data_total",
            ),
        ];
        for (rec, row, field) in cases {
            let e = parse_twilio_supersim_usage(&usage(&format!("{REC},{rec}")), &sims).unwrap_err();
            assert!(
                matches!(&e, CarrierError::Field { row: r, field: f, .. } if r == row && f == field),
                "{rec}: {e}"
            );
        }
        assert!(matches!(parse_twilio_supersim_usage("[]", &sims), Err(CarrierError::Malformed(_))));
        let bad_sid = r#"{"sims":[{"sid":"XX1","iccid":"8988307000012345678"}]}"#;
        assert!(matches!(parse_twilio_sims(bad_sid), Err(CarrierError::Field { field: "sid", .. })));
    }

    #[test]
    fn a_total_alone_counts_without_directions() {
        let sims = parse_twilio_sims(SIMS).unwrap();
        let rec = REC.replace("\"data_upload\":150000,\"data_download\":150000,", "");
        let days = parse_twilio_supersim_usage(&usage(&rec), &sims).unwrap();
        assert_eq!((days[0].rx_bytes, days[0].tx_bytes, days[0].total_bytes), (None, None, 300_000));
    }
}
