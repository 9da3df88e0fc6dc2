//! The `Aggregate` trait: a pure decision function from (state, event) to new state and outputs.

use crate::events::{AggregateKind, Envelope, Event};
use crate::gateway::Charge;
use crate::outcome::Rejection;
use crate::output::OutputEvent;
use crate::readmodel::Change;
use crate::snapshot::{AvroBinary, Snapshot};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// What an accepted event does: the whole new state, the output events to publish, and the
/// payments to charge through the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<A> {
    pub state: A,
    pub outputs: Vec<OutputEvent>,
    pub charges: Vec<Charge>,
}

/// An aggregate is a value with a pure `decide`; actors add identity, storage and supervision.
pub trait Aggregate: Clone + Serialize + DeserializeOwned + Send + Unpin + 'static {
    const KIND: AggregateKind;
    /// Whether this kind journals its events and keeps full-state snapshots (see
    /// [`crate::snapshot`]); otherwise its latest state alone is stored.
    const SNAPSHOTS: bool = false;
    type Event: Serialize + DeserializeOwned;

    /// The part of `event` this aggregate handles, or `None` when it belongs to another kind.
    fn select(event: &Event) -> Option<&Self::Event>;

    /// Events applied so far: the aggregate's journal position.
    fn version(&self) -> u64;

    /// Whether the change from `before` to `after` calls for a snapshot now, besides the regular
    /// ones (a campaign paused or completed).
    fn snapshot_now(_before: Option<&Self>, _after: &Self) -> bool {
        false
    }

    /// Writes the state's fields of its published snapshot record, Avro binary-encoded in the
    /// record's schema order: what the snapshot's checksum covers besides `version_esquema` and
    /// `watermark` (see [`crate::snapshot::canonical`]), so a reader of the record can recompute
    /// it. A kind that publishes no snapshot record writes its whole state as one JSON string.
    fn write_snapshot_state(&self, out: &mut AvroBinary) {
        out.string(&serde_json::to_string(self).expect("aggregate states serialize"));
    }

    /// The output event announcing a snapshot (published to the state topic), if the kind has one.
    fn snapshot_output(_snapshot: &Snapshot<Self>, _cause: &Envelope) -> Option<OutputEvent> {
        None
    }

    /// The report read-model counters the change from `before` to `after` moves (see
    /// [`crate::readmodel`]).
    fn read_model_changes(_before: Option<&Self>, _after: &Self) -> Vec<Change> {
        Vec::new()
    }

    /// Decides what `event` does to `current` (`None`: the aggregate does not exist yet).
    /// Must not panic on any input: a rejection carries the reason instead.
    fn decide(
        current: Option<&Self>,
        event: &Self::Event,
        envelope: &Envelope,
    ) -> Result<Decision<Self>, Rejection>;
}
