//! Running the plugin binary once, as a container runtime does: the CNI variables in a clean
//! environment, the network configuration on stdin, and the answer checked against the CNI contract.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// The budget the tests give each plugin call (`WHEREABOUTS_CALL_BUDGET`), in seconds: far beyond
/// what any call takes on a busy machine, and short enough that a test of an outage ends soon.
pub const PLUGIN_BUDGET_SECONDS: u64 = 20;

/// How long one call may take before the test fails: beyond the plugin's own bound (its budget, the
/// 15 s a failed ADD has to roll back, and a margin).
pub const CALL_LIMIT: Duration = Duration::from_secs(PLUGIN_BUDGET_SECONDS + 30);

/// What one call answered.
#[derive(Debug)]
pub enum Outcome {
    /// Exit 0: the parsed stdout, `Null` when it printed nothing.
    Success(Value),
    /// Exit 1 with a CNI error object.
    Failed {
        /// The error's `code`.
        code: u64,
        /// The error's `msg`.
        msg: String,
    },
}

impl Outcome {
    /// The error's code and message; panics naming `what` on a success.
    #[track_caller]
    pub fn failure(self, what: &str) -> (u64, String) {
        match self {
            Outcome::Failed { code, msg } => (code, msg),
            other => panic!("{what}: expected an error, got {other:?}"),
        }
    }

    /// Panics naming `what` unless the call succeeded and printed nothing (DEL, CHECK, GC, STATUS).
    #[track_caller]
    pub fn silent(self, what: &str) {
        match self {
            Outcome::Success(Value::Null) => {}
            other => panic!("{what}: expected a silent success, got {other:?}"),
        }
    }

    /// The addresses of an ADD result, in order; panics naming `what` on a failure.
    #[track_caller]
    pub fn addresses(self, what: &str) -> Vec<String> {
        match self {
            Outcome::Success(result) => addresses_of(&result),
            other => panic!("{what}: expected success, got {other:?}"),
        }
    }
}

/// The addresses of an ADD result, in order.
#[track_caller]
pub fn addresses_of(result: &Value) -> Vec<String> {
    let ips = result["ips"].as_array().unwrap_or_else(|| panic!("no ips in {result}"));
    ips.iter().map(|ip| ip["address"].as_str().unwrap_or_default().to_string()).collect()
}

/// One call of a plugin binary.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    /// The binary.
    pub binary: &'a Path,
    /// `CNI_COMMAND`.
    pub command: &'a str,
    /// `CNI_CONTAINERID` (also names the network namespace).
    pub container: &'a str,
    /// `CNI_ARGS`.
    pub cni_args: &'a str,
    /// `NODENAME`.
    pub node: &'a str,
}

impl Call<'_> {
    /// Runs the call with `netconf` on stdin on interface `net1`; panics when it hangs past
    /// [`CALL_LIMIT`] or answers outside the CNI contract.
    pub async fn run(&self, netconf: &Value) -> Outcome {
        let Call { binary, command, container, cni_args, node } = *self;
        let mut child = tokio::process::Command::new(binary)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", format!("/var/run/netns/{container}"))
            .env("CNI_IFNAME", "net1")
            .env("CNI_PATH", "/opt/cni/bin")
            .env("CNI_ARGS", cni_args)
            .env("NODENAME", node)
            .env("WHEREABOUTS_CALL_BUDGET", PLUGIN_BUDGET_SECONDS.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the plugin");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(netconf.to_string().as_bytes()).await.expect("write stdin");
        drop(stdin);
        let output = tokio::time::timeout(CALL_LIMIT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("{command} {container}: still running after {CALL_LIMIT:?}"))
            .expect("wait for the plugin");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let parsed = || -> Value {
            serde_json::from_str(&stdout).unwrap_or_else(|e| {
                panic!("{command} {container}: stdout is not JSON ({e}): {stdout:?}; {stderr}")
            })
        };
        match output.status.code() {
            Some(0) if stdout.is_empty() => Outcome::Success(Value::Null),
            Some(0) => Outcome::Success(parsed()),
            Some(1) => {
                let reply = parsed();
                let code = reply["code"].as_u64().unwrap_or_else(|| panic!("error without a code: {reply}"));
                Outcome::Failed { code, msg: reply["msg"].as_str().unwrap_or_default().to_string() }
            }
            _ => {
                panic!("{command} {container}: exited {}; stdout {stdout:?}; stderr {stderr}", output.status)
            }
        }
    }
}
