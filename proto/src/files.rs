//! Durable, private files: what the coordinator and meshd keep on disk
//! (keys, tokens, credentials, the netmap cache).
//!
//! [`write_atomic`] replaces a file so that a crash at any moment leaves
//! either the old contents or the new, never a torn or empty file, and the
//! new contents survive once it returns. [`read_private`] reads a private
//! key and refuses one that group or others may read or write.

use std::fmt;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Distinguishes temporary files of one process (with the pid and the
/// clock, the name is unique among writers of one directory).
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `path` atomically and durably with exactly `mode`.
///
/// The contents go to a fresh temporary file beside `path` (a unique name,
/// created with `O_EXCL` and `mode` from the start, so it is never readable
/// by others even for a moment), which is fsynced, renamed over `path`; then
/// the directory is fsynced so the rename itself survives a crash. On an
/// error the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} does not name a file", path.display()),
        )
    })?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = dir.join(format!(
        ".{}.{}.{}.{nanos}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(mode)
        .open(&tmp)?;
    let written = (|| {
        // `mode` above is filtered by the umask; make it exact.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// Fsyncs a directory, making the renames and creations in it durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Why a private key file could not be read.
#[derive(Debug)]
pub enum PrivateFileError {
    /// Opening or reading failed (it may not exist: see
    /// [`PrivateFileError::is_not_found`]).
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Group or others may read or write the file.
    TooOpen {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

impl PrivateFileError {
    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, PrivateFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

impl fmt::Display for PrivateFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrivateFileError::Io { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            PrivateFileError::TooOpen { path, mode } => write!(
                f,
                "{} has mode {mode:04o}: a private key must not be readable or writable by group or others (fix: chmod 600 {})",
                path.display(),
                path.display()
            ),
        }
    }
}

impl std::error::Error for PrivateFileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PrivateFileError::Io { source, .. } => Some(source),
            PrivateFileError::TooOpen { .. } => None,
        }
    }
}

/// Reads a private key file (UTF-8), refusing it when its mode has any
/// group or other bit (wider than 0600). The mode is that of the opened
/// file, so a symlink is judged by its target.
pub fn read_private(path: &Path) -> Result<String, PrivateFileError> {
    let io = |source| PrivateFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mode = f.metadata().map_err(io)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PrivateFileError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut s = String::new();
    f.read_to_string(&mut s).map_err(io)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_with_the_exact_mode_replaces_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k");
        write_atomic(&k, b"one", 0o600).unwrap();
        assert_eq!(mode_of(&k), 0o600);
        write_atomic(&k, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(&k).unwrap(), b"two");
        assert_eq!(mode_of(&k), 0o644, "the new file's mode, not the old");
        // Exact even where the umask would strip bits.
        write_atomic(&k, b"three", 0o666).unwrap();
        assert_eq!(mode_of(&k), 0o666);
        assert_eq!(entries(d.path()), vec!["k"]);
    }

    #[test]
    fn a_planted_temporary_name_is_not_written_through() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("k");
        // A symlink where a fixed temporary name would be (what a
        // non-exclusive create would follow and truncate).
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join(".k.tmp")).unwrap();
        write_atomic(&k, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&k).unwrap(), b"new");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn a_failed_write_leaves_the_target_and_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("t");
        // Renaming a file over a non-empty directory fails after the
        // temporary was written.
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), b"x").unwrap();
        assert!(write_atomic(&target, b"data", 0o600).is_err());
        assert!(target.is_dir());
        assert_eq!(entries(d.path()), vec!["t"], "the temporary was removed");
        let missing = d.path().join("no-such-dir").join("f");
        assert!(write_atomic(&missing, b"data", 0o600).is_err());
    }

    #[test]
    fn private_files_wider_than_0600_are_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let k = d.path().join("private.key");
        std::fs::write(&k, b"secret\n").unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o644, false),
            (0o640, false),
            (0o604, false),
            (0o620, false),
        ] {
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(mode)).unwrap();
            match read_private(&k) {
                Ok(s) => {
                    assert!(ok, "{mode:o} accepted");
                    assert_eq!(s, "secret\n");
                }
                Err(e) => {
                    assert!(!ok, "{mode:o} refused: {e}");
                    let msg = e.to_string();
                    assert!(msg.contains(&k.display().to_string()), "{msg}");
                    assert!(msg.contains(&format!("mode 0{mode:o}")), "{msg}");
                    assert!(msg.contains(&format!("chmod 600 {}", k.display())), "{msg}");
                    assert!(!msg.contains('\n'));
                }
            }
        }
        let e = read_private(&d.path().join("absent")).unwrap_err();
        assert!(e.is_not_found(), "{e}");
    }
}
