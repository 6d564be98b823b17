//! The service layer: the IO sequences behind the routes. A service reads state from the
//! store, asks the rating core (`countersign-rating`, re-exported as [`crate::billing`],
//! [`crate::pricing`], [`crate::usage`]) for the decisions, and writes what was decided back
//! to the store, in the order that keeps it safe to retry. It answers in
//! [`crate::wire`]'s shapes and knows nothing of HTTP.
//!
//! - [`ingest`]: one signed batch in, one reply out: keys read, the batch checked by the
//!   rating core, the records inserted in one durable step.
//! - [`billing`]: [`billing::Billing`] (runs, charges, wallets, top-ups) and
//!   [`billing::forecast`], over a validated plan file ([`billing::load_plans`]).
//! - [`lago`]: the Lago exporter: plans from the store's outbox, sends, settles what Lago
//!   accepted, exactly once per record, once the billable metric matched.
//! - [`lago_status`]: where the export stands (running, stopped by a refusal, metric
//!   mismatch, backlog), shared with `/health` and `/metrics`; a pure state machine.
//!
//! Settlement has no service of its own: a run must read the booked days, decide and write
//! under one lock or transaction, so the store runs the rating core's `settle` inside it (as
//! [`crate::store::StoreBackend::with_wallet`] runs a billing decision under the wallet's
//! lock); the route calls [`crate::store::StoreBackend::settle`].
//!
//! Import direction: `service` → `wire`, `service` → the store and the rating core;
//! `api` → `service`. The service never imports `api`, the client or the CLI.

pub mod billing;
pub mod ingest;
pub mod lago;
pub mod lago_status;
