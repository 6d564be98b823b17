//! The thin HTTP side of `reconcile --fetch`: runs [`countersign_rating::once_fetch`]'s state
//! machine against the 1NCE Management API with reqwest. Every decision (which request, when
//! to renew the token, whether and how long to wait, what an answer means) is made there; this
//! file sends, reads at most [`ONCE_ANSWER_BYTES_MAX`] bytes, and sleeps.
//!
//! Credentials come from a TOML file ([`OnceCredentials::from_file`]) so the secret never
//! appears on a command line or in a process listing.

use std::path::Path;
use std::time::Instant;

use countersign_rating::carrier::CarrierDay;
use countersign_rating::once_fetch::{
    Action, Answer, FetchError, FetchStats, OnceFetch, ONCE_ANSWER_BYTES_MAX, TOKEN_REQUEST_BODY,
};
use serde::Deserialize;

/// Largest credentials file accepted, bytes.
pub const CREDENTIALS_FILE_BYTES_MAX: u64 = 64 * 1024;

/// The API client's credentials (1NCE portal → API access): `client_id`, `client_secret`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnceCredentials {
    /// The client id (the Basic auth user name).
    pub client_id: String,
    /// The client secret (the Basic auth password).
    pub client_secret: String,
}

impl std::fmt::Debug for OnceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnceCredentials").field("client_id", &self.client_id).finish_non_exhaustive()
    }
}

/// Why the credentials file was refused. Not recoverable until the file changes.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// The file cannot be read or is larger than [`CREDENTIALS_FILE_BYTES_MAX`].
    #[error("{path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The TOML is malformed or a key is missing, unknown or empty; the message names it.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: String,
        /// Why, naming the key.
        reason: String,
    },
}

impl OnceCredentials {
    /// Reads and validates `client_id = "…"`, `client_secret = "…"` from a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, CredentialsError> {
        let shown = path.display().to_string();
        let read = |reason: String| CredentialsError::Read { path: shown.clone(), reason };
        let meta = std::fs::metadata(path).map_err(|e| read(e.to_string()))?;
        if meta.len() > CREDENTIALS_FILE_BYTES_MAX {
            return Err(read(format!("larger than {CREDENTIALS_FILE_BYTES_MAX} bytes")));
        }
        let text = std::fs::read_to_string(path).map_err(|e| read(e.to_string()))?;
        Self::from_toml(&text).map_err(|reason| CredentialsError::Invalid { path: shown, reason })
    }

    /// Parses and validates the TOML text; the error names the key.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let c: OnceCredentials = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        if c.client_id.is_empty() {
            return Err("client_id: empty".into());
        }
        if c.client_id.contains(':') {
            // Basic auth joins id and secret with ':'; an id holding one would be split wrongly.
            return Err("client_id: must not contain ':'".into());
        }
        if c.client_secret.is_empty() {
            return Err("client_secret: empty".into());
        }
        Ok(c)
    }
}

/// Why fetching failed: the API's answer ([`FetchError`]), or a reply too large to read.
#[derive(Debug, thiserror::Error)]
pub enum OnceApiError {
    /// See [`FetchError`]'s variants for which are recoverable.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// An answer exceeded [`ONCE_ANSWER_BYTES_MAX`]. Not recoverable by retrying.
    #[error("{request}: answer larger than {ONCE_ANSWER_BYTES_MAX} bytes")]
    TooLarge {
        /// The request.
        request: String,
    },
}

/// Reads a body up to [`ONCE_ANSWER_BYTES_MAX`]; `Ok(None)` when it is larger.
async fn body_limited(mut response: reqwest::Response) -> Result<Option<String>, reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if buf.len() + chunk.len() > ONCE_ANSWER_BYTES_MAX {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// Fetches daily usage of `sims` (and, with `list_account`, of every SIM `/v1/sims` lists)
/// for `from..=to` from the API at `base_url` (e.g.
/// [`countersign_rating::once_fetch::ONCE_API_BASE_URL`]). Requests go one at a time.
pub async fn fetch_usage(
    http: &reqwest::Client,
    base_url: &str,
    credentials: &OnceCredentials,
    sims: impl IntoIterator<Item = u64>,
    range: (time::Date, time::Date),
    list_account: bool,
) -> Result<(Vec<CarrierDay>, FetchStats), OnceApiError> {
    let base = base_url.trim_end_matches('/');
    let mut machine = OnceFetch::new(sims, range.0, range.1, list_account)?;
    let start = Instant::now();
    let now_ms = || u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    loop {
        match machine.next_action(now_ms()) {
            Action::Done => break,
            Action::Wait { ms } => {
                tracing::info!(wait_ms = ms, "1nce: waiting before retrying");
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            Action::Send { request, method, path_and_query, bearer } => {
                let url = format!("{base}{path_and_query}");
                let method = if method == "POST" { reqwest::Method::POST } else { reqwest::Method::GET };
                let builder = http.request(method, &url);
                let builder = match bearer {
                    Some(token) => builder.bearer_auth(token),
                    None => builder
                        .basic_auth(&credentials.client_id, Some(&credentials.client_secret))
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(TOKEN_REQUEST_BODY),
                };
                let sent = builder.header(reqwest::header::ACCEPT, "application/json").send().await;
                let outcome = match sent {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let retry_after = header(&response, "retry-after");
                        let total_pages = header(&response, "x-total-pages");
                        match body_limited(response).await {
                            Ok(Some(body)) => {
                                tracing::debug!(%request, status, "1nce: answer");
                                let answer = Answer { status, retry_after, total_pages, body };
                                machine.on_answer(request, now_ms(), &answer)
                            }
                            Ok(None) => return Err(OnceApiError::TooLarge { request: request.to_string() }),
                            Err(e) => machine.on_transport_error(request, &e.to_string()),
                        }
                    }
                    Err(e) => machine.on_transport_error(request, &e.to_string()),
                };
                outcome?;
            }
        }
    }
    let stats = machine.stats();
    tracing::info!(
        requests = stats.requests,
        tokens = stats.tokens,
        retries = stats.retries,
        sims = stats.sims,
        "1nce: usage fetched"
    );
    Ok((machine.into_days(), stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_name_the_key() {
        let c = OnceCredentials::from_toml("client_id = \"me\"\nclient_secret = \"s3cret\"\n").unwrap();
        assert_eq!(c.client_id, "me");
        assert!(!format!("{c:?}").contains("s3cret"));
        let e = OnceCredentials::from_toml("client_id = \"me\"\n").unwrap_err();
        assert!(e.contains("client_secret"), "{e}");
        let e = OnceCredentials::from_toml("client_id = \"me\"\nclient_secret = \"x\"\nsecret = 1\n")
            .unwrap_err();
        assert!(e.contains("secret"), "{e}");
        let e = OnceCredentials::from_toml("client_id = \"a:b\"\nclient_secret = \"x\"\n").unwrap_err();
        assert!(e.starts_with("client_id"), "{e}");
        let e = OnceCredentials::from_toml("client_id = \"\"\nclient_secret = \"x\"\n").unwrap_err();
        assert!(e.starts_with("client_id"), "{e}");
    }
}
