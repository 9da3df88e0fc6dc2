//! Input events as the domain sees them: the CloudEvents envelope and the typed event bodies.
//!
//! The daemon's codec builds these from Avro; wire names (in Spanish) are noted on each variant.

use crate::money::Money;
use serde::{Deserialize, Serialize};

/// The CloudEvents attributes every event carries (SPEC §3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    /// CloudEvents `type`, the wire name such as `ClickRegistrado`.
    pub event_type: String,
    pub source: String,
    /// Event time, milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub subject: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub schema_version: String,
}

/// One decoded event ready for its aggregate, with what exactly-once needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub envelope: Envelope,
    pub event: Event,
    /// The event's `idempotency_key` where it has one, else its `id` (SPEC §5).
    pub idempotency_key: String,
    /// SHA-256 (hex) of the canonical event body: a reused key with another hash is a conflict.
    pub content_hash: String,
    /// The broker message the event came in, recorded with the idempotency key when the event is
    /// applied: a later duplicate from the same message is a broker redelivery, from another
    /// message a partner's duplicate ([`crate::Outcome`]). `None` for events made by the daemon.
    pub delivery: Option<DeliveryId>,
    /// The input partition the event came from, on an input whose partitions are owned by one
    /// daemon at a time (Failover): its commit's changelog record goes to the changelog partition
    /// of that number. `None` for events made by the daemon and for inputs that share partitions.
    pub partition: Option<u32>,
}

impl Incoming {
    pub fn aggregate(&self) -> AggregateKey {
        self.event.aggregate()
    }
}

/// Identifies a broker message, the same for every delivery of it: the first 8 bytes of the
/// SHA-256 of its topic (partition included), ledger, entry and batch index. A message redelivered
/// (after a crash, a lost ack, a reset subscription) has the id it had the first time; two
/// messages have different ids (a collision needs two messages with the same idempotency key and
/// a 1 in 2⁶⁴ chance).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeliveryId(pub u64);

impl DeliveryId {
    /// The id of the message at `ledger`/`entry` (and `batch_index` inside a batch) of `topic`
    /// (its `partition`, for a partition of a partitioned topic).
    pub fn of(
        topic: &str,
        partition: Option<i32>,
        ledger: u64,
        entry: u64,
        batch_index: Option<i32>,
    ) -> Self {
        use sha2::{Digest, Sha256};
        let mut hash = Sha256::new();
        hash.update((topic.len() as u64).to_be_bytes());
        hash.update(topic.as_bytes());
        hash.update(partition.unwrap_or(-1).to_be_bytes());
        hash.update(ledger.to_be_bytes());
        hash.update(entry.to_be_bytes());
        hash.update(batch_index.unwrap_or(-1).to_be_bytes());
        let digest = hash.finalize();
        DeliveryId(u64::from_be_bytes(
            digest[..8].try_into().expect("SHA-256 has 32 bytes"),
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregateKind {
    Campaign,
    Payment,
    /// The report service: one instance, [`REPORT_SERVICE_ID`].
    Report,
}

/// The id of the one report aggregate.
pub const REPORT_SERVICE_ID: &str = "service";

impl AggregateKind {
    pub const ALL: [AggregateKind; 3] = [
        AggregateKind::Campaign,
        AggregateKind::Payment,
        AggregateKind::Report,
    ];

    /// Stable label value for metrics and storage prefixes.
    pub fn as_str(self) -> &'static str {
        match self {
            AggregateKind::Campaign => "campaign",
            AggregateKind::Payment => "payment",
            AggregateKind::Report => "report",
        }
    }
}

impl std::str::FromStr for AggregateKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AggregateKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown aggregate kind {s:?}; expected campaign, payment or report"))
    }
}

/// Which aggregate instance an event belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AggregateKey {
    pub kind: AggregateKind,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Campaign(CampaignEvent),
    Payment(PaymentEvent),
    Report(ReportEvent),
}

impl Event {
    pub fn aggregate(&self) -> AggregateKey {
        match self {
            Event::Campaign(e) => AggregateKey {
                kind: AggregateKind::Campaign,
                id: e.campaign_id().to_owned(),
            },
            Event::Payment(e) => AggregateKey {
                kind: AggregateKind::Payment,
                id: e.payment_id().to_owned(),
            },
            Event::Report(_) => AggregateKey {
                kind: AggregateKind::Report,
                id: REPORT_SERVICE_ID.to_owned(),
            },
        }
    }
}

/// How an affiliate's commission is computed from a conversion (`regla_comision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CommissionRule {
    /// A share of the conversion value, in basis points (1/100 of a percent).
    Percentage { basis_points: u32 },
    /// A fixed amount per conversion, in the campaign's currency.
    Fixed { amount_minor: i64 },
}

impl CommissionRule {
    /// The published `regla_comision`: `tipo` (PORCENTAJE or FIJO) and `valor` (basis points or
    /// minor units).
    pub fn wire(self) -> (&'static str, i64) {
        match self {
            CommissionRule::Percentage { basis_points } => ("PORCENTAJE", i64::from(basis_points)),
            CommissionRule::Fixed { amount_minor } => ("FIJO", amount_minor),
        }
    }

    /// The commission earned on a conversion of `value_minor`, rounded half up to a minor unit.
    pub fn apply(self, value_minor: i64) -> i64 {
        match self {
            CommissionRule::Percentage { basis_points } => {
                (value_minor * i64::from(basis_points) + 5_000) / 10_000
            }
            CommissionRule::Fixed { amount_minor } => amount_minor,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CampaignEvent {
    /// `CampanaCreada`
    Created {
        campaign_id: String,
        name: String,
        budget: Money,
        cost_per_click_minor: i64,
        cost_per_conversion_minor: i64,
        commission: CommissionRule,
    },
    /// `CampanaActivada`
    Activated { campaign_id: String },
    /// `CampanaPausada`
    Paused { campaign_id: String, reason: String },
    /// `CampanaCompletada`
    Completed { campaign_id: String },
    /// `PresupuestoActualizado`
    BudgetUpdated { campaign_id: String, budget: Money },
    /// `ImpresionRegistrada`
    ImpressionRecorded {
        campaign_id: String,
        affiliate_id: String,
    },
    /// `ClickRegistrado`
    ClickRecorded {
        campaign_id: String,
        affiliate_id: String,
    },
    /// `ConversionRegistrada`
    ConversionRecorded {
        campaign_id: String,
        affiliate_id: String,
        value: Money,
    },
}

impl CampaignEvent {
    pub fn campaign_id(&self) -> &str {
        match self {
            CampaignEvent::Created { campaign_id, .. }
            | CampaignEvent::Activated { campaign_id }
            | CampaignEvent::Paused { campaign_id, .. }
            | CampaignEvent::Completed { campaign_id }
            | CampaignEvent::BudgetUpdated { campaign_id, .. }
            | CampaignEvent::ImpressionRecorded { campaign_id, .. }
            | CampaignEvent::ClickRecorded { campaign_id, .. }
            | CampaignEvent::ConversionRecorded { campaign_id, .. } => campaign_id,
        }
    }

    /// Tracking events commute with each other; lifecycle events are ordered.
    pub fn is_tracking(&self) -> bool {
        matches!(
            self,
            CampaignEvent::ImpressionRecorded { .. }
                | CampaignEvent::ClickRecorded { .. }
                | CampaignEvent::ConversionRecorded { .. }
        )
    }
}

/// Payment states; the rank orders them so a payment never moves backwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PaymentStatus {
    #[serde(rename = "PENDIENTE")]
    Pending,
    #[serde(rename = "PROCESANDO")]
    Processing,
    #[serde(rename = "EXITOSO")]
    Succeeded,
    #[serde(rename = "FALLIDO")]
    Failed,
}

impl PaymentStatus {
    pub fn rank(self) -> u8 {
        match self {
            PaymentStatus::Pending => 0,
            PaymentStatus::Processing => 1,
            PaymentStatus::Succeeded | PaymentStatus::Failed => 2,
        }
    }

    pub fn is_terminal(self) -> bool {
        self.rank() == 2
    }

    pub fn wire_name(self) -> &'static str {
        match self {
            PaymentStatus::Pending => "PENDIENTE",
            PaymentStatus::Processing => "PROCESANDO",
            PaymentStatus::Succeeded => "EXITOSO",
            PaymentStatus::Failed => "FALLIDO",
        }
    }
}

impl std::str::FromStr for PaymentStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            PaymentStatus::Pending,
            PaymentStatus::Processing,
            PaymentStatus::Succeeded,
            PaymentStatus::Failed,
        ]
        .into_iter()
        .find(|p| p.wire_name() == s)
        .ok_or_else(|| format!("unknown payment status {s:?}"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PaymentEvent {
    /// `PagoSolicitado`
    Requested {
        payment_id: String,
        affiliate_id: String,
        amount: Money,
    },
    /// `PagoProcesado`
    Processed {
        payment_id: String,
        affiliate_id: String,
        amount: Money,
        status: PaymentStatus,
        /// The partner's `hash_contenido`, kept for traceability.
        declared_hash: String,
        attempts: u32,
    },
}

/// The idempotency key of a `PagoProcesado` (seed 000: `pago_<id>_<status>_<affiliate>`).
pub fn processed_idempotency_key(payment_id: &str, status: PaymentStatus, affiliate_id: &str) -> String {
    format!("pago_{payment_id}_{}_{affiliate_id}", status.wire_name())
}

impl PaymentEvent {
    pub fn payment_id(&self) -> &str {
        match self {
            PaymentEvent::Requested { payment_id, .. } | PaymentEvent::Processed { payment_id, .. } => {
                payment_id
            }
        }
    }
}

/// The report versions the report service answers in (SPEC §7).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ReportVersion {
    /// Totals: count and amount per payment status and currency, campaigns per status.
    #[default]
    #[serde(rename = "v1")]
    V1,
    /// Every v1 field with the same values, plus breakdowns, success rate and processing times.
    #[serde(rename = "v2")]
    V2,
}

impl ReportVersion {
    pub const ALL: [ReportVersion; 2] = [ReportVersion::V1, ReportVersion::V2];

    pub fn as_str(self) -> &'static str {
        match self {
            ReportVersion::V1 => "v1",
            ReportVersion::V2 => "v2",
        }
    }
}

impl std::fmt::Display for ReportVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ReportVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReportVersion::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("unknown report version {s:?}; allowed: v1, v2"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportEvent {
    /// `ReporteSolicitado`: answered with a `ReporteGenerado` output event.
    Requested {
        request_id: String,
        /// `None` ("latest" on the wire): the version active when the request is handled.
        version: Option<ReportVersion>,
        parameters: std::collections::BTreeMap<String, String>,
    },
    /// `VersionReporteCambiada` (control topic) or `PUT /api/reports/version`.
    VersionChanged { version: ReportVersion },
}

#[cfg(test)]
mod tests {
    use super::DeliveryId;

    #[test]
    fn a_delivery_id_is_stable_and_tells_every_part_of_the_position_apart() {
        let topic = "persistent://public/default/t-partition-2";
        let id = DeliveryId::of(topic, Some(2), 17, 42, None);
        // Stored with idempotency keys and carried by changelog records: it must not change
        // between versions. Computed independently (Python hashlib) over
        // len(topic) u64 BE ‖ topic ‖ partition i32 BE ‖ ledger u64 BE ‖ entry u64 BE ‖ batch i32 BE.
        assert_eq!(id, DeliveryId(0x26b8_1a01_b7c5_4f15));
        let others = [
            DeliveryId::of("persistent://public/default/t-partition-1", Some(2), 17, 42, None),
            DeliveryId::of(topic, Some(1), 17, 42, None),
            DeliveryId::of(topic, Some(2), 18, 42, None),
            DeliveryId::of(topic, Some(2), 17, 43, None),
            DeliveryId::of(topic, Some(2), 17, 42, Some(0)),
        ];
        for other in others {
            assert_ne!(other, id);
        }
    }
}
