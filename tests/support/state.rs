//! The daemon's served state compared with a generator's expected state.

use super::daemon::{wait_for, Daemon};
use aerostream::views::{CampaignView, LedgerView, Page, PaymentView, StateView};
use serde::de::DeserializeOwned;
use std::path::Path;
use std::time::Duration;

/// Reads the daemon's state for the aggregates in `expected`.
pub fn served_state(daemon: &Daemon, expected: &StateView) -> anyhow::Result<StateView> {
    let mut campaigns: Vec<CampaignView> = every_page(daemon, "/api/campaigns", 1_000)?;
    campaigns.sort_by(|a, b| a.id.cmp(&b.id));
    let payments = expected
        .payments
        .iter()
        .map(|p| daemon.get::<PaymentView>(&format!("/api/payments/{}", p.id)))
        .collect::<Result<Vec<_>, _>>()?;
    let affiliates = expected
        .affiliates
        .iter()
        .map(|l| daemon.get::<LedgerView>(&format!("/api/affiliates/{}/commissions", l.ledger.affiliate_id)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(StateView {
        campaigns,
        payments,
        affiliates,
    })
}

/// Every item of list route `path` (`/api/campaigns`, …), read page after page of `limit`.
pub fn every_page<T: DeserializeOwned>(daemon: &Daemon, path: &str, limit: usize) -> anyhow::Result<Vec<T>> {
    let mut items = Vec::new();
    let limit = limit.to_string();
    let mut after: Option<String> = None;
    loop {
        let mut query = vec![("limit", limit.as_str())];
        query.extend(after.as_deref().map(|after| ("after", after)));
        let page: Page<T> = daemon.get_query(path, &query)?;
        items.extend(page.items);
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(items),
        }
    }
}

pub fn read_expected(path: &Path) -> StateView {
    serde_json::from_slice(&std::fs::read(path).expect("expected state written")).expect("valid JSON")
}

/// Waits until the daemon serves exactly `expected`.
pub fn wait_for_state(daemon: &Daemon, expected: &StateView, timeout: Duration) {
    wait_for("the exact expected state", timeout, || {
        let served = served_state(daemon, expected).ok()?;
        (served == *expected).then_some(())
    })
    .map_err(|e| {
        let served = served_state(daemon, expected).map(|s| first_difference(&s, expected));
        anyhow::anyhow!("{e}: {served:?}\n{}", daemon.log_tail())
    })
    .unwrap();
}

/// The first aggregate whose served state differs from the expected one, for failure messages.
pub fn first_difference(served: &StateView, expected: &StateView) -> String {
    let campaigns = served
        .campaigns
        .iter()
        .zip(&expected.campaigns)
        .find(|(s, e)| s != e)
        .map(|(s, e)| format!("served {s:?}\nexpected {e:?}"));
    let payments = served
        .payments
        .iter()
        .zip(&expected.payments)
        .find(|(s, e)| s != e)
        .map(|(s, e)| format!("served {s:?}\nexpected {e:?}"));
    let affiliates = served
        .affiliates
        .iter()
        .zip(&expected.affiliates)
        .find(|(s, e)| s != e)
        .map(|(s, e)| format!("served {s:?}\nexpected {e:?}"));
    campaigns.or(payments).or(affiliates).unwrap_or_else(|| {
        format!(
            "{} campaigns served, {} expected",
            served.campaigns.len(),
            expected.campaigns.len()
        )
    })
}
