//! Wiring: opens the store, starts the actors, the HTTP listener and one consumer per input, and
//! shuts them down in order when `shutdown` resolves.

use crate::broker::{self, BrokerHealth};
use crate::codec::{Codec, SchemaRegistry};
use crate::config::Config;
use crate::http::{self, HttpState, InputsUp};
use crate::ingest::{self, Pipeline};
use crate::store::SledStore;
use crate::telemetry::{
    self, ACTORS_PASSIVATED, IDEMPOTENCY_EVICTED, IDEMPOTENCY_INDEX_BYTES, IDEMPOTENCY_WINDOW_KEYS,
    STORE_DISK_BYTES,
};
use actix::Arbiter;
use aerostream_actors::ports::{StoreError, SystemClock};
use aerostream_actors::{ActorEnv, Registry};
use anyhow::Context as _;
use futures::StreamExt as _;
use std::collections::BTreeMap;
use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Runs the daemon until `shutdown` resolves; must be called inside an actix `System`.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    if config.chaos.enabled {
        for (name, actions) in &config.chaos.failpoints {
            http::set_known_failpoint(name, actions)
                .map_err(|error| anyhow::anyhow!("chaos.failpoints.{name}: {error}"))?;
            tracing::warn!(%name, %actions, "Chaos: fail point set at start.");
        }
    }
    let clock = Arc::new(SystemClock);
    let instance = config.instance_id();
    let mut store = SledStore::open_with_cache(
        &config.daemon.data_dir,
        config.idempotency.window_seconds,
        config.daemon.cache_mib.saturating_mul(1 << 20),
        clock.clone(),
    )
    .context("opening the state store")?
    .with_min_free(config.daemon.min_free_mib.saturating_mul(1 << 20));
    if config.changelog.enabled {
        store = store.with_changelog(instance.clone());
        let withdrawn = store
            .withdraw_unpublished()
            .context("withdrawing unpublished changelog records")?;
        if withdrawn > 0 {
            tracing::info!(
                withdrawn,
                "Withdrew commits the changelog never received; the changelog decides them."
            );
        }
    }
    let store = Arc::new(store);
    store
        .start_committer(config.min_commit_interval())
        .context("starting the committer thread")?;
    tracing::info!(%instance, changelog = config.changelog.enabled, "Starting.");
    for (name, input) in &config.inputs {
        if config.changelog.enabled && input.subscription_type == crate::config::SubscriptionKind::Shared {
            tracing::warn!(input = %name, "A shared subscription spreads one aggregate's events over every daemon on it: run one daemon on it, or use key_shared or failover.");
        }
    }
    let prometheus = telemetry::prometheus();
    telemetry::zero_counters(config.inputs.keys().map(String::as_str));
    let registry = SchemaRegistry::shipped();
    let incompatible: Vec<String> = registry
        .subjects()
        .flat_map(crate::codec::compat::check)
        .map(|problem| problem.to_string())
        .collect();
    anyhow::ensure!(
        incompatible.is_empty(),
        "broken schemas:\n{}",
        incompatible.join("\n")
    );
    let codec = Arc::new(Codec::new(Arc::new(registry)));
    let arbiters: Vec<Arbiter> = (0..config.actors.arbiters).map(|_| Arbiter::new()).collect();
    let registry = Arc::new(Registry::new(
        ActorEnv {
            store: store.clone(),
            observer: Arc::new(telemetry::MetricsObserver),
            clock,
            mailbox_capacity: config.actors.mailbox_capacity,
            snapshots: config.snapshot.policy(),
        },
        arbiters.iter().map(Arbiter::handle).collect(),
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (late_stop_tx, late_stop_rx) = watch::channel(false);
    let mut barriers = config.changelog.enabled.then(crate::changelog::follower);
    let broker_health = BrokerHealth::default();
    let inputs_up: InputsUp = Arc::new(
        config
            .inputs
            .keys()
            .map(|name| (name.clone(), Arc::default()))
            .collect::<BTreeMap<_, _>>(),
    );

    let collector = Arc::new(crate::collector::Collector::new(&config, codec.clone()));
    let service = registry
        .report_service()
        .await
        .context("loading the report service")?;
    tracing::info!(version = %service.active, "Report service answering.");

    let address = listener.local_addr()?;
    let server = http::serve(
        listener,
        HttpState {
            store: store.clone(),
            registry: registry.clone(),
            prometheus,
            broker: broker_health.clone(),
            inputs: inputs_up.clone(),
            stall_timeout: Duration::from_secs(config.daemon.stall_timeout_seconds),
            admin_token: config.http.admin_token.clone(),
            chaos_enabled: config.chaos.enabled,
            collector: collector.clone(),
            changelog: barriers.as_ref().map(|(follower, _)| http::ChangelogHealth {
                seen: follower.status(),
                stall_timeout: Duration::from_millis(config.changelog.stall_timeout_ms),
            }),
        },
    )?;
    let server_handle = server.handle();
    let server_task = actix_rt::spawn(server);
    tracing::info!(%address, "HTTP listening.");

    let work = async {
        let client = broker::connect(&config.broker, &mut stop_rx.clone()).await?;
        tracing::info!(url = %config.broker.url, "Connected to the broker.");
        collector.connected(client.clone());
        let mut tasks = vec![
            tokio::spawn(broker::probe(
                client.clone(),
                config.broker.clone(),
                broker_health.clone(),
                stop_rx.clone(),
            )),
            // The outbox and the changelog follower stop last: consumers finishing their messages
            // wait for them.
            tokio::spawn(crate::outbox::run(
                client.clone(),
                crate::outbox::Destinations {
                    broker: config.broker.clone(),
                    outputs: config.outputs.clone(),
                    changelog: config.changelog.clone(),
                },
                codec.clone(),
                store.clone(),
                late_stop_rx.clone(),
            )),
            tokio::spawn(
                crate::charges::Worker {
                    store: store.clone(),
                    registry: registry.clone(),
                    gateway: Arc::new(config.gateway.simulated()),
                    policy: config.gateway.retry_policy(),
                    concurrency: config.gateway.concurrency,
                }
                .run(stop_rx.clone()),
            ),
            tokio::spawn(passivate(
                registry.clone(),
                config.actors.idle_seconds,
                stop_rx.clone(),
            )),
            tokio::spawn(evict(
                store.clone(),
                config.idempotency.eviction_interval_seconds,
                stop_rx.clone(),
            )),
            tokio::spawn(probe_store(store.clone(), stop_rx.clone())),
        ];
        let follower = match barriers.take() {
            Some((follower, requests)) => {
                let (checker, broker, changelog, inputs) = (
                    client.clone(),
                    config.broker.clone(),
                    config.changelog.clone(),
                    config.inputs.clone(),
                );
                tokio::spawn(async move {
                    crate::changelog::check_partition_counts(&checker, &broker, &changelog, &inputs).await
                });
                tasks.push(tokio::spawn(crate::changelog::run(
                    client.clone(),
                    config.broker.clone(),
                    config.changelog.clone(),
                    instance.clone(),
                    store.clone(),
                    registry.clone(),
                    requests,
                    late_stop_rx.clone(),
                )));
                Some(follower)
            }
            None => None,
        };
        let pipeline = Arc::new(Pipeline {
            registry,
            codec,
            store: store.clone(),
            follower,
            takeover_gap: Duration::from_millis(config.changelog.takeover_gap_ms),
            preferred_partitions: config.daemon.preferred_partitions.clone(),
        });
        let mut consumers = Vec::new();
        for (name, input) in &config.inputs {
            let up = inputs_up.clone();
            let (name, input, broker, client, pipeline, stop) = (
                name.clone(),
                input.clone(),
                config.broker.clone(),
                client.clone(),
                pipeline.clone(),
                stop_rx.clone(),
            );
            consumers.push(actix_rt::spawn(async move {
                let result = ingest::run_input(
                    name.clone(),
                    input,
                    broker,
                    client,
                    pipeline,
                    up[&name].clone(),
                    stop,
                )
                .await;
                if let Err(error) = &result {
                    tracing::info!(input = %name, error = %error, "Input stopped.");
                }
            }));
        }
        Ok::<_, anyhow::Error>((consumers, tasks))
    };

    tokio::pin!(shutdown);
    let started = tokio::select! {
        started = work => Some(started?),
        _ = &mut shutdown => None,
    };
    if started.is_some() {
        (&mut shutdown).await;
    }
    tracing::info!("Shutting down: finishing in-flight events.");
    let _ = stop_tx.send(true);
    if let Some((consumers, tasks)) = started {
        // Three quarters of the grace period for the consumers, the rest for closing down. A
        // consumer that finished leaves the set: a finished task's handle must not be polled again.
        let mut consumers: futures::stream::FuturesUnordered<_> = consumers.into_iter().collect();
        let drained = tokio::time::timeout(config.shutdown_timeout().mul_f64(0.75), async {
            while consumers.next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                consumers = consumers.len(),
                "Shutdown timeout reached with events still in flight; they will be redelivered."
            );
            consumers.iter().for_each(|consumer| consumer.abort());
            // Let the aborted tasks drop their broker handles while the runtime still runs.
            while consumers.next().await.is_some() {}
        }
        let _ = late_stop_tx.send(true);
        tasks.iter().for_each(|task| task.abort());
        futures::future::join_all(tasks).await;
    }
    // The logged commits applied, so that the next start has no log to apply.
    store.settle().context("applying the commit log")?;
    store.flush().await.context("flushing the state store")?;
    server_handle.stop(true).await;
    let _ = server_task.await;
    for arbiter in arbiters {
        arbiter.stop();
    }
    tracing::info!("Stopped.");
    Ok(())
}

/// Stops idle actors, checking four times per idle period.
async fn passivate(registry: Arc<Registry>, idle_seconds: u64, mut shutdown: watch::Receiver<bool>) {
    let idle_ms = (idle_seconds as i64).saturating_mul(1_000);
    let every = Duration::from_millis((idle_seconds * 250).max(250));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        let stopped = registry.passivate_idle(idle_ms);
        if stopped > 0 {
            metrics::counter!(ACTORS_PASSIVATED).increment(stopped as u64);
            tracing::debug!(stopped, "Passivated idle actors.");
        }
    }
}

/// How often the store's write check runs.
const STORE_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A write check (a key written and flushed) not finished after this long means the store hangs.
const WRITE_CHECK_HANG: Duration = Duration::from_secs(5);

/// Checks every second that the store writes (`SledStore::check_writable`): a store that cannot
/// write stops consumption and turns /health to 503 until a check succeeds. A check that has not
/// finished after [`WRITE_CHECK_HANG`] counts as a failure too (a store that hangs answers no
/// error at all: sled 0.34.7 after `ENOSPC` mid-write, docs/OPERATIONS.md); the check is waited
/// for, and its success ends the problem.
async fn probe_store(store: Arc<SledStore>, mut shutdown: watch::Receiver<bool>) {
    loop {
        // The outcome is kept by the store (`write_problem`, the writable gauge).
        let mut check = tokio::spawn({
            let store = store.clone();
            async move { store.check_writable().await }
        });
        tokio::select! {
            _ = &mut check => {}
            _ = tokio::time::sleep(WRITE_CHECK_HANG) => {
                store.note_failure(&StoreError::Unavailable(format!(
                    "a write check has not finished in {} s: the store does not answer",
                    WRITE_CHECK_HANG.as_secs()
                )));
                tokio::select! {
                    _ = &mut check => {}
                    _ = shutdown.changed() => return,
                }
            }
            _ = shutdown.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(STORE_PROBE_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn evict(store: Arc<SledStore>, interval_seconds: u64, mut shutdown: watch::Receiver<bool>) {
    let interval = Duration::from_secs(interval_seconds);
    loop {
        match store.evict_expired() {
            Ok(evicted) => metrics::counter!(IDEMPOTENCY_EVICTED).increment(evicted as u64),
            Err(error) => tracing::error!(error = %error, "Idempotency eviction failed."),
        }
        if let Err(error) = store.evict_dead_letters() {
            tracing::error!(error = %error, "Dead-letter memory eviction failed.");
        }
        metrics::gauge!(IDEMPOTENCY_WINDOW_KEYS).set(store.window_len() as f64);
        metrics::gauge!(IDEMPOTENCY_INDEX_BYTES).set(store.window_index_bytes() as f64);
        match store.disk_bytes() {
            Ok(bytes) => metrics::gauge!(STORE_DISK_BYTES).set(bytes as f64),
            Err(error) => tracing::warn!(error = %error, "Cannot measure the data directory."),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
    }
}
