//! Lago parity: the worked examples of README.md ("Lago-compatible pricing"), each priced
//! under both semantics, and a proptest against an independent model of Lago's rules.
//!
//! The model follows getlago/lago-api at 1b1c24a6a6c321d7900b05906bf1b20f706c97c2, written
//! from its code and not from [`super::plans`]:
//! - app/services/charge_models/amount_details/range_graduated_service.rb (units of a range:
//!   `min(total, to) - from`, adjacent ranges) and graduated_service.rb (ranges summed with
//!   their `flat_amount` until the first range whose `to_value` is nil or ≥ the units);
//! - volume_service.rb (the range with `from ≤ ceil(units)` and `units ≤ to` prices all units,
//!   plus its flat amount); standard_service.rb (`units × amount`); package_service.rb
//!   (`ceil((units - free_units) / package_size) × amount`, 0 when negative);
//! - app/services/fees/charge_service.rb (`amount.round(currency.exponent)`, BigDecimal's
//!   default mode ROUND_HALF_UP, also config/initializers/money.rb) and
//!   app/services/fees/create_true_up_service.rb (a true-up fee of `min_amount_cents -
//!   amount_cents` when the fee is below the minimum; full periods, so no proration).
//!
//! Exact arithmetic stands in for Ruby's BigDecimal: every figure here is a finite decimal.

use super::*;
use proptest::prelude::*;
use time::macros::date;

const GB: u64 = 1_000_000_000;
const MB: u64 = 1_000_000;
const GIB: u64 = 1 << 30;
const USD: u64 = 1_000_000;

/// One plan from TOML `body` (after `[[plan]]`), read the way the endpoint reads it.
fn plan(body: &str) -> Plan {
    let text = format!("[[plan]]\nid = \"p\"\n{body}");
    PricingConfig::from_toml_str(&text).unwrap().plans.remove("p").unwrap()
}

/// The same plan under both semantics.
fn both(body: &str) -> (Plan, Plan) {
    (plan(body), plan(&format!("semantics = \"lago\"\n{body}")))
}

fn charge(plan: &Plan, bytes: u64) -> Charge {
    let period = plan.cycle.period_of(date!(2026 - 11 - 10)).unwrap();
    rate(plan, period, &[UsageItem { iccid: 1, date: date!(2026 - 11 - 10), bytes }]).unwrap()
}

/// Totals of the Countersign and the Lago charge, in micro-units.
fn totals(body: &str, bytes: u64) -> (u64, u64) {
    let (c, l) = both(body);
    (charge(&c, bytes).total_micros, charge(&l, bytes).total_micros)
}

fn kinds(c: &Charge) -> Vec<(&str, i64)> {
    c.lines.iter().map(|l| (l.kind, l.amount_micros)).collect()
}

const TIERS: &str = r#"currency = "USD"
model = "graduated"
tiers = [{ up_to = 100, price = "0.10" }, { up_to = 500, price = "0.08" }, { price = "0.06" }]
"#;

#[test]
fn example_1_the_issue_600_gb_with_10_gb_free() {
    let body = format!("{TIERS}included_bytes = 10000000000\n");
    let (c, l) = both(&body);
    // Countersign deducts 10 GB before the tiers: 10 + 32 + 90 × 0.06.
    assert_eq!(charge(&c, 600 * GB).total_micros, 47_400_000);
    // Lago: the 10 GB are the start of the first range: 90 × 0.10 + 32 + 6.
    let lc = charge(&l, 600 * GB);
    assert_eq!(lc.total_micros, 47_000_000);
    assert_eq!(
        kinds(&lc),
        [("included", 0), ("tier", 9_000_000), ("tier", 32_000_000), ("tier", 6_000_000), ("rounding", 0)]
    );
    assert_eq!(lc.lines[0].quantity_bytes, 10 * GB);
    assert_eq!(lc.lines[1].quantity_bytes, 90 * GB);
    assert!(lc.lines[..4].iter().all(|x| x.money_rounding == LAGO_PART_ROUNDING));
    assert_eq!(lc.lines[4].money_rounding, LAGO_FEE_ROUNDING);
    assert_eq!(lc.lines[4].description, "usage fee 47 USD rounded once, half up, to 2 decimal(s): 47.000000");
    // Below the allowance nothing is charged under either.
    assert_eq!(totals(&body, 10 * GB), (0, 0));
}

#[test]
fn example_2_600_gb_without_allowance_agree() {
    assert_eq!(totals(TIERS, 600 * GB), (48 * USD, 48 * USD));
}

#[test]
fn example_3_gib_tiers_on_decimal_usage() {
    let body = TIERS.replace("currency", "unit = \"GiB\"\ncurrency");
    // 600 GB = 558.7935447692871 GiB; the last 58.79… GiB at 0.06 are 3.5276126861572265625.
    assert_eq!(totals(&body, 600 * GB), (45_527_613, 45_530_000));
    let l = charge(&both(&body).1, 600 * GB);
    assert_eq!(
        l.lines.last().unwrap().description,
        "usage fee 45.5276126861572265625 USD rounded once, half up, to 2 decimal(s): 45.530000"
    );
    assert_eq!(l.lines.last().unwrap().amount_micros, 2_387);
    assert_eq!(totals(&body, 600 * GIB), (48 * USD, 48 * USD));
}

#[test]
fn example_4_rounded_per_line_or_once() {
    // 123.456789 GB: 10 + 23.456789 × 0.08 = 11.87654312.
    assert_eq!(totals(TIERS, 123_456_789_000), (11_876_543, 11_880_000));
}

#[test]
fn example_5_half_a_cent_rounds_up() {
    let body = "currency = \"USD\"\nmodel = \"per_unit\"\nprice = \"0.01\"\n";
    assert_eq!(totals(body, GB / 2), (5_000, 10_000));
    assert_eq!(totals(body, GB / 2 - 1), (5_000, 0));
    let l = charge(&both(body).1, GB / 2 - 1);
    // Shown to the micro as 0.005000, rounded down to 0.00 by the rounding line.
    assert_eq!(kinds(&l), [("per_unit", 5_000), ("rounding", -5_000)]);
}

#[test]
fn example_6_package_with_free_units() {
    let body = r#"currency = "USD"
unit = "MB"
model = "package"
package_bytes = 100000000
package_price = "0.0125"
included_bytes = 200000000
"#;
    // 1234 MB - 200 MB free = 1034 MB: 11 packages of 100 MB at 0.0125 = 0.1375.
    assert_eq!(totals(body, 1_234 * MB), (137_500, 140_000));
    let l = charge(&both(body).1, 1_234 * MB);
    assert_eq!(kinds(&l), [("included", 0), ("package", 137_500), ("rounding", 2_500)]);
    assert_eq!(totals(body, 200 * MB), (0, 0));
    assert_eq!(totals(body, 200 * MB + 1), (12_500, 10_000));
}

const FLAT_TIERS: &str = r#"currency = "USD"
model = "graduated"
tiers = [
  { up_to = 100, price = "0.10", flat_amount = "5" },
  { up_to = 500, price = "0.08", flat_amount = "2" },
  { price = "0.06", flat_amount = "1" },
]
"#;

#[test]
fn example_7_graduated_flat_amounts() {
    // The first range's flat amount applies even at zero usage, as in Lago.
    assert_eq!(totals(FLAT_TIERS, 0), (5 * USD, 5 * USD));
    assert_eq!(totals(FLAT_TIERS, 100 * GB), (15 * USD, 15 * USD));
    // One byte into tier 2 brings its flat amount.
    assert_eq!(totals(FLAT_TIERS, 100 * GB + 1), (17 * USD, 17 * USD));
    assert_eq!(totals(FLAT_TIERS, 600 * GB), (56 * USD, 56 * USD));
    let c = charge(&both(FLAT_TIERS).0, 600 * GB);
    assert_eq!(
        kinds(&c),
        [
            ("tier", 10 * USD as i64),
            ("tier_flat", 5 * USD as i64),
            ("tier", 32 * USD as i64),
            ("tier_flat", 2 * USD as i64),
            ("tier", 6 * USD as i64),
            ("tier_flat", USD as i64),
        ]
    );
    assert_eq!(c.lines[3].description, "tier 2 flat amount");
}

#[test]
fn example_8_volume_flat_amounts() {
    let body = r#"currency = "USD"
model = "volume"
tiers = [{ up_to = 100, price = "0.10" }, { up_to = 500, price = "0.08", flat_amount = "10" }, { price = "0.06", flat_amount = "20" }]
"#;
    assert_eq!(totals(body, 300 * GB), (34 * USD, 34 * USD));
    assert_eq!(totals(body, 100 * GB), (10 * USD, 10 * USD));
    assert_eq!(totals(body, 600 * GB), (56 * USD, 56 * USD));
}

#[test]
fn example_9_minimum_charge_true_up() {
    let body = "currency = \"USD\"\nmodel = \"per_unit\"\nprice = \"0.10\"\nflat_fee = \"5\"\nminimum_charge = \"20\"\n";
    // 123.4567 GB × 0.10 = 12.34567: raised to 20, the flat fee on top.
    assert_eq!(totals(body, 123_456_700_000), (25 * USD, 25 * USD));
    let (c, l) = both(body);
    let cc = charge(&c, 123_456_700_000);
    assert_eq!(kinds(&cc), [("flat_fee", 5_000_000), ("per_unit", 12_345_670), ("minimum", 7_654_330)]);
    assert_eq!(
        cc.lines[2].description,
        "minimum usage charge 20.000000: usage charge 12.345670 raised by a true-up of 7.654330"
    );
    let lc = charge(&l, 123_456_700_000);
    // Lago compares the rounded fee (12.35) with the minimum: a true-up of 7.65.
    assert_eq!(
        kinds(&lc),
        [("flat_fee", 5_000_000), ("per_unit", 12_345_670), ("rounding", 4_330), ("minimum", 7_650_000)]
    );
    assert_eq!(totals(body, 250 * GB), (30 * USD, 30 * USD));
}

#[test]
fn example_10_currency_exponents() {
    let jpy = "currency = \"JPY\"\nmodel = \"per_unit\"\nprice = \"1.5\"\n";
    assert_eq!(totals(jpy, 3 * GB), (4_500_000, 5_000_000));
    assert_eq!(totals(jpy, 2_999_000_000), (4_498_500, 4_000_000));
    let kwd = "currency = \"KWD\"\nmodel = \"per_unit\"\nprice = \"0.0125\"\n";
    assert_eq!(totals(kwd, GB), (12_500, 13_000));
}

#[test]
fn example_11_per_unit_allowance_is_the_same_either_way() {
    let body = "currency = \"USD\"\nmodel = \"per_unit\"\nprice = \"0.10\"\nincluded_bytes = 10000000000\n";
    assert_eq!(totals(body, 25 * GB), (1_500_000, 1_500_000));
}

#[test]
fn lago_plans_that_lago_cannot_hold_are_refused_by_key() {
    let err = |body: &str| {
        PricingConfig::from_toml_str(&format!("[[plan]]\nid = \"p\"\nsemantics = \"lago\"\n{body}"))
            .unwrap_err()
            .to_string()
    };
    let e = err("currency = \"HUF\"\nmodel = \"per_unit\"\nprice = \"1\"\n");
    assert!(e.starts_with("plan[0].currency: 'HUF'") && e.contains("ISO 4217"), "{e}");
    assert!(err("currency = \"XYZ\"\nmodel = \"per_unit\"\nprice = \"1\"\n")
        .contains("not a currency Lago accepts"));
    let e = err("currency = \"USD\"\nmodel = \"per_unit\"\nprice = \"1\"\nflat_fee = \"1.005\"\n");
    assert!(e.starts_with("plan[0].flat_fee: "), "{e}");
    let e = err("currency = \"JPY\"\nmodel = \"per_unit\"\nprice = \"1\"\nminimum_charge = \"10.5\"\n");
    assert!(e.starts_with("plan[0].minimum_charge: "), "{e}");
    let e = err("currency = \"USD\"\nmodel = \"volume\"\ntiers = [{ price = \"1\" }]\nincluded_bytes = 1\n");
    assert!(e.starts_with("plan[0].included_bytes: Lago's volume"), "{e}");
    let e = err(&format!("{TIERS}included_bytes = 100000000001\n"));
    assert!(e.starts_with("plan[0].included_bytes: "), "{e}");
    let e = PricingConfig::from_toml_str("[[plan]]\nid = \"p\"\nsemantics = \"stripe\"\ncurrency = \"USD\"\nmodel = \"per_unit\"\nprice = \"1\"\n")
        .unwrap_err()
        .to_string();
    assert_eq!(e, "plan[0].semantics: 'stripe' is not countersign or lago");
    // The same plans are fine under Countersign semantics.
    assert!(PricingConfig::from_toml_str("[[plan]]\nid = \"p\"\ncurrency = \"HUF\"\nmodel = \"per_unit\"\nprice = \"1\"\nflat_fee = \"1.005\"\n").is_ok());
}

#[test]
fn lago_currency_table_covers_lagos_list() {
    assert_eq!(lago_currency_exponent("USD"), Some(2));
    assert_eq!(lago_currency_exponent("EUR"), Some(2));
    assert_eq!(lago_currency_exponent("JPY"), Some(0));
    assert_eq!(lago_currency_exponent("BHD"), Some(3));
    assert_eq!(lago_currency_exponent("CLF"), Some(4));
    assert!(LAGO_CURRENCIES_DISAGREEING.iter().all(|c| lago_currency_exponent(c).is_none()));
}

// ---- an independent model of Lago's rules, in exact fractions ----

/// A non-negative fraction, kept reduced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Q {
    n: u128,
    d: u128,
}

fn gcd(a: u128, b: u128) -> u128 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Q {
    fn new(n: u128, d: u128) -> Q {
        let g = gcd(n, d).max(1);
        Q { n: n / g, d: d / g }
    }
    fn int(n: u64) -> Q {
        Q::new(u128::from(n), 1)
    }
    /// A money string's value: micro-units over 10⁶.
    fn micros(m: u64) -> Q {
        Q::new(u128::from(m), 1_000_000)
    }
    fn add(self, o: Q) -> Q {
        Q::new(self.n * o.d + o.n * self.d, self.d * o.d)
    }
    fn sub_or_zero(self, o: Q) -> Q {
        let (a, b) = (self.n * o.d, o.n * self.d);
        Q::new(a.saturating_sub(b), self.d * o.d)
    }
    fn mul(self, o: Q) -> Q {
        let (g1, g2) = (gcd(self.n, o.d).max(1), gcd(o.n, self.d).max(1));
        Q::new((self.n / g1) * (o.n / g2), (self.d / g2) * (o.d / g1))
    }
    fn le(self, o: Q) -> bool {
        self.n * o.d <= o.n * self.d
    }
    fn ceil(self) -> u128 {
        self.n.div_ceil(self.d)
    }
    /// BigDecimal#round(exponent) in ROUND_HALF_UP, as micro-units.
    fn round_half_up_micros(self, exponent: u32) -> u64 {
        let scale = 10u128.pow(exponent);
        let minor = (self.n * scale * 2 + self.d) / (self.d * 2);
        // Beyond 64 bits stays beyond: the caller expects an overflow refusal there.
        u64::try_from(minor * 10u128.pow(6 - exponent)).unwrap_or(u64::MAX)
    }
}

/// A Lago range: `from`, `to` (None = open) in metric units, per-unit and flat amounts.
struct LagoRange {
    from: Q,
    to: Option<Q>,
    per_unit: Q,
    flat: Q,
}

/// Lago's graduated amount: range_graduated_service.rb + graduated_service.rb.
fn lago_graduated(ranges: &[LagoRange], units: Q) -> Q {
    let mut amount = Q::int(0);
    for r in ranges {
        let effective = match r.to {
            Some(to) if to.le(units) => to,
            _ => units,
        };
        let range_units = effective.sub_or_zero(r.from);
        let per_unit = if range_units.n == 0 { Q::int(0) } else { r.per_unit };
        amount = amount.add(range_units.mul(per_unit)).add(r.flat);
        if r.to.is_none_or(|to| units.le(to)) {
            break;
        }
    }
    amount
}

/// Lago's volume amount: volume_service.rb.
fn lago_volume(ranges: &[LagoRange], units: Q) -> Q {
    let ceil = Q::new(units.ceil(), 1);
    let r = ranges
        .iter()
        .find(|r| r.from.le(ceil) && r.to.is_none_or(|to| units.le(to)))
        .expect("the last range is open");
    units.mul(r.per_unit).add(r.flat)
}

/// A per-unit price as Lago holds it for a metric in bytes: `price / unit bytes` (an exact
/// decimal, which Lago's DecimalAmountService accepts at any precision).
fn per_byte(price_micros: u64, unit_bytes: u64) -> Q {
    Q::micros(price_micros).mul(Q::new(1, u128::from(unit_bytes)))
}

/// What a Lago user configures for a Countersign tier list: adjacent ranges in bytes, and
/// for an allowance a zero-priced first range (carrying the first tier's flat amount, which
/// Lago charges from the first unit).
fn lago_ranges(tiers: &[Tier], free_units: Q, unit_bytes: u64) -> Vec<LagoRange> {
    let mut out = Vec::new();
    let mut from = Q::int(0);
    for (i, t) in tiers.iter().enumerate() {
        let to = t.up_to_units.map(|u| Q::int(u * unit_bytes));
        let mut flat = Q::micros(t.flat_amount_micros);
        if i == 0 && free_units.n > 0 {
            out.push(LagoRange { from, to: Some(free_units), per_unit: Q::int(0), flat });
            from = free_units;
            flat = Q::int(0);
            if to == Some(free_units) {
                continue;
            }
        }
        out.push(LagoRange { from, to, per_unit: per_byte(t.unit_price_micros, unit_bytes), flat });
        from = to.unwrap_or(from);
    }
    out
}

/// Lago's usage fee plus true-up (without the flat fee) for `bytes` under `plan`, in micros,
/// with the billable metric the exporter feeds: the sum of `properties.bytes`, so Lago's
/// units are bytes, tier bounds `up_to × unit bytes` and prices per byte.
fn lago_model(plan: &Plan, bytes: u64, exponent: u32) -> u64 {
    let ub = plan.unit.bytes();
    let units = Q::int(bytes);
    let free = Q::int(plan.included_bytes);
    let amount = match &plan.model {
        ChargeModel::PerUnit { unit_price_micros } if plan.included_bytes == 0 => {
            units.mul(per_byte(*unit_price_micros, ub))
        }
        ChargeModel::PerUnit { unit_price_micros } => {
            let t =
                [Tier { up_to_units: None, unit_price_micros: *unit_price_micros, flat_amount_micros: 0 }];
            lago_graduated(&lago_ranges(&t, free, ub), units)
        }
        ChargeModel::Graduated { tiers } => lago_graduated(&lago_ranges(tiers, free, ub), units),
        ChargeModel::Volume { tiers } => lago_volume(&lago_ranges(tiers, Q::int(0), ub), units),
        ChargeModel::Package { package_bytes, package_price_micros } => {
            let size = Q::int(*package_bytes);
            let paid = units.sub_or_zero(free);
            let count = Q::new(paid.n * size.d, paid.d * size.n).ceil();
            Q::new(count, 1).mul(Q::micros(*package_price_micros))
        }
    };
    let fee = amount.round_half_up_micros(exponent);
    fee.max(plan.minimum_micros)
}

fn arb_tiers() -> impl Strategy<Value = Vec<Tier>> {
    let tier = (1u64..1_000, 0u64..300_000, prop_oneof![Just(0u64), 0u64..20_000_000]);
    (proptest::collection::vec(tier, 0..5), 0u64..300_000, 0u64..5_000_000).prop_map(
        |(v, last, last_flat)| {
            let mut bound = 0;
            let mut tiers: Vec<Tier> = v
                .into_iter()
                .map(|(step, price, flat)| {
                    bound += step;
                    Tier { up_to_units: Some(bound), unit_price_micros: price, flat_amount_micros: flat }
                })
                .collect();
            tiers.push(Tier { up_to_units: None, unit_price_micros: last, flat_amount_micros: last_flat });
            tiers
        },
    )
}

fn arb_model() -> impl Strategy<Value = ChargeModel> {
    prop_oneof![
        (0u64..2_000_000).prop_map(|p| ChargeModel::PerUnit { unit_price_micros: p }),
        arb_tiers().prop_map(|tiers| ChargeModel::Graduated { tiers }),
        arb_tiers().prop_map(|tiers| ChargeModel::Volume { tiers }),
        (prop_oneof![1u64..5_000, (1u64..50).prop_map(|n| n * GB)], 0u64..10_000_000)
            .prop_map(|(n, p)| ChargeModel::Package { package_bytes: n, package_price_micros: p }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn lago_semantics_match_an_independent_model_of_lago(
        model in arb_model(),
        unit in prop_oneof![Just(Unit::Gb), Just(Unit::Gib), Just(Unit::Mb)],
        bytes in prop_oneof![0u64..1 << 44, (0u64..2_000).prop_map(|g| g * GB)],
        at_bound in proptest::option::of((0usize..6, 0u64..3)),
        free_frac in 0u64..=100,
        exponent in prop_oneof![Just(0u32), Just(2), Just(3), Just(4)],
        minimum_minor in prop_oneof![Just(0u64), 0u64..10_000_000],
        flat_fee_minor in 0u64..1_000,
    ) {
        let ub = unit.bytes();
        // The allowance lies where Lago can hold it.
        let included_bytes = match &model {
            ChargeModel::Volume { .. } => 0,
            ChargeModel::Package { package_bytes, .. } => free_frac * package_bytes * 7 / 3,
            ChargeModel::Graduated { tiers } => {
                let first = tiers[0].up_to_units.map_or(1 << 40, |u| u * ub);
                first / 100 * free_frac
            }
            ChargeModel::PerUnit { .. } => free_frac * ub * 3 / 7,
        };
        // Often exactly at a tier bound, or a byte either side, where ranges hand over.
        let bounds: Vec<u64> = match &model {
            ChargeModel::Graduated { tiers } | ChargeModel::Volume { tiers } => {
                tiers.iter().filter_map(|t| t.up_to_units).map(|u| u * ub).collect()
            }
            _ => vec![included_bytes],
        };
        let bytes = match at_bound {
            Some((i, d)) if !bounds.is_empty() => (bounds[i % bounds.len()] + d).saturating_sub(1),
            _ => bytes,
        };
        let minor = 10u64.pow(6 - exponent);
        let plan = Plan {
            id: "p".into(),
            currency: "XXX".into(),
            unit,
            model,
            flat_fee_micros: flat_fee_minor * minor,
            included_bytes,
            rounding: Rounding { increment_bytes: 1, scope: RoundingScope::SimPeriod },
            cycle: BillingCycle::Daily,
            lifetime: None,
            semantics: Semantics::Lago { exponent },
            minimum_micros: minimum_minor * minor,
        };
        let day = date!(2026 - 11 - 10);
        let want = plan.flat_fee_micros.checked_add(lago_model(&plan, bytes, exponent));
        let charged = rate(&plan, plan.cycle.period_of(day).unwrap(), &[UsageItem { iccid: 1, date: day, bytes }]);
        // A charge beyond what a line amount holds (i64 micros) is refused, never wrapped.
        if want.is_none_or(|w| i64::try_from(w).is_err()) {
            prop_assert!(matches!(charged, Err(PricingError::Overflow(_))), "{:?}", charged);
            return Ok(());
        }
        let c = charged.unwrap();
        prop_assert_eq!(c.total_micros, plan.flat_fee_micros + lago_model(&plan, bytes, exponent));
        prop_assert_eq!(c.total_micros % minor, 0);
        // Only the rounding line is ever negative, and by less than half a minor unit… plus
        // the half micros of the lines it corrects.
        let n = c.lines.len() as i64;
        for l in &c.lines {
            prop_assert!(l.amount_micros >= 0 || l.kind == "rounding");
            if l.kind == "rounding" {
                prop_assert!(l.amount_micros.unsigned_abs() <= minor / 2 + n as u64);
            }
        }
    }

    #[test]
    fn countersign_and_lago_differ_by_rounding_only_without_allowance(
        tiers in arb_tiers(), bytes in 0u64..1 << 44,
    ) {
        let mut c = Plan {
            id: "p".into(),
            currency: "USD".into(),
            unit: Unit::Gb,
            model: ChargeModel::Graduated { tiers },
            flat_fee_micros: 0,
            included_bytes: 0,
            rounding: Rounding { increment_bytes: 1, scope: RoundingScope::SimPeriod },
            cycle: BillingCycle::Daily,
            lifetime: None,
            semantics: Semantics::Countersign,
            minimum_micros: 0,
        };
        let day = date!(2026 - 11 - 10);
        let items = [UsageItem { iccid: 1, date: day, bytes }];
        let period = c.cycle.period_of(day).unwrap();
        let ours = rate(&c, period, &items).unwrap();
        c.semantics = Semantics::Lago { exponent: 2 };
        let lago = rate(&c, period, &items).unwrap();
        // Lines rounded half up to the micro each, the fee once to the cent.
        let lines = ours.lines.len() as u64;
        prop_assert!(ours.total_micros.abs_diff(lago.total_micros) <= 5_000 + lines);
    }
}
