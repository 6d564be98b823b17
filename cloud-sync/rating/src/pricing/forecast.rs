//! Lifetime quota forecasts: when a SIM's quota runs out at its recent rate.

#[allow(unused_imports)]
use super::*;

/// When a SIM's lifetime quota runs out at its recent rate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QuotaForecast {
    /// The quota, bytes.
    pub quota_bytes: u64,
    /// Used since the plan started, up to and including `today`.
    pub used_bytes: u64,
    /// Quota minus used, 0 when exhausted.
    pub remaining_bytes: u64,
    /// Days averaged for the rate.
    pub window_days: u32,
    /// Bytes used in the window.
    pub window_bytes: u64,
    /// Day the quota runs out at the window's average rate; `None` if the rate is 0 or that
    /// day lies past the last date the calendar holds (9999-12-31).
    #[serde(serialize_with = "crate::text::json_opt_date::serialize")]
    pub exhausted_on: Option<Date>,
    /// Last day of the plan.
    #[serde(serialize_with = "crate::text::json_date::serialize")]
    pub expires_on: Date,
    /// Whether the quota runs out before the plan expires at this rate.
    pub runs_out_before_expiry: bool,
    /// Average bytes per day that would last exactly until expiry.
    pub sustainable_bytes_per_day: u64,
}

/// Forecasts a lifetime quota (e.g. 500 MB over 10 years) from daily usage.
///
/// `daily` is the SIM's bytes per day (any order, days outside the plan ignored). The rate is
/// the average of the last `window_days` days up to `today` (fewer if the plan is younger);
/// the exhaustion day is the first day on which cumulative usage at that rate reaches the
/// quota, computed in integers: `today + ceil(remaining × window / window_bytes)`.
pub fn forecast_quota(
    quota_bytes: u64,
    plan_start: Date,
    expires_on: Date,
    today: Date,
    window_days: u32,
    daily: &[(Date, u64)],
) -> Result<QuotaForecast, PricingError> {
    if window_days == 0 || window_days > FORECAST_WINDOW_DAYS_MAX {
        return Err(PricingError::Forecast("window_days must be 1 to 366"));
    }
    if quota_bytes > FORECAST_QUOTA_BYTES_MAX {
        return Err(PricingError::Forecast("quota_bytes must be at most 1152921504606846976 (1 EiB)"));
    }
    if expires_on < plan_start {
        return Err(PricingError::Forecast("the plan expires before it starts"));
    }
    let age_days =
        u32::try_from((today - plan_start).whole_days().saturating_add(1).max(1)).unwrap_or(u32::MAX);
    let window = window_days.min(age_days);
    // Every date operation is checked: the parameters may name any day the calendar holds.
    let window_start =
        today.checked_sub(time::Duration::days(i64::from(window).saturating_sub(1))).unwrap_or(Date::MIN);
    let (mut used, mut window_bytes) = (0u64, 0u64);
    for (d, b) in daily {
        if *d >= plan_start && *d <= today {
            used = used.checked_add(*b).ok_or(PricingError::Overflow("quota usage"))?;
            if *d >= window_start {
                window_bytes = window_bytes.checked_add(*b).ok_or(PricingError::Overflow("quota usage"))?;
            }
        }
    }
    let remaining = quota_bytes.saturating_sub(used);
    let exhausted_on = if remaining == 0 {
        Some(today)
    } else if window_bytes == 0 {
        None
    } else {
        // remaining < 2^60 and window ≤ 366: the product fits a u128 with room to spare.
        let days = (u128::from(remaining) * u128::from(window)).div_ceil(u128::from(window_bytes));
        i64::try_from(days)
            .ok()
            .and_then(|d| d.checked_mul(86_400))
            .and_then(|s| today.checked_add(time::Duration::seconds(s)))
    };
    let days_to_expiry = u64::try_from((expires_on - today).whole_days()).unwrap_or(0);
    Ok(QuotaForecast {
        quota_bytes,
        used_bytes: used,
        remaining_bytes: remaining,
        window_days: window,
        window_bytes,
        exhausted_on,
        expires_on,
        runs_out_before_expiry: exhausted_on.is_some_and(|d| d <= expires_on),
        sustainable_bytes_per_day: remaining.checked_div(days_to_expiry).unwrap_or(remaining),
    })
}
