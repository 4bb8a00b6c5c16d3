//! Whole-binary latency of ADD and DEL, process start included, sequential and with 32 concurrent
//! processes, on the file store and on a real single-member etcd (Debian's, started on loopback by the
//! test harness). Baselines measured in the same run: `whereabouts` answering VERSION (process start
//! alone), whereabouts on the file store (for etcd), and Debian's Go `host-local` IPAM plugin doing the
//! same ADD/DEL on its own file store.
//!
//! Run with `cargo bench -p whereabouts --bench cni_latency` (add `-- --quick` for a short run).

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

#[path = "../tests/etcd_support/mod.rs"]
mod etcd_support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

const HOST_LOCAL: &str = "/usr/lib/cni/host-local";

/// What answers the calls.
#[derive(Clone)]
enum Backend {
    /// whereabouts on the file store.
    File,
    /// whereabouts on etcd at these hosts.
    Etcd(String),
    /// Debian's host-local.
    HostLocal,
}

impl Backend {
    fn label(&self) -> &'static str {
        match self {
            Backend::File => "whereabouts, file store",
            Backend::Etcd(_) => "whereabouts, etcd",
            Backend::HostLocal => "host-local (Go)",
        }
    }

    fn config(&self, dir: &Path, run: usize) -> String {
        // Each run gets its own range (and so its own pool), on whichever store.
        let range = format!("198.51.{}.0/24", 100 + run % 2);
        let ipam = match self {
            Backend::File => json!({
                "type": "whereabouts", "datastore": "file", "file_store_dir": dir, "log_level": "error",
                "range": range,
            }),
            Backend::Etcd(hosts) => json!({
                "type": "whereabouts", "datastore": "etcd", "etcd_host": hosts, "log_level": "error",
                "etcd_key_prefix": format!("/bench-{run}/"), "range": range,
            }),
            Backend::HostLocal => json!({
                "type": "host-local", "dataDir": dir, "ranges": [[{ "subnet": range }]],
            }),
        };
        json!({ "cniVersion": "1.0.0", "name": "bench", "type": "bridge", "ipam": ipam }).to_string()
    }

    fn program(&self) -> &'static str {
        match self {
            Backend::HostLocal => HOST_LOCAL,
            _ => env!("CARGO_BIN_EXE_whereabouts"),
        }
    }
}

/// Runs one plugin call and returns its wall time.
fn call(program: &str, command: &str, container: &str, config: &str) -> Duration {
    let started = Instant::now();
    let mut child = Command::new(program)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", "/var/run/netns/bench")
        .env("CNI_IFNAME", "net1")
        .env("CNI_PATH", "/usr/lib/cni")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={container}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn plugin");
    child.stdin.take().expect("stdin").write_all(config.as_bytes()).expect("stdin");
    let output = child.wait_with_output().expect("wait");
    let elapsed = started.elapsed();
    assert!(output.status.success(), "{command} {container}: {}", String::from_utf8_lossy(&output.stdout));
    elapsed
}

struct Stats {
    add: Vec<Duration>,
    del: Vec<Duration>,
    wall: Duration,
}

impl Stats {
    fn cycles_per_second(&self) -> f64 {
        self.add.len() as f64 / self.wall.as_secs_f64()
    }

    fn add_p(&mut self, p: f64) -> Duration {
        percentile(&mut self.add, p)
    }

    fn del_p(&mut self, p: f64) -> Duration {
        percentile(&mut self.del, p)
    }
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn run(backend: &Backend, run_id: usize, workers: usize, cycles: usize) -> Stats {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = backend.config(dir.path(), run_id);
    let program = backend.program();
    let stats = Mutex::new(Stats { add: Vec::new(), del: Vec::new(), wall: Duration::ZERO });
    let started = Instant::now();
    std::thread::scope(|scope| {
        for worker in 0..workers {
            let (config, stats) = (&config, &stats);
            scope.spawn(move || {
                for cycle in 0..cycles {
                    let container = format!("bench-{run_id}-{worker}-{cycle}");
                    let add = call(program, "ADD", &container, config);
                    let del = call(program, "DEL", &container, config);
                    let mut stats = stats.lock().expect("stats");
                    stats.add.push(add);
                    stats.del.push(del);
                }
            });
        }
    });
    let mut stats = stats.into_inner().expect("stats");
    stats.wall = started.elapsed();
    stats
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (sequential, concurrent) = if quick { (50, 4) } else { (300, 20) };

    let mut start_only: Vec<Duration> = (0..sequential)
        .map(|_| {
            let started = Instant::now();
            let mut child = Command::new(env!("CARGO_BIN_EXE_whereabouts"))
                .env_clear()
                .env("CNI_COMMAND", "VERSION")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn");
            child.stdin.take().expect("stdin").write_all(b"{}").expect("stdin");
            child.wait().expect("wait");
            started.elapsed()
        })
        .collect();
    let start_p50 = percentile(&mut start_only, 0.5);
    println!("baseline: whereabouts VERSION (process start only): p50 {}", ms(start_p50));

    let etcd = etcd_support::etcd_available().then(etcd_support::EtcdCluster::single);
    let mut backends = vec![Backend::File];
    if let Some(etcd) = &etcd {
        backends.push(Backend::Etcd(etcd.hosts_csv()));
    }
    if Path::new(HOST_LOCAL).exists() {
        backends.push(Backend::HostLocal);
    }

    for (run_id, (label, workers, cycles)) in
        [("sequential", 1, sequential), ("32 concurrent processes", 32, concurrent)].into_iter().enumerate()
    {
        println!("{label}, {} ADD+DEL cycles per backend:", workers * cycles);
        let mut file_add_p50 = None;
        for backend in &backends {
            let mut stats = run(backend, run_id, workers, cycles);
            let (a50, a99, d50, d99) =
                (stats.add_p(0.5), stats.add_p(0.99), stats.del_p(0.5), stats.del_p(0.99));
            println!(
                "  {:<26} ADD p50 {} p99 {}   DEL p50 {} p99 {}   {:.0} cycles/s",
                backend.label(),
                ms(a50),
                ms(a99),
                ms(d50),
                ms(d99),
                stats.cycles_per_second()
            );
            match file_add_p50 {
                None => file_add_p50 = Some(a50),
                Some(file) => println!(
                    "  {:<26} ADD p50 = {:.2}x the file store's",
                    "",
                    a50.as_secs_f64() / file.as_secs_f64()
                ),
            }
        }
    }
}
