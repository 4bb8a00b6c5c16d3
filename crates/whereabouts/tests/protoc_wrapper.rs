//! `scripts/protoc`, the PROTOC that `.cargo/config.toml` gives etcd-client's build script: a fresh
//! machine without protoc gets one line saying what to install; with one, the build uses it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn wrapper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/protoc")
}

/// Runs the wrapper with `PATH` set to `path` and `--version`: (exit code, stdout, stderr).
fn run(path: &str) -> (i32, String, String) {
    let out = Command::new("/bin/sh")
        .arg(wrapper())
        .arg("--version")
        .env_clear()
        .env("PATH", path)
        .output()
        .expect("run /bin/sh");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

#[test]
fn without_protoc_it_says_in_one_line_what_to_install() {
    let (code, stdout, stderr) = run("/nonexistent");
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("apt-get install protobuf-compiler"), "{stderr}");
}

#[test]
fn with_protoc_on_path_it_runs_that_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = dir.path().join("protoc");
    std::fs::write(&fake, "#!/bin/sh\necho \"fake protoc $*\"\n").expect("write");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // The wrapper's own directory first: it must not run itself.
    let scripts = wrapper().parent().expect("scripts dir").to_path_buf();
    let path = format!("{}:{}", scripts.display(), dir.path().display());
    let (code, stdout, stderr) = run(&path);
    assert_eq!((code, stdout.as_str()), (0, "fake protoc --version\n"), "{stderr}");
}
