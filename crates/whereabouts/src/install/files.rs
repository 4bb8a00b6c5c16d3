//! Replacing a file so that a reader (the kubelet exec'ing the plugin, the plugin reading its
//! configuration) sees the old content or the new one, never a mix: write a temporary file beside the
//! target, set its mode, fsync it, rename it over the target, fsync the directory. Nothing is
//! written when the target already has the content, so a restarted installer changes nothing.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::InstallError;

/// What making a file hold some content took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// It already had the content and the mode.
    Unchanged,
    /// It had the content; its mode was changed in place.
    Chmod,
    /// It was created or replaced.
    Written,
}

/// Makes `path` hold `content` with permission bits `mode`.
pub(super) fn ensure_content(path: &Path, content: &[u8], mode: u32) -> Result<Outcome, InstallError> {
    let same = match fs::read(path) {
        Ok(existing) => Some(existing == content),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(InstallError::read(path, e)),
    };
    settle(path, mode, same, |file| file.write_all(content).map_err(|e| InstallError::write(path, e)))
}

/// Makes `path` a copy of `source` with permission bits `mode`.
pub(super) fn ensure_copy(path: &Path, source: &Path, mode: u32) -> Result<Outcome, InstallError> {
    let mut from = File::open(source).map_err(|e| InstallError::read(source, e))?;
    let same = match File::open(path) {
        Ok(existing) => Some(same_bytes(&mut from, source, existing, path)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(InstallError::read(path, e)),
    };
    settle(path, mode, same, |file| {
        io::Seek::rewind(&mut from).map_err(|e| InstallError::read(source, e))?;
        copy(&mut from, source, file, path)
    })
}

fn settle(
    path: &Path,
    mode: u32,
    same_content: Option<bool>,
    fill: impl FnOnce(&mut File) -> Result<(), InstallError>,
) -> Result<Outcome, InstallError> {
    if same_content == Some(true) {
        let current = fs::metadata(path).map_err(|e| InstallError::read(path, e))?.permissions().mode();
        if current & 0o7777 == mode {
            return Ok(Outcome::Unchanged);
        }
        fs::set_permissions(path, Permissions::from_mode(mode)).map_err(|e| InstallError::write(path, e))?;
        return Ok(Outcome::Chmod);
    }
    replace(path, mode, fill)?;
    Ok(Outcome::Written)
}

fn replace(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<(), InstallError>,
) -> Result<(), InstallError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let temp_path = dir.join(format!(".{name}.{:016x}.tmp", fastrand::u64(..)));
    // Private until complete: the mode is set on the descriptor once the content is in.
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp_path)
        .map_err(|e| InstallError::write(&temp_path, e))?;
    let mut temp = TempFile { path: temp_path, renamed: false };
    fill(&mut file)?;
    file.set_permissions(Permissions::from_mode(mode)).map_err(|e| InstallError::write(&temp.path, e))?;
    file.sync_all().map_err(|e| InstallError::write(&temp.path, e))?;
    drop(file);
    fs::rename(&temp.path, path).map_err(|e| InstallError::write(path, e))?;
    temp.renamed = true;
    // The rename is durable only once the directory is.
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| InstallError::write(dir, e))
}

/// A temporary file, removed when dropped unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    renamed: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.renamed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

const CHUNK: usize = 64 * 1024;

fn same_bytes(a: &mut File, a_path: &Path, mut b: File, b_path: &Path) -> Result<bool, InstallError> {
    let len = |f: &File, p: &Path| f.metadata().map(|m| m.len()).map_err(|e| InstallError::read(p, e));
    if len(a, a_path)? != len(&b, b_path)? {
        return Ok(false);
    }
    let (mut x, mut y) = (vec![0; CHUNK], vec![0; CHUNK]);
    loop {
        let n = read_full(a, a_path, &mut x)?;
        let m = read_full(&mut b, b_path, &mut y)?;
        if x[..n] != y[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

/// Fills `buf` unless the end comes first; the number of bytes read.
fn read_full(file: &mut File, path: &Path, buf: &mut [u8]) -> Result<usize, InstallError> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(InstallError::read(path, e)),
        }
    }
    Ok(filled)
}

fn copy(from: &mut File, from_path: &Path, to: &mut File, to_path: &Path) -> Result<(), InstallError> {
    let mut buf = vec![0; CHUNK];
    loop {
        let n = read_full(from, from_path, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n]).map_err(|e| InstallError::write(to_path, e))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn content_is_written_then_left_alone_then_chmodded_then_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        assert_eq!(ensure_content(&path, b"one", 0o600).unwrap(), Outcome::Written);
        assert_eq!((fs::read(&path).unwrap(), mode(&path)), (b"one".to_vec(), 0o600));
        assert_eq!(ensure_content(&path, b"one", 0o600).unwrap(), Outcome::Unchanged);
        assert_eq!(ensure_content(&path, b"one", 0o640).unwrap(), Outcome::Chmod);
        assert_eq!(mode(&path), 0o640);
        assert_eq!(ensure_content(&path, b"two", 0o644).unwrap(), Outcome::Written);
        assert_eq!((fs::read(&path).unwrap(), mode(&path)), (b"two".to_vec(), 0o644));
        assert_eq!(names(dir.path()), ["f"]);
    }

    #[test]
    fn copies_compare_by_content_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("source");
        let target = dir.path().join("target");
        let mut big = vec![7u8; CHUNK * 2 + 5];
        fs::write(&source, &big).unwrap();
        assert_eq!(ensure_copy(&target, &source, 0o755).unwrap(), Outcome::Written);
        assert_eq!(ensure_copy(&target, &source, 0o755).unwrap(), Outcome::Unchanged);
        // Same length, one byte different in the last chunk.
        big[CHUNK * 2 + 1] = 8;
        fs::write(&source, &big).unwrap();
        assert_eq!(ensure_copy(&target, &source, 0o755).unwrap(), Outcome::Written);
        assert_eq!((fs::read(&target).unwrap(), mode(&target)), (big, 0o755));
        assert_eq!(names(dir.path()), ["source", "target"]);
    }

    #[test]
    fn a_failed_write_leaves_no_temporary_file_and_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        let error = ensure_copy(&target, &dir.path().join("missing"), 0o755).unwrap_err();
        assert!(error.to_string().contains("missing"), "{error}");
        // The target is a directory: the rename fails after the temporary file was written.
        fs::create_dir(&target).unwrap();
        fs::write(target.join("inside"), "x").unwrap();
        fs::write(dir.path().join("source"), "x").unwrap();
        let error = ensure_copy(&target, &dir.path().join("source"), 0o755).unwrap_err();
        assert!(error.to_string().contains(&*target.to_string_lossy()), "{error}");
        assert!(error.to_string().starts_with("writing"), "{error}");
        assert_eq!(names(dir.path()), ["source", "target"]);
    }
}
