//! Charges for people: [`charges_csv`] and [`charges_table`] render a [`ChargesReply`] as the
//! command line prints it. Apart from [`crate::wire::billing`] because this is presentation,
//! not the contract: the JSON shapes are what clients may rely on, these texts may change
//! with the CLI. They stay in the library (not in the binary) so a test can pin them next to
//! the shapes they render, and any other client of the API can print the same. Knows nothing
//! of axum or the store.

use crate::pricing::format_micros;
use crate::text::format_date;
use crate::wire::billing::ChargesReply;

/// Charges as CSV: per group a `usage` row (rounding), one row per line, and a `total` row.
pub fn charges_csv(reply: &ChargesReply) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "customer",
        "group",
        "plan_id",
        "currency",
        "period_start",
        "period_end",
        "kind",
        "description",
        "quantity_bytes",
        "unit",
        "unit_bytes",
        "unit_price_micros",
        "amount_micros",
        "amount",
        "money_rounding",
    ])?;
    for c in &reply.charges {
        let head = [
            c.customer.clone(),
            c.group.clone(),
            c.plan_id.clone(),
            c.currency.clone(),
            format_date(c.period.start),
            format_date(c.period.end),
        ];
        let r = &c.rounding;
        let usage = format!(
            "raw {} B rounded up to {} B per {} ({} units) to {} B; {} B included, {} B billable",
            r.raw_bytes,
            r.increment_bytes,
            r.scope,
            r.rounding_units,
            r.rounded_bytes,
            c.included_bytes,
            c.billable_bytes
        );
        let mut row: Vec<String> = head.to_vec();
        row.extend([
            "usage".into(),
            usage,
            r.rounded_bytes.to_string(),
            "B".into(),
            "1".into(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
        w.write_record(&row)?;
        for l in &c.lines {
            let mut row: Vec<String> = head.to_vec();
            row.extend([
                l.kind.clone(),
                l.description.clone(),
                l.quantity_bytes.to_string(),
                l.unit.clone(),
                l.unit_bytes.to_string(),
                l.unit_price_micros.to_string(),
                l.amount_micros.to_string(),
                l.amount.clone(),
                l.money_rounding.clone(),
            ]);
            w.write_record(&row)?;
        }
        let mut row: Vec<String> = head.to_vec();
        row.extend([
            "total".into(),
            String::new(),
            c.billable_bytes.to_string(),
            String::new(),
            String::new(),
            String::new(),
            c.total_micros.to_string(),
            c.total.clone(),
            String::new(),
        ]);
        w.write_record(&row)?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Charges as a table for people.
pub fn charges_table(reply: &ChargesReply) -> String {
    let mut out = String::new();
    for c in &reply.charges {
        let last = c.period.end.previous_day().unwrap_or(c.period.end);
        out.push_str(&format!(
            "{} / {}  plan {}  {} to {}{}  {} SIM(s)  {}\n",
            c.customer,
            c.group,
            c.plan_id,
            format_date(c.period.start),
            format_date(last),
            if c.in_progress { " (in progress)" } else { "" },
            c.sims,
            c.currency
        ));
        let r = &c.rounding;
        out.push_str(&format!(
            "  usage     {} B raw, rounded up to {} B per {} ({} units): {} B; {} B included, {} B billable\n",
            r.raw_bytes, r.increment_bytes, r.scope, r.rounding_units, r.rounded_bytes, c.included_bytes, c.billable_bytes
        ));
        for l in &c.lines {
            let price = match l.kind.as_str() {
                "flat_fee" => format!("{} per period", format_micros(l.unit_price_micros.into())),
                "tier_flat" => format!("{} once", format_micros(l.unit_price_micros.into())),
                "minimum" => format!("{} at least", format_micros(l.unit_price_micros.into())),
                "rounding" => format!("to {} {}", format_micros(l.unit_price_micros.into()), l.unit),
                _ => format!(
                    "{} per {} ({} B)",
                    format_micros(l.unit_price_micros.into()),
                    l.unit,
                    l.unit_bytes
                ),
            };
            out.push_str(&format!(
                "  {:<9} {:<40} {:>16} B  {:<32} {:>16}\n",
                l.kind, l.description, l.quantity_bytes, price, l.amount
            ));
        }
        out.push_str(&format!("  {:<9} {:>119}\n\n", "total", format!("{} {}", c.total, c.currency)));
    }
    for t in &reply.totals {
        out.push_str(&format!("customer {} total: {} {}\n", t.customer, t.total, t.currency));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::{charges, PeriodSelector};
    use crate::pricing::PricingConfig;
    use crate::wire::billing::charge_json;
    use time::macros::date;

    #[test]
    fn charges_csv_and_table_state_every_line() {
        let cfg = PricingConfig::from_toml_str(
            r#"
[[plan]]
id = "field-example"
currency = "USD"
unit = "GB"
model = "graduated"
tiers = [{ up_to = 100, price = "0.10" }, { up_to = 500, price = "0.08" }, { price = "0.06" }]
rounding_increment_bytes = 1024

[[assign]]
customer = "acme"
group = "fleet"
plan = "field-example"
iccids = ["8988280666000000001"]
"#,
        )
        .unwrap();
        let items = vec![vec![crate::pricing::UsageItem {
            iccid: 8_988_280_666_000_000_001,
            date: date!(2026 - 11 - 10),
            bytes: 600_000_000_001,
        }]];
        let list =
            charges(&cfg, &items, PeriodSelector::Containing(date!(2026 - 11 - 10)), None, None).unwrap();
        let reply = ChargesReply {
            time_zone: "UTC".into(),
            period: Some(date!(2026 - 11 - 10)),
            from: None,
            to: None,
            unassigned_sims: 0,
            charges: list.iter().map(|c| charge_json(c, date!(2026 - 12 - 02))).collect(),
            totals: vec![],
            underivable: vec![],
        };
        let csv = charges_csv(&reply).unwrap();
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows.len(), 1 + 1 + 3 + 1, "{csv}");
        assert!(
            rows[1].contains(
                ",usage,\"raw 600000000001 B rounded up to 1024 B per sim_day (1 units) to 600000001024 B;"
            ),
            "{csv}"
        );
        assert_eq!(
            rows[3],
            "acme,fleet,field-example,USD,2026-11-01,2026-12-01,tier,tier 2: 100 GB < usage ≤ 500 GB,400000000000,GB,1000000000,80000,32000000,32.000000,half_up_to_1_micro_per_line"
        );
        assert!(rows[5].ends_with(",total,,600000001024,,,,48000000,48.000000,"), "{}", rows[5]);
        let table = charges_table(&reply);
        assert!(
            table.contains("acme / fleet  plan field-example  2026-11-01 to 2026-11-30  1 SIM(s)  USD"),
            "{table}"
        );
        assert!(table.contains("48.000000 USD"), "{table}");
        assert!(!reply.charges[0].in_progress);
    }

    #[test]
    fn a_lago_charge_states_its_rounding_and_true_up() {
        let cfg = PricingConfig::from_toml_str(
            r#"
[[plan]]
id = "lago"
semantics = "lago"
currency = "USD"
model = "per_unit"
price = "0.01"
minimum_charge = "1"

[[assign]]
customer = "acme"
group = "fleet"
plan = "lago"
iccids = ["8988280666000000001"]
"#,
        )
        .unwrap();
        let items = vec![vec![crate::pricing::UsageItem {
            iccid: 8_988_280_666_000_000_001,
            date: date!(2026 - 11 - 10),
            bytes: 499_999_999,
        }]];
        let list =
            charges(&cfg, &items, PeriodSelector::Containing(date!(2026 - 11 - 10)), None, None).unwrap();
        let c = charge_json(&list[0], date!(2026 - 12 - 02));
        // 0.00499999999 USD is shown as 0.005000 and rounded once down to 0.00; the minimum
        // of 1.00 is then a true-up of 1.00.
        let lines: Vec<(&str, i64, &str)> =
            c.lines.iter().map(|l| (l.kind.as_str(), l.amount_micros, l.amount.as_str())).collect();
        assert_eq!(
            lines,
            [
                ("per_unit", 5_000, "0.005000"),
                ("rounding", -5_000, "-0.005000"),
                ("minimum", 1_000_000, "1.000000")
            ]
        );
        assert_eq!(c.total_micros, 1_000_000);
        // The negative line survives the JSON contract both ways.
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains(r#""kind":"rounding","description":"usage fee 0.00499999999 USD rounded once, half up, to 2 decimal(s): 0.000000","quantity_bytes":0,"unit":"USD","unit_bytes":0,"unit_price_micros":10000,"amount_micros":-5000,"amount":"-0.005000","money_rounding":"half_up_to_currency_exponent_once_per_fee"}"#), "{json}");
        assert_eq!(serde_json::from_str::<crate::wire::billing::GroupChargeJson>(&json).unwrap(), c);
        let reply = ChargesReply {
            time_zone: "UTC".into(),
            period: Some(date!(2026 - 11 - 10)),
            from: None,
            to: None,
            unassigned_sims: 0,
            charges: vec![c],
            totals: vec![],
            underivable: vec![],
        };
        let table = charges_table(&reply);
        assert!(table.contains("to 0.010000 USD"), "{table}");
        assert!(table.contains("1.000000 at least"), "{table}");
        let csv = charges_csv(&reply).unwrap();
        assert!(csv.contains(",rounding,"), "{csv}");
    }
}
