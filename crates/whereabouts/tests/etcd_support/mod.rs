//! Throwaway etcd servers for integration tests (`mod etcd_support;` in a test file).
//!
//! [`EtcdCluster`] starts one or more `etcd` (3.4, from Debian's `etcd-server`) processes on
//! 127.0.0.1 only, on ports picked free at start, each with its data and log in one temporary
//! directory, and waits until every member answers `etcdctl endpoint health`. Dropping the handle
//! SIGKILLs every member and removes the directory, also when a test panics. Optional: TLS on the
//! client URLs (a CA and certificates generated per run with rcgen, see [`tls`]), client
//! certificate authentication, and etcd's user/password authentication.
//!
//! `etcd` and `etcdctl` are taken from `PATH`; `WHEREABOUTS_TEST_ETCD` and
//! `WHEREABOUTS_TEST_ETCDCTL` name other binaries. The `ETCD*`/`ETCDCTL*` and proxy variables of
//! the test's environment are not passed on, so a developer's etcdctl settings cannot leak in.
//!
//! Peers always talk plain HTTP on loopback; only client URLs carry TLS.

// Every test file that declares `mod etcd_support;` compiles all of it but uses only a part.
#![allow(dead_code, reason = "each test file that includes this module uses only some helpers")]

pub mod tls;

use std::env;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
pub use tls::TlsFiles;

/// How long a start or restart may take before the harness gives up and panics with the logs.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times a fresh cluster is started on new ports when one was taken meanwhile.
const START_ATTEMPTS: usize = 5;
const POLL: Duration = Duration::from_millis(50);
/// Lines of each member's log quoted in a panic message.
const LOG_TAIL_LINES: usize = 60;

/// Whether client URLs use TLS, and whether etcd then demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// `http://` client URLs.
    Plain,
    /// `https://` client URLs; clients need only trust the CA.
    ServerOnly,
    /// `https://` client URLs with `--client-cert-auth`: clients must present a certificate
    /// signed by the CA.
    ClientCertAuth,
}

/// A user name and password for etcd's authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl Credentials {
    /// The `user:password` form that `etcdctl --user` takes.
    pub fn etcdctl_arg(&self) -> String {
        format!("{}:{}", self.user, self.password)
    }
}

/// One etcd process (running or killed) of a cluster.
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster; dropping it kills every member and removes all its files.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    mode: TlsMode,
    tls: Option<TlsFiles>,
    /// What the harness's own etcdctl calls authenticate with once auth is on.
    credentials: Option<Credentials>,
    /// Root's credentials once auth is on (for health checks and administration).
    root: Option<Credentials>,
    cluster_token: String,
    /// Declared last: removed only after `Drop::drop` has killed the members.
    dir: tempfile::TempDir,
}

/// Why a fresh start did not come up.
enum StartFailure {
    /// A port was taken between picking it and etcd binding it: try again on other ports.
    PortTaken(String),
    /// Anything else: the panic message.
    Failed(String),
}

impl EtcdCluster {
    /// One member, plain HTTP.
    pub fn single() -> Self {
        Self::start(1, TlsMode::Plain)
    }

    /// `size` members (static `--initial-cluster` on loopback peer ports), plain HTTP.
    pub fn cluster(size: usize) -> Self {
        Self::start(size, TlsMode::Plain)
    }

    /// One member with `https://` client URLs; with `client_auth`, etcd requires a client
    /// certificate signed by the generated CA (`--client-cert-auth`).
    pub fn single_tls(client_auth: bool) -> Self {
        Self::start(1, if client_auth { TlsMode::ClientCertAuth } else { TlsMode::ServerOnly })
    }

    /// Starts `size` members and waits until all are healthy; panics with their logs otherwise.
    pub fn start(size: usize, mode: TlsMode) -> Self {
        assert!(size >= 1, "an etcd cluster needs at least one member");
        let dir = tempfile::Builder::new()
            .prefix("whereabouts-etcd-")
            .tempdir()
            .expect("creating a temporary directory for etcd");
        let token: String = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().chars().filter(char::is_ascii_alphanumeric).collect())
            .unwrap_or_default();
        let tls = (mode != TlsMode::Plain).then(|| tls::generate(dir.path()));
        // Built before any process starts, so that a panic from here on still kills and cleans.
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            mode,
            tls,
            credentials: None,
            root: None,
            cluster_token: String::new(),
            dir,
        };
        let mut collisions = Vec::new();
        for attempt in 0..START_ATTEMPTS {
            let ports = free_ports(2 * size);
            cluster.members = (0..size)
                .map(|i| Member {
                    // Unique across concurrently running tests, so that the identity check in
                    // `probe` can tell this member from another test's etcd on a reused port.
                    name: format!("{token}-m{i}"),
                    client_port: ports[2 * i],
                    peer_port: ports[2 * i + 1],
                    data_dir: cluster.dir.path().join(format!("m{i}.etcd")),
                    log: cluster.dir.path().join(format!("m{i}.log")),
                    child: None,
                })
                .collect();
            for member in &cluster.members {
                // Leftovers of an attempt that lost a port race.
                let _ = fs::remove_dir_all(&member.data_dir);
                let _ = fs::remove_file(&member.log);
            }
            cluster.cluster_token = format!("{token}-{attempt}");
            for i in 0..size {
                cluster.spawn(i, "new");
            }
            let all: Vec<usize> = (0..size).collect();
            match cluster.wait_healthy(&all) {
                Ok(()) => return cluster,
                Err(StartFailure::PortTaken(why)) => {
                    cluster.kill_all();
                    collisions.push(why);
                }
                Err(StartFailure::Failed(report)) => panic!("{report}"),
            }
        }
        panic!("etcd lost a port race {START_ATTEMPTS} times in a row:\n{}", collisions.join("\n"))
    }

    /// Number of members (running or killed).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Client URL of member `i`, like `http://127.0.0.1:23791`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.members[i].client_port)
    }

    /// Client URLs of all members, killed ones included.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.endpoint(i)).collect()
    }

    /// [`Self::endpoints`] joined with commas (etcdctl's `--endpoints`, whereabouts' `etcd_host`).
    pub fn endpoints_csv(&self) -> String {
        self.endpoints().join(",")
    }

    /// `127.0.0.1:port` of every member, comma-separated, without a scheme.
    pub fn hosts_csv(&self) -> String {
        self.members.iter().map(|m| format!("127.0.0.1:{}", m.client_port)).collect::<Vec<_>>().join(",")
    }

    /// Client port of member `i`.
    pub fn client_port(&self, i: usize) -> u16 {
        self.members[i].client_port
    }

    /// The temporary directory holding data, logs and certificates.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Data directory of member `i`.
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.members[i].data_dir
    }

    /// Process id of member `i`, unless it was killed.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Whether member `i`'s process is alive.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.exit_status(i).is_none() && self.members[i].child.is_some()
    }

    /// Everything member `i` logged (stderr, zap JSON lines), across restarts.
    pub fn log(&self, i: usize) -> String {
        fs::read(&self.members[i].log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// The generated certificate files, for a TLS cluster.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    fn tls_or_panic(&self) -> &TlsFiles {
        self.tls.as_ref().expect("this etcd cluster was started without TLS")
    }

    /// PEM of the CA that signed the server and client certificates (TLS clusters only).
    pub fn ca_file(&self) -> &Path {
        &self.tls_or_panic().ca
    }

    /// PEM of a client certificate signed by the CA (TLS clusters only).
    pub fn client_cert_file(&self) -> &Path {
        &self.tls_or_panic().client_cert
    }

    /// PEM of the client certificate's private key (TLS clusters only).
    pub fn client_key_file(&self) -> &Path {
        &self.tls_or_panic().client_key
    }

    /// The credentials set by [`Self::enable_auth`], if it was called.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// SIGKILLs member `i` (no-op when it is not running) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Starts member `i` again on its data directory and ports (`--initial-cluster-state
    /// existing`), killing it first if it still runs, and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i, "existing");
        self.wait_healthy_or_panic(&[i]);
    }

    /// Kills every member, starts them all again on their data and ports, and waits until all
    /// are healthy (a full-cluster outage; for one member, a plain restart).
    pub fn stop_all_and_restart(&mut self) {
        self.kill_all();
        for i in 0..self.len() {
            self.spawn(i, "existing");
        }
        let all: Vec<usize> = (0..self.len()).collect();
        self.wait_healthy_or_panic(&all);
    }

    /// Turns on etcd's authentication: root gets `password` too, `user` (unless it is `root`)
    /// gets a role with readwrite on every key starting with `/`. The harness's later etcdctl
    /// calls pass `--user user:password`.
    pub fn enable_auth(&mut self, user: &str, password: &str) {
        self.enable_auth_on_prefix(user, password, "/");
    }

    /// [`Self::enable_auth`] with readwrite on `prefix` only (`""`: the whole key space).
    pub fn enable_auth_on_prefix(&mut self, user: &str, password: &str, prefix: &str) {
        assert!(self.credentials.is_none(), "auth is already enabled");
        // etcd 3.4 refuses `auth enable` until a root user holding the root role exists.
        self.etcdctl(&["user", "add", &format!("root:{password}"), "--interactive=false"]);
        self.etcdctl(&["user", "grant-role", "root", "root"]);
        if user != "root" {
            let role = format!("{user}-readwrite");
            self.etcdctl(&["role", "add", &role]);
            self.etcdctl(&["role", "grant-permission", &role, "readwrite", prefix, "--prefix=true"]);
            self.etcdctl(&["user", "add", &format!("{user}:{password}"), "--interactive=false"]);
            self.etcdctl(&["user", "grant-role", user, &role]);
        }
        self.etcdctl(&["auth", "enable"]);
        self.root = Some(Credentials { user: "root".into(), password: password.into() });
        self.credentials = Some(Credentials { user: user.into(), password: password.into() });
    }

    /// etcdctl against `endpoints` with this cluster's TLS flags (CA, and the client
    /// certificate when etcd demands one), and `--user` when `credentials` is given.
    fn etcdctl_at(&self, endpoints: &str, credentials: Option<&Credentials>) -> Command {
        let mut cmd = bare_etcdctl(endpoints);
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert").arg(&tls.ca);
            if self.mode == TlsMode::ClientCertAuth {
                cmd.arg("--cert").arg(&tls.client_cert).arg("--key").arg(&tls.client_key);
            }
        }
        if let Some(credentials) = credentials {
            cmd.arg(format!("--user={}", credentials.etcdctl_arg()));
        }
        cmd
    }

    /// etcdctl on all endpoints, with TLS flags and (once auth is on) `--user`; add arguments.
    pub fn etcdctl_command(&self) -> Command {
        self.etcdctl_at(&self.endpoints_csv(), self.credentials.as_ref())
    }

    /// [`Self::etcdctl_command`] against member `i` only.
    pub fn etcdctl_command_for(&self, i: usize) -> Command {
        self.etcdctl_at(&self.endpoint(i), self.credentials.as_ref())
    }

    /// [`Self::etcdctl_command`] without `--user`, TLS flags kept.
    pub fn etcdctl_command_anonymous(&self) -> Command {
        self.etcdctl_at(&self.endpoints_csv(), None)
    }

    /// [`Self::etcdctl_command`] authenticating as `credentials` instead.
    pub fn etcdctl_command_as(&self, credentials: &Credentials) -> Command {
        self.etcdctl_at(&self.endpoints_csv(), Some(credentials))
    }

    /// Runs etcdctl with `args` on all endpoints; stdout, or the error with stderr.
    pub fn try_etcdctl(&self, args: &[&str]) -> Result<String, String> {
        run(self.etcdctl_command().args(args))
    }

    /// Runs etcdctl with `args` on all endpoints and returns stdout; panics with stderr.
    pub fn etcdctl(&self, args: &[&str]) -> String {
        self.try_etcdctl(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The index of the member that the running members agree is the leader, if any.
    pub fn leader(&mut self) -> Option<usize> {
        let running: Vec<usize> = (0..self.len()).filter(|&i| self.is_running(i)).collect();
        let endpoints: Vec<String> = running.iter().map(|&i| self.endpoint(i)).collect();
        let out = run(self.etcdctl_at(&endpoints.join(","), self.root.as_ref()).args([
            "endpoint",
            "status",
            "--write-out=json",
            "--command-timeout=1s",
        ]))
        .ok()?;
        let statuses: Value = serde_json::from_str(&out).ok()?;
        // Every answering member must name the same leader, and that leader must have answered.
        let mut leader_id: Option<&Value> = None;
        let mut leader_index = None;
        for s in statuses.as_array()? {
            let endpoint = s.get("Endpoint")?.as_str()?;
            let status = s.get("Status")?;
            let member_id = status.pointer("/header/member_id")?;
            let leader = status.get("leader")?;
            match leader_id {
                Some(id) if id != leader => return None,
                _ => leader_id = Some(leader),
            }
            if member_id == leader {
                leader_index = (0..self.len()).find(|&i| self.endpoint(i) == endpoint);
            }
        }
        leader_index
    }

    /// Waits up to [`HEALTH_TIMEOUT`] for [`Self::leader`]; panics otherwise.
    pub fn wait_for_leader(&mut self) -> usize {
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        loop {
            if let Some(leader) = self.leader() {
                return leader;
            }
            if Instant::now() >= deadline {
                let all: Vec<usize> = (0..self.len()).collect();
                panic!("{}", self.report("etcd elected no leader in time", &all));
            }
            sleep(POLL);
        }
    }

    fn spawn(&mut self, i: usize, initial_cluster_state: &str) {
        let scheme = self.scheme();
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        let client_url = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer_url = format!("http://127.0.0.1:{}", m.peer_port);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap_or_else(|e| panic!("opening {}: {e}", m.log.display()));
        let log_too = log.try_clone().expect("duplicating the log file handle");
        let mut cmd = Command::new(etcd_bin());
        scrub_env(&mut cmd);
        cmd.arg(format!("--name={}", m.name))
            .arg("--data-dir")
            .arg(&m.data_dir)
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg(format!("--initial-cluster-token={}", self.cluster_token))
            .arg(format!("--initial-cluster-state={initial_cluster_state}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log_too)
            .stderr(log);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file").arg(&tls.server_cert).arg("--key-file").arg(&tls.server_key);
            if self.mode == TlsMode::ClientCertAuth {
                cmd.arg("--trusted-ca-file").arg(&tls.ca).arg("--client-cert-auth");
            }
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {} (Debian: apt-get install etcd-server etcd-client): {e}",
                etcd_bin().display()
            )
        });
        self.members[i].child = Some(child);
    }

    fn exit_status(&mut self, i: usize) -> Option<ExitStatus> {
        self.members[i].child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    fn wait_healthy_or_panic(&mut self, members: &[usize]) {
        match self.wait_healthy(members) {
            Ok(()) => {}
            Err(StartFailure::PortTaken(why) | StartFailure::Failed(why)) => panic!("{why}"),
        }
    }

    /// Polls until every member in `members` answers `endpoint health` as itself.
    fn wait_healthy(&mut self, members: &[usize]) -> Result<(), StartFailure> {
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        let mut pending = members.to_vec();
        let mut last_errors = vec![String::new(); self.len()];
        loop {
            let mut still_pending = Vec::new();
            for &i in &pending {
                if let Some(status) = self.exit_status(i) {
                    let headline = format!("etcd member {i} exited ({status}) before becoming healthy");
                    let report = self.report(&headline, &[i]);
                    return Err(if self.log(i).contains("address already in use") {
                        StartFailure::PortTaken(headline)
                    } else {
                        StartFailure::Failed(report)
                    });
                }
                match self.probe(i) {
                    Ok(true) => {}
                    Ok(false) => {
                        // Another test's etcd answers on this member's port: ours lost the race.
                        return Err(StartFailure::PortTaken(format!(
                            "another etcd answers on {}",
                            self.endpoint(i)
                        )));
                    }
                    Err(e) => {
                        last_errors[i] = e;
                        still_pending.push(i);
                    }
                }
            }
            pending = still_pending;
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let mut headline = format!("etcd members {pending:?} not healthy within {HEALTH_TIMEOUT:?}");
                for &i in &pending {
                    let _ = write!(headline, "\nlast probe of member {i}: {}", last_errors[i].trim());
                }
                return Err(StartFailure::Failed(self.report(&headline, &pending)));
            }
            sleep(POLL);
        }
    }

    /// Ok(true): member `i` is healthy and is this cluster's member; Ok(false): a healthy etcd
    /// of someone else answers on its port; Err: not (yet) healthy.
    fn probe(&self, i: usize) -> Result<bool, String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.members[i].client_port));
        TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .map_err(|e| format!("client port {}: {e}", self.members[i].client_port))?;
        let endpoint = self.endpoint(i);
        run(self.etcdctl_at(&endpoint, self.root.as_ref()).args([
            "endpoint",
            "health",
            "--dial-timeout=1s",
            "--command-timeout=2s",
        ]))?;
        let members = run(self.etcdctl_at(&endpoint, self.root.as_ref()).args(["member", "list"]))?;
        Ok(members.contains(&self.members[i].name))
    }

    /// `headline` and the tail of the logs of `members`, for a panic message.
    fn report(&self, headline: &str, members: &[usize]) -> String {
        let mut out = headline.to_string();
        for &i in members {
            let m = &self.members[i];
            let log = self.log(i);
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            let _ = write!(
                out,
                "\n--- etcd member {i} ({}, client port {}, peer port {}), last {} lines of {} ---\n{}",
                m.name,
                m.client_port,
                m.peer_port,
                tail.len(),
                m.log.display(),
                tail.join("\n")
            );
        }
        out
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill_all();
        // `dir` (a TempDir) is dropped after this, removing data, logs and certificates.
    }
}

/// The etcd binary: `WHEREABOUTS_TEST_ETCD`, else `etcd` from `PATH`.
pub fn etcd_bin() -> OsString {
    env::var_os("WHEREABOUTS_TEST_ETCD").unwrap_or_else(|| "etcd".into())
}

/// The etcdctl binary: `WHEREABOUTS_TEST_ETCDCTL`, else `etcdctl` from `PATH`.
pub fn etcdctl_bin() -> OsString {
    env::var_os("WHEREABOUTS_TEST_ETCDCTL").unwrap_or_else(|| "etcdctl".into())
}

/// Whether an etcd binary can be run (for tests that would rather skip than fail without one).
pub fn etcd_available() -> bool {
    Command::new(etcd_bin()).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// etcdctl (API v3) against `endpoints` (comma-separated) with `--dial-timeout=2s
/// --command-timeout=5s` and no TLS or user flags; later flags of the same name override these.
pub fn bare_etcdctl(endpoints: &str) -> Command {
    let mut cmd = Command::new(etcdctl_bin());
    scrub_env(&mut cmd);
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .arg("--dial-timeout=2s")
        .arg("--command-timeout=5s")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd`: its stdout when it succeeds, otherwise a description with its stderr.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let output = cmd.output().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// Drops the environment variables that would change what etcd or etcdctl do.
fn scrub_env(cmd: &mut Command) {
    for (key, _) in env::vars_os() {
        let k = key.to_string_lossy().to_ascii_uppercase();
        if k.starts_with("ETCD") || k.ends_with("_PROXY") {
            cmd.env_remove(&key);
        }
    }
}

/// `n` distinct ports that were free on 127.0.0.1 a moment ago (all bound at once, then released).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0")).collect();
    listeners.iter().map(|l| l.local_addr().expect("local address of a listener").port()).collect()
}
