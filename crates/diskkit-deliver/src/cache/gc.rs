//! `gc`: remove the least recently used unreferenced entries until the limits hold.

use std::fs;
use std::time::Duration;

use serde::Serialize;

use super::lock::Mode;
use super::{check_name, now_secs, Cache};
use crate::error::Result;
use crate::fsutil;

/// The limits `gc` enforces. Without any, it only repairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcOptions {
    /// The cache may use at most this many bytes of disk.
    pub max_size: Option<u64>,
    /// The file system should keep at least this many bytes free.
    pub min_free: Option<u64>,
    /// Entries (and partial downloads) unused for longer than this are removed.
    pub older_than: Option<Duration>,
}

/// What `gc` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Entries removed, oldest use first.
    pub removed: Vec<String>,
    /// Partial downloads removed (by ID).
    pub partials_removed: Vec<String>,
    /// Bytes freed.
    pub freed: u64,
    /// Entries that would have been removed but are referenced.
    pub referenced: Vec<String>,
    /// Entries that would have been removed but another process holds right now (being
    /// fetched, removed, or given an instance).
    pub busy: Vec<String>,
    /// Bytes the cache uses afterwards.
    pub size: u64,
    /// Free bytes on the file system afterwards.
    pub free: u64,
    /// Whether every limit holds afterwards.
    pub satisfied: bool,
}

struct Candidate {
    id: String,
    partial: bool,
    size: u64,
    last_use: u64,
}

impl Cache {
    /// Repair the cache, then remove unreferenced entries, least recently used first, until
    /// the limits hold: entries older than `older_than` always go; others go while the cache
    /// is larger than `max_size` or the file system has less than `min_free` free. Entries
    /// with a live reference, and entries another process holds (a fetch, an instance being
    /// made), are never removed.
    pub fn gc(&self, options: &GcOptions) -> Result<GcReport> {
        self.repair()?;
        let mut report = GcReport::default();
        let mut candidates = Vec::new();
        let mut total = 0u64;
        for e in self.list()? {
            total += e.size;
            if !e.references.is_empty() {
                if options != &GcOptions::default() {
                    report.referenced.push(e.record.id.clone());
                }
                continue;
            }
            candidates.push(Candidate {
                id: e.record.id,
                partial: false,
                size: e.size,
                last_use: e.last_use,
            });
        }
        if let Ok(rd) = fs::read_dir(self.root.join("partial")) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(id) = name.strip_suffix(".part") else {
                    continue;
                };
                if check_name("cache ID", id).is_err() {
                    continue;
                }
                let size = fsutil::disk_usage(&e.path()) + fsutil::disk_usage(&self.partial_state_path(id));
                let last_use = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_secs());
                total += size;
                candidates.push(Candidate {
                    id: id.to_string(),
                    partial: true,
                    size,
                    last_use,
                });
            }
        }
        candidates.sort_by_key(|c| c.last_use);
        let now = now_secs();
        let mut free = self.free_space()?;
        for c in candidates {
            let too_old = options
                .older_than
                .is_some_and(|d| now.saturating_sub(c.last_use) > d.as_secs());
            let too_big = options.max_size.is_some_and(|m| total > m);
            let too_full = options.min_free.is_some_and(|m| free < m);
            if !(too_old || too_big || too_full) {
                continue;
            }
            let Some(lock) = self.lock(&c.id, Mode::Exclusive, false)? else {
                report.busy.push(c.id);
                continue;
            };
            if c.partial {
                if self.entry_dir(&c.id).exists() {
                    // Finished meanwhile; the partial file is a leftover.
                    self.remove_partial(&c.id);
                    continue;
                }
                self.remove_partial(&c.id);
                let _ = fs::remove_file(self.failed_path(&c.id));
                lock.unlink();
                total = total.saturating_sub(c.size);
                report.freed += c.size;
                report.partials_removed.push(c.id);
            } else {
                if self.entry(&c.id)?.is_none() {
                    continue;
                }
                // References are final while the lock is held exclusively.
                let live = self.release_dead_references(&c.id)?;
                if !live.is_empty() {
                    report.referenced.push(c.id);
                    continue;
                }
                let freed = self.remove_locked(&c.id, &lock)?;
                total = total.saturating_sub(freed);
                report.freed += freed;
                report.removed.push(c.id);
            }
            drop(lock);
            free = self.free_space()?;
        }
        report.size = total;
        report.free = free;
        report.satisfied =
            options.max_size.is_none_or(|m| total <= m) && options.min_free.is_none_or(|m| free >= m);
        Ok(report)
    }
}
