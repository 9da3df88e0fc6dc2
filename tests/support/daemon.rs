//! Runs the real `aerostream` binary against a [`super::LocalBroker`] and reads its HTTP API.

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The `aerostream` binary cargo built for these tests.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_aerostream")
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A config file for a test daemon: its own data dir and HTTP port, the given broker, and `extra`
/// TOML appended (it must not repeat a table header used here). Tests build theirs with
/// [`super::harness::Harness`]; this form is for those not moved to it yet.
pub fn write_config(dir: &Path, broker_url: &str, http_port: u16, extra: &str) -> anyhow::Result<PathBuf> {
    write_config_file(
        dir,
        broker_url,
        http_port,
        "shutdown_timeout_seconds = 20",
        "",
        extra,
    )
}

/// Writes `aerostream.toml` in `dir`: `[daemon]` with `data_dir = dir/data` and `daemon_keys`,
/// `[broker]` at `broker_url`, `[http]` on `http_port` with `http_keys`, then `extra`; every input
/// as shipped unless `extra` says otherwise.
pub fn write_config_file(
    dir: &Path,
    broker_url: &str,
    http_port: u16,
    daemon_keys: &str,
    http_keys: &str,
    extra: &str,
) -> anyhow::Result<PathBuf> {
    let path = dir.join("aerostream.toml");
    let data_dir = dir.join("data");
    let body = format!(
        "[daemon]\ndata_dir = {data:?}\n{daemon_keys}\n\n\
         [broker]\nurl = {broker_url:?}\nhealth_probe_interval_seconds = 1\n\n\
         [http]\nlisten = \"127.0.0.1:{http_port}\"\n{http_keys}\n{extra}\n",
        data = data_dir.display().to_string(),
    );
    std::fs::File::create(&path)?.write_all(body.as_bytes())?;
    Ok(path)
}

/// A daemon process. Killed on drop if still running.
pub struct Daemon {
    child: Child,
    pub base_url: String,
    pub config: PathBuf,
    pub log: PathBuf,
    http: reqwest::blocking::Client,
}

impl Daemon {
    /// Starts `aerostream run --config <config>` and waits until its HTTP listener answers.
    pub fn start(config: &Path, http_port: u16) -> anyhow::Result<Daemon> {
        static STARTS: AtomicU32 = AtomicU32::new(0);
        let n = STARTS.fetch_add(1, Ordering::SeqCst);
        let log = config.with_file_name(format!("daemon-{n}.log"));
        let child = Command::new(binary())
            .args(["run", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("AEROSTREAM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting aerostream")?;
        let daemon = Daemon {
            child,
            base_url: format!("http://127.0.0.1:{http_port}"),
            config: config.to_owned(),
            log,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .pool_idle_timeout(aerostream::status::IDLE_CONNECTION)
                .build()?,
        };
        wait_for("the HTTP listener", Duration::from_secs(30), || {
            daemon.http.get(format!("{}/health", daemon.base_url)).send().ok()
        })?;
        Ok(daemon)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The daemon's established TCP connections to 127.0.0.1:`port` (its sockets in
    /// `/proc/<pid>/fd`, their states in `/proc/net/tcp`).
    pub fn connections_to(&self, port: u16) -> anyhow::Result<usize> {
        let mut inodes = std::collections::HashSet::new();
        for fd in std::fs::read_dir(format!("/proc/{}/fd", self.pid()))? {
            let Ok(target) = std::fs::read_link(fd?.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if let Some(inode) = target
                .strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
            {
                inodes.insert(inode.to_owned());
            }
        }
        let remote = format!("0100007F:{port:04X}");
        let table = std::fs::read_to_string("/proc/net/tcp")?;
        Ok(table
            .lines()
            .skip(1)
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .filter(|fields| fields.len() > 9 && fields[2] == remote && fields[3] == "01")
            .filter(|fields| inodes.contains(fields[9]))
            .count())
    }

    /// Whether the process is still running (it has not exited).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until /health answers 200.
    pub fn wait_healthy(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_for("a healthy daemon", timeout, || {
            let response = self.http.get(format!("{}/health", self.base_url)).send().ok()?;
            response.status().is_success().then_some(())
        })
        .with_context(|| self.log_tail())
    }

    /// Waits until every input has subscribed (/health's `components.inputs.*.subscribed`),
    /// whatever else /health says: messages published before a subscription exists are not
    /// delivered to it.
    pub fn wait_subscribed(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_for("every input subscribed", timeout, || {
            let response = self.http.get(format!("{}/health", self.base_url)).send().ok()?;
            let body: serde_json::Value = response.json().ok()?;
            let inputs = body["components"]["inputs"].as_object()?;
            (!inputs.is_empty() && inputs.values().all(|input| input["subscribed"] == true)).then_some(())
        })
        .with_context(|| self.log_tail())
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        self.get_query(path, &[])
    }

    /// GET `path` with `query` (percent-encoded) as its query string.
    pub fn get_query<T: DeserializeOwned>(&self, path: &str, query: &[(&str, &str)]) -> anyhow::Result<T> {
        let response = self
            .http
            .get(format!("{}{path}", self.base_url))
            .query(query)
            .send()?;
        let status = response.status();
        if !status.is_success() {
            bail!(
                "GET {path} {query:?}: {status}: {}",
                response.text().unwrap_or_default()
            );
        }
        Ok(response.json()?)
    }

    /// POSTs `body` as JSON, with `Authorization: Bearer <token>` when given; returns the status.
    pub fn post(&self, path: &str, token: Option<&str>, body: &serde_json::Value) -> anyhow::Result<u16> {
        let mut request = self.http.post(format!("{}{path}", self.base_url)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        Ok(request.send()?.status().as_u16())
    }

    /// Sends `method path` with a raw JSON body (and the bearer token when given); returns the
    /// status, the JSON answer (`Null` when not JSON) and the `Retry-After` header.
    pub fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> anyhow::Result<(u16, serde_json::Value, Option<String>)> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base_url))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send()?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let json = response.json().unwrap_or(serde_json::Value::Null);
        Ok((status, json, retry_after))
    }

    pub fn status(&self, path: &str) -> anyhow::Result<u16> {
        Ok(self
            .http
            .get(format!("{}{path}", self.base_url))
            .send()?
            .status()
            .as_u16())
    }

    /// The Prometheus exposition text of /metrics.
    pub fn metrics_text(&self) -> anyhow::Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.base_url))
            .send()?
            .text()?)
    }

    /// Sum of every sample of metric `name` whose labels contain all of `labels` (`k="v"` pairs).
    pub fn metric(&self, name: &str, labels: &[&str]) -> anyhow::Result<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base_url))
            .send()?
            .text()?;
        Ok(text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .filter(|line| line.split(['{', ' ']).next() == Some(name))
            .filter(|line| labels.iter().all(|l| line.contains(l)))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Waits until metric `name` (summed over samples matching `labels`) equals `value`: counters
    /// move once an event's commit is durable, a moment after its state becomes readable.
    pub fn wait_metric(&self, name: &str, labels: &[&str], value: f64) -> anyhow::Result<()> {
        wait_for(&format!("{name} = {value}"), Duration::from_secs(30), || {
            (self.metric(name, labels).ok()? == value).then_some(())
        })
        .with_context(|| format!("{name} is {:?}", self.metric(name, labels)))
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        signal(self.child.id(), "TERM")?;
        let status = wait_for("the daemon to exit", timeout, || {
            self.child.try_wait().ok().flatten()
        })
        .with_context(|| self.log_tail())?;
        Ok(status)
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// Peak resident set size so far (VmHWM), in bytes.
    pub fn peak_rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .context("no VmHWM")?;
        let kib: u64 = line.split_whitespace().nth(1).context("no value")?.parse()?;
        Ok(kib * 1024)
    }

    /// The daemon's whole log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the daemon's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "daemon log tail:\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{name} {pid} failed");
    }
    Ok(())
}

/// Runs `aerostream produce` with `args` after `--config <config>` and returns its stdout.
pub fn produce(config: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(binary())
        .args(["produce", "--config"])
        .arg(config)
        .args(args)
        .output()
        .context("running aerostream produce")?;
    if !output.status.success() {
        bail!(
            "aerostream produce failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
