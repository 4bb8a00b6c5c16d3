//! The binary's process contract: what it prints and how it exits, with and without `CNI_COMMAND`, and
//! the log file it writes.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

fn run(envs: &[(&str, &str)], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_whereabouts"))
        .env_clear()
        .envs(envs.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("stdin");
    child.wait_with_output().expect("wait")
}

#[test]
fn without_cni_command_it_describes_itself_on_stderr() {
    let out = run(&[], "");
    assert!(out.status.success());
    assert!(out.stdout.is_empty(), "stdout is the CNI result channel");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CNI protocol versions supported: 0.1.0, 0.2.0, 0.3.0, 0.3.1, 0.4.0, 1.0.0, 1.1.0")
    );
}

#[test]
fn version_command() {
    let out = run(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert!(out.status.success());
    let reply: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(reply["supportedVersions"].as_array().map(Vec::len), Some(7));
}

#[test]
fn errors_are_json_on_stdout_with_exit_code_1() {
    let out = run(&[("CNI_COMMAND", "ADD")], "{}");
    assert_eq!(out.status.code(), Some(1));
    let reply: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(reply["code"], 4);
}

#[test]
fn log_file_gets_upstream_formatted_lines_and_stdout_only_the_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("whereabouts.log");
    let config = json!({
        "cniVersion": "1.0.0",
        "name": "logged",
        "ipam": {
            "type": "whereabouts", "datastore": "file", "file_store_dir": dir.path().join("store"),
            "range": "192.0.2.0/29", "log_file": log, "log_level": "debug",
        }
    })
    .to_string();
    let envs = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "logged-1"),
        ("CNI_NETNS", "/var/run/netns/none"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
    ];
    let out = run(&envs, &config);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let result: Value = serde_json::from_slice(&out.stdout).expect("stdout is exactly the result");
    assert_eq!(result["ips"][0]["address"], "192.0.2.1/29");

    let logged = std::fs::read_to_string(&log).expect("log file written");
    let line = logged.lines().find(|l| l.contains("ADD logged-1")).expect("ADD logged");
    // `<RFC3339 time> [debug] <message>`
    let (time, rest) = line.split_once(' ').expect("time");
    assert!(time.ends_with('Z') && time.contains('T'), "{line}");
    assert!(rest.starts_with("[debug] "), "{line}");

    // At level error, debug lines are not written.
    let quiet = config.replace("\"debug\"", "\"error\"");
    let before = logged.lines().count();
    let mut envs = envs;
    envs[1] = ("CNI_CONTAINERID", "logged-2");
    assert!(run(&envs, &quiet).status.success());
    let after = std::fs::read_to_string(&log).expect("log file").lines().count();
    assert_eq!(before, after);
}

/// A pool lock held longer than a short fixed timeout would allow (by a writer ahead in a long queue
/// on a busy node): the plugin keeps waiting within its call's one deadline, and the ADD succeeds once
/// the holder lets go, instead of failing with "try again later".
#[test]
fn a_pool_lock_held_for_seconds_is_waited_for_and_the_add_succeeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pools = dir.path().join("pools");
    std::fs::create_dir_all(&pools).expect("pools dir");
    let lock = std::fs::File::create(pools.join("192.0.2.0-29.lock")).expect("lock file");
    lock.lock().expect("hold the pool lock");
    // Longer than the 10 s the plugin used to give up after.
    let held = std::time::Duration::from_secs(11);
    std::thread::spawn(move || {
        std::thread::sleep(held);
        drop(lock);
    });
    let config = json!({
        "cniVersion": "1.0.0",
        "name": "busy",
        "ipam": { "type": "whereabouts", "datastore": "file", "file_store_dir": dir.path(), "range": "192.0.2.0/29" }
    })
    .to_string();
    let started = std::time::Instant::now();
    let out = run(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "busy-1"),
            ("CNI_NETNS", "/var/run/netns/none"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ],
        &config,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(started.elapsed() >= held, "answered before the holder let go");
    let reply: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(reply["ips"][0]["address"], "192.0.2.1/29", "{reply}");
}

/// A DEL that fails for good (here: the pool does not decode) is answered as done, so that the pod can
/// finish terminating, and says loudly in the log what stays behind. The pool is left as it was, and
/// an ADD still fails on it. A DEL the store may serve later (busy, unreachable) still fails: see the
/// store fault tests.
#[test]
fn a_del_that_fails_for_good_answers_done_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("whereabouts.log");
    let store = dir.path().join("store");
    let config = json!({
        "cniVersion": "1.0.0",
        "name": "broken",
        "ipam": {
            "type": "whereabouts", "datastore": "file", "file_store_dir": store,
            "range": "192.0.2.0/29", "log_file": log, "log_level": "error",
        }
    })
    .to_string();
    let envs = |command, id| {
        [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", "/var/run/netns/none"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ]
    };
    assert!(run(&envs("ADD", "held"), &config).status.success());
    let pool = store.join("pools/192.0.2.0-29.json");
    std::fs::write(&pool, b"{not json").expect("pool made undecodable");

    let out = run(&envs("DEL", "held"), &config);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    let logged = std::fs::read_to_string(&log).expect("log file written");
    assert!(
        logged.lines().any(|l| l.contains("[error] DEL held eth0 failed for good") && l.contains("corrupt")),
        "{logged}"
    );
    assert_eq!(std::fs::read(&pool).expect("pool"), b"{not json");

    let out = run(&envs("ADD", "next"), &config);
    assert_eq!(out.status.code(), Some(1));
    let reply: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(reply["code"], 999, "{reply}");
}

/// `release_cooldown` through the binary on the file store: ADD, DEL, ADD of another pod gets a different
/// address while others are free, and the released one once it is the only free address.
#[test]
fn a_released_address_waits_out_its_cooldown_unless_it_is_the_only_free_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let network = |cooldown: &str| {
        json!({
            "cniVersion": "1.0.0",
            "name": "cooled",
            "ipam": {
                "type": "whereabouts", "datastore": "file", "file_store_dir": dir.path(),
                "range": "198.51.100.0/29", "release_cooldown": cooldown,
            }
        })
        .to_string()
    };
    let config = network("10m");
    let call = |command: &str, container: &str, config: &str| {
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=pod-{container}");
        run(
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", container),
                ("CNI_NETNS", "/var/run/netns/none"),
                ("CNI_IFNAME", "net1"),
                ("CNI_PATH", "/usr/lib/cni"),
                ("CNI_ARGS", &args),
            ],
            config,
        )
    };
    let add = |container: &str| {
        let out = call("ADD", container, &config);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        let reply: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        reply["ips"][0]["address"].as_str().expect("an address").to_string()
    };
    assert_eq!(add("c1"), "198.51.100.1/29");
    assert!(call("DEL", "c1", &config).status.success());
    assert_eq!(add("c2"), "198.51.100.2/29", "the released .1 cools down");
    for (container, expected) in [("c3", 3), ("c4", 4), ("c5", 5), ("c6", 6)] {
        assert_eq!(add(container), format!("198.51.100.{expected}/29"));
    }
    assert_eq!(add("c7"), "198.51.100.1/29", "the only free address is handed out");

    let refused = call("ADD", "c8", &network("ten minutes"));
    assert_eq!(refused.status.code(), Some(1));
    let error: Value = serde_json::from_slice(&refused.stdout).expect("JSON");
    assert_eq!(error["code"], 7, "{error}");
    let msg = error["msg"].as_str().expect("msg");
    assert!(msg.contains("release_cooldown") && msg.contains("ten minutes"), "{msg}");
}
