//! The plugin binaries for tests and benchmarks that run them as processes: ours (`whereabouts`) and the
//! upstream-shaped one (`upstream-whereabouts`, this crate's). Cargo builds a test's or bench's own
//! package binaries before running it (`CARGO_BIN_EXE_*`), but not another package's; these helpers
//! find them next to the running test and build them when missing or older than the sources.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::SystemTime;

/// Our CNI plugin, built in the running test's profile.
///
/// # Panics
/// When it cannot be built.
pub fn whereabouts() -> PathBuf {
    built("whereabouts", "whereabouts")
}

/// The upstream-shaped CNI plugin ([`crate::upstream`] behind the CNI process contract), built in the
/// running test's profile.
///
/// # Panics
/// When it cannot be built.
pub fn upstream_whereabouts() -> PathBuf {
    built("whereabouts-kube-testing", "upstream-whereabouts")
}

/// The workspace root, from this crate's manifest directory.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where the running executable's profile puts binaries: `target/<profile>` (tests and benches run
/// from its `deps` directory).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running executable");
    let dir = exe.parent().expect("the executable's directory");
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().expect("the profile directory").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// `bin` of `package` in the running profile, built first when missing or stale. Checked once per
/// process and binary; concurrent callers wait for one build.
fn built(package: &str, bin: &str) -> PathBuf {
    static CHECKED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let profile_dir = profile_dir();
    let path = profile_dir.join(bin);
    let mut checked = CHECKED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if !checked.iter().any(|b| b == bin) {
        if is_stale(&path) {
            build(package, bin, &profile_dir);
        }
        checked.push(bin.to_string());
    }
    path
}

/// Whether `binary` is missing or older than any source, manifest or the lock file of the workspace.
fn is_stale(binary: &Path) -> bool {
    let Some(built) = modified(binary) else { return true };
    let root = workspace_root();
    let mut newest =
        [root.join("Cargo.toml"), root.join("Cargo.lock")].iter().filter_map(|p| modified(p)).max();
    let crates = std::fs::read_dir(root.join("crates")).into_iter().flatten().flatten();
    for krate in crates {
        newest = newest.max(modified(&krate.path().join("Cargo.toml")));
        newest = newest.max(newest_under(&krate.path().join("src")));
    }
    newest.is_some_and(|newest| newest > built)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest modification time of any file under `dir`.
fn newest_under(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let time = if path.is_dir() { newest_under(&path) } else { modified(&path) };
        newest = newest.max(time);
    }
    newest
}

/// `cargo build -p <package> --bin <bin>` into the running executable's target directory and profile.
fn build(package: &str, bin: &str, profile_dir: &Path) {
    let target_dir = profile_dir.parent().expect("the target directory");
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .current_dir(workspace_root())
        .args(["build", "-p", package, "--bin", bin])
        .arg("--target-dir")
        .arg(target_dir);
    match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => {}
        Some("release") => {
            cargo.arg("--release");
        }
        Some(profile) => {
            cargo.args(["--profile", profile]);
        }
        None => panic!("no profile directory in {}", profile_dir.display()),
    }
    let output = cargo.output().expect("run cargo");
    assert!(output.status.success(), "building {bin} failed:\n{}", String::from_utf8_lossy(&output.stderr));
}
