//! The binary's edges: config errors name the key; the shipped config and schemas load.

use std::process::Command;

fn aerostream(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_aerostream"))
        .args(args)
        .output()
        .expect("runs")
}

fn run_with_config(body: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, body).unwrap();
    let out = aerostream(&["run", "--config", path.to_str().unwrap()]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_key_refuses_to_start_and_names_it() {
    let (ok, stderr) = run_with_config("[http]\nlisten = \"127.0.0.1:0\"\nadmin_tokn = \"x\"\n");
    assert!(!ok);
    assert!(stderr.contains("admin_tokn"), "{stderr}");
}

#[test]
fn bad_value_refuses_to_start_and_names_it() {
    let (ok, stderr) = run_with_config("[inputs.payments]\nsubscription_type = \"round_robin\"\n");
    assert!(!ok);
    assert!(stderr.contains("subscription_type"), "{stderr}");
    let (ok, stderr) = run_with_config("[http]\nlisten = \"not an address\"\n");
    assert!(!ok);
    assert!(stderr.contains("listen"), "{stderr}");
}

#[test]
fn missing_config_file_is_an_error() {
    let out = aerostream(&["run", "--config", "/nonexistent/aerostream.toml"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn shipped_schemas_check_passes() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas");
    let out = aerostream(&["schemas", "check", "--dir", dir]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("com.aeropartners.idempotencia.PagoProcesado"));
}

#[test]
fn shipped_config_parses() {
    aerostream::config::Config::load(Some(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config.toml"
    ))))
    .expect("the shipped config.toml is valid");
}

/// The Dockerfile copies everything the manifest's targets need (cargo refuses a manifest whose
/// targets are missing), and every file it copies exists.
#[test]
fn dockerfile_copies_what_the_build_needs() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let copied: Vec<&str> = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("COPY "))
        .filter(|args| !args.starts_with("--from"))
        .flat_map(|args| {
            let parts: Vec<&str> = args.split_whitespace().collect();
            parts[..parts.len() - 1].to_vec()
        })
        .collect();
    for source in &copied {
        assert!(
            root.join(source).exists(),
            "Dockerfile copies {source}, which does not exist"
        );
    }
    for needed in [
        "Cargo.toml",
        "Cargo.lock",
        "config.toml",
        "src",
        "actors",
        "schemas",
        "tests",
        "examples",
        "benches",
    ] {
        assert!(copied.contains(&needed), "the Dockerfile does not copy {needed}");
    }
}

/// Editing a shipped schema incompatibly (on a copy) makes `schemas check` fail, naming the
/// subject, the versions and the field.
#[test]
fn an_incompatible_schema_edit_fails_the_check_with_a_clear_message() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    // v2's new field loses its default: a v2 reader can no longer read v1 data (BACKWARD).
    let v2 = dir.path().join("PagoProcesado.v2.avsc");
    let text = std::fs::read_to_string(&v2).unwrap();
    let edited = text.replace(r#""default": "desconocida","#, "");
    assert_ne!(text, edited, "the edit applies");
    std::fs::write(&v2, edited).unwrap();

    let out = aerostream(&["schemas", "check", "--dir", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "com.aeropartners.idempotencia.PagoProcesado",
        "v1 → v2",
        "BACKWARD",
        "`data.pasarela`",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in: {stderr}");
    }
}

/// docker-compose.yml cannot run here (no Docker engine): check its structure, that every file it
/// mounts exists, and that its services have what an operator relies on.
#[test]
fn docker_compose_is_well_formed_and_its_files_exist() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("docker-compose.yml")).unwrap()).unwrap();
    let services = compose["services"].as_mapping().expect("services");
    for name in ["pulsar", "aerostream", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "service {name}");
    }
    assert!(
        compose["services"]["pulsar"]["healthcheck"].is_mapping(),
        "pulsar has a health check"
    );
    assert_eq!(
        compose["services"]["aerostream"]["build"].as_str(),
        Some("."),
        "aerostream is built from the Dockerfile"
    );
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("HEALTHCHECK") && dockerfile.contains("/health"),
        "aerostream has a health check"
    );
    for (name, service) in services {
        for volume in service["volumes"].as_sequence().into_iter().flatten() {
            let volume = volume.as_str().unwrap();
            let host = volume.split(':').next().unwrap();
            if host.starts_with("./") {
                // What a service reads must be in the repository; an output directory is made by
                // Docker.
                assert!(
                    !volume.ends_with(":ro") || root.join(host).exists(),
                    "{name:?} mounts {host}, which does not exist"
                );
            } else {
                let declared = compose["volumes"]
                    .as_mapping()
                    .expect("named volumes are declared");
                assert!(
                    declared.contains_key(host),
                    "{name:?} uses volume {host}, which is not declared"
                );
            }
        }
    }
    // The demo producer's expected state lands in a directory of the host, where the user reads it.
    let producer = &compose["services"]["producer"];
    let command: Vec<&str> = producer["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|arg| arg.as_str().unwrap())
        .collect();
    let out = command
        .iter()
        .position(|arg| *arg == "--expected-out")
        .map(|at| std::path::Path::new(command[at + 1]))
        .expect("the producer writes its expected state");
    let mounted = producer["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|volume| volume.as_str()?.split_once(':'))
        .any(|(host, inside)| host.starts_with("./") && out.starts_with(inside.trim_end_matches(":rw")));
    assert!(
        mounted,
        "{} is in no directory mounted from the host",
        out.display()
    );
}

/// docker-compose.yml is accepted by docker-compose 1.29 (the Debian package, which refuses a
/// top-level `name:`) and by Compose v2 (`docker compose`), each where it is installed
/// (scripts/prereqs installs docker-compose where apt has it; Compose v2 comes with Docker's own
/// packages). `config` only reads and resolves the file: no container runs.
#[test]
fn docker_compose_config_is_accepted_by_compose_1_29_and_v2() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let compose: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(root.join("docker-compose.yml")).unwrap()).unwrap();
    // The top-level keys both read (extensions aside).
    for key in compose.as_mapping().unwrap().keys() {
        let key = key.as_str().unwrap();
        assert!(
            ["services", "volumes", "networks", "configs", "secrets"].contains(&key) || key.starts_with("x-"),
            "top-level {key:?} is not accepted by docker-compose 1.29"
        );
    }
    for (tool, subcommand) in [("docker-compose", None), ("docker", Some("compose"))] {
        let installed = Command::new(tool)
            .args(subcommand)
            .arg("version")
            .output()
            .is_ok_and(|out| out.status.success());
        if !installed {
            eprintln!(
                "{tool} {}: not installed here, not checked",
                subcommand.unwrap_or("")
            );
            continue;
        }
        for profile in [None, Some("demo")] {
            let out = Command::new(tool)
                .args(subcommand)
                .args(
                    profile
                        .map(|profile| ["--profile", profile])
                        .into_iter()
                        .flatten(),
                )
                .args(["config", "--quiet"])
                .current_dir(root)
                .env_remove("COMPOSE_FILE")
                .env_remove("COMPOSE_PROFILES")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{tool} {subcommand:?} (profile {profile:?}) config refuses docker-compose.yml:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
