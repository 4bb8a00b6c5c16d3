//! What the end-to-end tests share (`mod e2e_support;` in a test file): unique names, running
//! commands, host links removed on drop, the decision to run or skip on this machine, and the
//! sandbox that holds the binary under test and the file store it writes.

// Every test file that declares `mod e2e_support;` compiles all of it but uses only a part.
#![allow(dead_code, reason = "each test file that includes this module uses only some helpers")]

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::Value;
use tempfile::TempDir;

/// Where Debian's containernetworking-plugins live.
pub const CNI_DIR: &str = "/usr/lib/cni";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// `<prefix><pid>x<counter>`: unique within this process and across concurrent test processes.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id())
}

/// [`unique`] for an interface name, which must stay within 15 bytes.
pub fn unique_ifname(prefix: &str) -> String {
    let name = unique(prefix);
    assert!(name.len() <= 15, "name {name} too long for an interface");
    name
}

pub fn is_root() -> bool {
    let effective_uid = || {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("Uid:"))?;
        line.split_whitespace().nth(2)?.parse::<u32>().ok()
    };
    effective_uid() == Some(0)
}

pub fn have_tool(tool: &str) -> bool {
    Command::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok()
}

/// Whether the tests of `suite` can run here, given `problem` (why not, if anything). When they
/// cannot: fail under `CI`, otherwise say why and let the caller return early.
pub fn ready_or_skip(suite: &str, problem: Option<String>) -> bool {
    match problem {
        None => true,
        Some(why) if std::env::var_os("CI").is_some() => {
            panic!("{suite}: {why}; these tests must run in CI")
        }
        Some(why) => {
            eprintln!("{suite}: skipped: {why}");
            false
        }
    }
}

/// Runs a command without stdin, returning its output whatever the exit status.
pub fn output_of(command: &mut Command) -> Output {
    command.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"))
}

/// Runs a command without stdin that must succeed; returns its stdout.
pub fn stdout_of(command: &mut Command) -> String {
    let out = output_of(command);
    assert!(
        out.status.success(),
        "{command:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a program, returning its output whatever the exit status.
pub fn output(program: &str, args: &[&str]) -> Output {
    output_of(Command::new(program).args(args))
}

/// Runs a program that must succeed; returns its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    stdout_of(Command::new(program).args(args))
}

/// A link in the host namespace (a bridge made by a plugin or a dummy we make), deleted on drop.
#[derive(Debug)]
pub struct HostLink {
    pub name: String,
}

impl HostLink {
    /// Reserves a name for a link a plugin will create; removed on drop if it exists.
    pub fn named(prefix: &str) -> Self {
        HostLink { name: unique_ifname(prefix) }
    }

    pub fn exists(&self) -> bool {
        output("ip", &["link", "show", "dev", &self.name]).status.success()
    }
}

impl Drop for HostLink {
    fn drop(&mut self) {
        if self.exists() {
            let _ = output("ip", &["link", "del", "dev", &self.name]);
        }
    }
}

/// A temp dir with `bin/whereabouts` (a symlink to the binary under test) and the file store.
#[derive(Debug)]
pub struct Sandbox {
    dir: TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("wb-e2e-").tempdir().expect("temp dir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("mkdir bin");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_whereabouts"), bin.join("whereabouts"))
            .expect("symlink whereabouts");
        Sandbox { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The directory holding `whereabouts`; the reference plugins stay in [`CNI_DIR`].
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    pub fn cni_path(&self) -> String {
        format!("{}:{CNI_DIR}", self.bin_dir().display())
    }

    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Every allocation in every pool file: (address, container id, podref).
    pub fn allocations(&self) -> BTreeSet<(IpAddr, String, String)> {
        let mut out = BTreeSet::new();
        for path in json_files(&self.store().join("pools")) {
            let text = std::fs::read_to_string(&path).expect("read pool");
            let pool: Value = serde_json::from_str(&text).expect("pool is JSON");
            let range = pool["range"].as_str().expect("pool.range");
            let allocations = pool["allocations"].as_object().cloned().unwrap_or_default();
            for (offset, owner) in allocations {
                let offset: u128 = offset.parse().expect("offset is a number");
                out.insert((
                    nth_address(range, offset),
                    owner["id"].as_str().unwrap_or_default().to_string(),
                    owner["podref"].as_str().unwrap_or_default().to_string(),
                ));
            }
        }
        out
    }

    /// The reservation files in the store.
    pub fn reservations(&self) -> Vec<PathBuf> {
        json_files(&self.store().join("reservations"))
    }

    /// Dumps the store, for failure messages.
    pub fn dump_store(&self) -> String {
        let mut text = String::new();
        for dir in ["pools", "reservations"] {
            for path in json_files(&self.store().join(dir)) {
                let content = std::fs::read_to_string(&path).unwrap_or_default();
                text.push_str(&format!("{}: {content}\n", path.display()));
            }
        }
        text
    }
}

fn json_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.ends_with(".json") && !name.starts_with('.')
        })
        .collect();
    files.sort();
    files
}

/// The address `offset` places after the network address of `cidr`.
fn nth_address(cidr: &str, offset: u128) -> IpAddr {
    let (network, _) = cidr.split_once('/').expect("pool range is a CIDR");
    match network.parse::<IpAddr>().expect("pool range address") {
        IpAddr::V4(a) => {
            let offset = u32::try_from(offset).expect("v4 offset");
            IpAddr::V4((u32::from(a) + offset).into())
        }
        IpAddr::V6(a) => IpAddr::V6((u128::from(a) + offset).into()),
    }
}

/// The address of `ip/prefix` (or of a bare address).
pub fn address_part(cidr: &str) -> IpAddr {
    cidr.split_once('/').map_or(cidr, |(a, _)| a).parse().expect("address")
}
