//! Prepaid wallets: balances, alert conditions and the alerts a debit raises.

#[allow(unused_imports)]
use super::*;

/// An alert a wallet debit raised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "alert", rename_all = "snake_case")]
pub enum WalletAlert {
    /// The balance fell to or below a configured threshold.
    ThresholdCrossed {
        /// The threshold, micro-units.
        threshold_micros: i64,
        /// The balance after the debit.
        balance_micros: i64,
    },
    /// The balance went below zero: usage is now on credit.
    Overdrawn {
        /// The balance after the debit.
        balance_micros: i64,
    },
    /// The balance went below minus the overdraft limit: the SIMs should be barred.
    OverdraftLimitExceeded {
        /// The balance after the debit.
        balance_micros: i64,
        /// The limit.
        overdraft_limit_micros: i64,
    },
}

/// What a wallet alert is about; it holds while the balance stays on its side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AlertCondition {
    /// The balance is at or below this threshold, micro-units.
    Threshold(i64),
    /// The balance is below zero.
    Overdrawn,
    /// The balance is below minus the overdraft limit.
    OverdraftLimitExceeded,
}

impl AlertCondition {
    /// A stable text form for stores: `threshold:<micros>`, `overdrawn`, `overdraft_limit_exceeded`.
    pub fn key(self) -> String {
        match self {
            AlertCondition::Threshold(t) => format!("threshold:{t}"),
            AlertCondition::Overdrawn => "overdrawn".to_owned(),
            AlertCondition::OverdraftLimitExceeded => "overdraft_limit_exceeded".to_owned(),
        }
    }

    /// The inverse of [`AlertCondition::key`].
    pub fn from_key(key: &str) -> Option<Self> {
        match key {
            "overdrawn" => Some(AlertCondition::Overdrawn),
            "overdraft_limit_exceeded" => Some(AlertCondition::OverdraftLimitExceeded),
            other => other.strip_prefix("threshold:")?.parse().ok().map(AlertCondition::Threshold),
        }
    }
}

impl WalletAlert {
    /// The condition that raised it.
    pub fn condition(&self) -> AlertCondition {
        match self {
            WalletAlert::ThresholdCrossed { threshold_micros, .. } => {
                AlertCondition::Threshold(*threshold_micros)
            }
            WalletAlert::Overdrawn { .. } => AlertCondition::Overdrawn,
            WalletAlert::OverdraftLimitExceeded { .. } => AlertCondition::OverdraftLimitExceeded,
        }
    }

    /// `threshold_crossed`, `overdrawn` or `overdraft_limit_exceeded`.
    pub fn kind(&self) -> &'static str {
        match self {
            WalletAlert::ThresholdCrossed { .. } => "threshold_crossed",
            WalletAlert::Overdrawn { .. } => "overdrawn",
            WalletAlert::OverdraftLimitExceeded { .. } => "overdraft_limit_exceeded",
        }
    }

    /// The balance when it was raised.
    pub fn balance_micros(&self) -> i64 {
        match self {
            WalletAlert::ThresholdCrossed { balance_micros, .. }
            | WalletAlert::Overdrawn { balance_micros }
            | WalletAlert::OverdraftLimitExceeded { balance_micros, .. } => *balance_micros,
        }
    }
}

/// A prepaid credit wallet.
///
/// Usage has happened by the time it is priced, so a debit is never refused: refusing it would
/// lose revenue silently. Instead the balance may go negative, and every downward crossing of
/// a threshold, of zero and of the overdraft limit raises an alert; [`Wallet::overdrawn`]
/// and [`Wallet::limit_exceeded`] stay visible until a top-up lifts the balance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Wallet {
    /// Balance in micro-units.
    pub balance_micros: i64,
    /// How far below zero the balance may go before [`WalletAlert::OverdraftLimitExceeded`].
    pub overdraft_limit_micros: i64,
    /// Alert thresholds (≥ 0), micro-units.
    pub thresholds_micros: Vec<i64>,
}

impl Wallet {
    /// A wallet; thresholds beyond [`WALLET_THRESHOLDS_MAX`] or negative values are refused.
    pub fn new(
        balance_micros: i64,
        overdraft_limit_micros: i64,
        thresholds_micros: Vec<i64>,
    ) -> Result<Self, PricingError> {
        if thresholds_micros.len() > WALLET_THRESHOLDS_MAX || thresholds_micros.iter().any(|t| *t < 0) {
            return Err(invalid(
                "wallet.thresholds",
                format!("up to {WALLET_THRESHOLDS_MAX} non-negative amounts"),
            ));
        }
        if overdraft_limit_micros < 0 {
            return Err(invalid("wallet.overdraft_limit", "must not be negative"));
        }
        Ok(Self { balance_micros, overdraft_limit_micros, thresholds_micros })
    }

    /// Whether the balance is below zero.
    pub fn overdrawn(&self) -> bool {
        self.balance_micros < 0
    }

    /// Whether the balance is below minus the overdraft limit.
    pub fn limit_exceeded(&self) -> bool {
        self.balance_micros < -self.overdraft_limit_micros
    }

    /// Debits `amount_micros` (a charge's total) and returns the alerts the debit raised.
    pub fn debit(&mut self, amount_micros: u64) -> Result<Vec<WalletAlert>, PricingError> {
        let amount = i64::try_from(amount_micros).map_err(|_| PricingError::Overflow("wallet debit"))?;
        let before = self.balance_micros;
        let after = before.checked_sub(amount).ok_or(PricingError::Overflow("wallet balance"))?;
        self.balance_micros = after;
        let mut alerts: Vec<WalletAlert> = self
            .thresholds_micros
            .iter()
            .filter(|t| before > **t && after <= **t)
            .map(|t| WalletAlert::ThresholdCrossed { threshold_micros: *t, balance_micros: after })
            .collect();
        if before >= 0 && after < 0 {
            alerts.push(WalletAlert::Overdrawn { balance_micros: after });
        }
        let floor = -self.overdraft_limit_micros;
        if before >= floor && after < floor {
            alerts.push(WalletAlert::OverdraftLimitExceeded {
                balance_micros: after,
                overdraft_limit_micros: self.overdraft_limit_micros,
            });
        }
        for a in &alerts {
            tracing::warn!(alert = ?a, "wallet alert");
        }
        Ok(alerts)
    }

    /// The alert conditions that hold at the current balance: each threshold the balance is
    /// at or below, below zero, below minus the overdraft limit. An alert fires when its
    /// condition starts to hold (the same crossings [`Wallet::debit`] reports); a billing run
    /// keeps the set durably so that each crossing alerts once, and a top-up that lifts the
    /// balance re-arms what no longer holds.
    pub fn conditions(&self) -> std::collections::BTreeSet<AlertCondition> {
        let mut out: std::collections::BTreeSet<AlertCondition> = self
            .thresholds_micros
            .iter()
            .filter(|t| self.balance_micros <= **t)
            .map(|t| AlertCondition::Threshold(*t))
            .collect();
        if self.overdrawn() {
            out.insert(AlertCondition::Overdrawn);
        }
        if self.limit_exceeded() {
            out.insert(AlertCondition::OverdraftLimitExceeded);
        }
        out
    }

    /// The alert `condition` raises at the current balance.
    pub fn alert(&self, condition: AlertCondition) -> WalletAlert {
        let balance_micros = self.balance_micros;
        match condition {
            AlertCondition::Threshold(threshold_micros) => {
                WalletAlert::ThresholdCrossed { threshold_micros, balance_micros }
            }
            AlertCondition::Overdrawn => WalletAlert::Overdrawn { balance_micros },
            AlertCondition::OverdraftLimitExceeded => WalletAlert::OverdraftLimitExceeded {
                balance_micros,
                overdraft_limit_micros: self.overdraft_limit_micros,
            },
        }
    }

    /// Adds credit.
    pub fn top_up(&mut self, amount_micros: u64) -> Result<(), PricingError> {
        let amount = i64::try_from(amount_micros).map_err(|_| PricingError::Overflow("wallet top-up"))?;
        self.balance_micros =
            self.balance_micros.checked_add(amount).ok_or(PricingError::Overflow("wallet balance"))?;
        Ok(())
    }
}
