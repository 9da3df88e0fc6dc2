//! Broker down and back (SPEC §9): while the broker is stopped the daemon stays up and /health
//! answers 503; once it is back /health answers 200 again and consumption resumes without loss —
//! the final state is exact.

mod support;

use aerostream::generator::{self, Options};
use std::time::Duration;
use support::daemon::wait_for;
use support::events;
use support::state::wait_for_state;
use support::Harness;

#[test]
fn health_follows_the_broker_and_nothing_is_lost_across_a_restart() {
    let harness = Harness::new().broker_data_in_dir().build();
    let (broker, config) = (&harness.broker, harness.config());
    let daemon = harness.start();
    let plan = generator::plan(&Options {
        seed: 61,
        campaigns: 10,
        payments: 100,
        events: 4_000,
        ..Options::for_daemon(config)
    });
    let (first, second) = plan.stream.split_at(plan.stream.len() / 2);
    let publish = |planned: &[generator::Planned]| events::publish(harness.runtime(), config, planned);

    publish(first);
    broker.stop_broker().unwrap();
    wait_for("/health to answer 503", Duration::from_secs(30), || {
        (daemon.status("/health").ok()? == 503).then_some(())
    })
    .unwrap();

    broker.start_broker().unwrap();
    daemon.wait_healthy(Duration::from_secs(60)).unwrap();
    publish(second);
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
}
