//! Self-tests of the etcd test harness in `etcd_support`: starting, killing and restarting
//! members, TLS with client certificates, authentication, and cleanup on drop and on panic.

mod etcd_support;

use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use etcd_support::{Credentials, EtcdCluster, HEALTH_TIMEOUT, bare_etcdctl, run};

fn get(etcd: &EtcdCluster, key: &str) -> String {
    etcd.etcdctl(&["get", "--print-value-only", key]).trim().to_string()
}

/// Whether process `pid` still runs the etcd whose data lives in `dir`.
fn etcd_alive(pid: u32, dir: &Path) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(&*dir.to_string_lossy()))
}

#[test]
fn single_member_put_get() {
    let etcd = EtcdCluster::single();
    let endpoints = etcd.endpoints();
    assert_eq!(endpoints.len(), 1);
    assert!(endpoints[0].starts_with("http://127.0.0.1:"), "{endpoints:?}");
    assert_eq!(etcd.endpoints_csv(), endpoints[0]);
    assert_eq!(etcd.hosts_csv(), format!("127.0.0.1:{}", etcd.client_port(0)));

    assert_eq!(etcd.etcdctl(&["put", "/whereabouts/pools/a", "v1"]).trim(), "OK");
    assert_eq!(get(&etcd, "/whereabouts/pools/a"), "v1");
    assert_eq!(get(&etcd, "/whereabouts/pools/missing"), "");
}

#[test]
fn restarts_keep_the_data() {
    let mut etcd = EtcdCluster::single();
    etcd.etcdctl(&["put", "k", "before"]);
    let first_pid = etcd.pid(0).expect("running");

    etcd.stop_all_and_restart();
    assert_ne!(etcd.pid(0), Some(first_pid));
    assert!(!etcd_alive(first_pid, etcd.dir()));
    assert_eq!(get(&etcd, "k"), "before");

    etcd.kill(0);
    assert!(!etcd.is_running(0));
    let down =
        run(etcd.etcdctl_command().args(["--dial-timeout=300ms", "--command-timeout=500ms", "get", "k"]));
    assert!(down.is_err(), "a killed etcd answered: {down:?}");

    etcd.restart(0);
    assert!(etcd.is_running(0));
    assert_eq!(get(&etcd, "k"), "before");
    etcd.etcdctl(&["put", "k", "after"]);
    assert_eq!(get(&etcd, "k"), "after");
}

#[test]
fn three_members_survive_losing_the_leader_and_it_rejoins() {
    let mut etcd = EtcdCluster::cluster(3);
    assert_eq!(etcd.endpoints().len(), 3);
    let members = etcd.etcdctl(&["member", "list"]);
    assert_eq!(members.lines().count(), 3, "{members}");
    // etcdctl 3.4 prints health lines on stderr; its exit status says whether all are healthy.
    etcd.etcdctl(&["endpoint", "health"]);
    etcd.etcdctl(&["put", "k", "all up"]);

    let leader = etcd.wait_for_leader();
    etcd.kill(leader);
    let new_leader = etcd.wait_for_leader();
    assert_ne!(new_leader, leader);
    // The endpoint list still names the dead member; the client must get by with the others.
    etcd.etcdctl(&["put", "k", "one down"]);
    assert_eq!(get(&etcd, "k"), "one down");

    etcd.restart(leader);
    // A serializable read answers from the restarted member's own store: it caught up.
    let deadline = Instant::now() + HEALTH_TIMEOUT;
    loop {
        let local =
            run(etcd.etcdctl_command_for(leader).args(["get", "--consistency=s", "--print-value-only", "k"]))
                .expect("serializable get on the restarted member");
        if local.trim() == "one down" {
            break;
        }
        assert!(Instant::now() < deadline, "restarted member still reads {local:?}");
        sleep(Duration::from_millis(50));
    }
    etcd.etcdctl(&["endpoint", "health"]);
    etcd.etcdctl(&["put", "k", "all up again"]);
    assert_eq!(
        run(etcd.etcdctl_command_for(leader).args(["get", "--print-value-only", "k"])).unwrap().trim(),
        "all up again"
    );
}

#[test]
fn tls_with_client_certificates() {
    let etcd = EtcdCluster::single_tls(true);
    let endpoint = etcd.endpoint(0);
    assert!(endpoint.starts_with("https://127.0.0.1:"), "{endpoint}");
    for file in [etcd.ca_file(), etcd.client_cert_file(), etcd.client_key_file()] {
        assert!(file.starts_with(etcd.dir()), "{}", file.display());
        let pem = fs::read_to_string(file).unwrap();
        assert!(pem.starts_with("-----BEGIN "), "{}: {pem}", file.display());
    }

    etcd.etcdctl(&["put", "/whereabouts/k", "over tls"]);
    assert_eq!(get(&etcd, "/whereabouts/k"), "over tls");

    let fails = |what: &str, cmd: &mut std::process::Command| {
        let result = run(cmd.args(["--dial-timeout=500ms", "--command-timeout=500ms", "put", "k", "x"]));
        assert!(result.is_err(), "{what} succeeded: {result:?}");
    };
    let plain = endpoint.replace("https://", "http://");
    fails("plain HTTP", &mut bare_etcdctl(&plain));
    fails("TLS without a client certificate", bare_etcdctl(&endpoint).arg("--cacert").arg(etcd.ca_file()));
    let tls = etcd.tls_files().unwrap();
    fails(
        "a client certificate from another CA",
        bare_etcdctl(&endpoint)
            .arg("--cacert")
            .arg(etcd.ca_file())
            .arg("--cert")
            .arg(&tls.foreign_client_cert)
            .arg("--key")
            .arg(&tls.foreign_client_key),
    );
    fails(
        "TLS without trusting the CA",
        bare_etcdctl(&endpoint)
            .arg("--cert")
            .arg(etcd.client_cert_file())
            .arg("--key")
            .arg(etcd.client_key_file()),
    );
    // The same flags by hand work: nothing but the harness's arguments made the difference.
    let by_hand = run(bare_etcdctl(&endpoint)
        .arg("--cacert")
        .arg(etcd.ca_file())
        .arg("--cert")
        .arg(etcd.client_cert_file())
        .arg("--key")
        .arg(etcd.client_key_file())
        .args(["get", "--print-value-only", "/whereabouts/k"]));
    assert_eq!(by_hand.unwrap().trim(), "over tls");
}

#[test]
fn tls_without_client_certificates() {
    let etcd = EtcdCluster::single_tls(false);
    etcd.etcdctl(&["put", "k", "server-only tls"]);
    let only_ca = run(bare_etcdctl(&etcd.endpoint(0)).arg("--cacert").arg(etcd.ca_file()).args([
        "get",
        "--print-value-only",
        "k",
    ]));
    assert_eq!(only_ca.unwrap().trim(), "server-only tls");
    let plain = run(bare_etcdctl(&etcd.endpoint(0).replace("https://", "http://")).args([
        "--dial-timeout=500ms",
        "--command-timeout=500ms",
        "get",
        "k",
    ]));
    assert!(plain.is_err(), "plain HTTP succeeded: {plain:?}");
}

#[test]
fn auth_needs_credentials() {
    let mut etcd = EtcdCluster::single();
    etcd.etcdctl(&["put", "/whereabouts/k", "before auth"]);
    etcd.enable_auth("whereabouts", "s3cret");
    let user = etcd.credentials().unwrap().clone();
    assert_eq!(user, Credentials { user: "whereabouts".into(), password: "s3cret".into() });

    let anonymous = run(etcd.etcdctl_command_anonymous().args(["put", "/whereabouts/k", "x"]));
    assert!(anonymous.as_ref().is_err_and(|e| e.contains("user name is empty")), "{anonymous:?}");
    let wrong = Credentials { user: "whereabouts".into(), password: "wrong".into() };
    let wrong = run(etcd.etcdctl_command_as(&wrong).args(["put", "/whereabouts/k", "x"]));
    assert!(wrong.as_ref().is_err_and(|e| e.contains("authentication failed")), "{wrong:?}");

    assert_eq!(get(&etcd, "/whereabouts/k"), "before auth");
    etcd.etcdctl(&["put", "/whereabouts/k", "with auth"]);
    assert_eq!(get(&etcd, "/whereabouts/k"), "with auth");
    // The user's role covers the prefix `/` only; root covers everything.
    let outside = etcd.try_etcdctl(&["put", "outside", "x"]);
    assert!(outside.as_ref().is_err_and(|e| e.contains("permission denied")), "{outside:?}");
    let root = Credentials { user: "root".into(), password: "s3cret".into() };
    run(etcd.etcdctl_command_as(&root).args(["put", "outside", "x"])).unwrap();

    // Auth survives a restart, and the harness's health checks get through it.
    etcd.stop_all_and_restart();
    assert_eq!(get(&etcd, "/whereabouts/k"), "with auth");
    assert!(run(etcd.etcdctl_command_anonymous().args(["get", "/whereabouts/k"])).is_err());
}

#[test]
fn auth_with_tls_and_a_three_member_cluster() {
    let mut etcd = etcd_support::EtcdCluster::start(3, etcd_support::TlsMode::ClientCertAuth);
    etcd.enable_auth_on_prefix("whereabouts", "pw", "");
    etcd.etcdctl(&["put", "anywhere", "v"]);
    assert_eq!(get(&etcd, "anywhere"), "v");
    etcd.kill(2);
    etcd.restart(2);
    assert_eq!(
        run(etcd.etcdctl_command_for(2).args(["get", "--consistency=s", "--print-value-only", "anywhere"]))
            .unwrap()
            .trim(),
        "v"
    );
}

#[test]
fn drop_kills_etcd_and_removes_its_directory() {
    let etcd = EtcdCluster::cluster(2);
    let pids: Vec<u32> = (0..2).map(|i| etcd.pid(i).unwrap()).collect();
    let dir = etcd.dir().to_path_buf();
    assert!(pids.iter().all(|&pid| etcd_alive(pid, &dir)));
    drop(etcd);
    assert!(!pids.iter().any(|&pid| etcd_alive(pid, &dir)), "etcd outlived its handle");
    assert!(!dir.exists(), "{} outlived its handle", dir.display());

    // The same when the test holding the handle panics.
    let mut seen: Option<(u32, PathBuf)> = None;
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let etcd = EtcdCluster::single();
        seen = Some((etcd.pid(0).unwrap(), etcd.dir().to_path_buf()));
        panic!("deliberate panic with a running etcd");
    }));
    assert!(outcome.is_err());
    let (pid, dir) = seen.unwrap();
    assert!(!etcd_alive(pid, &dir), "etcd outlived a panic");
    assert!(!dir.exists(), "{} outlived a panic", dir.display());
}
