//! Billing at the endpoint: the rating core's decisions ([`countersign_rating::billing`],
//! re-exported here) and the error of a billing operation, which adds the store's failures
//! to the decisions' refusals.

pub use countersign_rating::billing::*;

use countersign_rating::pricing::PricingError;
use countersign_rating::usage::UsageError;

use crate::store::StoreError;

/// The rating core's refusals, by another name where both errors are in scope.
pub use countersign_rating::billing::BillingError as Refusal;

/// Why a billing operation failed.
#[derive(Debug, thiserror::Error)]
#[allow(clippy::large_enum_variant)]
pub enum BillingError {
    /// A decision was refused (plan, usage, wallet, request). Not recoverable by retrying.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The store failed; recoverable when the store error is.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl BillingError {
    /// Whether retrying later may succeed without anyone changing data or configuration.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, BillingError::Store(e) if e.is_recoverable())
    }
}

impl From<PricingError> for BillingError {
    fn from(e: PricingError) -> Self {
        BillingError::Refused(Refusal::Pricing(e))
    }
}

impl From<UsageError> for BillingError {
    fn from(e: UsageError) -> Self {
        BillingError::Refused(Refusal::Usage(e))
    }
}
