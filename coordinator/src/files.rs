//! Durable, private files in the data directory.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// Writes `dir/name` atomically with `mode`: a temporary file created
/// exclusively, fsynced, renamed over the target, and the directory fsynced
/// so the rename survives a crash.
pub fn write_atomic(dir: &Path, name: &str, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn writes_with_the_mode_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        write_atomic(d.path(), "k", b"one", 0o600).unwrap();
        write_atomic(d.path(), "k", b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(d.path().join("k")).unwrap(), b"two");
        let mode = std::fs::metadata(d.path().join("k"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!d.path().join(".k.tmp").exists());
    }
}
