//! The lock-file arbiter: `flock` on a path both sides reach (one host or a shared
//! filesystem). The kernel releases the lock when its holder dies, so it detects process
//! death (not a hung host: that needs a lease, the etcd arbiter of a later version).
//!
//! The primary takes the lock when it starts and holds it while it is live. A backup must win
//! it before going live: it can only when the primary process is gone, so there is never a
//! second live copy. A backup that cannot win halts.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// A held lock; dropping it releases it.
#[derive(Debug)]
pub struct FileArbiter {
    _file: File,
    path: PathBuf,
}

impl FileArbiter {
    /// Tries to take the lock until `wait` has passed. `Ok(None)`: someone else holds it.
    pub fn acquire(path: &Path, wait: Duration) -> Result<Option<FileArbiter>> {
        let err = |why: String| Error::Arbiter { path: path.display().to_string(), why };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| err(format!("cannot open: {e}")))?;
        let start = Instant::now();
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is involved.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                return Ok(Some(FileArbiter { _file: file, path: path.to_path_buf() }));
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(err(format!("flock failed: {e}")));
            }
            if start.elapsed() >= wait {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_holder_and_release_on_drop() {
        let path = std::env::temp_dir().join(format!("ftvm-arbiter-test-{}", std::process::id()));
        let a = FileArbiter::acquire(&path, Duration::ZERO).unwrap().expect("first wins");
        assert!(FileArbiter::acquire(&path, Duration::from_millis(30)).unwrap().is_none(), "second loses");
        drop(a);
        assert!(FileArbiter::acquire(&path, Duration::ZERO).unwrap().is_some(), "free again");
        let _ = std::fs::remove_file(&path);
    }
}
