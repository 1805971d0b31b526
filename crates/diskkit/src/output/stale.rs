//! Removing the temporaries of killed runs.

use std::collections::HashSet;
use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use rustix::fs::{FlockOperation, OFlags};

use super::{remove_path, Kind};

/// Directories this process has cleaned already.
static CLEANED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// A `.init` name is only cleaned when it is older than this (its creator is between creating
/// and locking it for a moment; one left behind was killed in that moment).
const INIT_AGE: Duration = Duration::from_secs(60);

/// Whether `path`'s name has the form of a diskkit temporary: `.NAME.diskkit-<32 hex>.tmp`.
pub(crate) fn is_temporary_name(path: &Path) -> bool {
    temporary_kind(path).is_some()
}

/// `Some(false)` for a temporary's name, `Some(true)` for the name it is created under
/// (`….tmp.init`), `None` for anything else.
fn temporary_kind(path: &Path) -> Option<bool> {
    let name = path.file_name()?.to_str()?;
    let (name, init) = match name.strip_suffix(".init") {
        Some(n) => (n, true),
        None => (name, false),
    };
    let rest = name.strip_prefix('.')?.strip_suffix(".tmp")?;
    let (stem, hex) = rest.rsplit_once(".diskkit-")?;
    let ours = !stem.is_empty()
        && hex.len() == 32
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    ours.then_some(init)
}

/// Remove the temporaries of killed runs in `dir` (once per directory and process): names of
/// diskkit's form, owned by `uid`, that no process holds a lock on.
pub(super) fn clean_once(dir: &Path, uid: u32) {
    let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    {
        let mut cleaned = CLEANED.lock().unwrap_or_else(|e| e.into_inner());
        if !cleaned.get_or_insert_with(HashSet::new).insert(key) {
            return;
        }
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(init) = temporary_kind(&path) else {
            continue;
        };
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let kind = if meta.is_dir() {
            Kind::Dir
        } else if meta.is_file() {
            Kind::File
        } else {
            continue;
        };
        if meta.uid() != uid {
            continue;
        }
        if init
            && meta
                .modified()
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .is_none_or(|age| age < INIT_AGE)
        {
            continue;
        }
        if unlocked(&path) {
            remove_path(&path, kind);
        }
    }
}

/// Whether nobody holds a lock on `path` (its writer is gone). Opened without following a
/// symlink or blocking on a FIFO; the lock taken to find out goes away with the handle.
fn unlocked(path: &Path) -> bool {
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32)
        .open(path);
    let Ok(file): std::io::Result<File> = file else {
        return false;
    };
    rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_diskkit_temporary_names_match() {
        let hex = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            temporary_kind(Path::new(&format!("/d/.disk.asif.diskkit-{hex}.tmp"))),
            Some(false)
        );
        assert_eq!(
            temporary_kind(Path::new(&format!(".x.diskkit-{hex}.tmp.init"))),
            Some(true)
        );
        for other in [
            format!("disk.asif.diskkit-{hex}.tmp"),
            format!(".disk.asif.diskkit-{hex}.tmp~"),
            format!(".disk.asif.diskkit-{}.tmp", &hex[1..]),
            format!(".disk.asif.diskkit-{}.tmp", hex.to_uppercase()),
            format!("..diskkit-{hex}.tmp"),
            ".disk.asif.diskkit-zz23456789abcdef0123456789abcdef.tmp".to_string(),
            "disk.asif".to_string(),
        ] {
            assert_eq!(temporary_kind(Path::new(&other)), None, "{other}");
        }
    }
}
