//! The read API (SPEC §8, issue #18): every list is paged (`limit`, `after`) and returns each
//! aggregate exactly once; `/health` and `/metrics` answer within 100 ms while pages of a store of
//! 100 000 campaigns are read concurrently; a 404 says what the daemon knows (no state here, what
//! the inputs hold now) and the kill-actor route tells a passivated actor from an unknown
//! aggregate.

mod support;

use aerostream::generator::{self, Options};
use aerostream::store::SledStore;
use aerostream::views::{CampaignView, LedgerView, Page, PaymentView};
use aerostream_actors::events::{AggregateKey, CommissionRule};
use aerostream_actors::ports::{Clock, Commit, CommitResult, SystemClock};
use aerostream_actors::{Aggregate, AggregateKind, Campaign, CampaignEvent, Money};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::daemon::{wait_for, Daemon};
use support::events;
use support::state::{every_page, wait_for_state};
use support::Harness;

const TOKEN: &str = "api-test-token";

/// Campaigns in the store of the /health test (the figure).
const CAMPAIGNS: usize = 100_000;

/// Clients paging through /api/campaigns at once in the /health test: three times the machine's
/// two cores. With the scans on the worker, six readers put /health behind pages; three did not
/// show it clearly (median 23 to 26 ms, worst 51 to 58 ms).
const READERS: usize = 6;

/// Ids the /health test adds to the generated ones: they hold a query string's special
/// characters, the key separator and non-ASCII text, so the `after` cursor must round-trip.
const ODD_IDS: [&str; 6] = [
    "camp a&b=c",
    "camp/slash",
    "camp?q#frag",
    "campaña-ñ",
    "camp%41",
    "camp+plus",
];

/// Writes a created campaign for each of `ids` into the store at `data_dir` through the store's
/// own commit (state, version and idempotency record in one transaction), as an applied
/// `CampanaCreada` leaves them, then flushes it. The state is decided once by the domain and
/// given each id and name. No journal entry, read-model counters or output events are written:
/// nothing of this test restores these actors, reads the report or the outputs, and a seeded
/// outbox would have the daemon publish 100 000 events during the measurement.
fn seed_campaigns(runtime: &tokio::runtime::Runtime, data_dir: &Path, ids: &[String]) {
    let store = SledStore::open(data_dir, 3_600, Arc::new(SystemClock)).unwrap();
    let now = SystemClock.now_ms();
    let created = CampaignEvent::Created {
        campaign_id: "template".into(),
        name: "template".into(),
        budget: Money::positive(1_000_000, "USD").unwrap(),
        cost_per_click_minor: 100,
        cost_per_conversion_minor: 500,
        commission: CommissionRule::Percentage { basis_points: 1_000 },
    };
    let envelope = events::envelope("seed", "CampanaCreada", now, None);
    let template = Campaign::decide(None, &created, &envelope).unwrap().state;
    for chunk in ids.chunks(10_000) {
        let decided: Vec<_> = chunk
            .iter()
            .map(|id| {
                let campaign = Campaign {
                    id: id.clone(),
                    name: format!("campaign {id}"),
                    ..template.clone()
                };
                let key = AggregateKey {
                    kind: AggregateKind::Campaign,
                    id: id.clone(),
                };
                let idempotency_key = format!("seed-{id}");
                let hash = hex::encode(Sha256::digest(&idempotency_key));
                (key, serde_json::to_vec(&campaign).unwrap(), idempotency_key, hash)
            })
            .collect();
        let commits: Vec<Commit> = decided
            .iter()
            .map(|(key, state, idempotency_key, hash)| Commit::of(key, state, 1, idempotency_key, hash, now))
            .collect();
        for result in store.commit_batch(&commits) {
            assert_eq!(result.unwrap(), CommitResult::Committed);
        }
    }
    runtime.block_on(store.flush()).unwrap();
}

/// The id of a listed item (the rest is skipped while parsing).
#[derive(serde::Deserialize)]
struct Id {
    id: String,
}

/// Reads every page of /api/campaigns (the largest pages) and returns the ids, in order.
fn read_every_campaign(base_url: &str) -> Vec<String> {
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let mut ids = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut request = http
            .get(format!("{base_url}/api/campaigns"))
            .query(&[("limit", "1000")]);
        if let Some(after) = &after {
            request = request.query(&[("after", after)]);
        }
        let page: Page<Id> = request
            .send()
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .unwrap();
        ids.extend(page.items.into_iter().map(|item| item.id));
        match page.next {
            Some(next) => after = Some(next),
            None => return ids,
        }
    }
}

/// Times one GET of `path` (the whole answer read), which must answer 200.
fn timed_get(http: &reqwest::blocking::Client, base_url: &str, path: &str) -> Duration {
    let started = Instant::now();
    let response = http.get(format!("{base_url}{path}")).send().unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.bytes().unwrap();
    started.elapsed()
}

/// Acceptance point 3 of issue #18: /health (and /metrics) answer within the 100 ms while
/// [`READERS`] clients page through /api/campaigns at once, and every reader gets every campaign
/// exactly once.
///
/// The bound holds for 99 % of the answers, not for the single worst: on the shared 2-core
/// development machine (load average 4 to 9 from other builds and tests) a daemon with nobody
/// reading pages at all showed worst answers of 60 to 102 ms over about 1 000 probes, so the
/// worst sample measures the machine's scheduling, whereas the 99th percentile measures the
/// daemon. Measured with the pages read (docs/OPERATIONS.md, "HTTP"): /health median 0.2 to
/// 0.4 ms, p99 5 to 29 ms, a margin of three or more under the bound. With the scans on the
/// worker the test fails (median 56 to 87 ms, p99 320 to 580 ms), and without pages at all one
/// answer of 100 000 campaigns holds the worker for seconds.
#[test]
fn health_answers_within_100_ms_while_pages_of_100_000_campaigns_are_read() {
    let harness = Harness::started();
    let mut ids: Vec<String> = (0..CAMPAIGNS - ODD_IDS.len())
        .map(|n| format!("camp-{n:06}"))
        .chain(ODD_IDS.iter().map(|id| (*id).to_owned()))
        .collect();
    let seeding = Instant::now();
    seed_campaigns(harness.runtime(), harness.data_dir(), &ids);
    eprintln!("seeded {} campaigns in {:?}", ids.len(), seeding.elapsed());
    ids.sort();
    let daemon = harness.start();

    let reading = Arc::new(AtomicBool::new(true));
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let base_url = daemon.base_url.clone();
            std::thread::spawn(move || read_every_campaign(&base_url))
        })
        .collect();
    let watcher = {
        let reading = reading.clone();
        let readers_done: Vec<_> = readers;
        std::thread::spawn(move || {
            let pages: Vec<Vec<String>> = readers_done.into_iter().map(|r| r.join().unwrap()).collect();
            reading.store(false, Ordering::SeqCst);
            pages
        })
    };

    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut health = Vec::new();
    let mut metrics = Vec::new();
    while reading.load(Ordering::SeqCst) {
        health.push(timed_get(&http, &daemon.base_url, "/health"));
        metrics.push(timed_get(&http, &daemon.base_url, "/metrics"));
        // Paces the probes (not a readiness wait): the readers, not the probes, load the daemon.
        std::thread::sleep(Duration::from_millis(10));
    }
    let read = watcher.join().unwrap();

    for (reader, read_ids) in read.iter().enumerate() {
        assert_eq!(read_ids.len(), ids.len(), "reader {reader}: campaigns read");
        assert!(
            *read_ids == ids,
            "reader {reader}: every campaign once, in id order"
        );
    }
    for (path, mut times) in [("/health", health), ("/metrics", metrics)] {
        times.sort();
        let at = |fraction: f64| times[((times.len() - 1) as f64 * fraction) as usize];
        let (median, p99, worst) = (at(0.5), at(0.99), at(1.0));
        let summary = format!(
            "{path}: {} answers while pages were read: median {median:?}, p99 {p99:?}, worst {worst:?}",
            times.len()
        );
        eprintln!("{summary}");
        assert!(times.len() >= 50, "{summary}");
        assert!(p99 < Duration::from_millis(100), "{summary}");
    }
}

/// GET `path`: its status and JSON body.
fn get_json(daemon: &Daemon, path: &str) -> (u16, Value) {
    let (status, body, _) = daemon.send(Method::GET, path, None, Vec::new()).unwrap();
    (status, body)
}

#[test]
fn lists_page_every_aggregate_once_and_404s_say_what_the_daemon_knows() {
    let harness = Harness::new()
        .admin_token(TOKEN)
        .chaos(true)
        .extra("[actors]\nidle_seconds = 1\n")
        .build();
    let (config, runtime) = (harness.config(), harness.runtime());
    let daemon = harness.start();
    let plan = generator::plan(&Options {
        seed: 18,
        campaigns: 9,
        payments: 31,
        events: 600,
        duplicate_fraction: 0.1,
        reorder_window: 4,
        conflict_fraction: 0.0,
        ..Options::for_daemon(config)
    });
    events::publish(runtime, config, &plan.stream);
    wait_for_state(&daemon, &plan.expected, Duration::from_secs(60));

    // Every list, in pages of several sizes (one item, a size that divides the count, the
    // count, more): the same aggregates, each once, in id order.
    let mut expected = plan.expected.clone();
    expected.campaigns.sort_by(|a, b| a.id.cmp(&b.id));
    expected.payments.sort_by(|a, b| a.id.cmp(&b.id));
    expected
        .affiliates
        .sort_by(|a, b| a.ledger.affiliate_id.cmp(&b.ledger.affiliate_id));
    assert!(
        expected.affiliates.len() >= 2,
        "{} affiliates",
        expected.affiliates.len()
    );
    for limit in [1, 3, 7, expected.payments.len(), 1_000] {
        let campaigns: Vec<CampaignView> = every_page(&daemon, "/api/campaigns", limit).unwrap();
        assert_eq!(campaigns, expected.campaigns, "campaigns in pages of {limit}");
        let payments: Vec<PaymentView> = every_page(&daemon, "/api/payments", limit).unwrap();
        assert_eq!(payments, expected.payments, "payments in pages of {limit}");
        let affiliates: Vec<LedgerView> = every_page(&daemon, "/api/affiliates", limit).unwrap();
        assert_eq!(affiliates, expected.affiliates, "affiliates in pages of {limit}");
    }
    // The last page has no `next`, even when it is full; a page that is not the last names its
    // last id; the default page is 100 items.
    let count = expected.payments.len();
    let (_, whole) = get_json(&daemon, &format!("/api/payments?limit={count}"));
    assert_eq!(
        (whole["items"].as_array().unwrap().len(), &whole["next"]),
        (count, &Value::Null)
    );
    let (_, first) = get_json(&daemon, &format!("/api/payments?limit={}", count - 1));
    assert_eq!(first["next"], json!(expected.payments[count - 2].id));
    let (status, default) = get_json(&daemon, "/api/payments");
    assert_eq!(
        (status, default["items"].as_array().unwrap().len()),
        (200, count.min(100))
    );

    // Bad paging answers 400 naming the parameters.
    for bad in ["limit=0", "limit=1001", "limit=ten", "page=2", "limit=-1"] {
        let (status, body) = get_json(&daemon, &format!("/api/campaigns?{bad}"));
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_request")),
            "{bad}: {body}"
        );
        assert!(
            body["detail"].as_str().unwrap().contains("limit"),
            "{bad}: {body}"
        );
    }

    // No state: the daemon says what it cannot know, and what its inputs hold now.
    for path in [
        "/api/payments/pago-never",
        "/api/campaigns/camp-never",
        "/api/affiliates/af-never/commissions",
    ] {
        let (status, body) = get_json(&daemon, path);
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("not_found")),
            "{path}: {body}"
        );
        assert_eq!(body["reason"], "not_applied", "{path}: {body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(
            detail.contains("never sent") && detail.contains("dead-lettered"),
            "{detail}"
        );
        assert_eq!(body["inputs"]["payments"]["subscribed"], true, "{path}: {body}");
        assert!(body["inputs"]["campaigns"]["held"].is_u64(), "{path}: {body}");
    }

    // kill-actor: an aggregate with no state, then one whose actor was passivated, then the same
    // once an event has brought its actor back.
    let kill = |id: &str| {
        let body = json!({ "kind": "campaign", "id": id }).to_string().into_bytes();
        let (status, body, _) = daemon
            .send(Method::POST, "/admin/chaos/kill-actor", Some(TOKEN), body)
            .unwrap();
        (status, body)
    };
    let (status, body) = kill("camp-never");
    assert_eq!(
        (status, body["reason"].as_str()),
        (404, Some("not_applied")),
        "{body}"
    );
    wait_for("every campaign actor passivated", Duration::from_secs(30), || {
        let active = daemon
            .metric("aerostream_actors_active", &["kind=\"campaign\""])
            .ok()?;
        (active == 0.0).then_some(())
    })
    .unwrap();
    let campaign = &expected.campaigns[0].id;
    let (status, body) = kill(campaign);
    assert_eq!(
        (status, body["reason"].as_str()),
        (404, Some("not_in_memory")),
        "{body}"
    );
    assert!(
        body["detail"].as_str().unwrap().contains("idle_seconds"),
        "{body}"
    );
    let mut wakes = 0;
    wait_for(
        "the woken campaign actor to be killed",
        Duration::from_secs(30),
        || {
            if kill(campaign).0 == 202 {
                return Some(());
            }
            // Passivated again before the kill: another event brings it back.
            wakes += 1;
            events::publish(
                runtime,
                config,
                &[events::impression(campaign, &format!("wake-{wakes}"))],
            );
            None
        },
    )
    .unwrap();
}
