//! The alerting rules of deploy/alerts.yml against their unit tests, deploy/alerts.test.yml
//! (`promtool test rules`; promtool comes with the Debian package `prometheus`, installed by
//! scripts/prereqs): every alert has a case where it fires and one where it does not, and every
//! case passes. tests/observability.rs runs the same rules against a real Prometheus scraping a
//! daemon. Every rule links its section of docs/OPERATIONS.md (`runbook_url`).

use serde_yaml::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn yaml(path: &str) -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(repo(path)).unwrap()).unwrap()
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool is installed (scripts/prereqs installs the prometheus package)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

fn sequence(value: &Value) -> &[Value] {
    value.as_sequence().map(Vec::as_slice).unwrap_or_default()
}

/// The alert names of deploy/alerts.yml.
fn alerts() -> BTreeSet<String> {
    let rules = yaml("deploy/alerts.yml");
    sequence(&rules["groups"])
        .iter()
        .flat_map(|group| sequence(&group["rules"]))
        .filter_map(|rule| rule["alert"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn every_alert_has_promtool_cases_that_fire_and_that_do_not_and_they_pass() {
    let alerts = alerts();
    assert!(alerts.len() >= 6, "{alerts:?}");
    let tests = yaml("deploy/alerts.test.yml");
    let cases: Vec<&Value> = sequence(&tests["tests"])
        .iter()
        .flat_map(|test| sequence(&test["alert_rule_test"]))
        .collect();
    let named = |fires: bool| -> BTreeSet<String> {
        cases
            .iter()
            .filter(|case| sequence(&case["exp_alerts"]).is_empty() != fires)
            .filter_map(|case| case["alertname"].as_str().map(str::to_owned))
            .collect()
    };
    let (firing, quiet) = (named(true), named(false));
    for alert in &alerts {
        assert!(
            firing.contains(alert),
            "no case where {alert} fires in deploy/alerts.test.yml"
        );
        assert!(
            quiet.contains(alert),
            "no case where {alert} stays quiet in deploy/alerts.test.yml"
        );
    }
    let unknown: Vec<&String> = firing
        .union(&quiet)
        .filter(|name| !alerts.contains(*name))
        .collect();
    assert!(
        unknown.is_empty(),
        "cases for alerts that do not exist: {unknown:?}"
    );

    promtool(&["check", "rules", repo("deploy/alerts.yml").to_str().unwrap()]);
    let report = promtool(&["test", "rules", repo("deploy/alerts.test.yml").to_str().unwrap()]);
    assert!(report.contains("SUCCESS"), "{report}");
}

/// The anchor a Markdown renderer gives a heading: lower case, spaces as dashes, punctuation
/// dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every alert links its runbook: a section of docs/OPERATIONS.md that exists, named after it.
#[test]
fn every_alert_links_its_section_of_the_operations_guide() {
    let operations = std::fs::read_to_string(repo("docs/OPERATIONS.md")).unwrap();
    let anchors: BTreeSet<String> = operations
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .map(|heading| anchor(heading.trim_start_matches('#')))
        .collect();
    let rules = yaml("deploy/alerts.yml");
    let rules: Vec<&Value> = sequence(&rules["groups"])
        .iter()
        .flat_map(|group| sequence(&group["rules"]))
        .filter(|rule| rule["alert"].is_string())
        .collect();
    assert_eq!(rules.len(), alerts().len());
    for rule in rules {
        let alert = rule["alert"].as_str().unwrap();
        let url = rule["annotations"]["runbook_url"]
            .as_str()
            .unwrap_or_else(|| panic!("{alert} has no runbook_url"));
        let section = url
            .strip_prefix("docs/OPERATIONS.md#")
            .unwrap_or_else(|| panic!("{alert}: {url} is not a section of docs/OPERATIONS.md"));
        assert_eq!(section, anchor(alert), "{alert}: its section is named after it");
        assert!(
            anchors.contains(section),
            "{alert}: docs/OPERATIONS.md has no section #{section}"
        );
    }
}
