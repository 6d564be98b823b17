//! Administration on the wire: meter and gateway registrations, API tokens, settlement runs
//! and the list of SIMs whose usage cannot be derived. Knows nothing of axum; of the store
//! it names only [`Registration`], the outcome a registration reply carries as it is.

use serde::{Deserialize, Serialize};

use crate::auth::Role;
use crate::store::Registration;
use crate::wire::usage::UnderivableSim;

/// Path of meter registration.
pub const ADMIN_METERS_PATH: &str = "/v1/admin/meters";
/// Path of gateway registration.
pub const ADMIN_GATEWAYS_PATH: &str = "/v1/admin/gateways";
/// Path of API token management (list, create).
pub const ADMIN_TOKENS_PATH: &str = "/v1/admin/tokens";
/// Path of one API token (revoke), axum/OpenAPI template.
pub const ADMIN_TOKEN_PATH: &str = "/v1/admin/tokens/{name}";
/// Largest admin request body: a registration is well under 200 bytes.
pub const ADMIN_BODY_BYTES_MAX: usize = 16 * 1024;
/// Path of a settlement run.
pub const ADMIN_SETTLE_PATH: &str = "/v1/admin/settle";
/// Path of the list of SIMs whose usage cannot be derived.
pub const ADMIN_FAULTS_PATH: &str = "/v1/admin/faults";

/// Answer of `GET /v1/admin/faults`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultsReply {
    /// Every SIM whose usage cannot be derived, by ICCID, with the record and the reason.
    pub underivable: Vec<UnderivableSim>,
}

/// Body of `POST /v1/admin/meters`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterRegistration {
    /// The meter's id.
    pub meter_id: u64,
    /// Its 32-byte HMAC key, 64 hex digits.
    pub key_hex: String,
}

/// Body of `POST /v1/admin/gateways`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRegistration {
    /// The gateway's id.
    pub gateway_id: u64,
    /// Its Ed25519 public key, 64 hex digits.
    pub public_key_hex: String,
}

/// Answer of a registration: `created` (201) or `already_registered` (200).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationReply {
    /// What the registration did.
    pub status: Registration,
}

/// Body of `POST /v1/admin/tokens`: the SHA-256 of a token made by the caller, who keeps
/// the token itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRegistration {
    /// A unique name, 1 to 64 of `A-Z a-z 0-9 . _ -`.
    pub name: String,
    /// `query` or `admin`.
    pub role: Role,
    /// SHA-256 of the token's 32 bytes, 64 hex digits.
    pub token_sha256_hex: String,
}

/// One token in [`TokenList`]; never its secret or hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Its name.
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Answer of `GET /v1/admin/tokens`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenList {
    /// Every token in the store, by name (the bootstrap admin token is not listed).
    pub tokens: Vec<TokenInfo>,
}

/// Body of `POST /v1/admin/settle`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleRequest {
    /// IANA zone days are cut in; fixed by the ledger's first settlement.
    pub tz: String,
    /// Hours after a day's end before it closes.
    pub settlement_hours: u32,
}

/// Answer of `POST /v1/admin/settle`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleReply {
    /// SIM-days settled by this run.
    pub settled: usize,
    /// Adjustments booked by this run.
    pub adjustments: usize,
    /// SIMs none of whose days was settled or adjusted because their usage cannot be
    /// derived.
    #[serde(default)]
    pub underivable: Vec<UnderivableSim>,
}
