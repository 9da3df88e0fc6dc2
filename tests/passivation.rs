//! Passivation (SPEC §6) against the real broker: with a 1-second idle time, every actor stops
//! once the stream is applied (the active aggregate actors gauge falls to 0), and a later event re-activates
//! its campaign from the stored state, exactly.

mod support;

use aerostream::generator::{self, Options, Planned};
use aerostream::views::CampaignView;
use aerostream_actors::CampaignStatus;
use std::time::Duration;
use support::daemon::{wait_for, Daemon};
use support::events;
use support::state::wait_for_state;
use support::Harness;

/// Active aggregate actors (the report service's one actor is never passivated).
fn active(daemon: &Daemon) -> f64 {
    ["campaign", "payment"]
        .iter()
        .map(|kind| {
            daemon
                .metric("aerostream_actors_active", &[&format!("kind=\"{kind}\"")])
                .unwrap()
        })
        .sum()
}

#[test]
fn idle_actors_passivate_and_come_back_with_exact_state() {
    let harness = Harness::new().extra("[actors]\nidle_seconds = 1\n").build();
    let config = harness.config();
    let daemon = harness.start();
    let plan = generator::plan(&Options {
        seed: 51,
        campaigns: 6,
        payments: 10,
        events: 600,
        duplicate_fraction: 0.0,
        reorder_window: 0,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    });
    let publish = |events: &[Planned]| events::publish(harness.runtime(), config, events);

    publish(&plan.stream);
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(60));
    wait_for("every actor passivated", Duration::from_secs(30), || {
        (active(&daemon) == 0.0).then_some(())
    })
    .unwrap();
    assert!(daemon.metric("aerostream_actors_passivated_total", &[]).unwrap() >= 16.0);

    // One more impression for a campaign still running: its actor starts again from the store.
    let before = plan
        .expected
        .campaigns
        .iter()
        .find(|c| c.status != CampaignStatus::Completed)
        .expect("a campaign still running")
        .clone();
    publish(&[events::impression(&before.id, "late-impression")]);
    let mut expected = before.clone();
    expected.metrics.impressions += 1;
    expected.version += 1;
    wait_for("the re-activated campaign", Duration::from_secs(30), || {
        let served: CampaignView = daemon.get(&format!("/api/campaigns/{}", before.id)).ok()?;
        (served == expected).then_some(())
    })
    .unwrap();
}
