//! File writes shared by the provider state, the local target's server configs and the
//! `render` subcommand. None of them follows a symbolic link or lands outside its directory:
//! a file is written as a fresh temp file in the target's directory (`O_CREAT|O_EXCL|
//! O_NOFOLLOW`, so a link planted at the temp name fails the open instead of being written
//! through), then renamed over the target name (rename replaces a link there, it never writes
//! to where the link points).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Owner-only: state and server configs may carry credentials.
pub const PRIVATE: u32 = 0o600;

/// [`write_file`] with mode 0600.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_file(path, bytes, PRIVATE)
}

/// Replaces `path` with `bytes` (mode `mode`, less the umask) crash-safely: temp file beside
/// it, fsync, rename, fsync the directory. Never through a symbolic link.
pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "a file path has no name")
    })?;
    let (tmp, mut f) = create_temp(dir, &name.to_string_lossy(), mode)?;
    let written = f
        .write_all(bytes)
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The `<n>` of the next temp file name.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// A new file `.<name>.<pid>.<n>.tmp` in `dir`, created exclusively and never through a link.
fn create_temp(dir: &Path, name: &str, mode: u32) -> std::io::Result<(PathBuf, std::fs::File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut last = None;
    for _ in 0..64 {
        let tmp = dir.join(format!(
            ".{name}.{}.{}.tmp",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free temp file name")))
}

/// An error unless `path` is absent or a real directory (a symbolic link is refused, whatever
/// it points to).
pub fn refuse_link_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.file_type().is_symlink() => Err(std::io::Error::other(
            "is a symbolic link; not following it (give the directory it points to, or remove it)",
        )),
        Ok(m) if !m.is_dir() => Err(std::io::Error::other("exists and is not a directory")),
        Ok(_) => Ok(()),
    }
}

/// An error when `path` is a symbolic link (a file another program writes there would follow it).
pub fn refuse_link(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(std::io::Error::other(
            "is a symbolic link; not following it (remove it)",
        )),
        _ => Ok(()),
    }
}

/// Creates `path` and its missing parents, each new one mode 0700, refusing when `path` is a
/// symbolic link.
pub fn create_private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    refuse_link_dir(path)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// An exclusive `flock(2)` on a lock file, held until dropped (closing the file releases it).
/// It serialises plugin processes that share a state directory: wfctl runs are not serialised
/// by their users. Blocking: call it off the async worker threads.
pub struct FileLock(std::fs::File);

impl FileLock {
    /// Opens (creating it 0600 when missing, never through a symbolic link) and locks `path`,
    /// waiting for other holders.
    pub fn exclusive(path: &Path) -> std::io::Result<FileLock> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(PRIVATE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        loop {
            // SAFETY: flock(2) on a descriptor this guard owns for its whole lifetime.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(FileLock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as above; the lock would also go with the descriptor, this just says so.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// Issue 19, the class of finding 5: the state file, the local target's nats.conf and the
    /// lock file never write through a symbolic link, at the target name or at a temp name.
    #[test]
    fn writes_never_follow_a_symbolic_link() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim.txt");
        std::fs::write(&victim, "untouched").unwrap();
        let dir = d.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        // A link at the target name is replaced, not written through.
        let target = dir.join("state.json");
        symlink(&victim, &target).unwrap();
        write_atomic(&target, b"{}").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        let m = std::fs::symlink_metadata(&target).unwrap();
        assert!(m.is_file() && m.permissions().mode() & 0o077 == 0);
        assert_eq!(std::fs::read(&target).unwrap(), b"{}");
        // Links planted at every temp name this process could pick next are skipped.
        let next = NEXT.load(Ordering::Relaxed);
        for n in next..next + 3 {
            let planted = dir.join(format!(".state.json.{}.{n}.tmp", std::process::id()));
            symlink(&victim, &planted).unwrap();
        }
        write_atomic(&target, b"{\"v\":2}").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(std::fs::read(&target).unwrap(), b"{\"v\":2}");
        // The lock file: a link there is refused.
        let lock = dir.join("apply.lock");
        symlink(d.path().join("elsewhere.lock"), &lock).unwrap();
        assert!(FileLock::exclusive(&lock).is_err());
        assert!(!d.path().join("elsewhere.lock").exists());
        // Directories: a link is refused, a missing one is created private.
        let linked = d.path().join("linked");
        symlink(d.path(), &linked).unwrap();
        assert!(create_private_dir(&linked).is_err());
        assert!(refuse_link(&linked).is_err());
        let fresh = d.path().join("a/b");
        create_private_dir(&fresh).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
}
