//! Whole-binary latency of ADD and DEL on the file store, process start included, sequential and with
//! 32 concurrent processes. Baselines measured in the same run: `whereabouts` answering VERSION (process
//! start alone) and Debian's Go `host-local` IPAM plugin doing the same ADD/DEL on its own file store.
//!
//! Run with `cargo bench -p whereabouts --bench cni_latency` (add `-- --quick` for a short run).

#![allow(clippy::print_stdout, reason = "a benchmark reports on stdout")]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

const HOST_LOCAL: &str = "/usr/lib/cni/host-local";

#[derive(Clone, Copy)]
enum Plugin {
    Whereabouts,
    HostLocal,
}

fn config(plugin: Plugin, dir: &Path) -> String {
    let ipam = match plugin {
        Plugin::Whereabouts => json!({
            "type": "whereabouts", "datastore": "file", "file_store_dir": dir, "log_level": "error",
            "range": "198.51.100.0/24",
        }),
        Plugin::HostLocal => json!({
            "type": "host-local", "dataDir": dir, "ranges": [[{ "subnet": "198.51.100.0/24" }]],
        }),
    };
    json!({ "cniVersion": "1.0.0", "name": "bench", "type": "bridge", "ipam": ipam }).to_string()
}

/// Runs one plugin call and returns its wall time.
fn call(plugin: Plugin, command: &str, container: &str, config: &str) -> Duration {
    let program = match plugin {
        Plugin::Whereabouts => env!("CARGO_BIN_EXE_whereabouts"),
        Plugin::HostLocal => HOST_LOCAL,
    };
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
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn run(plugin: Plugin, workers: usize, cycles: usize) -> Stats {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config(plugin, dir.path());
    let stats = Mutex::new(Stats { add: Vec::new(), del: Vec::new(), wall: Duration::ZERO });
    let started = Instant::now();
    std::thread::scope(|scope| {
        for worker in 0..workers {
            let (config, stats) = (&config, &stats);
            scope.spawn(move || {
                for cycle in 0..cycles {
                    let container = format!("bench-{worker}-{cycle}");
                    let add = call(plugin, "ADD", &container, config);
                    let del = call(plugin, "DEL", &container, config);
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

    let host_local = Path::new(HOST_LOCAL).exists();
    for (label, workers, cycles) in
        [("sequential", 1, sequential), ("32 concurrent processes", 32, concurrent)]
    {
        let mut ours = run(Plugin::Whereabouts, workers, cycles);
        let (add50, add99) = (percentile(&mut ours.add, 0.5), percentile(&mut ours.add, 0.99));
        let (del50, del99) = (percentile(&mut ours.del, 0.5), percentile(&mut ours.del, 0.99));
        println!(
            "{label}: whereabouts file store, {} ADD+DEL cycles, {:.0} cycles/s",
            ours.add.len(),
            ours.cycles_per_second()
        );
        println!("  ADD p50 {} p99 {}   DEL p50 {} p99 {}", ms(add50), ms(add99), ms(del50), ms(del99));
        println!("  ADD p50 = {:.2}x process start", add50.as_secs_f64() / start_p50.as_secs_f64());
        if host_local {
            let mut go = run(Plugin::HostLocal, workers, cycles);
            let (g50, g99) = (percentile(&mut go.add, 0.5), percentile(&mut go.add, 0.99));
            let (gd50, gd99) = (percentile(&mut go.del, 0.5), percentile(&mut go.del, 0.99));
            println!(
                "  baseline host-local (Go), {:.0} cycles/s: ADD p50 {} p99 {}   DEL p50 {} p99 {}",
                go.cycles_per_second(),
                ms(g50),
                ms(g99),
                ms(gd50),
                ms(gd99)
            );
            println!(
                "  ratio whereabouts/host-local: ADD p50 {:.2}  p99 {:.2}",
                add50.as_secs_f64() / g50.as_secs_f64(),
                add99.as_secs_f64() / g99.as_secs_f64()
            );
        }
    }
}
