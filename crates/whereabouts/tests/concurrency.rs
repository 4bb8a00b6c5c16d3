//! Many plugin processes at once on the file store, some killed with SIGKILL at random points, then
//! the store is checked against what the surviving calls answered: every ADD that answered success
//! holds exactly its address, no address is held twice, nothing else is held, and every reservation
//! matches a pool entry.
//!
//! Half the workers allocate from 203.0.113.0/24, the other half from the overlapping 203.0.113.0/25
//! (both dual stack with one shared IPv6 pool), so the cluster-wide reservations are raced too.
//!
//! A killed ADD is followed by a DEL (as a runtime does after a failed ADD), a killed DEL by another
//! DEL (as kubelet retries), so the ledger of expected state stays exact.
//!
//! The one thing a kill may leave is the documented one (see `whereabouts_store::ipam` on the order
//! of writes): a DEL killed between removing the pool entry and deleting the reservation leaves the
//! reservation, blocking its address, and the DEL that follows finds no entry to lead it there. Such
//! reservations must belong to a container whose DEL was killed, and `whereabouts check --repair`
//! must remove them; after it the store is exact.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Value, json};
use whereabouts_core::pool::Pool;
use whereabouts_store::Store;
use whereabouts_store::file::FileStore;

const WORKERS: usize = 32;
const ROUNDS: usize = 10;
/// Live containers per worker stay below this, so that 16 workers never exhaust the /25.
const MAX_LIVE: usize = 3;
const V4_POOLS: [(&str, &str); 2] =
    [("203.0.113.0-24", "203.0.113.0/24"), ("203.0.113.0-25", "203.0.113.0/25")];
const V6_POOL: (&str, &str) = ("2001-db8-42---64", "2001:db8:42::/64");

fn config(store: &Path, v4_range: &str) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": "chaos",
        "type": "bridge",
        "ipam": {
            "type": "whereabouts",
            "datastore": "file",
            "file_store_dir": store,
            "log_level": "error",
            "range": v4_range,
            "ipRanges": [{ "range": "2001:db8:42::/64" }],
        }
    })
    .to_string()
}

/// What one plugin run ended as.
enum Outcome {
    Success(Value),
    Failed(String),
    Killed,
}

fn run_plugin(command: &str, container: &str, config: &str, kill_after: Option<Duration>) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_whereabouts"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", "/var/run/netns/none")
        .env("CNI_IFNAME", "net1")
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=chaos;K8S_POD_NAME={container}"))
        .env("NODENAME", "node-a")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn plugin");
    child.stdin.take().expect("stdin").write_all(config.as_bytes()).expect("write stdin");
    if let Some(delay) = kill_after {
        std::thread::sleep(delay);
        let _ = child.kill();
    }
    let output = child.wait_with_output().expect("wait plugin");
    if output.status.signal() == Some(libc::SIGKILL) {
        return Outcome::Killed;
    }
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    if output.status.success() {
        Outcome::Success(if stdout.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout).expect("result JSON")
        })
    } else {
        Outcome::Failed(stdout)
    }
}

fn addresses(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .expect("ips")
        .iter()
        .map(|ip| ip["address"].as_str().expect("address").to_string())
        .collect()
}

/// Calls DEL until it answers (kills only ever hit the first try).
fn del_until_done(container: &str, config: &str) {
    match run_plugin("DEL", container, config, None) {
        Outcome::Success(_) => {}
        Outcome::Failed(out) => panic!("DEL {container} failed: {out}"),
        Outcome::Killed => unreachable!("not killed"),
    }
}

fn random_kill() -> Option<Duration> {
    // One call in three is killed somewhere between exec and well after its store writes.
    (fastrand::u8(..3) == 0).then(|| Duration::from_micros(fastrand::u64(0..6000)))
}

#[test]
fn concurrent_processes_with_kills_never_duplicate_or_lose() {
    let dir = tempfile::tempdir().expect("tempdir");
    let configs = [config(dir.path(), V4_POOLS[0].1), config(dir.path(), V4_POOLS[1].1)];
    // container -> addresses it holds according to the answers the workers saw.
    let ledger: Mutex<BTreeMap<String, Vec<String>>> = Mutex::new(BTreeMap::new());
    let kills = Mutex::new(0usize);
    let killed_dels: Mutex<HashSet<String>> = Mutex::new(HashSet::new());

    std::thread::scope(|scope| {
        for worker in 0..WORKERS {
            let (config, ledger, kills, killed_dels) = (&configs[worker % 2], &ledger, &kills, &killed_dels);
            scope.spawn(move || {
                let mut live: Vec<String> = Vec::new();
                for round in 0..ROUNDS {
                    let container = format!("w{worker}-r{round}");
                    match run_plugin("ADD", &container, config, random_kill()) {
                        Outcome::Success(result) => {
                            ledger.lock().unwrap().insert(container.clone(), addresses(&result));
                            live.push(container);
                        }
                        Outcome::Failed(out) => panic!("ADD {container} failed: {out}"),
                        Outcome::Killed => {
                            *kills.lock().unwrap() += 1;
                            del_until_done(&container, config);
                        }
                    }
                    // Release one in two of the live containers, sometimes killing the DEL.
                    if !live.is_empty() && (fastrand::bool() || live.len() >= MAX_LIVE) {
                        let victim = live.swap_remove(fastrand::usize(..live.len()));
                        if let Outcome::Killed = run_plugin("DEL", &victim, config, random_kill()) {
                            *kills.lock().unwrap() += 1;
                            killed_dels.lock().unwrap().insert(victim.clone());
                            del_until_done(&victim, config);
                        }
                        ledger.lock().unwrap().remove(&victim);
                    }
                }
            });
        }
    });

    let kills = kills.into_inner().unwrap();
    assert!(kills > 0, "the test must actually kill some processes");
    let ledger = ledger.into_inner().unwrap();
    let killed_dels = killed_dels.into_inner().unwrap();
    for container in orphaned_reservations(dir.path()) {
        assert!(
            killed_dels.contains(&container),
            "an orphaned reservation of {container}, whose DEL was not killed"
        );
    }
    let repair = Command::new(env!("CARGO_BIN_EXE_whereabouts"))
        .args(["check", "--repair", "--file-store-dir"])
        .arg(dir.path())
        .env_remove("CNI_COMMAND")
        .stdin(Stdio::null())
        .output()
        .expect("run check --repair");
    // Shown with a failure below.
    eprintln!(
        "check --repair: {}{}",
        String::from_utf8_lossy(&repair.stdout),
        String::from_utf8_lossy(&repair.stderr)
    );
    let held = store_contents(dir.path());
    assert_eq!(held, ledger, "the store must hold exactly what successful ADDs answered ({kills} kills)");
}

/// The containers recorded by reservations whose address no pool holds.
fn orphaned_reservations(dir: &Path) -> Vec<String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    runtime.block_on(async {
        let store = FileStore::open(dir).expect("open store");
        let mut held: HashSet<String> = HashSet::new();
        for (pool_name, network) in V4_POOLS.into_iter().chain([V6_POOL]) {
            let stored = store.read_pool(pool_name).await.expect("read pool").expect("pool exists");
            let (pool, _) =
                Pool::from_spec(&stored.spec, network.parse().expect("network")).expect("decode pool");
            held.extend(pool.iter().map(|(ip, _)| ip.to_string()));
        }
        let reservations = store.list_reservations().await.expect("list reservations");
        reservations
            .into_iter()
            .filter(|(name, _)| !held.contains(&reservation_ip(name)))
            .map(|(_, read)| read.holder.container_id)
            .collect()
    })
}

/// The address a reservation is named after (IPv6 names write `:` as `-`).
fn reservation_ip(name: &str) -> String {
    let ip = name.replace('-', ":");
    if ip.contains(':') { ip } else { name.to_string() }
}

/// container -> addresses (with prefix) held in the store, after checking each address is held once
/// and reservations match the pools exactly.
fn store_contents(dir: &Path) -> BTreeMap<String, Vec<String>> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    runtime.block_on(async {
        let store = FileStore::open(dir).expect("open store");
        let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut owners: HashMap<String, String> = HashMap::new();
        // Range order: IPv4 pool first, as in the ADD result.
        for (pool_name, network) in V4_POOLS.into_iter().chain([V6_POOL]) {
            let stored = store.read_pool(pool_name).await.expect("read pool").expect("pool exists");
            let network: ipnet::IpNet = network.parse().expect("network");
            let (pool, skipped) = Pool::from_spec(&stored.spec, network).expect("decode pool");
            assert!(skipped.is_empty());
            for (ip, allocation) in pool.iter() {
                let previous = owners.insert(ip.to_string(), allocation.container_id.clone());
                assert!(previous.is_none(), "{ip} held twice");
                held.entry(allocation.container_id.clone())
                    .or_default()
                    .push(format!("{ip}/{}", network.prefix_len()));
            }
        }
        let reservations = store.list_reservations().await.expect("list reservations");
        assert_eq!(reservations.len(), owners.len(), "one reservation per allocated address");
        for (name, read) in reservations {
            let reservation = read.holder;
            assert_eq!(
                owners.get(&reservation_ip(&name)),
                Some(&reservation.container_id),
                "reservation {name}"
            );
        }
        held
    })
}
