//! `whereabouts install`, run as the DaemonSet runs it, against a node laid out in a temporary
//! directory: `<root>/host/{opt/cni/bin,etc/cni/net.d}` and a service account directory.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;
use whereabouts_k8s::client::{Timeouts, connect};

struct Node {
    root: TempDir,
    ca_pem: String,
}

impl Node {
    fn new() -> Node {
        let root = tempfile::tempdir().expect("tempdir");
        let sa = root.path().join("serviceaccount");
        let ca_pem = self_signed("kubernetes");
        fs::create_dir_all(&sa)
            .and_then(|()| fs::create_dir_all(root.path().join("host/opt/cni/bin")))
            .and_then(|()| fs::write(sa.join("token"), "token-one"))
            .and_then(|()| fs::write(sa.join("ca.crt"), &ca_pem))
            .and_then(|()| fs::write(root.path().join("plugin"), "the plugin, version 1"))
            .expect("laying out the node");
        Node { root, ca_pem }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.root.path().join(relative)
    }

    fn host(&self) -> PathBuf {
        self.path("host")
    }

    fn conf(&self, name: &str) -> PathBuf {
        self.path("host/etc/cni/net.d/whereabouts.d").join(name)
    }

    fn installed_binary(&self) -> PathBuf {
        self.path("host/opt/cni/bin/whereabouts")
    }

    /// `whereabouts install` with the DaemonSet's environment pointed at this node; `args` after.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_whereabouts"));
        command
            .env_clear()
            .env("CNI_BIN_DIR", self.path("host/opt/cni/bin"))
            .env("CNI_CONF_DIR", self.path("host/etc/cni/net.d"))
            .env("SERVICE_ACCOUNT_TOKEN_FILE", self.path("serviceaccount/token"))
            .env("KUBE_CA_FILE", self.path("serviceaccount/ca.crt"))
            .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
            .env("KUBERNETES_SERVICE_PORT", "443")
            .env("NODENAME", "node-1")
            .env("WHEREABOUTS_NAMESPACE", "whereabouts")
            .arg("install")
            .arg("--host-root")
            .arg(self.host())
            .arg("--binary")
            .arg(self.path("plugin"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    fn kubeconfig(&self) -> Value {
        read_json(&self.conf("whereabouts.kubeconfig"))
    }
}

fn read_json(path: &Path) -> Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A self-signed certificate (PEM), as a CA bundle.
fn self_signed(name: &str) -> String {
    rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("certificate").cert.pem()
}

fn once(command: &mut Command) -> Output {
    let output = command.arg("--once").output().expect("running whereabouts install");
    assert!(output.stdout.is_empty(), "nothing on stdout");
    output
}

fn succeeds(output: Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    stderr
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("metadata").permissions().mode() & 0o7777
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("read_dir").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn installs_the_binary_the_flat_file_the_kubeconfig_and_the_node_name() {
    let node = Node::new();
    succeeds(once(&mut node.command(&[])));

    assert_eq!(fs::read_to_string(node.installed_binary()).unwrap(), "the plugin, version 1");
    assert_eq!(mode(&node.installed_binary()), 0o755);
    assert_eq!(names(&node.path("host/opt/cni/bin")), ["whereabouts"], "no temporary file left");
    assert_eq!(names(&node.conf("")), ["nodename", "whereabouts.conf", "whereabouts.kubeconfig"]);

    let flat = read_json(&node.conf("whereabouts.conf"));
    assert_eq!(
        flat,
        json!({
            "datastore": "kubernetes",
            "configuration_path": "/etc/cni/net.d/whereabouts.d",
            "kubernetes": { "kubeconfig": "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig" },
            "reconciler_cron_expression": "30 4 * * *",
        })
    );
    assert_eq!(mode(&node.conf("whereabouts.conf")), 0o600);

    assert_eq!(fs::read(node.conf("nodename")).unwrap(), b"node-1", "no newline");
    assert_eq!(mode(&node.conf("nodename")), 0o600);

    let kubeconfig = node.kubeconfig();
    let cluster = &kubeconfig["clusters"][0];
    assert_eq!(cluster["name"], "local");
    assert_eq!(cluster["cluster"]["server"], "https://10.96.0.1:443");
    let ca = cluster["cluster"]["certificate-authority-data"].as_str().unwrap();
    assert_eq!(base64_decode(ca), node.ca_pem.as_bytes());
    assert_eq!(kubeconfig["users"][0], json!({ "name": "whereabouts", "user": { "token": "token-one" } }));
    assert_eq!(
        kubeconfig["contexts"][0],
        json!({
            "name": "whereabouts-context",
            "context": { "cluster": "local", "user": "whereabouts", "namespace": "whereabouts" },
        })
    );
    assert_eq!(kubeconfig["current-context"], "whereabouts-context");
    assert_eq!(mode(&node.conf("whereabouts.kubeconfig")), 0o600);
}

/// The test's own decoder, so that the encoding is checked against something independent.
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sextets: Vec<u32> = text
        .bytes()
        .filter(|b| *b != b'=')
        .map(|b| ALPHABET.iter().position(|a| *a == b).expect("base64") as u32)
        .collect();
    let mut out = Vec::new();
    for chunk in sextets.chunks(4) {
        let bits = chunk.iter().enumerate().fold(0u32, |acc, (i, s)| acc | s << (18 - 6 * i));
        out.extend_from_slice(&bits.to_be_bytes()[1..chunk.len()]);
    }
    out
}

#[test]
fn kube_reads_the_kubeconfig() {
    let node = Node::new();
    succeeds(once(&mut node.command(&[])));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let connection = runtime
        .block_on(connect(&node.conf("whereabouts.kubeconfig"), Timeouts::REQUESTS))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(connection.namespace, "whereabouts");
}

#[test]
fn the_default_namespace_is_kube_system_and_empty_variables_count_as_unset() {
    let node = Node::new();
    let mut command = node.command(&[]);
    command
        .env("WHEREABOUTS_NAMESPACE", "")
        .env("KUBERNETES_SERVICE_PROTOCOL", "")
        .env("WHEREABOUTS_RECONCILER_CRON", "*/5 * * * *");
    succeeds(once(&mut command));
    let kubeconfig = node.kubeconfig();
    assert_eq!(kubeconfig["contexts"][0]["context"]["namespace"], "kube-system");
    assert_eq!(kubeconfig["clusters"][0]["cluster"]["server"], "https://10.96.0.1:443");
    let flat = read_json(&node.conf("whereabouts.conf"));
    assert_eq!(flat["reconciler_cron_expression"], "*/5 * * * *");
}

#[test]
fn kubeconfig_mode_is_honoured() {
    let node = Node::new();
    succeeds(once(node.command(&[]).env("KUBECONFIG_MODE", "640")));
    assert_eq!(mode(&node.conf("whereabouts.kubeconfig")), 0o640);
    assert_eq!(mode(&node.conf("whereabouts.conf")), 0o600);
    // A changed mode is applied to the existing file.
    succeeds(once(node.command(&[]).env("KUBECONFIG_MODE", "0600")));
    assert_eq!(mode(&node.conf("whereabouts.kubeconfig")), 0o600);

    let output = once(node.command(&[]).env("KUBECONFIG_MODE", "rw-r-----"));
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("KUBECONFIG_MODE"));
}

#[test]
fn ipv6_service_hosts_are_bracketed_and_the_protocol_is_taken() {
    let node = Node::new();
    let mut command = node.command(&[]);
    command.env("KUBERNETES_SERVICE_HOST", "fd00:10:96::1").env("KUBERNETES_SERVICE_PROTOCOL", "http");
    succeeds(once(&mut command));
    assert_eq!(node.kubeconfig()["clusters"][0]["cluster"]["server"], "http://[fd00:10:96::1]:443");
}

#[test]
fn skip_tls_verify_replaces_the_ca() {
    let node = Node::new();
    succeeds(once(node.command(&[]).env("SKIP_TLS_VERIFY", "true")));
    let cluster = &node.kubeconfig()["clusters"][0]["cluster"];
    assert_eq!(cluster["insecure-skip-tls-verify"], true);
    assert_eq!(cluster.get("certificate-authority-data"), None);

    // As upstream: only the exact word `true`.
    succeeds(once(node.command(&[]).env("SKIP_TLS_VERIFY", "yes")));
    let cluster = &node.kubeconfig()["clusters"][0]["cluster"];
    assert_eq!(cluster.get("insecure-skip-tls-verify"), None);
    assert!(cluster["certificate-authority-data"].is_string());
}

#[test]
fn a_missing_service_host_or_port_is_an_error_naming_it() {
    for var in ["KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"] {
        let node = Node::new();
        let output = once(node.command(&[]).env_remove(var));
        assert_eq!(output.status.code(), Some(1), "{var}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&format!("{var} is not set")), "{stderr}");
        assert!(!node.conf("whereabouts.kubeconfig").exists());
        assert!(!node.installed_binary().exists(), "nothing is installed half-configured");
    }
}

#[test]
fn without_a_token_the_kubeconfig_is_skipped_with_a_warning() {
    let node = Node::new();
    fs::remove_file(node.path("serviceaccount/token")).unwrap();
    // Upstream needs the service's address only for the kubeconfig.
    let stderr =
        succeeds(once(node.command(&[]).env_remove("KUBERNETES_SERVICE_HOST").env_remove("NODENAME")));
    assert!(stderr.contains("WARN") && stderr.contains("no service account token"), "{stderr}");
    assert!(stderr.contains("NODENAME is not set"), "{stderr}");
    assert_eq!(names(&node.conf("")), ["whereabouts.conf"]);
    assert!(node.installed_binary().exists());
}

#[test]
fn a_second_run_changes_nothing() {
    let node = Node::new();
    succeeds(once(&mut node.command(&[])));
    let files = [
        node.installed_binary(),
        node.conf("whereabouts.conf"),
        node.conf("whereabouts.kubeconfig"),
        node.conf("nodename"),
    ];
    // The inode too: a replaced file would be a new one even within the mtime's granularity.
    let stamp = || -> Vec<(u64, i64, i64)> {
        files
            .iter()
            .map(|f| {
                let m = fs::metadata(f).unwrap();
                (m.ino(), m.mtime(), m.mtime_nsec())
            })
            .collect()
    };
    let before = stamp();
    std::thread::sleep(Duration::from_millis(20));
    succeeds(once(&mut node.command(&[])));
    assert_eq!(stamp(), before);

    // A new binary replaces the old one.
    fs::write(node.path("plugin"), "the plugin, version 2").unwrap();
    succeeds(once(&mut node.command(&[])));
    assert_eq!(fs::read_to_string(node.installed_binary()).unwrap(), "the plugin, version 2");
    assert_eq!(names(&node.path("host/opt/cni/bin")), ["whereabouts"]);
}

#[test]
fn by_default_the_running_binary_is_installed() {
    let node = Node::new();
    let mut command = Command::new(env!("CARGO_BIN_EXE_whereabouts"));
    command
        .env_clear()
        .env("CNI_BIN_DIR", node.path("host/opt/cni/bin"))
        .env("CNI_CONF_DIR", node.path("host/etc/cni/net.d"))
        .env("SERVICE_ACCOUNT_TOKEN_FILE", node.path("serviceaccount/missing"))
        .args(["install", "--once"]);
    let output = command.output().unwrap();
    succeeds(output);
    let installed = fs::read(node.installed_binary()).unwrap();
    assert!(installed == fs::read(env!("CARGO_BIN_EXE_whereabouts")).unwrap(), "a copy of the binary");
    assert_eq!(mode(&node.installed_binary()), 0o755);
}

/// Kills the child on drop, so that a failed assertion leaves no process behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_rotated_token_or_ca_is_written_into_the_kubeconfig_until_sigterm() {
    let node = Node::new();
    let mut running =
        Running(node.command(&["--interval", "50ms"]).stderr(Stdio::inherit()).spawn().unwrap());
    let token = |node: &Node| -> Option<String> {
        let text = fs::read(node.conf("whereabouts.kubeconfig")).ok()?;
        let kubeconfig: Value = serde_json::from_slice(&text).ok()?;
        kubeconfig["users"][0]["user"]["token"].as_str().map(str::to_owned)
    };
    eventually("the first kubeconfig", || token(&node).as_deref() == Some("token-one"));

    // As the kubelet rotates a projected token: a new file renamed into place.
    fs::write(node.path("serviceaccount/token.new"), "token-two\n").unwrap();
    fs::rename(node.path("serviceaccount/token.new"), node.path("serviceaccount/token")).unwrap();
    eventually("the rotated token", || token(&node).as_deref() == Some("token-two"));
    assert_eq!(mode(&node.conf("whereabouts.kubeconfig")), 0o600);

    let other_ca = self_signed("other");
    fs::write(node.path("serviceaccount/ca.crt"), &other_ca).unwrap();
    eventually("the new CA", || {
        node.kubeconfig()["clusters"][0]["cluster"]["certificate-authority-data"]
            .as_str()
            .is_some_and(|ca| base64_decode(ca) == other_ca.as_bytes())
    });
    assert_eq!(names(&node.conf("")), ["nodename", "whereabouts.conf", "whereabouts.kubeconfig"]);

    assert_eq!(terminate(&mut running).code(), Some(0));
}

#[test]
fn a_token_that_appears_later_gets_its_kubeconfig() {
    let node = Node::new();
    fs::remove_file(node.path("serviceaccount/token")).expect("remove token");
    let mut running =
        Running(node.command(&["--interval", "50ms"]).stderr(Stdio::inherit()).spawn().expect("spawn"));
    eventually("the binary", || node.installed_binary().exists());
    assert!(!node.conf("whereabouts.kubeconfig").exists());
    fs::write(node.path("serviceaccount/token"), "late-token").expect("token");
    eventually("the kubeconfig", || node.conf("whereabouts.kubeconfig").exists());
    assert_eq!(node.kubeconfig()["users"][0]["user"]["token"], "late-token");
    assert_eq!(terminate(&mut running).code(), Some(0));
}

/// Sends SIGTERM (with kill(1): no unsafe code here) and waits for the exit.
fn terminate(running: &mut Running) -> ExitStatus {
    let pid = running.0.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = running.0.try_wait().expect("try_wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
