//! The service layer: the IO sequences behind the routes. A service reads state from the
//! store, asks the rating core (`countersign-rating`, re-exported as [`crate::billing`],
//! [`crate::pricing`], [`crate::usage`]) for the decisions, and writes what was decided back
//! to the store, in the order that keeps it safe to retry. It answers in
//! [`crate::wire`]'s shapes and knows nothing of HTTP.
//!
//! - [`billing`]: [`billing::Billing`] (runs, charges, wallets, top-ups) and
//!   [`billing::forecast`], over a validated plan file ([`billing::load_plans`]).
//!
//! Import direction: `service` → `wire`, `service` → the store and the rating core;
//! `api` → `service`. The service never imports `api`, the client or the CLI.

pub mod billing;
