//! Temporary files of atomic writes: their recognisable names, a registry of the ones in flight
//! (so that a program interrupted by a signal can remove them before it exits), and the removal of
//! stale ones a killed process left behind.
//!
//! Every temporary file this workspace writes is named `.iapt-tmp-{pid}-{random}` (see
//! [`temp_prefix`]) in the directory of the file it will become. A temporary is *stale* when its
//! name has that form, it is a regular file, it was last modified at least [`STALE_AGE`] ago, and
//! the process whose id it carries is no longer running (checked through `/proc` where it exists).
//! [`remove_stale`] removes those and nothing else; every atomic write calls it on its directory
//! first, so a `kill -9` costs at most one temporary until the next write to that directory.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// The start of every temporary file's name.
pub const TEMP_PREFIX: &str = ".iapt-tmp-";

/// A temporary untouched this long, whose process is gone, is stale.
pub const STALE_AGE: Duration = Duration::from_secs(60 * 60);

/// Temporary files being written now, by this process.
static IN_FLIGHT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// The name prefix of this process's temporary files: `.iapt-tmp-{pid}-`.
pub fn temp_prefix() -> String {
    format!("{TEMP_PREFIX}{}-", std::process::id())
}

/// A registered temporary file; dropping it forgets the path (it does not remove the file).
#[derive(Debug)]
pub struct InFlight {
    path: PathBuf,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut list = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = list.iter().position(|p| *p == self.path) {
            list.swap_remove(i);
        }
    }
}

/// Records `path` as a temporary file in flight until the returned guard is dropped.
pub fn register(path: &Path) -> InFlight {
    IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_owned());
    InFlight { path: path.to_owned() }
}

/// The temporary files in flight now.
pub fn in_flight() -> Vec<PathBuf> {
    IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Removes every temporary file in flight (for a signal handler about to exit the process).
/// Returns how many were removed.
pub fn remove_in_flight() -> usize {
    let list = IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner());
    list.iter().filter(|p| std::fs::remove_file(p).is_ok()).count()
}

/// The process id a temporary file's name carries, if the name has the temporary form.
fn pid_of(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(TEMP_PREFIX)?;
    let (pid, tail) = rest.split_once('-')?;
    if tail.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` is running (`true` where that cannot be told: no `/proc`).
fn is_running(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.join("self").exists() || proc.join(pid.to_string()).exists()
}

/// Removes the stale temporary files (see the module documentation) directly in `dir`; errors
/// (an unreadable directory, a file that went away) are ignored. Returns the paths removed.
pub fn remove_stale(dir: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return removed };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(pid_of) else { continue };
        // `DirEntry::metadata` does not follow symbolic links: only our regular files qualify.
        let Ok(meta) = entry.metadata() else { continue };
        let old = meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age >= STALE_AGE);
        if meta.is_file() && old && pid != std::process::id() && !is_running(pid) && std::fs::remove_file(entry.path()).is_ok() {
            removed.push(entry.path());
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_recognised_by_their_exact_form() {
        assert_eq!(pid_of(".iapt-tmp-123-abc"), Some(123));
        assert_eq!(pid_of(&format!("{}x", temp_prefix())), Some(std::process::id()));
        for other in [".iapt-tmp-", ".iapt-tmp-123", ".iapt-tmp-123-", ".iapt-tmp-x1-abc", "iapt-tmp-1-a", "a.gguf", ".iapt-tmp--a"] {
            assert_eq!(pid_of(other), None, "{other}");
        }
    }

    #[test]
    fn registry_lists_files_in_flight_until_their_guard_drops() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let guard = register(&a);
        assert!(in_flight().contains(&a));
        drop(guard);
        assert!(!in_flight().contains(&a));
    }

    #[test]
    fn only_old_temporaries_of_dead_processes_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - STALE_AGE - Duration::from_secs(60);
        // A process id above the kernel's largest (2^22) is never running.
        let dead = 4_194_305 + 17;
        let make = |name: &str, aged: bool| {
            let p = dir.path().join(name);
            let f = std::fs::File::create(&p).unwrap();
            if aged {
                f.set_modified(old).unwrap();
            }
            p
        };
        let stale = make(&format!("{TEMP_PREFIX}{dead}-abc"), true);
        let fresh = make(&format!("{TEMP_PREFIX}{dead}-def"), false);
        let ours = make(&format!("{}ghi", temp_prefix()), true);
        let other = make("model.iapt-tmp-1-x", true);
        let not_ours = make(".iapt-tmp-notapid", true);
        assert_eq!(remove_stale(dir.path()), vec![stale.clone()]);
        assert!(!stale.exists());
        for kept in [fresh, ours, other, not_ours] {
            assert!(kept.exists(), "{}", kept.display());
        }
    }
}
