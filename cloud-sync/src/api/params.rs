//! Request parameters shared by the routes of several areas: dates within the range a query
//! may name, JSON bodies whose rejection is a `bad_request`.

use axum::extract::rejection::JsonRejection;
use axum::Json;
use time::Date;

use crate::api::error::ApiError;
use crate::text::{format_date, parse_date};
use crate::wire::{QUERY_DATE_MAX, QUERY_DATE_MIN};

/// A date query parameter: absent, or `YYYY-MM-DD` inside
/// [`QUERY_DATE_MIN`]`..=`[`QUERY_DATE_MAX`]; errors name the parameter.
pub(super) fn date_param(name: &str, value: Option<&str>) -> Result<Option<Date>, ApiError> {
    match value {
        None | Some("") => Ok(None),
        Some(s) => {
            let date = parse_date(s).ok_or_else(|| {
                ApiError::bad_request(format!("{name}: expected a date as YYYY-MM-DD, got '{s}'"))
            })?;
            if !(QUERY_DATE_MIN..=QUERY_DATE_MAX).contains(&date) {
                return Err(ApiError::bad_request(format!(
                    "{name}: {s} is outside {}..={}",
                    format_date(QUERY_DATE_MIN),
                    format_date(QUERY_DATE_MAX)
                )));
            }
            Ok(Some(date))
        }
    }
}

/// A JSON body, its rejection (syntax, shape, content type) answered as a `bad_request`.
pub(super) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b).map_err(|r| ApiError::bad_request(r.body_text()))
}
