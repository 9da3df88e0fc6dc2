//! `aerostream config check|print` and `schemas check`, run as an operator would: every problem
//! named at once as written (the file's key, the variable's name), secrets masked, each value's
//! source, the built-in schemas checked from any directory.

use std::path::Path;
use std::process::{Command, Output};

/// Runs the binary in `dir` with `args`, with only the `AEROSTREAM__` variables given.
fn aerostream(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_aerostream"));
    command.current_dir(dir).args(args);
    for (name, _) in std::env::vars() {
        if name.to_ascii_uppercase().starts_with("AEROSTREAM__") {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    command.output().expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A temporary directory holding `body` as `my.toml`.
fn config_file(body: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("my.toml");
    std::fs::write(&path, body).unwrap();
    let path = path.display().to_string();
    (dir, path)
}

/// Three different mistakes (an unknown key, a value of the wrong kind, a value out of range)
/// are all named, by the file's dotted keys, and the check fails.
#[test]
fn config_check_names_every_mistake_by_its_file_key() {
    let (dir, path) =
        config_file("[daemon]\ncache_mb = 64\n\n[http]\nlisten = \"nowhere\"\n\n[actors]\narbiters = 0\n");
    let out = aerostream(dir.path(), &["config", "check", "--config", &path], &[]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    for key in ["`daemon.cache_mb`", "`http.listen`", "`actors.arbiters`"] {
        assert!(
            stderr.contains(&format!("{key} in {path}")),
            "{key} missing in:\n{stderr}"
        );
    }
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
    assert!(!stderr.contains("default."), "figment's profile leaks: {stderr}");
    // The daemon refuses the same file with the same list before doing anything else.
    let run = aerostream(dir.path(), &["run", "--config", &path], &[]);
    assert!(!run.status.success());
    assert_eq!(text(&run.stderr), stderr);
}

#[test]
fn a_mistake_in_the_environment_is_named_by_its_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = aerostream(
        dir.path(),
        &["config", "check"],
        &[
            ("AEROSTREAM__HTTP__LISTNE", "127.0.0.1:9090"),
            ("AEROSTREAM__GATEWAY__DECLINE_RATE", "lots"),
        ],
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("AEROSTREAM__HTTP__LISTNE: unknown key"),
        "{stderr}"
    );
    assert!(stderr.contains("AEROSTREAM__GATEWAY__DECLINE_RATE: "), "{stderr}");
    assert!(!stderr.contains("HTTP.LISTNE"), "{stderr}");

    let fine = aerostream(
        dir.path(),
        &["config", "check"],
        &[("AEROSTREAM__HTTP__LISTEN", "127.0.0.1:9090")],
    );
    assert!(fine.status.success(), "{}", text(&fine.stderr));
    assert!(text(&fine.stdout).contains("configuration ok"));
}

/// `pulsar://` names no host: refused by the check and by the daemon at start, which would
/// otherwise retry for ever.
#[test]
fn a_broker_url_without_a_host_is_refused() {
    let (dir, path) = config_file("[broker]\nurl = \"pulsar://\"\n");
    for command in [
        &["config", "check", "--config", &path][..],
        &["run", "--config", &path],
    ] {
        let out = aerostream(dir.path(), command, &[]);
        assert!(!out.status.success(), "{command:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!("`broker.url` in {path}: names no host")),
            "{command:?}: {stderr}"
        );
    }
    let out = aerostream(dir.path(), &["run"], &[("AEROSTREAM__BROKER__URL", "pulsar://")]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("AEROSTREAM__BROKER__URL: names no host"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn config_print_masks_secrets_and_names_each_values_source() {
    let (dir, path) = config_file("[http]\nadmin_token = \"file-secret\"\n\n[actors]\narbiters = 3\n");
    let out = aerostream(
        dir.path(),
        &["config", "print", "--config", &path],
        &[
            ("AEROSTREAM__HTTP__ADMIN_TOKEN", "env-secret"),
            ("AEROSTREAM__BROKER__URL", "pulsar://broker.example:6650"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        !stdout.contains("file-secret") && !stdout.contains("env-secret"),
        "{stdout}"
    );
    for line in [
        "admin_token = \"<redacted>\"  # env AEROSTREAM__HTTP__ADMIN_TOKEN".to_owned(),
        "url = \"pulsar://broker.example:6650\"  # env AEROSTREAM__BROKER__URL".to_owned(),
        format!("arbiters = 3  # file {path}"),
        "cache_mib = 64  # default".to_owned(),
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "{line:?} missing in:\n{stdout}"
        );
    }
    // Every option of the shipped file is printed with its source (an empty map has no value).
    let shipped = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap();
    for key in shipped
        .lines()
        .filter(|line| !line.starts_with(['#', '[']) && !line.ends_with("{}"))
        .filter_map(|line| line.split_once(" = ").map(|(key, _)| key))
    {
        assert!(
            stdout
                .lines()
                .any(|line| line.starts_with(&format!("{key} = ")) && line.contains("  # ")),
            "{key} missing in:\n{stdout}"
        );
    }
}

/// Run from a directory without `schemas/`, the check reads the schemas built into the binary;
/// a directory that does not exist is an error whose cause is said once.
#[test]
fn schemas_check_works_from_any_directory() {
    let elsewhere = tempfile::tempdir().unwrap();
    let out = aerostream(elsewhere.path(), &["schemas", "check"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("built into this binary"), "{stdout}");
    assert!(
        stdout.contains("com.aeropartners.idempotencia.PagoProcesado"),
        "{stdout}"
    );

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas");
    let out = aerostream(elsewhere.path(), &["schemas", "check", "--dir", shipped], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = aerostream(elsewhere.path(), &["schemas", "check", "--dir", "missing"], &[]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("missing/manifest.toml"), "{stderr}");
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
}

/// `run --help` and `produce --help` say how the environment overrides the configuration, and
/// every flag of `produce` has a text.
#[test]
fn help_mentions_environment_overrides_and_describes_every_flag() {
    let dir = tempfile::tempdir().unwrap();
    for command in ["run", "produce", "config"] {
        let out = aerostream(dir.path(), &[command, "--help"], &[]);
        assert!(out.status.success());
        let help = text(&out.stdout);
        if command != "config" {
            assert!(help.contains("AEROSTREAM__<TABLE>__<KEY>"), "{command}: {help}");
        }
    }
    let out = aerostream(dir.path(), &["produce", "--help"], &[]);
    let help = text(&out.stdout);
    let options: Vec<&str> = help
        .lines()
        .skip_while(|line| !line.starts_with("Options:"))
        .skip(1)
        .collect();
    // Long help: each flag's line is followed by an indented text line.
    for (i, line) in options.iter().enumerate() {
        if line.trim_start().starts_with("--") {
            let next = options.get(i + 1).copied().unwrap_or("");
            assert!(
                !next.trim().is_empty() && !next.trim_start().starts_with('-'),
                "{line:?} has no text in:\n{help}"
            );
        }
    }
}
