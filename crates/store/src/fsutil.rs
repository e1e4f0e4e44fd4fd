//! Crash-safe file helpers.
//!
//! A rename is only durable once the directory holding it is fsync'd, and the renamed file's
//! data only once the file itself was fsync'd before the rename. Every metadata update in
//! Slipway goes through [`write_atomic`] so a `kill -9` or power cut leaves either the old or
//! the new file, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::StoreError;

/// fsyncs a directory, making renames and creations inside it durable.
pub fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(format!(
            "fsyncing directory {}",
            dir.display()
        )))
}

/// Creates `dir` and its parents and makes each new entry durable.
pub fn create_dir_all_durable(dir: &Path) -> Result<(), StoreError> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_all_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => {
            return Err(StoreError::io(format!(
                "creating directory {}",
                dir.display()
            ))(e))
        }
    }
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// Replaces `path` with `data` atomically and durably: write a temp file beside it, fsync it,
/// rename it over `path`, fsync the directory. `mode` is applied to the new file.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let what = |s: &str| format!("{s} {}", tmp.display());
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(StoreError::io(what("creating")))?;
    f.write_all(data).map_err(StoreError::io(what("writing")))?;
    f.sync_all().map_err(StoreError::io(what("fsyncing")))?;
    drop(f);
    fs::rename(&tmp, path).map_err(StoreError::io(format!(
        "renaming {} to {}",
        tmp.display(),
        path.display()
    )))?;
    fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_replace_and_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/meta.json");
        create_dir_all_durable(p.parent().unwrap()).unwrap();
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp file is left behind.
        let names: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }
}
