//! Unit tests of pricing, across its submodules.

use super::*;
use proptest::prelude::*;
use time::macros::date;

const GB: u64 = 1_000_000_000;
const GIB: u64 = 1 << 30;

fn worked(unit: &str, model: &str) -> Plan {
    let text = format!(
        r#"
[[plan]]
id = "field-example"
currency = "USD"
unit = "{unit}"
model = "{model}"
tiers = [{{ up_to = 100, price = "0.10" }}, {{ up_to = 500, price = "0.08" }}, {{ price = "0.06" }}]
"#
    );
    PricingConfig::from_toml_str(&text).unwrap().plans.remove("field-example").unwrap()
}

fn charge(plan: &Plan, bytes: u64) -> Charge {
    let period = plan.cycle.period_of(date!(2026 - 11 - 10)).unwrap();
    rate(plan, period, &[UsageItem { iccid: 1, date: date!(2026 - 11 - 10), bytes }]).unwrap()
}

#[test]
fn worked_example_graduated_decimal_gb() {
    let p = worked("GB", "graduated");
    let c = charge(&p, 600 * GB);
    // $0.10 × 100 + $0.08 × 400 + $0.06 × 100 = $48.
    assert_eq!(c.total_micros, 48_000_000);
    let amounts: Vec<i64> = c.lines.iter().map(|l| l.amount_micros).collect();
    assert_eq!(amounts, vec![10_000_000, 32_000_000, 6_000_000]);
    assert_eq!(c.lines[1].description, "tier 2: 100 GB < usage ≤ 500 GB");
    assert_eq!(c.lines[2].quantity_bytes, 100 * GB);
    assert!(c.lines.iter().all(|l| l.unit_bytes == GB && l.money_rounding == MONEY_ROUNDING));
    assert_eq!(charge(&p, 100 * GB).total_micros, 10_000_000);
    assert_eq!(charge(&p, 100 * GB).lines.len(), 1);
    assert_eq!(charge(&p, 250 * GB).total_micros, 10_000_000 + 12_000_000);
    assert_eq!(charge(&p, 0).total_micros, 0);
    // One byte at $0.10/GB is 0.0000001 USD: half-up rounding to the micro gives 0.
    assert_eq!(charge(&p, 1).total_micros, 0);
    assert_eq!(charge(&p, 5_000).total_micros, 1);
}

#[test]
fn worked_example_graduated_binary_gib() {
    let p = worked("GiB", "graduated");
    assert_eq!(charge(&p, 600 * GIB).total_micros, 48_000_000);
    // 600 GB decimal is 558.79 GiB: the last 63_129_088_000 bytes at $0.06/GiB are
    // 3_527_612.686 micros, rounded half up to 3_527_613.
    let c = charge(&p, 600 * GB);
    assert_eq!(c.lines[2].quantity_bytes, 600 * GB - 500 * GIB);
    assert_eq!(c.lines[2].amount_micros, 3_527_613);
    assert_eq!(c.total_micros, 45_527_613);
}

#[test]
fn worked_example_volume() {
    let p = worked("GB", "volume");
    assert_eq!(charge(&p, 600 * GB).total_micros, 36_000_000);
    assert_eq!(charge(&p, 500 * GB).total_micros, 40_000_000);
    assert_eq!(charge(&p, 100 * GB).total_micros, 10_000_000);
    assert_eq!(charge(&p, 100 * GB + 1).total_micros, 8_000_000);
    assert_eq!(charge(&p, 600 * GB).lines[0].description, "tier 3 (usage > 500 GB) prices all usage");
}

#[test]
fn flat_fee_allowance_package_and_rounding_are_stated() {
    let cfg = PricingConfig::from_toml_str(
        r#"
[[plan]]
id = "bundle"
currency = "EUR"
unit = "MiB"
model = "package"
package_bytes = 10485760
package_price = "1.50"
flat_fee = "2.00"
included_bytes = 52428800
rounding_increment_bytes = 1024
rounding_scope = "session"
billing_cycle = "monthly"
billing_anchor_day = 15

[[assign]]
customer = "acme"
group = "berlin"
plan = "bundle"
iccids = ["8988280666000000001", "8988280666000000002"]
"#,
    )
    .unwrap();
    let a = cfg.assignment_of(8_988_280_666_000_000_002).unwrap().clone();
    assert_eq!(a.customer, "acme");
    let day = date!(2026 - 11 - 10);
    let items = [
        UsageItem { iccid: 8_988_280_666_000_000_001, date: day, bytes: 50 * 1024 * 1024 },
        UsageItem { iccid: 8_988_280_666_000_000_002, date: day, bytes: 1 },
        UsageItem { iccid: 8_988_280_666_000_000_002, date: day, bytes: 10 * 1024 * 1024 },
        // Another SIM, and a day outside the period: neither counted.
        UsageItem { iccid: 7, date: day, bytes: 1 << 40 },
        UsageItem { iccid: 8_988_280_666_000_000_001, date: date!(2026 - 11 - 15), bytes: 1 << 40 },
    ];
    let c = cfg.rate_group(&a, day, &items).unwrap();
    assert_eq!(c.period, BillingPeriod { start: date!(2026 - 10 - 15), end: date!(2026 - 11 - 15) });
    assert_eq!(c.rounding.rounding_units, 3);
    assert_eq!(c.rounding.raw_bytes, 60 * 1024 * 1024 + 1);
    assert_eq!(c.rounding.rounded_bytes, 60 * 1024 * 1024 + 1024);
    assert_eq!(c.billable_bytes, 10 * 1024 * 1024 + 1024);
    // Flat 2.00 + two started packages of 10 MiB at 1.50.
    assert_eq!(c.total_micros, 5_000_000);
    assert_eq!(c.lines[0].kind, "flat_fee");
    assert_eq!(c.lines[1].description, "2 started package(s) of 10485760 bytes");
    let json = serde_json::to_string(&c.rounding).unwrap();
    assert_eq!(
        json,
        r#"{"increment_bytes":1024,"scope":"session","rounding_units":3,"raw_bytes":62914561,"rounded_bytes":62915584}"#
    );
    assert!(matches!(cfg.assignment_of(5), Err(PricingError::Unassigned(5))));
}

#[test]
fn charge_json_is_pinned() {
    let p = worked("GB", "graduated");
    let c = charge(&p, 150 * GB);
    assert_eq!(
        serde_json::to_string(&c).unwrap(),
        concat!(
            r#"{"plan_id":"field-example","currency":"USD","period":{"start":"2026-11-01","end":"2026-12-01"},"#,
            r#""rounding":{"increment_bytes":1,"scope":"sim_day","rounding_units":1,"raw_bytes":150000000000,"rounded_bytes":150000000000},"#,
            r#""included_bytes":0,"billable_bytes":150000000000,"lines":["#,
            r#"{"kind":"tier","description":"tier 1: usage ≤ 100 GB","quantity_bytes":100000000000,"unit":"GB","unit_bytes":1000000000,"unit_price_micros":100000,"amount_micros":10000000,"money_rounding":"half_up_to_1_micro_per_line"},"#,
            r#"{"kind":"tier","description":"tier 2: 100 GB < usage ≤ 500 GB","quantity_bytes":50000000000,"unit":"GB","unit_bytes":1000000000,"unit_price_micros":80000,"amount_micros":4000000,"money_rounding":"half_up_to_1_micro_per_line"}],"#,
            r#""total_micros":14000000}"#
        )
    );
}

#[test]
fn config_errors_name_the_key() {
    let cases = [
        (
            r#"[[plan]]
id = "a"
currency = "USD"
model = "graduated"
tiers = [{ up_to = 100, price = "0.10" }, { up_to = 50, price = "0.08" }, { price = "0.06" }]"#,
            "plan[0].tiers[1].up_to",
        ),
        (
            r#"[[plan]]
id = "a"
currency = "USD"
model = "graduated"
tiers = [{ up_to = 100, price = "0.1234567" }, { price = "0.06" }]"#,
            "plan[0].tiers[0].price",
        ),
        (
            r#"[[plan]]
id = "a"
currency = "usd"
model = "per_unit"
price = "1""#,
            "plan[0].currency",
        ),
        (
            r#"[[plan]]
id = "a"
currency = "USD"
model = "flat"
price = "1""#,
            "plan[0].model",
        ),
        (
            r#"[[plan]]
id = "a"
currency = "USD"
model = "per_unit"
price = "1"
rounding_increment_bytes = 0"#,
            "plan[0].rounding_increment_bytes",
        ),
        (
            r#"[[plan]]
id = "a"
currency = "USD"
model = "per_unit"
price = "1"
billing_anchor_day = 31"#,
            "plan[0].billing_anchor_day",
        ),
        (
            r#"[[assign]]
customer = "c"
group = "g"
plan = "nope"
iccids = []"#,
            "assign[0].plan",
        ),
    ];
    for (text, key) in cases {
        let e = PricingConfig::from_toml_str(text).unwrap_err();
        assert!(e.to_string().starts_with(&format!("{key}: ")), "{key}: got {e}");
    }
    let e = PricingConfig::from_toml_str("[[plan]]\nid = \"a\"\ncolour = 1").unwrap_err();
    assert!(e.to_string().contains("colour"), "{e}");
}

#[test]
fn wallets_time_zone_and_lifetime_quotas_parse_and_errors_name_the_key() {
    let base = r#"
time_zone = "Europe/Berlin"

[[plan]]
id = "usd"
currency = "USD"
model = "per_unit"
price = "1"
lifetime_quota_bytes = 524288000
lifetime_years = 10

[[plan]]
id = "eur"
currency = "EUR"
model = "per_unit"
price = "1"

[[assign]]
customer = "acme"
group = "a"
plan = "usd"
iccids = ["8988280666000000001"]
active_since = "2026-02-28"
"#;
    let wallet = "[[wallet]]\ncustomer = \"acme\"\ncurrency = \"USD\"\nopening_credit = \"100.50\"\nalert_thresholds = [\"50\", \"10\"]\noverdraft_limit = \"5\"\n";
    let cfg = PricingConfig::from_toml_str(&format!("{base}{wallet}")).unwrap();
    assert_eq!(cfg.time_zone, "Europe/Berlin");
    let w = &cfg.wallets["acme"];
    assert_eq!((w.opening_micros, w.overdraft_limit_micros), (100_500_000, 5_000_000));
    assert_eq!(w.thresholds_micros, vec![50_000_000, 10_000_000]);
    let a = cfg.assignment_of(8_988_280_666_000_000_001).unwrap();
    assert_eq!(a.active_since, Some(date!(2026 - 02 - 28)));
    let life = cfg.plans["usd"].lifetime.unwrap();
    assert_eq!(life, LifetimeQuota { quota_bytes: 500 * 1024 * 1024, years: 10 });
    assert_eq!(life.last_day(date!(2026 - 02 - 28)), Some(date!(2036 - 02 - 27)));
    assert_eq!(add_months_clamped(date!(2028 - 02 - 29), 12), Some(date!(2029 - 02 - 28)));
    assert_eq!(PricingConfig::from_toml_str(base).unwrap().time_zone, "Europe/Berlin");
    assert_eq!(PricingConfig::from_toml_str("").unwrap().time_zone, BILLING_TIME_ZONE_DEFAULT);

    let cases = [
        (format!("{base}[[wallet]]\ncustomer = \"acme\"\ncurrency = \"EUR\"\n"), "wallet[0].currency"),
        (format!("{base}[[wallet]]\ncustomer = \"nobody\"\ncurrency = \"USD\"\n"), "wallet[0].customer"),
        (format!("{base}{wallet}{wallet}"), "wallet[1].customer"),
        (format!("{base}[[wallet]]\ncustomer = \"acme\"\ncurrency = \"USD\"\nopening_credit = \"-1\"\n"), "wallet[0].opening_credit"),
        (format!("{base}[[wallet]]\ncustomer = \"acme\"\ncurrency = \"USD\"\nalert_thresholds = [\"1\", \"1\"]\n"), "wallet[0].alert_thresholds[1]"),
        (base.replace("Europe/Berlin", "Mars/Olympus"), "time_zone"),
        (base.replace("2026-02-28", "2026-02-30"), "assign[0].active_since"),
        (base.replace("lifetime_years = 10", "lifetime_years = 31"), "plan[0].lifetime_years"),
        (base.replace("lifetime_quota_bytes = 524288000", ""), "plan[0].lifetime_years"),
        (base.replace("customer = \"acme\"", "customer = \"a b\""), "assign[0].customer"),
        (
            format!("{base}[[assign]]\ncustomer = \"acme\"\ngroup = \"b\"\nplan = \"eur\"\niccids = [\"8988280666000000001\"]\n"),
            "assign[1].iccids[0]",
        ),
        (
            format!("{base}[[assign]]\ncustomer = \"acme\"\ngroup = \"a\"\nplan = \"eur\"\niccids = []\n"),
            "assign[1].group",
        ),
    ];
    for (text, key) in cases {
        let e = PricingConfig::from_toml_str(&text).unwrap_err();
        assert!(e.to_string().starts_with(&format!("{key}: ")), "{key}: got {e}");
    }
    let e = PricingConfig::from_toml_str(&format!(
        "{base}[[assign]]\ncustomer = \"other\"\ngroup = \"b\"\nplan = \"eur\"\niccids = [\"8988280666000000001\"]\n"
    ))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "assign[1].iccids[0]: 8988280666000000001 is already in group 'a' of customer 'acme' (assign[0])"
    );
}

#[test]
fn alert_conditions_round_trip_and_match_debit_crossings() {
    for c in
        [AlertCondition::Threshold(-3), AlertCondition::Overdrawn, AlertCondition::OverdraftLimitExceeded]
    {
        assert_eq!(AlertCondition::from_key(&c.key()), Some(c));
    }
    assert_eq!(AlertCondition::from_key("threshold:x"), None);
    let mut w = Wallet::new(10, 5, vec![8, 2]).unwrap();
    let before = w.conditions();
    let fired = w.debit(9).unwrap();
    let newly: std::collections::BTreeSet<AlertCondition> =
        w.conditions().difference(&before).copied().collect();
    assert_eq!(fired.iter().map(WalletAlert::condition).collect::<std::collections::BTreeSet<_>>(), newly);
    assert_eq!(newly.len(), 2);
    assert_eq!(w.alert(AlertCondition::Threshold(8)), fired[0]);
}

#[test]
fn money_parses_exactly() {
    assert_eq!(parse_money_micros("0.10"), Ok(100_000));
    assert_eq!(parse_money_micros("12"), Ok(12_000_000));
    assert_eq!(parse_money_micros("0.000001"), Ok(1));
    for bad in ["", ".1", "1.", "-1", "1e3", "0.0000001", "1,5", " 1", "9999999999999"] {
        assert!(parse_money_micros(bad).is_err(), "{bad}");
    }
    assert_eq!(format_micros(48_000_000), "48.000000");
    assert_eq!(format_micros(-1), "-0.000001");
}

#[test]
fn billing_periods() {
    let m = BillingCycle::Monthly { anchor_day: 1 };
    assert_eq!(
        m.period_of(date!(2026 - 12 - 31)),
        Some(BillingPeriod { start: date!(2026 - 12 - 01), end: date!(2027 - 01 - 01) })
    );
    let m = BillingCycle::Monthly { anchor_day: 28 };
    assert_eq!(
        m.period_of(date!(2027 - 01 - 05)),
        Some(BillingPeriod { start: date!(2026 - 12 - 28), end: date!(2027 - 01 - 28) })
    );
    assert_eq!(
        BillingCycle::Daily.period_of(date!(2028 - 02 - 28)),
        Some(BillingPeriod { start: date!(2028 - 02 - 28), end: date!(2028 - 02 - 29) })
    );
}

#[test]
fn wallet_alerts_once_per_crossing() {
    let mut w = Wallet::new(10_000_000, 5_000_000, vec![5_000_000, 1_000_000]).unwrap();
    assert_eq!(w.debit(4_000_000).unwrap(), vec![]);
    assert_eq!(
        w.debit(1_000_000).unwrap(),
        vec![WalletAlert::ThresholdCrossed { threshold_micros: 5_000_000, balance_micros: 5_000_000 }]
    );
    assert_eq!(w.debit(1).unwrap(), vec![]);
    let a = w.debit(6_000_000).unwrap();
    assert_eq!(a.len(), 2, "{a:?}");
    assert!(w.overdrawn() && !w.limit_exceeded());
    let a = w.debit(5_000_000).unwrap();
    assert!(matches!(a[..], [WalletAlert::OverdraftLimitExceeded { .. }]), "{a:?}");
    assert!(w.limit_exceeded());
    w.top_up(20_000_000).unwrap();
    assert!(!w.overdrawn());
    assert!(w.debit(u64::MAX).is_err());
}

#[test]
fn lifetime_quota_forecast() {
    const MB: u64 = 1024 * 1024;
    let start = date!(2026 - 01 - 01);
    let expires = date!(2035 - 12 - 31);
    let today = date!(2026 - 01 - 30);
    // 30 days at 1 MiB a day: 470 MiB remain, ⌈470⌉ more days at that rate.
    let daily: Vec<(Date, u64)> = (0..30).map(|i| (start + time::Duration::days(i), MB)).collect();
    let f = forecast_quota(500 * MB, start, expires, today, 30, &daily).unwrap();
    assert_eq!(f.used_bytes, 30 * MB);
    assert_eq!(f.exhausted_on, Some(today + time::Duration::days(470)));
    assert!(f.runs_out_before_expiry);
    // About 140 KiB a day lasts; at 10 KiB a day it does not run out before expiry.
    let slow: Vec<(Date, u64)> = (0..30).map(|i| (start + time::Duration::days(i), 10 * 1024)).collect();
    let f = forecast_quota(500 * MB, start, expires, today, 7, &slow).unwrap();
    assert!(!f.runs_out_before_expiry);
    assert_eq!(f.window_days, 7);
    assert_eq!(f.sustainable_bytes_per_day, (500 * MB - 300 * 1024) / 3622);
    let idle = forecast_quota(500 * MB, start, expires, today, 7, &[]).unwrap();
    assert_eq!(idle.exhausted_on, None);
    assert!(forecast_quota(1, start, expires, today, 0, &[]).is_err());
}

/// Regression: a huge quota at a tiny rate put the exhaustion day 10^17 days out and
/// `Duration::days` panicked; the calendar's edges panicked in date subtraction.
#[test]
fn forecast_never_panics_at_the_edges() {
    let start = date!(2026 - 01 - 01);
    let today = date!(2026 - 01 - 30);
    let daily = [(today, 1u64)];
    let e = forecast_quota(u64::MAX, start, Date::MAX, today, 30, &daily).unwrap_err();
    assert!(e.to_string().contains("quota_bytes"), "{e}");
    let f = forecast_quota(FORECAST_QUOTA_BYTES_MAX, start, Date::MAX, today, 366, &daily).unwrap();
    assert_eq!((f.exhausted_on, f.runs_out_before_expiry), (None, false));
    let f = forecast_quota(10, Date::MIN, Date::MAX, Date::MIN, 366, &[(Date::MIN, 1)]).unwrap();
    assert_eq!(f.window_days, 1);
    let f = forecast_quota(10, Date::MIN, Date::MAX, Date::MAX, 366, &[(Date::MAX, 1)]).unwrap();
    assert_eq!(f.exhausted_on, None, "past 9999-12-31");
    proptest::proptest!(|(quota: u64, bytes: u64, window in 1u32..=366, a: i32, b: i32, c: i32)| {
        let day = |n: i32| Date::from_julian_day(n.rem_euclid(Date::MAX.to_julian_day() - Date::MIN.to_julian_day()) + Date::MIN.to_julian_day()).unwrap();
        let _ = forecast_quota(quota, day(a), day(b), day(c), window, &[(day(c), bytes)]);
    });
}

fn arb_tiers() -> impl Strategy<Value = Vec<Tier>> {
    (proptest::collection::vec((1u64..1000, 0u64..500_000), 0..5), 0u64..500_000).prop_map(|(v, last)| {
        let mut bound = 0;
        let mut tiers: Vec<Tier> = v
            .into_iter()
            .map(|(step, price)| {
                bound += step;
                Tier { up_to_units: Some(bound), unit_price_micros: price, flat_amount_micros: 0 }
            })
            .collect();
        tiers.push(Tier { up_to_units: None, unit_price_micros: last, flat_amount_micros: 0 });
        tiers
    })
}

fn plan_with(model: ChargeModel, unit: Unit) -> Plan {
    Plan {
        id: "p".into(),
        currency: "USD".into(),
        unit,
        model,
        flat_fee_micros: 0,
        included_bytes: 0,
        rounding: Rounding { increment_bytes: 1, scope: RoundingScope::SimDay },
        cycle: BillingCycle::Daily,
        lifetime: None,
        semantics: Semantics::Countersign,
        minimum_micros: 0,
    }
}

fn total(plan: &Plan, bytes: u64) -> u64 {
    model_lines(plan, bytes).unwrap().iter().map(|l| l.amount_micros.unsigned_abs()).sum()
}

proptest! {
    #[test]
    fn graduated_total_is_monotone(tiers in arb_tiers(), a in 0u64..1 << 44, b in 0u64..1 << 44, binary: bool) {
        let p = plan_with(ChargeModel::Graduated { tiers }, if binary { Unit::Gib } else { Unit::Gb });
        let (lo, hi) = (a.min(b), a.max(b));
        prop_assert!(total(&p, lo) <= total(&p, hi));
        // Lines cover the usage exactly.
        let q: u64 = model_lines(&p, hi).unwrap().iter().map(|l| l.quantity_bytes).sum();
        prop_assert_eq!(q, hi);
    }

    #[test]
    fn volume_is_never_above_graduated_with_falling_prices(mut tiers in arb_tiers(), q in 0u64..1 << 44) {
        // Prices falling with usage, as in the field example.
        let mut prices: Vec<u64> = tiers.iter().map(|t| t.unit_price_micros).collect();
        prices.sort_unstable_by(|a, b| b.cmp(a));
        for (t, p) in tiers.iter_mut().zip(prices) { t.unit_price_micros = p; }
        let g = plan_with(ChargeModel::Graduated { tiers: tiers.clone() }, Unit::Gb);
        let v = plan_with(ChargeModel::Volume { tiers: tiers.clone() }, Unit::Gb);
        let lines = model_lines(&g, q).unwrap().len() as u64;
        // Exactly: volume ≤ graduated; each graduated line rounds by at most half a micro.
        prop_assert!(total(&v, q) <= total(&g, q) + lines);
        // Inside the first tier both are the same single price.
        let first = tiers[0].up_to_units.map_or(q, |u| q.min(u * Unit::Gb.bytes()));
        prop_assert_eq!(total(&v, first), total(&g, first));
        // One flat price: volume and graduated agree to rounding.
        let flat: Vec<Tier> = tiers.iter().map(|t| Tier { unit_price_micros: tiers[0].unit_price_micros, ..*t }).collect();
        let gf = total(&plan_with(ChargeModel::Graduated { tiers: flat.clone() }, Unit::Gb), q);
        let vf = total(&plan_with(ChargeModel::Volume { tiers: flat }, Unit::Gb), q);
        prop_assert!(vf.abs_diff(gf) <= lines);
    }

    #[test]
    fn rounding_never_undercharges_the_increment_rule(
        items in proptest::collection::vec((0u64..4, 0i64..3, 0u64..1 << 30), 0..40),
        increment in 1u64..1 << 20,
        scope in prop_oneof![Just(RoundingScope::Session), Just(RoundingScope::SimDay), Just(RoundingScope::SimPeriod)],
    ) {
        let items: Vec<UsageItem> = items.into_iter()
            .map(|(iccid, d, bytes)| UsageItem { iccid, date: date!(2026 - 11 - 01) + time::Duration::days(d), bytes })
            .collect();
        let r = apply_rounding(Rounding { increment_bytes: increment, scope }, &items).unwrap();
        let raw: u64 = items.iter().map(|i| i.bytes).sum();
        prop_assert_eq!(r.raw_bytes, raw);
        prop_assert!(r.rounded_bytes >= raw);
        prop_assert!(r.rounded_bytes - raw < increment * r.rounding_units.max(1));
        prop_assert_eq!(r.rounded_bytes % increment, 0);
        // Session rounding is the finest unit, so it never charges less than coarser ones.
        let coarse = apply_rounding(Rounding { increment_bytes: increment, scope: RoundingScope::SimPeriod }, &items).unwrap();
        let fine = apply_rounding(Rounding { increment_bytes: increment, scope: RoundingScope::Session }, &items).unwrap();
        prop_assert!(fine.rounded_bytes >= r.rounded_bytes && r.rounded_bytes >= coarse.rounded_bytes);
    }

    #[test]
    fn wallet_never_goes_negative_without_an_alert(
        start in 0i64..10_000_000, limit in 0i64..5_000_000,
        ops in proptest::collection::vec((any::<bool>(), 0u64..3_000_000), 0..40),
    ) {
        let mut w = Wallet::new(start, limit, vec![1_000_000]).unwrap();
        let mut overdrawn_alerted = false;
        let mut limit_alerted = false;
        for (top_up, amount) in ops {
            if top_up {
                w.top_up(amount).unwrap();
                if !w.overdrawn() { overdrawn_alerted = false; }
                if !w.limit_exceeded() { limit_alerted = false; }
                continue;
            }
            let before = w.balance_micros;
            let alerts = w.debit(amount).unwrap();
            prop_assert_eq!(w.balance_micros, before - amount as i64);
            overdrawn_alerted |= alerts.iter().any(|a| matches!(a, WalletAlert::Overdrawn { .. }));
            limit_alerted |= alerts.iter().any(|a| matches!(a, WalletAlert::OverdraftLimitExceeded { .. }));
            prop_assert!(!w.overdrawn() || overdrawn_alerted);
            prop_assert!(!w.limit_exceeded() || limit_alerted);
            if before > 1_000_000 && w.balance_micros <= 1_000_000 {
                let crossed = alerts.iter().any(|a| matches!(a, WalletAlert::ThresholdCrossed { .. }));
                prop_assert!(crossed);
            }
        }
    }
}
