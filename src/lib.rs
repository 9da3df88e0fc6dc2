//! aerostream: consumes Apache Pulsar event streams into exact, queryable state with supervised
//! actix actors (the `aerostream_actors` crate). This crate holds all the I/O.
//!
//! # Layout
//! - [`config`]: the shipped `config.toml`, overlays, validation naming every problem, where each
//!   value came from (`config check`, `config print`).
//! - [`codec`]: Avro schemas (`schemas/`) and the wire codec to and from domain events.
//! - [`store`]: sled implementation of the actors' `StateStore` port (state, idempotency window,
//!   outbox), its committer thread (many commits per sled transaction) and flusher thread (group
//!   commit).
//! - [`backoff`]: the one exponential backoff with jitter that every retry loop waits by.
//! - [`broker`]: Pulsar client, reconnect backoff, health probe, dead letters.
//! - [`charges`]: the gateway worker, charging requested payments exactly once.
//! - [`dispatch`]: per-aggregate ordering of concurrently processed messages.
//! - [`dlq`]: dead-letter topics read back and replayed (`aerostream dlq`).
//! - [`ingest`]: one consumer per input: decode → actor → commit → flush → ack.
//! - [`outbox`]: publishes committed output events.
//! - [`http`], [`views`]: the HTTP API and its JSON views.
//! - [`status`]: `aerostream status`, one screen about a running daemon from its HTTP API.
//! - [`tables`]: the plain text tables those commands print.
//! - [`telemetry`]: metric names, the Prometheus recorder.
//! - [`logging`]: log set-up, the pulsar client's records at DEBUG, rate-limited repeated lines.
//! - [`generator`], [`produce`]: reproducible demo/test traffic and its expected state.
//! - [`daemon`]: wiring and orderly shutdown.

pub mod acking;
pub mod backoff;
pub mod broker;
pub mod changelog;
pub mod charges;
pub mod codec;
pub mod collector;
pub mod config;
pub mod daemon;
pub mod dispatch;
pub mod dlq;
pub mod generator;
pub mod http;
pub mod ingest;
pub mod logging;
pub mod outbox;
pub mod partitions;
pub mod produce;
pub mod starvation;
pub mod status;
pub mod store;
pub mod tables;
pub mod telemetry;
pub mod views;
