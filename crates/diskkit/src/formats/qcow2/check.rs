//! The qcow2 consistency check: what the refcounts should be, and how they differ.
//!
//! Like `qemu-img check`, the walk counts a reference for every cluster something uses: the
//! header, the active L1 table and every L2 table and data cluster it reaches, every
//! snapshot's L1 table and what it reaches, the snapshot table, the refcount table and every
//! refcount block; a compressed cluster counts a reference on each host cluster its bytes
//! touch. The counts are then compared with the refcounts stored in the image: a stored
//! refcount below the real use is a corruption (the cluster could be handed out again while
//! in use), one above it a leak. The copied flag of the active tables' entries must be set
//! exactly when the refcount is 1 (an entry written in place while shared would change a
//! snapshot). Offsets past the end of the file, unaligned offsets, reserved bits, and data
//! clusters that are also metadata are corruptions too.
//!
//! Memory is bounded: three small counters per cluster of the file (at most
//! [`MAX_CHECK_CLUSTERS`] clusters), one table at a time, and the ranges persistent bitmaps
//! use (listed first, at most one per cluster of the file). The work is bounded too: the
//! tables read in one walk may not exceed a budget derived from the file size, so hostile
//! images whose tables all point at each other end with an error instead of running for hours.
//!
//! Repair (`repair.rs`) rebuilds the refcount structure from these counts.

use super::bitmaps;
use super::entry::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use super::header::{Header, MAX_L1_BYTES};
use super::refcount::read_entry;
pub(super) use super::report::{CheckReport, Problem, ProblemKind, Repair};
use super::snapshots::{self, SnapshotL1};
use crate::error::{Error, Result};
use crate::storage::Storage;

/// The largest file (in clusters) the check handles: 5 bytes of counters per cluster, so at
/// most 160 MiB of memory (a 2 TiB file with 64 KiB clusters).
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 25;
/// Problems kept in a report (the counts go on).
const MAX_PROBLEMS: usize = 10_000;
/// Table entries one repair rewrites at most.
const MAX_FIXES: usize = 1 << 20;
/// Bits that must be zero in an L1 entry.
const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Bits that must be zero in a standard L2 entry (version 3: bit 0 is the zero flag).
const L2_RESERVED_V3: u64 = 0x3f00_0000_0000_01fe;
const L2_RESERVED_V2: u64 = 0x3f00_0000_0000_01ff;
/// Reserved bits of a refcount table entry.
const REFT_RESERVED: u64 = 0x1ff;

/// What a cluster is used for (bits; a cluster may have several, which is the problem).
pub(super) const USE_METADATA: u8 = 1;
pub(super) const USE_REFCOUNTS: u8 = 2;
pub(super) const USE_DATA: u8 = 4;
pub(super) const USE_COMPRESSED: u8 = 8;

/// A table entry a repair rewrites: the file offset of the 8-byte entry and its new value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Fix {
    pub(super) at: u64,
    pub(super) raw: u64,
}

/// One walk over an image's metadata.
pub(super) struct Walk<'a> {
    storage: &'a dyn Storage,
    pub(super) h: &'a Header,
    pub(super) cs: u64,
    pub(super) file_len: u64,
    /// Clusters the file covers (the last one may be partial).
    pub(super) file_clusters: u64,
    /// References counted per cluster (saturating).
    pub(super) counts: Vec<u16>,
    /// `USE_*` bits per cluster.
    pub(super) uses: Vec<u8>,
    /// Stored refcounts per cluster (saturating), filled by `compare`.
    pub(super) stored: Vec<u16>,
    /// The refcount table entries as read (block offsets; 0 for none or unusable).
    blocks: Vec<u64>,
    /// Clusters of the current refcount table and blocks (counted once each).
    pub(super) old_refcount_clusters: Vec<u64>,
    pub(super) report: CheckReport,
    /// Entries a repair should rewrite (structure: offsets, reserved bits, overlaps).
    pub(super) fixes: Vec<Fix>,
    /// Copied-flag changes, against the refcounts `copied_pass` was given.
    pub(super) copied_fixes: Vec<Fix>,
    /// The refcount structure itself is broken: only a rebuild repairs it.
    pub(super) refcounts_broken: bool,
    /// The first cluster with more references than a refcount (or a counter) can hold: its
    /// count stopped at the largest value, so a rebuild from the counts would be too low.
    pub(super) overflow: Option<u64>,
    budget: u64,
    active_l1: Vec<u64>,
}

fn be64(b: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[8 * i..8 * i + 8]);
    u64::from_be_bytes(w)
}

impl<'a> Walk<'a> {
    /// Set up a walk; refuses files with more than [`MAX_CHECK_CLUSTERS`] clusters.
    pub(super) fn new(storage: &'a dyn Storage, h: &'a Header, file_len: u64) -> Result<Walk<'a>> {
        let cs = 1u64 << h.cluster_bits;
        let file_clusters = file_len.div_ceil(cs);
        if file_clusters > MAX_CHECK_CLUSTERS {
            return Err(Error::unsupported(format!(
                "checking a qcow2 file of {file_clusters} clusters (at most {MAX_CHECK_CLUSTERS}; \
                 the counters take 5 bytes per cluster)"
            )));
        }
        // One more: references may reach up to one cluster past the end of the file.
        let n = (file_clusters + 1) as usize;
        Ok(Walk {
            storage,
            h,
            cs,
            file_len,
            file_clusters,
            counts: vec![0; n],
            uses: vec![0; n],
            stored: Vec::new(),
            blocks: Vec::new(),
            old_refcount_clusters: Vec::new(),
            report: CheckReport {
                cluster_size: cs,
                total_clusters: h.size.div_ceil(cs),
                dirty: h.incompatible & super::header::INCOMPAT_DIRTY != 0,
                corrupt: h.incompatible & super::header::INCOMPAT_CORRUPT != 0,
                ..CheckReport::default()
            },
            fixes: Vec::new(),
            copied_fixes: Vec::new(),
            refcounts_broken: false,
            overflow: None,
            budget: (4u64 << 20).saturating_add(file_len.saturating_mul(16)),
            active_l1: Vec::new(),
        })
    }

    fn problem(&mut self, kind: ProblemKind, offset: u64, message: String) {
        if kind == ProblemKind::Leak {
            self.report.leaks += 1;
        } else {
            self.report.corruptions += 1;
        }
        if self.report.problems.len() < MAX_PROBLEMS {
            self.report.problems.push(Problem {
                kind,
                offset,
                message,
            });
        } else {
            self.report.problems_omitted += 1;
        }
    }

    fn fix(&mut self, at: u64, raw: u64) {
        if self.fixes.len() < MAX_FIXES {
            self.fixes.push(Fix { at, raw });
        }
    }

    /// The largest value a stored refcount can hold (and the counters, which saturate).
    fn refcount_max(&self) -> u64 {
        let width_max = if self.h.refcount_order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.h.refcount_order)) - 1
        };
        width_max.min(u64::from(u16::MAX))
    }

    /// Read `len` bytes at `offset`, zero-filled past the end of the file, charging the
    /// walk's budget.
    fn read_table(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        if len > self.budget {
            return Err(Error::corrupt(format!(
                "qcow2 tables reference more metadata than the file could hold (at {offset:#x}); \
                 refusing to walk further"
            )));
        }
        self.budget -= len;
        let mut buf = vec![0u8; len as usize];
        let avail = self.file_len.saturating_sub(offset).min(len) as usize;
        if avail > 0 {
            self.storage.read_at(&mut buf[..avail], offset)?;
        }
        Ok(buf)
    }

    /// Count one reference to every cluster `[offset, offset + size)` touches. Returns false
    /// (a corruption) when the range reaches a cluster or more past the end of the file.
    fn count(&mut self, offset: u64, size: u64, use_bit: u8, what: &str) -> bool {
        if size == 0 {
            return true;
        }
        let end = match offset.checked_add(size) {
            Some(e) if e < self.file_len.saturating_add(self.cs) => e,
            _ => {
                self.problem(
                    ProblemKind::BeyondEnd,
                    offset,
                    format!(
                        "{what} at {offset:#x} ({size} bytes) reaches past the end of the file ({} bytes)",
                        self.file_len
                    ),
                );
                return false;
            }
        };
        let max = self.refcount_max();
        for c in offset / self.cs..=(end - 1) / self.cs {
            let Some(n) = self.counts.get_mut(c as usize) else {
                continue;
            };
            if u64::from(*n) >= max {
                self.overflow.get_or_insert(c);
                self.problem(
                    ProblemKind::Overflow,
                    c * self.cs,
                    format!(
                        "cluster {c} has more references than the {}-bit refcounts can hold",
                        1u32 << self.h.refcount_order.min(6)
                    ),
                );
                continue;
            }
            *n += 1;
            self.uses[c as usize] |= use_bit;
        }
        true
    }

    /// Count everything: header, active L1, snapshots, snapshot table, refcount structure.
    pub(super) fn count_all(&mut self) -> Result<()> {
        let cs = self.cs;
        let h = self.h;
        self.count(0, cs, USE_METADATA, "the header");
        self.count(h.l1_table_offset, h.l1_size * 8, USE_METADATA, "the L1 table");
        let l1_bytes = self.read_table(h.l1_table_offset, h.l1_size * 8)?;
        self.active_l1 = (0..h.l1_size as usize).map(|i| be64(&l1_bytes, i)).collect();
        let l1 = std::mem::take(&mut self.active_l1);
        self.walk_l1(h.l1_table_offset, &l1, None)?;
        self.active_l1 = l1;
        let (snaps, table_len) = snapshots::read_table(
            self.storage,
            h.snapshots_offset,
            h.nb_snapshots,
            cs,
            self.file_len,
        )?;
        for s in &snaps {
            self.walk_snapshot(s)?;
        }
        self.count(h.snapshots_offset, table_len, USE_METADATA, "the snapshot table");
        self.count_bitmaps();
        self.count_refcount_structure()
    }

    /// Persistent bitmaps, when the autoclear bit vouches for them (QEMU ignores them
    /// otherwise). A malformed bitmap directory is a check error.
    fn count_bitmaps(&mut self) {
        let h = self.h;
        if h.version != 3 || h.autoclear & 1 == 0 {
            return;
        }
        let Some((_, at, ext)) = h.extensions.iter().find(|(t, _, _)| *t == bitmaps::EXT_BITMAPS) else {
            return;
        };
        let (cs, file_len) = (self.cs, self.file_len);
        let mut read = |off: u64, len: u64| self.read_table(off, len);
        match bitmaps::ranges(ext, cs, file_len, &mut read) {
            Ok(list) => {
                for (off, len, what) in list {
                    self.count(off, len, USE_METADATA, what);
                }
            }
            Err(e) => {
                self.report.check_errors += 1;
                if self.report.problems.len() < MAX_PROBLEMS {
                    self.report.problems.push(Problem {
                        kind: ProblemKind::Unreadable,
                        offset: *at,
                        message: format!("persistent bitmaps could not be checked: {e}"),
                    });
                }
            }
        }
    }

    fn walk_snapshot(&mut self, s: &SnapshotL1) -> Result<()> {
        let at = s.l1_offset;
        if at % self.cs != 0 {
            self.problem(
                ProblemKind::Unaligned,
                at,
                format!("snapshot {}: L1 table at {at:#x} is not cluster aligned", s.label),
            );
            return Ok(());
        }
        if s.l1_size * 8 > MAX_L1_BYTES {
            self.problem(
                ProblemKind::BeyondEnd,
                at,
                format!(
                    "snapshot {}: L1 table of {} entries is too large",
                    s.label, s.l1_size
                ),
            );
            return Ok(());
        }
        if !self.count(at, s.l1_size * 8, USE_METADATA, "a snapshot L1 table") {
            self.report.check_errors += 1;
            return Ok(());
        }
        let bytes = self.read_table(at, s.l1_size * 8)?;
        let l1: Vec<u64> = (0..s.l1_size as usize).map(|i| be64(&bytes, i)).collect();
        self.walk_l1(at, &l1, Some(&s.label))
    }

    /// Count the L2 tables and clusters an L1 table reaches. `snapshot` is `None` for the
    /// active table, whose bad entries are queued for repair and whose clusters are counted
    /// as allocated.
    fn walk_l1(&mut self, l1_offset: u64, l1: &[u64], snapshot: Option<&str>) -> Result<()> {
        let cs = self.cs;
        let active = snapshot.is_none();
        let whose = snapshot.map_or_else(|| "active".to_string(), |s| format!("snapshot {s}"));
        for (i, &e) in l1.iter().enumerate() {
            let at = l1_offset + 8 * i as u64;
            let l2 = e & OFFSET_MASK;
            if e & L1_RESERVED != 0 {
                self.problem(
                    ProblemKind::ReservedBits,
                    at,
                    format!("{whose} L1 entry {i} ({e:#018x}) has reserved bits set"),
                );
                if active {
                    self.fix(at, e & !L1_RESERVED);
                }
            }
            if l2 == 0 {
                continue;
            }
            let counted = self.count(l2, cs, USE_METADATA, "an L2 table");
            if l2 % cs != 0 {
                self.problem(
                    ProblemKind::Unaligned,
                    l2,
                    format!("{whose} L1 entry {i}: L2 table at {l2:#x} is not cluster aligned"),
                );
                if active {
                    self.fix(at, 0);
                }
                continue;
            }
            if !counted {
                if active {
                    self.fix(at, 0);
                }
                continue;
            }
            let bytes = self.read_table(l2, cs)?;
            let per = (cs / 8) as usize;
            // Fragmentation is judged within each L2 table, as QEMU does.
            let mut next_contiguous = 0u64;
            for j in 0..per {
                let raw = be64(&bytes, j);
                if raw == 0 {
                    continue;
                }
                let guest = (i as u64 * per as u64 + j as u64).saturating_mul(cs);
                let entry_at = l2 + 8 * j as u64;
                self.walk_l2_entry(raw, entry_at, guest, active, &whose, &mut next_contiguous);
            }
        }
        Ok(())
    }

    fn walk_l2_entry(
        &mut self,
        raw: u64,
        at: u64,
        guest: u64,
        active: bool,
        whose: &str,
        next_contiguous: &mut u64,
    ) {
        let cs = self.cs;
        let cb = self.h.cluster_bits;
        let v3 = self.h.version == 3;
        let zero_entry = if v3 { ZERO } else { 0 };
        if raw & COMPRESSED != 0 {
            let x = 62 - (cb - 8);
            let host = raw & ((1u64 << x) - 1);
            let sectors = ((raw >> x) & ((1u64 << (cb - 8)) - 1)) + 1;
            let len = (sectors * 512).saturating_sub(host & 511);
            if raw & COPIED != 0 {
                self.problem(
                    ProblemKind::CopiedFlag,
                    host,
                    format!("{whose} L2 entry for guest offset {guest:#x}: compressed cluster at {host:#x} has the copied flag"),
                );
                if active {
                    self.fix(at, raw & !COPIED);
                }
            }
            if !self.count(host, len, USE_COMPRESSED, "a compressed cluster") && active {
                self.fix(at, zero_entry);
            }
            if active {
                // Compressed clusters count as fragmented, as in QEMU (they are read by sectors).
                self.report.allocated_clusters += 1;
                self.report.compressed_clusters += 1;
                self.report.fragmented_clusters += 1;
            }
            return;
        }
        let reserved = if v3 { L2_RESERVED_V3 } else { L2_RESERVED_V2 };
        let mut raw = raw;
        if raw & reserved != 0 {
            self.problem(
                ProblemKind::ReservedBits,
                at,
                format!("{whose} L2 entry for guest offset {guest:#x} ({raw:#018x}) has reserved bits set"),
            );
            raw &= !reserved;
            if active {
                self.fix(at, raw);
            }
        }
        let host = raw & OFFSET_MASK;
        if host == 0 {
            return;
        }
        let counted = self.count(host, cs, USE_DATA, "a data cluster");
        if active {
            self.report.allocated_clusters += 1;
            if *next_contiguous != 0 && host != *next_contiguous {
                self.report.fragmented_clusters += 1;
            }
            *next_contiguous = host.saturating_add(cs);
        }
        if host % cs != 0 {
            self.problem(
                ProblemKind::Unaligned,
                host,
                format!("{whose} L2 entry for guest offset {guest:#x}: cluster at {host:#x} is not aligned"),
            );
            if active {
                self.fix(at, zero_entry);
            }
            return;
        }
        if !counted && active {
            self.fix(at, zero_entry);
        }
    }

    /// Count the refcount table and blocks, checking each table entry.
    fn count_refcount_structure(&mut self) -> Result<()> {
        let cs = self.cs;
        let h = self.h;
        let table_len = h.refcount_table_clusters * cs;
        if self.count(
            h.refcount_table_offset,
            table_len,
            USE_REFCOUNTS,
            "the refcount table",
        ) {
            let first = h.refcount_table_offset / cs;
            self.old_refcount_clusters
                .extend(first..first + h.refcount_table_clusters);
        }
        let bytes = self.read_table(h.refcount_table_offset, table_len)?;
        let n = (table_len / 8) as usize;
        self.blocks = vec![0; n];
        for i in 0..n {
            let e = be64(&bytes, i);
            let at = h.refcount_table_offset + 8 * i as u64;
            if e & REFT_RESERVED != 0 {
                self.problem(
                    ProblemKind::RefcountStructure,
                    at,
                    format!("refcount table entry {i} ({e:#018x}) has reserved bits set"),
                );
                self.refcounts_broken = true;
                continue;
            }
            if e == 0 {
                continue;
            }
            if e % cs != 0 {
                self.problem(
                    ProblemKind::RefcountStructure,
                    e,
                    format!("refcount block {i} at {e:#x} is not cluster aligned"),
                );
                self.refcounts_broken = true;
                continue;
            }
            let c = e / cs;
            if c >= self.file_clusters {
                self.problem(
                    ProblemKind::RefcountStructure,
                    e,
                    format!("refcount block {i} at {e:#x} is past the end of the file"),
                );
                self.refcounts_broken = true;
                continue;
            }
            self.count(e, cs, USE_REFCOUNTS, "a refcount block");
            self.old_refcount_clusters.push(c);
            // The block is in force even if shared: its refcounts are the stored ones.
            self.blocks[i] = e;
            let n = self.counts.get(c as usize).copied().unwrap_or(0);
            if n != 1 {
                self.problem(
                    ProblemKind::RefcountStructure,
                    e,
                    format!("refcount block {i} at {e:#x} is also used for something else ({n} references)"),
                );
                self.refcounts_broken = true;
            }
        }
        Ok(())
    }

    /// Read the stored refcounts and compare them with the counts; sets the image end.
    pub(super) fn compare(&mut self) -> Result<()> {
        let cs = self.cs;
        let order = self.h.refcount_order;
        let per_block = (cs * 8) >> order;
        // The slot past the last cluster of the file only counts when something reaches it
        // (as QEMU grows its table only then).
        let n = self.counts.len() as u64;
        let compared = if self.counts.last().is_some_and(|&c| c > 0) {
            n
        } else {
            n - 1
        };
        self.stored = vec![0; n as usize];
        let mut highest = None;
        let mut block: Option<(u64, Vec<u8>)> = None;
        for c in 0..compared {
            let bi = c / per_block;
            let off = self.blocks.get(bi as usize).copied().unwrap_or(0);
            let stored = if off == 0 {
                0
            } else {
                if block.as_ref().is_none_or(|(b, _)| *b != bi) {
                    let mut bytes = vec![0u8; cs as usize];
                    let avail = self.file_len.saturating_sub(off).min(cs) as usize;
                    self.storage.read_at(&mut bytes[..avail], off)?;
                    block = Some((bi, bytes));
                }
                let (_, bytes) = block.as_ref().expect("the block was just loaded");
                read_entry(bytes, order, c % per_block)
            };
            self.stored[c as usize] = stored.min(u64::from(u16::MAX)) as u16;
            let counted = u64::from(self.counts[c as usize]);
            if stored > 0 || counted > 0 {
                highest = Some(c);
            }
            if stored < counted {
                self.problem(
                    ProblemKind::RefcountTooLow,
                    c * cs,
                    format!(
                        "cluster {c} (at {:#x}) refcount={stored} reference={counted}",
                        c * cs
                    ),
                );
            } else if stored > counted {
                self.problem(
                    ProblemKind::Leak,
                    c * cs,
                    format!(
                        "cluster {c} (at {:#x}) refcount={stored} reference={counted}: leaked",
                        c * cs
                    ),
                );
            }
        }
        self.report.image_end_offset = highest.map_or(0, |c| (c + 1) * cs);
        Ok(())
    }

    /// Check the active tables' copied flags against `refcounts` (the stored ones, or the
    /// ones a repair just wrote), queueing changes in `copied_fixes`; also find data clusters
    /// that are metadata too, queueing those entries (in `fixes`) to read as zeroes.
    pub(super) fn copied_pass(&mut self, refcounts: &[u16]) -> Result<()> {
        let cs = self.cs;
        let zero_entry = if self.h.version == 3 { ZERO } else { 0 };
        let l1 = std::mem::take(&mut self.active_l1);
        let refcount = |c: u64| refcounts.get(c as usize).copied().unwrap_or(0);
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            let at = self.h.l1_table_offset + 8 * i as u64;
            let r = refcount(l2 / cs);
            if (r == 1) != (e & COPIED != 0) {
                self.problem(
                    ProblemKind::CopiedFlag,
                    l2,
                    format!("L1 entry {i} ({e:#018x}): copied flag wrong for an L2 table with refcount {r}"),
                );
                self.copied_fixes.push(Fix {
                    at,
                    raw: (e & !L1_RESERVED & !COPIED) | if r == 1 { COPIED } else { 0 },
                });
            }
            if l2 % cs != 0 || l2 >= self.file_len {
                continue;
            }
            let bytes = self.read_table(l2, cs)?;
            for j in 0..(cs / 8) as usize {
                let raw = be64(&bytes, j);
                let host = raw & OFFSET_MASK;
                if raw & COMPRESSED != 0 || host == 0 {
                    continue;
                }
                let at = l2 + 8 * j as u64;
                let guest = ((i * (cs / 8) as usize + j) as u64).saturating_mul(cs);
                let c = host / cs;
                let inside = host % cs == 0 && host < self.file_len;
                if inside && self.uses.get(c as usize).is_some_and(|u| u & USE_METADATA != 0) {
                    self.problem(
                        ProblemKind::Overlap,
                        host,
                        format!("L2 entry for guest offset {guest:#x} maps cluster {host:#x}, which is qcow2 metadata"),
                    );
                    self.fix(at, zero_entry);
                    continue;
                }
                let r = refcount(c);
                if (r == 1) != (raw & COPIED != 0) {
                    self.problem(
                        ProblemKind::CopiedFlag,
                        host,
                        format!("L2 entry for guest offset {guest:#x} ({raw:#018x}): copied flag wrong for a cluster with refcount {r}"),
                    );
                    if self.copied_fixes.len() < MAX_FIXES {
                        self.copied_fixes.push(Fix {
                            at,
                            raw: (raw & !COPIED) | if r == 1 { COPIED } else { 0 },
                        });
                    }
                }
            }
        }
        self.active_l1 = l1;
        Ok(())
    }
}

/// Check `storage` without changing it.
pub(super) fn walk<'a>(storage: &'a dyn Storage, h: &'a Header, file_len: u64) -> Result<Walk<'a>> {
    let mut w = Walk::new(storage, h, file_len)?;
    w.count_all()?;
    w.compare()?;
    let stored = std::mem::take(&mut w.stored);
    w.copied_pass(&stored)?;
    w.stored = stored;
    Ok(w)
}
