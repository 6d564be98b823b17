//! The decisions of `reconcile --fetch`: fetching each SIM's daily usage from the 1NCE
//! Management API, as a pure state machine. The caller does the HTTP and owns the clock: it asks
//! [`OnceFetch::next_action`] what to do, does it, and hands the answer back with
//! [`OnceFetch::on_answer`] (or [`OnceFetch::on_transport_error`]).
//!
//! # The contract followed
//!
//! 1NCE's published OpenAPI files, as 1NCE ships them in github.com/1NCE-GmbH/1nce-mcp-server
//! (commit 593e74a5ca8aad6a2f3b18db5372dc79a970e607):
//!
//! - `auth.json` ("Authorization", v2.1.1): `POST /oauth/token` with HTTP Basic auth (client id
//!   and secret) and the JSON body `{"grant_type":"client_credentials"}`; the answer
//!   `Bearer_Token_200` carries `access_token`, `token_type` (`bearer`) and `expires_in`
//!   (seconds, default 3600). Other members (`status_code`, `userId`, the example's `user_id`
//!   and `score`) are ignored.
//! - `sim.json` ("SIM Management", v2.0), server `https://api.1nce.com/management-api`
//!   ([`ONCE_API_BASE_URL`]): `GET /v1/sims?page=&pageSize=` (page from 1, `pageSize` at most
//!   100, headers `X-Total-Pages` etc.; items `SIM_card` with `iccid` (19 digits) and
//!   `iccid_with_luhn`), and `GET /v1/sims/{iccid}/usage?start_dt=YYYY-MM-DD&end_dt=YYYY-MM-DD`
//!   answering `DailyUsage`, read by [`crate::carrier::parse_1nce_daily_json`]. Both take a
//!   Bearer token.
//! - help.1nce.com/dev-hub/reference/api-rate-limits: `/sims` has no rate limit, but 1NCE asks
//!   to be gentle, so requests go one at a time. A 429 is still handled (a proxy or a future
//!   limit may send one): `Retry-After` in seconds when given, else exponential back-off.
//!
//! # Decisions
//!
//! - A token is requested first and again [`TOKEN_REFRESH_MARGIN_S`] before it expires; a 401
//!   on a data request (the token expired early or was revoked) drops the token and repeats
//!   the request once with a new one ([`AUTH_REFRESHES_PER_REQUEST_MAX`]).
//! - 429, 5xx and transport errors are retried at most [`RETRIES_MAX`] times per request,
//!   waiting `Retry-After` (capped at [`RETRY_AFTER_MAX_S`]) or [`backoff_ms`].
//! - Any other status is a [`FetchError`] naming the request (the SIM) and the status; a 400,
//!   401 or 403 on the token request means the credentials are refused.
//! - With account listing on, `/v1/sims` is paged first (up to `X-Total-Pages`, or until a short
//!   page when the header is absent, at most [`ONCE_SIM_PAGES_MAX`] pages), and its SIMs join
//!   the ones the caller named.

use std::collections::BTreeSet;
use std::fmt;

use serde::Deserialize;
use time::Date;

use crate::carrier::{parse_1nce_daily_json, CarrierDay, CarrierError};
use crate::text::{format_date, iccid_from_text};

/// The Management API's published server URL.
pub const ONCE_API_BASE_URL: &str = "https://api.1nce.com/management-api";
/// SIMs per `/v1/sims` page: the published maximum of `pageSize`.
pub const ONCE_SIM_PAGE_SIZE: u32 = 100;
/// Most `/v1/sims` pages read in one run (10⁶ SIMs at 100 a page).
pub const ONCE_SIM_PAGES_MAX: u32 = 10_000;
/// Most SIMs whose usage one run fetches.
pub const ONCE_SIMS_MAX: usize = 1_000_000;
/// A token is renewed this long before `expires_in` runs out, seconds.
pub const TOKEN_REFRESH_MARGIN_S: u64 = 60;
/// `expires_in` when the answer leaves it out: the published default, seconds.
pub const TOKEN_EXPIRES_DEFAULT_S: u64 = 3600;
/// Retries of one request after a 429, a 5xx or a transport error.
pub const RETRIES_MAX: u32 = 5;
/// First back-off wait when no `Retry-After` is given, milliseconds; doubles per retry.
pub const BACKOFF_BASE_MS: u64 = 1_000;
/// Longest back-off wait, milliseconds.
pub const BACKOFF_MAX_MS: u64 = 60_000;
/// Longest `Retry-After` honoured, seconds; a longer one is waited this long.
pub const RETRY_AFTER_MAX_S: u64 = 300;
/// New tokens fetched for one request after it got a 401.
pub const AUTH_REFRESHES_PER_REQUEST_MAX: u32 = 1;
/// Largest answer read from the API, bytes (a usage answer of six months is far smaller).
pub const ONCE_ANSWER_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Characters of an error answer kept in a [`FetchError`].
pub const ERROR_BODY_CHARS_MAX: usize = 300;

/// Why fetching stopped.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The token endpoint refused the credentials (400, 401 or 403). Not recoverable until
    /// the credentials change.
    #[error("1nce refused the credentials: status {status}: {message}")]
    Credentials {
        /// The HTTP status.
        status: u16,
        /// The start of the answer.
        message: String,
    },
    /// The API refused a request with a 4xx (e.g. 404: the SIM is not in this account).
    /// Not recoverable by retrying.
    #[error("{request}: 1nce answered status {status}: {message}")]
    Refused {
        /// The request, naming the SIM.
        request: String,
        /// The HTTP status.
        status: u16,
        /// The start of the answer.
        message: String,
    },
    /// 429, 5xx or transport errors outlasted [`RETRIES_MAX`] retries. Recoverable later.
    #[error("{request}: gave up after {attempts} attempts, last: {last}")]
    RetriesExhausted {
        /// The request.
        request: String,
        /// Attempts made.
        attempts: u32,
        /// The last status or transport error.
        last: String,
    },
    /// An answer does not follow the published schema. Not recoverable by retrying.
    #[error("{request}: answer does not follow the published schema: {reason}")]
    BadAnswer {
        /// The request.
        request: String,
        /// What is wrong (row and field for usage answers).
        reason: String,
    },
    /// More SIMs or pages than the named limit. Not recoverable: narrow the run.
    #[error("more than {0}")]
    TooMany(&'static str),
}

/// One request to the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnceRequest {
    /// `POST /oauth/token`.
    Token,
    /// `GET /v1/sims`, one page (from 1).
    Sims {
        /// The page.
        page: u32,
    },
    /// `GET /v1/sims/{iccid}/usage` for the range.
    Usage {
        /// The SIM (19 digits, no Luhn digit, as 1NCE's `iccid`).
        iccid: u64,
    },
}

impl fmt::Display for OnceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OnceRequest::Token => f.write_str("POST /oauth/token"),
            OnceRequest::Sims { page } => write!(f, "GET /v1/sims page {page}"),
            OnceRequest::Usage { iccid } => write!(f, "usage of SIM {iccid}"),
        }
    }
}

/// What the caller does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this request: `method`, `path_and_query` appended to the base URL; `bearer` is the
    /// token to send, `None` for the token request (Basic auth with the credentials and the
    /// JSON body [`TOKEN_REQUEST_BODY`]).
    Send {
        /// The request.
        request: OnceRequest,
        /// `GET` or `POST`.
        method: &'static str,
        /// Path and query below the base URL.
        path_and_query: String,
        /// The Bearer token, if any.
        bearer: Option<String>,
    },
    /// Wait this long, then ask again.
    Wait {
        /// Milliseconds.
        ms: u64,
    },
    /// All usage is fetched: take it with [`OnceFetch::into_days`].
    Done,
}

/// The token request's body, as `auth.json` gives it.
pub const TOKEN_REQUEST_BODY: &str = r#"{"grant_type":"client_credentials"}"#;

/// An answer as the caller received it.
#[derive(Clone, Debug, Default)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
    /// The `X-Total-Pages` header, if any.
    pub total_pages: Option<String>,
    /// The body.
    pub body: String,
}

/// The published `Bearer_Token_200`, the members used.
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The published `SIM_card`, the members used.
#[derive(Deserialize)]
struct SimCard {
    #[serde(default)]
    iccid: Option<String>,
    #[serde(default)]
    iccid_with_luhn: Option<String>,
}

/// Counters of one run, for the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Requests sent (token requests included).
    pub requests: u64,
    /// Tokens obtained.
    pub tokens: u64,
    /// Retries after 429, 5xx or transport errors.
    pub retries: u64,
    /// SIMs whose usage was fetched.
    pub sims: u64,
}

/// Wait before retry `attempt` (from 1) when the server named none: doubling from
/// [`BACKOFF_BASE_MS`], capped at [`BACKOFF_MAX_MS`].
pub fn backoff_ms(attempt: u32) -> u64 {
    let shift = attempt.saturating_sub(1).min(20);
    BACKOFF_BASE_MS.saturating_mul(1u64 << shift).min(BACKOFF_MAX_MS)
}

/// A `Retry-After` header as a wait in milliseconds: delta-seconds only (an HTTP-date needs a
/// clock and is treated as absent), capped at [`RETRY_AFTER_MAX_S`].
pub fn retry_after_ms(header: &str) -> Option<u64> {
    let s: u64 = header.trim().parse().ok()?;
    Some(s.min(RETRY_AFTER_MAX_S) * 1000)
}

fn excerpt(body: &str) -> String {
    let t: String = body.chars().take(ERROR_BODY_CHARS_MAX).collect();
    if t.is_empty() {
        "(empty answer)".to_owned()
    } else {
        t
    }
}

/// Fetching daily usage of a set of SIMs for a range of days. See the module docs.
#[derive(Debug)]
pub struct OnceFetch {
    from: Date,
    to: Date,
    pending: BTreeSet<u64>,
    queued: BTreeSet<u64>,
    next_page: Option<u32>,
    current: Option<OnceRequest>,
    token: Option<(String, u64)>,
    attempts: u32,
    auth_refreshes: u32,
    wait_ms: Option<u64>,
    days: Vec<CarrierDay>,
    stats: FetchStats,
}

impl OnceFetch {
    /// Fetches `sims` for `from..=to`; with `list_account`, also every SIM `/v1/sims` lists.
    pub fn new(
        sims: impl IntoIterator<Item = u64>,
        from: Date,
        to: Date,
        list_account: bool,
    ) -> Result<Self, FetchError> {
        let pending: BTreeSet<u64> = sims.into_iter().collect();
        if pending.len() > ONCE_SIMS_MAX {
            return Err(FetchError::TooMany("ONCE_SIMS_MAX SIMs"));
        }
        Ok(OnceFetch {
            from,
            to,
            queued: pending.clone(),
            pending,
            next_page: list_account.then_some(1),
            current: None,
            token: None,
            attempts: 0,
            auth_refreshes: 0,
            wait_ms: None,
            days: Vec::new(),
            stats: FetchStats::default(),
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> FetchStats {
        self.stats
    }

    /// The usage fetched, in SIM order.
    pub fn into_days(self) -> Vec<CarrierDay> {
        self.days
    }

    /// What to do now; `now_ms` is the caller's monotonic clock.
    pub fn next_action(&mut self, now_ms: u64) -> Action {
        if let Some(ms) = self.wait_ms.take() {
            return Action::Wait { ms };
        }
        if self.current.is_none() {
            self.current = match self.next_page {
                Some(page) => Some(OnceRequest::Sims { page }),
                None => self.pending.pop_first().map(|iccid| OnceRequest::Usage { iccid }),
            };
            self.attempts = 0;
            self.auth_refreshes = 0;
        }
        let Some(current) = self.current else { return Action::Done };
        let fresh = self
            .token
            .as_ref()
            .filter(|(_, expires_at)| now_ms.saturating_add(TOKEN_REFRESH_MARGIN_S * 1000) < *expires_at);
        let Some((bearer, _)) = fresh else {
            return Action::Send {
                request: OnceRequest::Token,
                method: "POST",
                path_and_query: "/oauth/token".to_owned(),
                bearer: None,
            };
        };
        let path_and_query = match current {
            OnceRequest::Token => "/oauth/token".to_owned(),
            OnceRequest::Sims { page } => format!("/v1/sims?page={page}&pageSize={ONCE_SIM_PAGE_SIZE}"),
            OnceRequest::Usage { iccid } => format!(
                "/v1/sims/{iccid}/usage?start_dt={}&end_dt={}",
                format_date(self.from),
                format_date(self.to)
            ),
        };
        Action::Send { request: current, method: "GET", path_and_query, bearer: Some(bearer.clone()) }
    }

    /// Takes the answer to `request` (as sent by the last [`Action::Send`]).
    pub fn on_answer(
        &mut self,
        request: OnceRequest,
        now_ms: u64,
        answer: &Answer,
    ) -> Result<(), FetchError> {
        self.stats.requests += 1;
        let status = answer.status;
        if status == 429 || status >= 500 {
            let wait = answer.retry_after.as_deref().and_then(retry_after_ms);
            return self.retry(request, format!("status {status}"), wait);
        }
        match request {
            OnceRequest::Token => self.on_token(now_ms, answer),
            _ if status == 401 && self.auth_refreshes < AUTH_REFRESHES_PER_REQUEST_MAX => {
                // The token expired early or was revoked: one new token, same request.
                self.auth_refreshes += 1;
                self.token = None;
                Ok(())
            }
            _ if !(200..300).contains(&status) => Err(FetchError::Refused {
                request: request.to_string(),
                status,
                message: excerpt(&answer.body),
            }),
            OnceRequest::Sims { page } => self.on_sims(page, answer),
            OnceRequest::Usage { iccid } => self.on_usage(iccid, &answer.body),
        }
    }

    /// The request could not be sent or its answer not read; retried like a 5xx.
    pub fn on_transport_error(&mut self, request: OnceRequest, error: &str) -> Result<(), FetchError> {
        self.stats.requests += 1;
        self.retry(request, error.to_owned(), None)
    }

    fn retry(&mut self, request: OnceRequest, last: String, wait: Option<u64>) -> Result<(), FetchError> {
        self.attempts += 1;
        if self.attempts > RETRIES_MAX {
            return Err(FetchError::RetriesExhausted {
                request: request.to_string(),
                attempts: self.attempts,
                last,
            });
        }
        self.stats.retries += 1;
        self.wait_ms = Some(wait.unwrap_or_else(|| backoff_ms(self.attempts)));
        Ok(())
    }

    fn on_token(&mut self, now_ms: u64, answer: &Answer) -> Result<(), FetchError> {
        let bad = |reason: String| FetchError::BadAnswer { request: OnceRequest::Token.to_string(), reason };
        match answer.status {
            200..=299 => {}
            400 | 401 | 403 => {
                return Err(FetchError::Credentials { status: answer.status, message: excerpt(&answer.body) })
            }
            status => {
                return Err(FetchError::Refused {
                    request: OnceRequest::Token.to_string(),
                    status,
                    message: excerpt(&answer.body),
                })
            }
        }
        let t: TokenAnswer = serde_json::from_str(&answer.body).map_err(|e| bad(e.to_string()))?;
        if t.access_token.is_empty() {
            return Err(bad("access_token is empty".into()));
        }
        if let Some(kind) = t.token_type.as_deref().filter(|k| !k.eq_ignore_ascii_case("bearer")) {
            return Err(bad(format!("token_type '{kind}': only bearer is documented")));
        }
        let expires_in = t.expires_in.unwrap_or(TOKEN_EXPIRES_DEFAULT_S);
        if expires_in <= TOKEN_REFRESH_MARGIN_S {
            return Err(bad(format!(
                "expires_in {expires_in} s is not above the refresh margin {TOKEN_REFRESH_MARGIN_S} s"
            )));
        }
        self.token = Some((t.access_token, now_ms.saturating_add(expires_in * 1000)));
        self.stats.tokens += 1;
        // A token answer is progress on the data request waiting for it, not a retry of it.
        Ok(())
    }

    fn on_sims(&mut self, page: u32, answer: &Answer) -> Result<(), FetchError> {
        let request = OnceRequest::Sims { page }.to_string();
        let cards: Vec<SimCard> = serde_json::from_str(&answer.body)
            .map_err(|e| FetchError::BadAnswer { request: request.clone(), reason: e.to_string() })?;
        for (i, card) in cards.iter().enumerate() {
            let field_err = |field: &str, reason: String| FetchError::BadAnswer {
                request: request.clone(),
                reason: format!("row {}, {field}: {reason}", i + 1),
            };
            let plain = card
                .iccid
                .as_deref()
                .map(|t| iccid_from_text(t).map_err(|e| field_err("iccid", e.to_string())))
                .transpose()?;
            let luhn = card
                .iccid_with_luhn
                .as_deref()
                .map(|t| iccid_from_text(t).map_err(|e| field_err("iccid_with_luhn", e.to_string())))
                .transpose()?;
            let iccid = match (plain, luhn) {
                (Some(a), Some(b)) if a != b => {
                    return Err(field_err("iccid_with_luhn", format!("names SIM {b}, iccid names {a}")))
                }
                (Some(a), _) | (None, Some(a)) => a,
                (None, None) => return Err(field_err("iccid", "missing".into())),
            };
            if self.queued.insert(iccid) {
                if self.queued.len() > ONCE_SIMS_MAX {
                    return Err(FetchError::TooMany("ONCE_SIMS_MAX SIMs"));
                }
                self.pending.insert(iccid);
            }
        }
        let more = match answer.total_pages.as_deref() {
            Some(h) => {
                let total: u32 = h.trim().parse().map_err(|_| FetchError::BadAnswer {
                    request: request.clone(),
                    reason: format!("X-Total-Pages '{h}' is not a number"),
                })?;
                page < total
            }
            None => cards.len() >= ONCE_SIM_PAGE_SIZE as usize,
        };
        if more && page >= ONCE_SIM_PAGES_MAX {
            return Err(FetchError::TooMany("ONCE_SIM_PAGES_MAX pages of /v1/sims"));
        }
        self.next_page = more.then_some(page + 1);
        self.current = None;
        Ok(())
    }

    fn on_usage(&mut self, iccid: u64, body: &str) -> Result<(), FetchError> {
        let request = OnceRequest::Usage { iccid }.to_string();
        let days = parse_1nce_daily_json(iccid, body)
            .map_err(|e: CarrierError| FetchError::BadAnswer { request, reason: e.to_string() })?;
        self.days.extend(days);
        self.stats.sims += 1;
        self.current = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::parse_date;

    const SIM_A: u64 = 8_988_280_666_000_000_000;
    const SIM_B: u64 = 8_988_280_666_000_000_001;
    /// `auth.json`'s published example `Success` (members as published, `score` included).
    const TOKEN_OK: &str = r#"{"status_code":200,"access_token":"eyJpzhr...","token_type":"bearer","expires_in":3600,"user_id":"user","score":"all"}"#;
    const USAGE: &str = include_str!("../tests/fixtures/1nce/v1-usage-three-days.json");

    fn d(s: &str) -> Date {
        parse_date(s).unwrap()
    }

    fn ok(body: &str) -> Answer {
        Answer { status: 200, body: body.to_owned(), ..Answer::default() }
    }

    fn status(status: u16) -> Answer {
        Answer { status, ..Answer::default() }
    }

    fn send(a: Action) -> (OnceRequest, String, Option<String>) {
        match a {
            Action::Send { request, path_and_query, bearer, .. } => (request, path_and_query, bearer),
            other => panic!("expected a request, got {other:?}"),
        }
    }

    fn fetch(sims: &[u64], list: bool) -> OnceFetch {
        OnceFetch::new(sims.iter().copied(), d("2021-06-28"), d("2021-06-30"), list).unwrap()
    }

    #[test]
    fn token_first_then_usage_per_sim_with_the_published_query() {
        let mut f = fetch(&[SIM_B, SIM_A], false);
        let (r, path, bearer) = send(f.next_action(0));
        assert_eq!((r, path.as_str(), bearer), (OnceRequest::Token, "/oauth/token", None));
        f.on_answer(r, 0, &ok(TOKEN_OK)).unwrap();
        let (r, path, bearer) = send(f.next_action(10));
        assert_eq!(r, OnceRequest::Usage { iccid: SIM_A });
        assert_eq!(path, "/v1/sims/8988280666000000000/usage?start_dt=2021-06-28&end_dt=2021-06-30");
        assert_eq!(bearer.as_deref(), Some("eyJpzhr..."));
        f.on_answer(r, 10, &ok(USAGE)).unwrap();
        let (r, _, _) = send(f.next_action(20));
        assert_eq!(r, OnceRequest::Usage { iccid: SIM_B });
        f.on_answer(r, 20, &ok(USAGE)).unwrap();
        assert_eq!(f.next_action(30), Action::Done);
        assert_eq!(f.stats(), FetchStats { requests: 3, tokens: 1, retries: 0, sims: 2 });
        let days = f.into_days();
        assert!(days.iter().any(|c| c.iccid == SIM_A) && days.iter().any(|c| c.iccid == SIM_B));
    }

    #[test]
    fn token_is_renewed_before_it_expires() {
        let mut f = fetch(&[SIM_A, SIM_B], false);
        let (r, ..) = send(f.next_action(0));
        f.on_answer(r, 0, &ok(TOKEN_OK)).unwrap();
        let (r, ..) = send(f.next_action(0));
        f.on_answer(r, 0, &ok(USAGE)).unwrap();
        // Just inside the margin before 3600 s: a new token first.
        let at = 3600 * 1000 - TOKEN_REFRESH_MARGIN_S * 1000;
        assert_eq!(send(f.next_action(at)).0, OnceRequest::Token);
        assert_eq!(send(f.next_action(at - 1)).0, OnceRequest::Usage { iccid: SIM_B });
    }

    #[test]
    fn a_401_fetches_one_new_token_and_repeats_the_request_once() {
        let mut f = fetch(&[SIM_A], false);
        let (r, ..) = send(f.next_action(0));
        f.on_answer(r, 0, &ok(TOKEN_OK)).unwrap();
        let (r, ..) = send(f.next_action(0));
        f.on_answer(r, 0, &status(401)).unwrap();
        let (t, ..) = send(f.next_action(0));
        assert_eq!(t, OnceRequest::Token);
        f.on_answer(t, 0, &ok(TOKEN_OK)).unwrap();
        let (again, ..) = send(f.next_action(0));
        assert_eq!(again, r);
        let e =
            f.on_answer(again, 0, &Answer { status: 401, body: "Unauthorized".into(), ..Answer::default() });
        assert!(matches!(e, Err(FetchError::Refused { status: 401, .. })), "{e:?}");
    }

    #[test]
    fn a_429_waits_retry_after_else_backs_off_and_gives_up_after_the_limit() {
        let mut f = fetch(&[SIM_A], false);
        let (t, ..) = send(f.next_action(0));
        f.on_answer(t, 0, &ok(TOKEN_OK)).unwrap();
        let (r, ..) = send(f.next_action(0));
        let limited = Answer { status: 429, retry_after: Some("2".into()), ..Answer::default() };
        f.on_answer(r, 0, &limited).unwrap();
        assert_eq!(f.next_action(0), Action::Wait { ms: 2000 });
        assert_eq!(send(f.next_action(0)).0, r);
        for attempt in 2..=RETRIES_MAX {
            f.on_answer(r, 0, &status(503)).unwrap();
            assert_eq!(f.next_action(0), Action::Wait { ms: backoff_ms(attempt) });
            assert_eq!(send(f.next_action(0)).0, r);
        }
        let e = f.on_answer(r, 0, &status(503)).unwrap_err();
        assert_eq!(
            e,
            FetchError::RetriesExhausted {
                request: format!("usage of SIM {SIM_A}"),
                attempts: RETRIES_MAX + 1,
                last: "status 503".into()
            }
        );
    }

    #[test]
    fn retries_are_counted_per_request() {
        let mut f = fetch(&[SIM_A, SIM_B], false);
        let (t, ..) = send(f.next_action(0));
        f.on_answer(t, 0, &ok(TOKEN_OK)).unwrap();
        for _ in 0..RETRIES_MAX {
            let (r, ..) = send(f.next_action(0));
            f.on_transport_error(r, "connection reset").unwrap();
            assert!(matches!(f.next_action(0), Action::Wait { .. }));
        }
        let (r, ..) = send(f.next_action(0));
        f.on_answer(r, 0, &ok(USAGE)).unwrap();
        for _ in 0..RETRIES_MAX {
            let (r, ..) = send(f.next_action(0));
            assert_eq!(r, OnceRequest::Usage { iccid: SIM_B });
            f.on_answer(r, 0, &status(500)).unwrap();
            assert!(matches!(f.next_action(0), Action::Wait { .. }));
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped_and_retry_after_is_capped() {
        assert_eq!(backoff_ms(1), BACKOFF_BASE_MS);
        assert_eq!(backoff_ms(2), 2 * BACKOFF_BASE_MS);
        assert_eq!(backoff_ms(40), BACKOFF_MAX_MS);
        assert_eq!(retry_after_ms(" 7 "), Some(7000));
        assert_eq!(retry_after_ms("99999"), Some(RETRY_AFTER_MAX_S * 1000));
        assert_eq!(retry_after_ms("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn a_4xx_names_the_sim_and_the_status() {
        let mut f = fetch(&[SIM_A], false);
        let (t, ..) = send(f.next_action(0));
        f.on_answer(t, 0, &ok(TOKEN_OK)).unwrap();
        let (r, ..) = send(f.next_action(0));
        let e = f.on_answer(r, 0, &Answer { status: 404, body: "Not Found".into(), ..Answer::default() });
        assert_eq!(
            e.unwrap_err().to_string(),
            "usage of SIM 8988280666000000000: 1nce answered status 404: Not Found"
        );
    }

    #[test]
    fn refused_credentials_and_bad_token_answers_stop() {
        // auth.json's published 400 example.
        let body =
            r#"{"statusCode":400,"errorCode":"CognitoAuthenticationError","message":"User does not exist."}"#;
        let mut f = fetch(&[SIM_A], false);
        let (t, ..) = send(f.next_action(0));
        let e =
            f.on_answer(t, 0, &Answer { status: 400, body: body.into(), ..Answer::default() }).unwrap_err();
        assert!(
            matches!(&e, FetchError::Credentials { status: 400, message } if message.contains("User does not exist"))
        );
        for bad in [r#"{"token_type":"bearer"}"#, r#"{"access_token":"x","token_type":"mac"}"#, "[]"] {
            let mut f = fetch(&[SIM_A], false);
            let (t, ..) = send(f.next_action(0));
            assert!(matches!(f.on_answer(t, 0, &ok(bad)), Err(FetchError::BadAnswer { .. })), "{bad}");
        }
        // expires_in absent: the published default.
        let mut f = fetch(&[SIM_A], false);
        let (t, ..) = send(f.next_action(0));
        f.on_answer(t, 0, &ok(r#"{"access_token":"x"}"#)).unwrap();
        let late = TOKEN_EXPIRES_DEFAULT_S * 1000 - TOKEN_REFRESH_MARGIN_S * 1000 - 1;
        assert!(matches!(send(f.next_action(late)).0, OnceRequest::Usage { .. }));
    }

    #[test]
    fn listing_pages_until_x_total_pages_and_adds_the_sims() {
        let mut f = fetch(&[SIM_A], true);
        let (t, ..) = send(f.next_action(0));
        f.on_answer(t, 0, &ok(TOKEN_OK)).unwrap();
        let (r, path, _) = send(f.next_action(0));
        assert_eq!(path, "/v1/sims?page=1&pageSize=100");
        // SIM_card as published: iccid 19 digits, iccid_with_luhn 20. The published example's
        // Luhn digit (…7890) is wrong (the digit is 4), so the right one is used here.
        let page1 = r#"[{"iccid":"8988303000123456789","iccid_with_luhn":"89883030001234567894","status":"Enabled"},{"iccid":"8988280666000000000"}]"#;
        f.on_answer(r, 0, &Answer { total_pages: Some("2".into()), ..ok(page1) }).unwrap();
        let (r, path, _) = send(f.next_action(0));
        assert_eq!(path, "/v1/sims?page=2&pageSize=100");
        f.on_answer(r, 0, &Answer { total_pages: Some("2".into()), ..ok("[]") }).unwrap();
        let mut sims = Vec::new();
        while let Action::Send { request, .. } = f.next_action(0) {
            let OnceRequest::Usage { iccid } = request else { panic!("{request:?}") };
            sims.push(iccid);
            f.on_answer(request, 0, &ok(USAGE)).unwrap();
        }
        assert_eq!(sims, vec![SIM_A, 8_988_303_000_123_456_789]);
    }

    #[test]
    fn listing_without_the_header_stops_at_a_short_page_and_checks_the_luhn_digit() {
        let mut f = fetch(&[], true);
        let (t, ..) = send(f.next_action(0));
        f.on_answer(t, 0, &ok(TOKEN_OK)).unwrap();
        let (r, ..) = send(f.next_action(0));
        f.on_answer(r, 0, &ok(r#"[{"iccid_with_luhn":"89883030001234567894"}]"#)).unwrap();
        assert_eq!(send(f.next_action(0)).0, OnceRequest::Usage { iccid: 8_988_303_000_123_456_789 });

        let mut f = fetch(&[], true);
        let (t, ..) = send(f.next_action(0));
        f.on_answer(t, 0, &ok(TOKEN_OK)).unwrap();
        let (r, ..) = send(f.next_action(0));
        let e = f.on_answer(
            r,
            0,
            &ok(r#"[{"iccid":"8988303000123456789"},{"iccid_with_luhn":"89883030001234567890"}]"#),
        );
        let msg = e.unwrap_err().to_string();
        // The published example's own iccid_with_luhn fails the check.
        assert!(
            msg.contains("page 1") && msg.contains("row 2, iccid_with_luhn") && msg.contains("Luhn"),
            "{msg}"
        );
    }

    #[test]
    fn a_usage_answer_off_schema_names_the_sim_row_and_field() {
        let mut f = fetch(&[SIM_A], false);
        let (t, ..) = send(f.next_action(0));
        f.on_answer(t, 0, &ok(TOKEN_OK)).unwrap();
        let (r, ..) = send(f.next_action(0));
        let e = f.on_answer(
            r,
            0,
            &ok(r#"{"stats":[{"date":"2021-06-28T00:00:00.000Z","data":{"volume":"1,5"}}]}"#),
        );
        let msg = e.unwrap_err().to_string();
        assert!(
            msg.starts_with("usage of SIM 8988280666000000000") && msg.contains("row 1, data.volume"),
            "{msg}"
        );
    }
}
