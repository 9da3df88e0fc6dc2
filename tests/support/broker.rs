//! [`LocalBroker`]: a pulsar-lite process behind the checksum-adding relay (SPEC §11).
//!
//! Everything runs on one supervisor thread with its own single-threaded tokio runtime: the relay,
//! and the pulsar-lite child process, which is started from that thread with
//! `PR_SET_PDEATHSIG` so it dies with the thread even when the test process is killed or the broker
//! sits in a `static` that is never dropped. The API is synchronous, so it serves `#[tokio::test]`,
//! `#[actix_rt::test]` and plain tests alike.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _};
use tokio::sync::mpsc;

use super::relay;

/// pulsar-lite configuration: its Prometheus endpoint would otherwise bind 0.0.0.0:8080, which
/// clashes between brokers and with the daemon's own metrics port.
const PULSAR_LITE_CONFIG: &str = "[metrics]\nenabled = false\n";
/// Interval between readiness probes while pulsar-lite starts.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How to start a [`LocalBroker`].
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Port of the relay, the one in [`LocalBroker::url`]; 0 picks a free port.
    pub relay_port: u16,
    /// Directory for pulsar-lite's database, config and log; `None` makes a temporary directory
    /// that is removed on drop.
    pub data_dir: Option<PathBuf>,
    /// How long pulsar-lite may take to accept connections before start-up fails.
    pub ready_timeout: Duration,
    /// Partitions of every topic the broker creates; 0 for non-partitioned topics.
    pub default_partitions: u32,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            relay_port: 0,
            data_dir: None,
            ready_timeout: Duration::from_secs(30),
            default_partitions: 0,
        }
    }
}

/// A running pulsar-lite broker reachable through the relay at [`LocalBroker::url`].
///
/// Dropping it stops the relay (closing every client connection) and kills pulsar-lite.
pub struct LocalBroker {
    url: String,
    broker_addr: SocketAddr,
    data_dir: PathBuf,
    control: Option<mpsc::UnboundedSender<Control>>,
    supervisor: Option<thread::JoinHandle<()>>,
    faults: Arc<relay::Faults>,
    _temp_dir: Option<tempfile::TempDir>,
}

/// Requests to the supervisor thread; each carries the channel its answer goes back on.
enum Control {
    Start(std_mpsc::Sender<anyhow::Result<()>>),
    Stop(std_mpsc::Sender<()>),
}

impl LocalBroker {
    /// Starts pulsar-lite on a free port with a temporary data directory, behind a relay on
    /// another free port, and returns once pulsar-lite accepts connections.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(BrokerOptions::default())
    }

    /// Like [`LocalBroker::start`], with a chosen relay port and data directory.
    pub fn start_with(options: BrokerOptions) -> anyhow::Result<Self> {
        let binary = pulsar_lite_binary()?;
        let (data_dir, temp_dir) = match options.data_dir {
            Some(dir) => {
                std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
                (dir.canonicalize()?, None)
            }
            None => {
                let temp = tempfile::Builder::new().prefix("pulsar-lite-").tempdir()?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        // AEROSTREAM_BROKER_METRICS=127.0.0.1:PORT, for an investigation: the broker's own
        // Prometheus metrics at http://PORT/metrics (messages out per subscription, copies
        // included; redeliveries; unacked messages).
        let metrics = match std::env::var("AEROSTREAM_BROKER_METRICS") {
            Ok(addr) => format!("[metrics]\nenabled = true\naddr = {addr:?}\n"),
            Err(_) => PULSAR_LITE_CONFIG.to_string(),
        };
        let config = format!("default_partitions = {}\n{metrics}", options.default_partitions);
        std::fs::write(data_dir.join("pulsar-lite.toml"), config)?;

        let relay_listener = TcpListener::bind(("127.0.0.1", options.relay_port))
            .with_context(|| format!("binding the relay on port {}", options.relay_port))?;
        relay_listener.set_nonblocking(true)?;
        let url = format!("pulsar://{}", relay_listener.local_addr()?);
        let broker_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));

        let process = BrokerProcess {
            binary,
            addr: broker_addr,
            data_dir: data_dir.clone(),
            ready_timeout: options.ready_timeout,
            child: None,
        };
        let (control, requests) = mpsc::unbounded_channel();
        let relay_url = url.clone();
        let faults = Arc::new(relay::Faults::default());
        let supervisor = thread::Builder::new().name("local-broker".into()).spawn({
            let faults = faults.clone();
            move || supervise(relay_listener, relay_url, faults, process, requests)
        })?;

        let broker = Self {
            url,
            broker_addr,
            data_dir,
            control: Some(control),
            supervisor: Some(supervisor),
            faults,
            _temp_dir: temp_dir,
        };
        broker.start_broker()?;
        Ok(broker)
    }

    /// The relay's `pulsar://127.0.0.1:PORT` URL, for clients.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Where pulsar-lite itself listens (without the relay; the `pulsar` crate cannot consume
    /// from it directly).
    pub fn broker_addr(&self) -> SocketAddr {
        self.broker_addr
    }

    /// Faults the relay puts between the broker and its clients.
    pub fn faults(&self) -> &relay::Faults {
        &self.faults
    }

    /// Directory holding pulsar-lite's database, config and `pulsar-lite.log`.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Kills pulsar-lite (SIGKILL, like a crash) and closes the relay's listening socket, so that
    /// open connections drop and new ones are refused until [`LocalBroker::start_broker`]; the
    /// URL stays the same. Does nothing if it is already stopped.
    pub fn stop_broker(&self) -> anyhow::Result<()> {
        let (reply, answer) = std_mpsc::channel();
        self.send(Control::Stop(reply))?;
        answer.recv().map_err(|_| anyhow!("supervisor thread ended"))
    }

    /// Starts pulsar-lite again on the same port and data directory, waits until it accepts
    /// connections, then reopens the relay on its port. Does nothing if it is already running.
    pub fn start_broker(&self) -> anyhow::Result<()> {
        let (reply, answer) = std_mpsc::channel();
        self.send(Control::Start(reply))?;
        answer.recv().map_err(|_| anyhow!("supervisor thread ended"))?
    }

    fn send(&self, request: Control) -> anyhow::Result<()> {
        self.control
            .as_ref()
            .and_then(|control| control.send(request).ok())
            .ok_or_else(|| anyhow!("supervisor thread ended"))
    }
}

impl Drop for LocalBroker {
    fn drop(&mut self) {
        // Closing the channel ends the supervisor, which kills pulsar-lite and drops the relay.
        self.control = None;
        if let Some(supervisor) = self.supervisor.take() {
            let _ = supervisor.join();
        }
    }
}

/// Body of the supervisor thread: obeys control requests until the [`LocalBroker`] is dropped.
fn supervise(
    relay_listener: TcpListener,
    relay_url: String,
    faults: Arc<relay::Faults>,
    process: BrokerProcess,
    mut requests: mpsc::UnboundedReceiver<Control>,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the local broker's runtime");
    let mut supervisor = Supervisor {
        relay_addr: relay_listener.local_addr().expect("bound relay listener"),
        relay_listener: Some(relay_listener),
        relay_url,
        faults,
        relay: None,
        process,
    };
    runtime.block_on(async {
        while let Some(request) = requests.recv().await {
            match request {
                Control::Start(reply) => {
                    let _ = reply.send(supervisor.start().await);
                }
                Control::Stop(reply) => {
                    supervisor.stop().await;
                    let _ = reply.send(());
                }
            }
        }
        supervisor.stop().await;
    });
    // Dropping the runtime here ends the relay's remaining connections.
}

/// pulsar-lite and the relay's listener, up and down together: while the broker is stopped the
/// relay port refuses connections, as a crashed broker's would. (Accepting and then closing
/// would not do: the `pulsar` crate retries a refused connection but gives up on a reset one.)
struct Supervisor {
    relay_addr: SocketAddr,
    /// The listener bound by [`LocalBroker::start_with`], used by the first start.
    relay_listener: Option<TcpListener>,
    relay_url: String,
    faults: Arc<relay::Faults>,
    /// The relay's accept loop; dropping it closes the listener.
    relay: Option<tokio::task::JoinHandle<()>>,
    process: BrokerProcess,
}

impl Supervisor {
    async fn start(&mut self) -> anyhow::Result<()> {
        self.process.start().await?;
        if self.relay.is_none() {
            let listener = match self.relay_listener.take() {
                Some(listener) => listener,
                None => {
                    let listener = TcpListener::bind(self.relay_addr)
                        .with_context(|| format!("rebinding the relay on {}", self.relay_addr))?;
                    listener.set_nonblocking(true)?;
                    listener
                }
            };
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let serve = relay::serve(
                listener,
                self.process.addr,
                self.relay_url.clone(),
                self.faults.clone(),
            );
            self.relay = Some(tokio::spawn(serve));
        }
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some(relay) = self.relay.take() {
            relay.abort();
            let _ = relay.await;
        }
        self.process.stop();
    }
}

/// The pulsar-lite child process; only ever touched from the supervisor thread.
struct BrokerProcess {
    binary: PathBuf,
    addr: SocketAddr,
    data_dir: PathBuf,
    ready_timeout: Duration,
    child: Option<Child>,
}

impl BrokerProcess {
    async fn start(&mut self) -> anyhow::Result<()> {
        if let Some(child) = &mut self.child {
            if child.try_wait()?.is_none() {
                return Ok(());
            }
        }
        let log_path = self.data_dir.join("pulsar-lite.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut command = Command::new(&self.binary);
        command
            .arg("--config")
            .arg(self.data_dir.join("pulsar-lite.toml"))
            .arg("--addr")
            .arg(self.addr.to_string())
            .arg("--db-path")
            .arg(self.data_dir.join("pulsar-lite"))
            // pulsar-lite logs every message and ack at info: warn by default keeps the broker's
            // CPU for the work; AEROSTREAM_BROKER_LOG=debug (or info) for an investigation.
            .arg("--log-level")
            .arg(std::env::var("AEROSTREAM_BROKER_LOG").unwrap_or_else(|_| "warn".into()))
            .current_dir(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_this_thread(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);

        let deadline = Instant::now() + self.ready_timeout;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().transpose()) {
                self.child = None;
                bail!(
                    "pulsar-lite exited ({}) before accepting connections; log: {}\n{}",
                    status?,
                    log_path.display(),
                    log_tail(&log_path)
                );
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                bail!(
                    "pulsar-lite did not accept connections on {} within {:?}; log: {}\n{}",
                    self.addr,
                    self.ready_timeout,
                    log_path.display(),
                    log_tail(&log_path)
                );
            }
            tokio::time::sleep(READY_POLL_INTERVAL).await;
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Has the child killed when the spawning thread (the supervisor) ends, however it ends.
#[cfg(target_os = "linux")]
fn die_with_this_thread(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs between fork and exec and only makes an async-signal-safe syscall.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_this_thread(_command: &mut Command) {}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A port that was free a moment ago.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Path of the pulsar-lite binary: `$PULSAR_LITE_BINARY`, else the one inside the `pulsar-lite`
/// Python package, which is pip-installed when missing.
pub fn pulsar_lite_binary() -> anyhow::Result<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BINARY
        .get_or_init(|| find_or_install_binary().map_err(|error| format!("{error:#}")))
        .clone()
        .map_err(|error| anyhow!(error))
}

fn find_or_install_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PULSAR_LITE_BINARY") {
        return Ok(PathBuf::from(path));
    }
    if let Some(path) = binary_in_python_package() {
        return Ok(path);
    }
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "pulsar-lite"])
        .status()
        .context("running python3 -m pip install pulsar-lite")?;
    if !status.success() {
        bail!("python3 -m pip install pulsar-lite failed ({status})");
    }
    binary_in_python_package().ok_or_else(|| anyhow!("pulsar-lite installed but its binary was not found"))
}

fn binary_in_python_package() -> Option<PathBuf> {
    let output = Command::new("python3")
        .args([
            "-c",
            "import os, pulsar_lite; print(os.path.dirname(pulsar_lite.__file__))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let package_dir = String::from_utf8(output.stdout).ok()?;
    let binary = Path::new(package_dir.trim()).join("bin").join("pulsar-lite");
    (output.status.success() && binary.is_file()).then_some(binary)
}

/// A consumer id no other consumer on the machine is using (pulsar-lite keys consumers by id
/// across connections): the process id in the high half, a time-seeded counter in the low half.
pub fn unique_consumer_id() -> u64 {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    NEXT.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.subsec_nanos());
        let seed = (u64::from(std::process::id()) << 32) | (u64::from(nanos & 0xffff) << 16);
        AtomicU64::new(seed)
    })
    .fetch_add(1, Ordering::Relaxed)
}
