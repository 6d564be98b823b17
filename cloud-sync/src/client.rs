//! A small async client for the endpoint's admin and usage API.
//!
//! `base_url` is the endpoint's root, e.g. `https://rating.example:8443` (a trailing slash is
//! fine); `token` is the admin token as hex, as the token file holds it.
//!
//! The shapes sent and decoded are [`crate::wire`]'s, the same the routes use. Import
//! direction: client → wire; the client knows nothing of the routes (`crate::api`).

use countersign_meter::METER_KEY_BYTES;
use countersign_protocol::ErrorBody;
use ed25519_dalek::VerifyingKey;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::auth::{token_sha256, Role, TOKEN_BYTES};
use crate::store::rollups::USAGE_PAGE_SIMS_MAX;
use crate::text::format_date;
use crate::usage::DateRange;
use crate::wire::admin::{
    FaultsReply, GatewayRegistration, MeterRegistration, SettleReply, SettleRequest, TokenList,
    TokenRegistration, ADMIN_FAULTS_PATH, ADMIN_GATEWAYS_PATH, ADMIN_METERS_PATH, ADMIN_SETTLE_PATH,
    ADMIN_TOKENS_PATH,
};
use crate::wire::billing::{
    ChargesQuery, ChargesReply, ForecastQuery, ForecastReply, RunReply, TopupReply, TopupRequest,
    WalletsReply, ADMIN_BILLING_RUN_PATH, ADMIN_WALLET_TOPUPS_PATH, BILLING_CHARGES_PATH,
    BILLING_FORECAST_PATH, BILLING_WALLETS_PATH,
};
use crate::wire::ops::{HealthReply, HEALTH_PATH};
use crate::wire::usage::{
    LedgerReply, SimUsage, SimsUsage, ZoneDays, USAGE_DAYS_PATH, USAGE_LEDGER_PATH, USAGE_PATH,
    USAGE_SIMS_PATH,
};

/// Why a request to the endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The request did not complete (connect, TLS, timeout). Recoverable: retry later.
    #[error("request to {url} failed")]
    Transport {
        /// The URL asked.
        url: String,
        /// reqwest's error.
        source: reqwest::Error,
    },
    /// The endpoint answered with an error. Recoverable only for 5xx (see
    /// [`ClientError::is_recoverable`]); a 4xx needs a different request.
    #[error("{url} answered {status} {code}: {error}")]
    Refused {
        /// The URL asked.
        url: String,
        /// HTTP status.
        status: u16,
        /// The endpoint's error code, e.g. `conflict`, or `http_error` without a JSON body.
        code: String,
        /// The endpoint's message.
        error: String,
    },
    /// The endpoint answered success with a body this client does not understand: a
    /// version mismatch, not recoverable by retrying.
    #[error("{url} answered with an unreadable body")]
    BadResponse {
        /// The URL asked.
        url: String,
        /// The decoding error.
        source: reqwest::Error,
    },
    /// A paged answer went on for more than [`CLIENT_PAGES_MAX`] pages (or a page said
    /// nothing): the endpoint pages wrongly. Not recoverable by retrying.
    #[error("{url} answered more than {CLIENT_PAGES_MAX} pages")]
    TooManyPages {
        /// The URL asked.
        url: String,
    },
}

impl ClientError {
    /// Whether retrying the same request later may succeed.
    pub fn is_recoverable(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Refused { status, .. } => *status >= 500,
            ClientError::BadResponse { .. } | ClientError::TooManyPages { .. } => false,
        }
    }
}

fn url(base_url: &str, path: &str) -> String {
    format!("{}{path}", base_url.trim_end_matches('/'))
}

async fn check(url: &str, response: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    let (code, error) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => (body.code, body.error),
        Err(_) => ("http_error".to_owned(), text),
    };
    Err(ClientError::Refused { url: url.to_owned(), status: status.as_u16(), code, error })
}

async fn post_json(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: &impl Serialize,
) -> Result<(), ClientError> {
    let response = http
        .post(url)
        .bearer_auth(token.trim())
        .json(body)
        .send()
        .await
        .map_err(|source| ClientError::Transport { url: url.to_owned(), source })?;
    check(url, response).await.map(drop)
}

async fn get_json<T: DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    query: &[(&str, String)],
) -> Result<T, ClientError> {
    let response = http
        .get(url)
        .bearer_auth(token.trim())
        .query(query)
        .send()
        .await
        .map_err(|source| ClientError::Transport { url: url.to_owned(), source })?;
    check(url, response)
        .await?
        .json()
        .await
        .map_err(|source| ClientError::BadResponse { url: url.to_owned(), source })
}

fn range_query(range: DateRange) -> Vec<(&'static str, String)> {
    let mut q = Vec::new();
    if let Some(from) = range.from {
        q.push(("from", format_date(from)));
    }
    if let Some(to) = range.to {
        q.push(("to", format_date(to)));
    }
    q
}

/// The endpoint's health (`GET /health`, no token): `ok` or `degraded`, with the Lago
/// export's state when the endpoint runs one.
pub async fn health(http: &reqwest::Client, base_url: &str) -> Result<HealthReply, ClientError> {
    let url = url(base_url, HEALTH_PATH);
    let response =
        http.get(&url).send().await.map_err(|source| ClientError::Transport { url: url.clone(), source })?;
    check(&url, response).await?.json().await.map_err(|source| ClientError::BadResponse { url, source })
}

/// Registers a meter's HMAC key. Succeeds if it was registered now or before with the same
/// key; a different key already registered is a `Refused` error with code `conflict`.
pub async fn register_meter(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    meter_id: u64,
    key: &[u8; METER_KEY_BYTES],
) -> Result<(), ClientError> {
    let body = MeterRegistration { meter_id, key_hex: hex::encode(key) };
    post_json(http, &url(base_url, ADMIN_METERS_PATH), token, &body).await
}

/// Registers a gateway's Ed25519 public key; idempotent like [`register_meter`].
pub async fn register_gateway(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    gateway_id: u64,
    public_key: &VerifyingKey,
) -> Result<(), ClientError> {
    let body = GatewayRegistration { gateway_id, public_key_hex: hex::encode(public_key.as_bytes()) };
    post_json(http, &url(base_url, ADMIN_GATEWAYS_PATH), token, &body).await
}

/// Usage of one SIM, day by day, within `range`.
pub async fn usage(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    iccid: u64,
    range: DateRange,
) -> Result<SimUsage, ClientError> {
    let mut query = vec![("iccid", iccid.to_string())];
    query.extend(range_query(range));
    get_json(http, &url(base_url, USAGE_PATH), token, &query).await
}

/// Pages the client asks for at most when following `next_after`: enough for
/// [`CLIENT_PAGES_MAX`] × [`USAGE_PAGE_SIMS_MAX`] SIMs; a fleet beyond is refused rather
/// than read without end.
pub const CLIENT_PAGES_MAX: usize = 100_000;

/// Totals of every SIM with usage within `range`, every page of it (the totals summed over
/// the pages, `next_after` `None`).
pub async fn usage_sims(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    range: DateRange,
) -> Result<SimsUsage, ClientError> {
    every_page(http, url(base_url, USAGE_SIMS_PATH), token, range_query(range)).await
}

/// Usage per SIM-day with days cut in the IANA zone `tz`, within `range`; one SIM with
/// `iccid`, else every page of every SIM.
pub async fn usage_days(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    tz: &str,
    iccid: Option<u64>,
    range: DateRange,
) -> Result<ZoneDays, ClientError> {
    let url = url(base_url, USAGE_DAYS_PATH);
    let mut query = vec![("tz", tz.to_owned())];
    query.extend(range_query(range));
    match iccid {
        Some(i) => {
            query.push(("iccid", i.to_string()));
            get_json(http, &url, token, &query).await
        }
        None => every_page(http, url, token, query).await,
    }
}

/// The SIMs whose usage cannot be derived, with the record and the reason (admin token).
pub async fn faults(http: &reqwest::Client, base_url: &str, token: &str) -> Result<FaultsReply, ClientError> {
    get_json(http, &url(base_url, ADMIN_FAULTS_PATH), token, &[]).await
}

/// The settlement ledger: settled SIM-days and their adjustments.
pub async fn usage_ledger(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    iccid: Option<u64>,
    range: DateRange,
) -> Result<LedgerReply, ClientError> {
    let url = url(base_url, USAGE_LEDGER_PATH);
    let mut query = range_query(range);
    match iccid {
        Some(i) => {
            query.push(("iccid", i.to_string()));
            get_json(http, &url, token, &query).await
        }
        None => every_page(http, url, token, query).await,
    }
}

/// An answer that comes a page of SIMs at a time: its cursor, and how a later page joins it.
trait Paged: DeserializeOwned {
    /// The `after` of the next page; `None` on the last.
    fn next_after(&self) -> Option<u64>;
    /// Adds a later page's SIMs (and sums) to this answer.
    fn join(&mut self, next: Self);
}

impl Paged for SimsUsage {
    fn next_after(&self) -> Option<u64> {
        self.next_after
    }
    fn join(&mut self, next: Self) {
        self.sims.extend(next.sims);
        self.underivable.extend(next.underivable);
        self.up_bytes = self.up_bytes.saturating_add(next.up_bytes);
        self.down_bytes = self.down_bytes.saturating_add(next.down_bytes);
        self.total_bytes = self.total_bytes.saturating_add(next.total_bytes);
        self.next_after = next.next_after;
    }
}

impl Paged for ZoneDays {
    fn next_after(&self) -> Option<u64> {
        self.next_after
    }
    fn join(&mut self, next: Self) {
        self.days.extend(next.days);
        self.underivable.extend(next.underivable);
        self.next_after = next.next_after;
    }
}

impl Paged for LedgerReply {
    fn next_after(&self) -> Option<u64> {
        self.next_after
    }
    fn join(&mut self, next: Self) {
        self.days.extend(next.days);
        self.next_after = next.next_after;
    }
}

/// Every page of a paged answer, [`USAGE_PAGE_SIMS_MAX`] SIMs at a time, joined into one
/// (at most [`CLIENT_PAGES_MAX`] pages).
async fn every_page<T: Paged>(
    http: &reqwest::Client,
    url: String,
    token: &str,
    query: Vec<(&str, String)>,
) -> Result<T, ClientError> {
    let mut all: Option<T> = None;
    let mut after = None;
    for _ in 0..CLIENT_PAGES_MAX {
        let mut q = query.clone();
        q.push(("limit", USAGE_PAGE_SIMS_MAX.to_string()));
        if let Some(a) = after {
            q.push(("after", format!("{a}")));
        }
        let page: T = get_json(http, &url, token, &q).await?;
        after = page.next_after();
        match all.as_mut() {
            None => all = Some(page),
            Some(acc) => acc.join(page),
        }
        if after.is_none() {
            return all.ok_or(ClientError::TooManyPages { url });
        }
    }
    Err(ClientError::TooManyPages { url })
}

/// Runs a settlement: closes days `settlement_hours` after their end in `tz`, books
/// adjustments for closed days that changed.
pub async fn settle(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    tz: &str,
    settlement_hours: u32,
) -> Result<SettleReply, ClientError> {
    let u = url(base_url, ADMIN_SETTLE_PATH);
    let body = SettleRequest { tz: tz.to_owned(), settlement_hours };
    let response = http
        .post(&u)
        .bearer_auth(token.trim())
        .json(&body)
        .send()
        .await
        .map_err(|source| ClientError::Transport { url: u.clone(), source })?;
    check(&u, response).await?.json().await.map_err(|source| ClientError::BadResponse { url: u, source })
}

/// Registers an API token by its SHA-256 under `name` with `role`; the secret itself never
/// leaves the caller. Idempotent for the same name, role and secret.
pub async fn create_token(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    name: &str,
    role: Role,
    secret: &[u8; TOKEN_BYTES],
) -> Result<(), ClientError> {
    let body = TokenRegistration {
        name: name.to_owned(),
        role,
        token_sha256_hex: hex::encode(token_sha256(secret)),
    };
    post_json(http, &url(base_url, ADMIN_TOKENS_PATH), token, &body).await
}

/// Revokes the API token named `name`; a `Refused` error with status 404 if there is none.
pub async fn revoke_token(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    name: &str,
) -> Result<(), ClientError> {
    // Names are checked to be URL-safe by the endpoint; an unsafe one is refused there.
    let u = url(base_url, &format!("{ADMIN_TOKENS_PATH}/{name}"));
    let response = http
        .delete(&u)
        .bearer_auth(token.trim())
        .send()
        .await
        .map_err(|source| ClientError::Transport { url: u.clone(), source })?;
    check(&u, response).await.map(drop)
}

/// The names and roles of every API token.
pub async fn list_tokens(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
) -> Result<TokenList, ClientError> {
    get_json(http, &url(base_url, ADMIN_TOKENS_PATH), token, &[]).await
}

// ---------------------------------------------------------------------------------------------
// Billing

async fn post_for<T: DeserializeOwned, B: Serialize>(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: Option<&B>,
) -> Result<T, ClientError> {
    let mut request = http.post(url).bearer_auth(token.trim());
    if let Some(b) = body {
        request = request.json(b);
    }
    let response =
        request.send().await.map_err(|source| ClientError::Transport { url: url.to_owned(), source })?;
    check(url, response)
        .await?
        .json()
        .await
        .map_err(|source| ClientError::BadResponse { url: url.to_owned(), source })
}

/// The explained charges per customer and group (`GET /v1/billing/charges`).
pub async fn billing_charges(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    q: &ChargesQuery,
) -> Result<ChargesReply, ClientError> {
    let mut query = Vec::new();
    if let Some(c) = &q.customer {
        query.push(("customer", c.clone()));
    }
    if let Some(g) = &q.group {
        query.push(("group", g.clone()));
    }
    if let Some(p) = q.period {
        query.push(("period", format_date(p)));
    }
    query.extend(range_query(DateRange { from: q.from, to: q.to }));
    get_json(http, &url(base_url, BILLING_CHARGES_PATH), token, &query).await
}

/// Runs billing now: every prepaid wallet debited by what its periods' charges grew
/// (`POST /v1/admin/billing/run`).
pub async fn billing_run(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
) -> Result<RunReply, ClientError> {
    post_for(http, &url(base_url, ADMIN_BILLING_RUN_PATH), token, None::<&()>).await
}

/// Wallets: balance, debits per period, top-ups, alerts (`GET /v1/billing/wallets`).
pub async fn billing_wallets(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    customer: Option<&str>,
) -> Result<WalletsReply, ClientError> {
    let query: Vec<(&str, String)> = customer.map(|c| ("customer", c.to_owned())).into_iter().collect();
    get_json(http, &url(base_url, BILLING_WALLETS_PATH), token, &query).await
}

/// Books a top-up of `amount` (decimal, the wallet's currency) under the caller's
/// `topup_id`; the same id and amount again is answered `already_booked`.
pub async fn billing_topup(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    customer: &str,
    topup_id: &str,
    amount: &str,
) -> Result<TopupReply, ClientError> {
    // Customer names are checked to be URL-safe by the endpoint; an unsafe one is refused there.
    let path = ADMIN_WALLET_TOPUPS_PATH.replace("{customer}", customer);
    let body = TopupRequest { topup_id: topup_id.to_owned(), amount: amount.to_owned() };
    post_for(http, &url(base_url, &path), token, Some(&body)).await
}

/// When a SIM's lifetime quota runs out at its recent rate (`GET /v1/billing/forecast`).
pub async fn billing_forecast(
    http: &reqwest::Client,
    base_url: &str,
    token: &str,
    q: &ForecastQuery,
) -> Result<ForecastReply, ClientError> {
    let mut query = vec![("iccid", q.iccid.to_string())];
    if let Some(v) = q.quota_bytes {
        query.push(("quota_bytes", v.to_string()));
    }
    for (name, d) in [("since", q.since), ("expires", q.expires), ("as_of", q.as_of)] {
        if let Some(d) = d {
            query.push((name, format_date(d)));
        }
    }
    if let Some(w) = q.window_days {
        query.push(("window_days", w.to_string()));
    }
    get_json(http, &url(base_url, BILLING_FORECAST_PATH), token, &query).await
}
