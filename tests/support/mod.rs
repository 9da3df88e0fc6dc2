//! Test support: a local pulsar-lite broker behind a relay, shared by the black-box tests under
//! `tests/` and the `devbroker` example (`#[path = "../tests/support/mod.rs"] mod support;`).
//!
//! # Layout
//! - `broker`: [`LocalBroker`] starts, stops and restarts pulsar-lite and owns the relay.
//! - `relay`: the TCP relay that adds checksums to MESSAGE frames and rewrites lookup answers.
//! - `daemon`: runs the built `aerostream` binary against a broker and reads its HTTP API
//!   (integration tests only: it needs `CARGO_BIN_EXE_aerostream`, which examples do not get).
//! - `harness`: [`Harness`], the set-up of a black-box test: broker, temporary directory, port,
//!   config (written and loaded), daemon(s) started and healthy, runtime and pulsar client
//!   (integration tests only, like `daemon`).
//! - `events`: events the tests publish by hand, and publishing them.
//! - `state`: the daemon's served state against a generator's expected state.
//! - `topic`: reads what landed on a topic (outputs, dead letters).

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code, unused_imports)]

pub mod broker;
// Drives the built binary: only test targets have CARGO_BIN_EXE_aerostream.
#[cfg(test)]
pub mod daemon;
pub mod events;
#[cfg(test)]
pub mod harness;
pub mod relay;
#[cfg(test)]
pub mod state;
pub mod topic;

pub use broker::{free_port, pulsar_lite_binary, unique_consumer_id, BrokerOptions, LocalBroker};
#[cfg(test)]
pub use harness::Harness;
