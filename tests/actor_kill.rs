//! Supervision under chaos (SPEC §6, §8): campaign actors killed through the admin chaos route
//! while events stream are restarted by their supervisors from committed state, and the final
//! state is exact. The route refuses callers without the admin token and daemons without chaos.

mod support;

use aerostream::codec::Codec;
use aerostream::generator::{self, Options};
use aerostream::produce;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::time::Duration;
use support::daemon::{wait_for, Daemon};
use support::state::wait_for_state;
use support::Harness;

const TOKEN: &str = "chaos-test-token";
const KILL: &str = "/admin/chaos/kill-actor";
/// Kills while 20 000 events stream over 20 campaigns.
const KILLS: u32 = 20;
/// Between kills.
const KILL_EVERY: Duration = Duration::from_millis(300);

fn restarts(daemon: &Daemon) -> f64 {
    daemon
        .metric("aerostream_actor_restarts_total", &["kind=\"campaign\""])
        .unwrap()
}

#[test]
fn killed_campaign_actors_restart_and_the_state_stays_exact() {
    let harness = Harness::new().admin_token(TOKEN).chaos(true).build();
    let config = harness.config();
    let daemon = harness.start();
    let plan = generator::plan(&Options {
        seed: 41,
        campaigns: 20,
        payments: 20,
        events: 20_000,
        duplicate_fraction: 0.05,
        reorder_window: 4,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    });

    let runtime = harness.runtime();
    let publisher = {
        let (config, events) = (config.clone(), plan.stream.clone());
        runtime.spawn(async move { produce::publish(&config, &Codec::shipped(), &events, 1_500).await })
    };
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let mut killed = 0u32;
    // The kills are paced by the clock, not by the daemon's progress, while the stream is being
    // published (at 1 500 events/s it lasts over 13 s; the kills take about 6 s): each lands
    // mid-stream however fast or slow the daemon applies (kills paced by events applied once ran
    // out of stream when a slowed daemon caught up in bursts).
    wait_for("the first events applied", Duration::from_secs(60), || {
        let applied = daemon.metric("aerostream_events_applied_total", &[]).ok()?;
        (applied >= 400.0).then_some(())
    })
    .unwrap();
    while killed < KILLS && !publisher.is_finished() {
        std::thread::sleep(KILL_EVERY);
        // A campaign not started yet answers 404: the next one is tried.
        for _ in 0..20 {
            let id = format!("camp-{:05}", rng.gen_range(0..20));
            match daemon
                .post(KILL, Some(TOKEN), &json!({ "kind": "campaign", "id": id }))
                .unwrap()
            {
                202 => {
                    killed += 1;
                    break;
                }
                404 => {}
                status => panic!("kill-actor answered {status}"),
            }
        }
    }
    runtime.block_on(publisher).unwrap().unwrap();
    assert_eq!(killed, KILLS, "every kill lands mid-stream");
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(120));
    assert_eq!(restarts(&daemon), f64::from(killed), "one restart per kill");
    println!("{killed} campaign actors killed mid-stream; state exact");
}

#[test]
fn chaos_route_needs_the_admin_token_and_chaos_enabled() {
    let harness = Harness::new().admin_token(TOKEN).chaos(false).build();
    let body = json!({ "kind": "campaign", "id": "camp-00000" });

    let disabled = harness.spawn();
    assert_eq!(disabled.post(KILL, None, &body).unwrap(), 401, "no token");
    assert_eq!(
        disabled.post(KILL, Some("wrong"), &body).unwrap(),
        401,
        "wrong token"
    );
    assert_eq!(
        disabled.post(KILL, Some(TOKEN), &body).unwrap(),
        403,
        "chaos disabled"
    );

    let no_token_node = harness.node_with(Harness::new().chaos(true));
    let no_token = no_token_node.spawn();
    assert_eq!(
        no_token.post(KILL, Some(""), &body).unwrap(),
        403,
        "no admin token configured"
    );
    assert_eq!(no_token.post(KILL, None, &body).unwrap(), 403);

    assert_eq!(
        restarts(&disabled) + restarts(&no_token),
        0.0,
        "nothing was killed"
    );
}
