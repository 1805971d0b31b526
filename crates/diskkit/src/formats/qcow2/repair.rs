//! Repairing a qcow2 image from the counts of the consistency check.
//!
//! # Order of writes (crash safety)
//!
//! 1. (`Repair::All`) Table entries that point past the end of the file, are unaligned or
//!    point at metadata are made to read as zeroes (version 3: the zero flag; version 2:
//!    unallocated), reserved bits are cleared; sync. These writes only drop references, so
//!    the old refcounts can at worst be too high (leaks).
//! 2. The counts are taken again, and a whole new refcount structure (blocks, then the
//!    table) is written *past the end of the file*, where nothing the old header names can
//!    be; sync. The old structure stays valid and in use.
//! 3. The header is pointed at the new table in one 12-byte write; sync. This is the switch:
//!    before it the old refcounts are in force, after it the new ones.
//! 4. Clusters that are free now (leaks, the old structure) are punched out of the file.
//! 5. (`Repair::All`) Copied flags are set where the refcount is 1 and cleared elsewhere; sync.
//! 6. The check runs again. The dirty bit is cleared when it finds no corruption, the corrupt
//!    bit when it finds nothing at all; sync.

use super::check::{self, CheckReport, Fix, Repair, Walk};
use super::header::{
    read_head, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, MAX_REFTABLE_BYTES, OFF_INCOMPATIBLE, OFF_REFTABLE,
};
use super::refcount::write_entry;
use crate::error::{Error, ErrorKind, Result};
use crate::storage::Storage;

fn read_header(storage: &dyn Storage) -> Result<(Header, u64)> {
    let (head, file_len) = read_head(storage)?;
    Ok((Header::parse_for_check(&head, file_len)?, file_len))
}

/// Check a qcow2 image on `storage` and repair what `repair` allows. See the module docs of
/// `check.rs` for what is checked and of `repair.rs` for the order of writes.
pub(super) fn run(storage: &dyn Storage, repair: Repair) -> Result<CheckReport> {
    let (h, file_len) = read_header(storage)?;
    let first = check::walk(storage, &h, file_len)?;
    if repair == Repair::None {
        return Ok(first.report);
    }
    if storage.read_only() {
        return Err(Error::new(
            ErrorKind::ReadOnly,
            "repairing a qcow2 image needs it opened for writing",
        ));
    }
    let mut changes = Vec::new();
    let mut corruptions_fixed = 0;
    let mut leaks_fixed = 0;
    // 1. Entries that cannot stay.
    if repair == Repair::All && !first.fixes.is_empty() {
        let n = write_fixes(storage, &first.fixes, file_len)?;
        storage.sync()?;
        corruptions_fixed += n;
        changes.push(format!(
            "rewrote {n} L1/L2 entries that pointed outside the file, were unaligned, had reserved \
             bits or mapped metadata (they now read as zeroes or lost the bad bits)"
        ));
    }
    let found = first.report;
    // 2.-4. A new refcount structure, if the stored refcounts are not what they should be.
    let (h, file_len) = read_header(storage)?;
    let mut w = Walk::new(storage, &h, file_len)?;
    w.count_all()?;
    w.compare()?;
    let mut target: Vec<u16> = w
        .counts
        .iter()
        .zip(&w.stored)
        .map(|(&counted, &stored)| match repair {
            Repair::All => counted,
            _ => counted.min(stored),
        })
        .collect();
    let differs = target.iter().zip(&w.stored).any(|(t, s)| t != s);
    let rebuild = differs || (repair == Repair::All && w.refcounts_broken);
    if rebuild {
        for (c, (&counted, &stored)) in w.counts.iter().zip(&w.stored).enumerate() {
            if stored > counted {
                leaks_fixed += 1;
            } else if stored < counted && target[c] == counted {
                corruptions_fixed += 1;
            }
        }
        let at = rebuild_refcounts(storage, &w, &mut target)?;
        changes.push(format!(
            "wrote a new refcount structure (table at {at:#x}) and switched the header to it; \
             freed {leaks_fixed} leaked clusters and the old refcount structure"
        ));
        if repair == Repair::All && corruptions_fixed > 0 {
            changes.push(format!(
                "raised the refcounts of {corruptions_fixed} clusters that were in use"
            ));
        }
    }
    // 5. Copied flags, against the refcounts now in force.
    if repair == Repair::All {
        let refs = if rebuild { &target } else { &w.stored };
        let refs = refs.clone();
        w.copied_fixes.clear();
        w.fixes.clear();
        w.copied_pass(&refs)?;
        // Structural fixes first: for the same entry, the first one queued wins.
        let mut all = std::mem::take(&mut w.fixes);
        all.append(&mut w.copied_fixes);
        if !all.is_empty() {
            let n = write_fixes(storage, &all, storage.len()?)?;
            storage.sync()?;
            corruptions_fixed += n;
            changes.push(format!("corrected the copied flag of {n} L1/L2 entries"));
        }
    }
    drop(w);
    // 6. Check again; clear the header bits the result allows.
    let (h, file_len) = read_header(storage)?;
    let mut after = check::walk(storage, &h, file_len)?.report;
    if h.version == 3 {
        let mut bits = h.incompatible;
        if after.corruptions == 0 && after.check_errors == 0 {
            bits &= !INCOMPAT_DIRTY;
            if after.leaks == 0 {
                bits &= !INCOMPAT_CORRUPT;
            }
        }
        if bits != h.incompatible {
            storage.write_at(&bits.to_be_bytes(), OFF_INCOMPATIBLE)?;
            storage.sync()?;
            if h.incompatible & INCOMPAT_DIRTY != 0 && bits & INCOMPAT_DIRTY == 0 {
                changes.push("cleared the dirty bit".into());
            }
            if h.incompatible & INCOMPAT_CORRUPT != 0 && bits & INCOMPAT_CORRUPT == 0 {
                changes.push("cleared the corrupt bit".into());
            }
        }
        after.dirty = bits & INCOMPAT_DIRTY != 0;
        after.corrupt = bits & INCOMPAT_CORRUPT != 0;
    }
    after.remaining = std::mem::take(&mut after.problems);
    after.problems = found.problems;
    after.problems_omitted = found.problems_omitted;
    after.corruptions_fixed = corruptions_fixed;
    after.leaks_fixed = leaks_fixed;
    after.changes = changes;
    Ok(after)
}

/// Write each fix (8-byte big-endian entries). Returns how many were written.
fn write_fixes(storage: &dyn Storage, fixes: &[Fix], file_len: u64) -> Result<u64> {
    let mut fixes = fixes.to_vec();
    fixes.sort_by_key(|f| f.at);
    fixes.dedup_by_key(|f| f.at);
    let mut n = 0;
    for f in &fixes {
        if f.at.checked_add(8).is_none_or(|e| e > file_len) {
            continue;
        }
        storage.write_at(&f.raw.to_be_bytes(), f.at)?;
        n += 1;
    }
    Ok(n)
}

/// Steps 2 to 4: write refcount blocks and a table holding `target` (minus the old
/// structure, plus the new one) past the end of the file, switch the header to them, and
/// punch out clusters nothing uses any more. Returns the new table's offset.
fn rebuild_refcounts(storage: &dyn Storage, w: &Walk<'_>, target: &mut Vec<u16>) -> Result<u64> {
    let cs = w.cs;
    let order = w.h.refcount_order;
    let per_block = (cs * 8) >> order;
    for &c in &w.old_refcount_clusters {
        if let Some(t) = target.get_mut(c as usize) {
            *t = t.saturating_sub(1);
        }
    }
    // The counters stop at the largest refcount the image can hold (`Walk::count`), so an
    // overflow shows in the walk, not in the counts; 65535 may also be a counter that stopped.
    let too_many = w
        .overflow
        .or_else(|| target.iter().position(|&t| t == u16::MAX).map(|c| c as u64));
    if let Some(c) = too_many {
        return Err(Error::unsupported(format!(
            "cluster {c} (at {:#x}) has more references than the image's refcounts can hold; \
             diskkit cannot rebuild them",
            c * cs
        )));
    }
    // What nothing but the old refcount structure uses is free after the switch.
    let mut in_use = w.counts.clone();
    for &c in &w.old_refcount_clusters {
        if let Some(t) = in_use.get_mut(c as usize) {
            *t = t.saturating_sub(1);
        }
    }
    let used_end = target
        .iter()
        .zip(&in_use)
        .rposition(|(&t, &u)| t > 0 || u > 0)
        .map_or(0, |c| c as u64 + 1);
    let start = used_end.max(w.file_clusters);
    let (mut blocks, mut table) = (0u64, 0u64);
    loop {
        let total = start + blocks + table;
        let nb = total.div_ceil(per_block);
        let nt = (nb * 8).div_ceil(cs);
        if nb == blocks && nt == table {
            break;
        }
        (blocks, table) = (nb, nt);
    }
    if table * cs > MAX_REFTABLE_BYTES.max(cs) || table > u64::from(u32::MAX) {
        return Err(Error::out_of_bounds(format!(
            "the rebuilt qcow2 refcount table would take {table} clusters"
        )));
    }
    let total = start + blocks + table;
    target.resize(total as usize, 0);
    for t in &mut target[start as usize..] {
        *t = 1;
    }
    storage.set_len(total * cs)?;
    let mut bytes = vec![0u8; cs as usize];
    for b in 0..blocks {
        bytes.fill(0);
        let first = b * per_block;
        for c in first..(first + per_block).min(total) {
            let v = u64::from(target[c as usize]);
            if v != 0 {
                write_entry(&mut bytes, order, c - first, v);
            }
        }
        storage.write_at(&bytes, (start + b) * cs)?;
    }
    let table_at = (start + blocks) * cs;
    let mut t = vec![0u8; (table * cs) as usize];
    for b in 0..blocks {
        let off = (start + b) * cs;
        t[8 * b as usize..8 * b as usize + 8].copy_from_slice(&off.to_be_bytes());
    }
    storage.write_at(&t, table_at)?;
    storage.sync()?;
    let mut f = [0u8; 12];
    f[..8].copy_from_slice(&table_at.to_be_bytes());
    f[8..].copy_from_slice(&(table as u32).to_be_bytes());
    storage.write_at(&f, OFF_REFTABLE)?;
    storage.sync()?;
    // Best effort: the refcounts already say these clusters are free; punching only returns
    // their space to the file system.
    for c in 0..w.file_clusters {
        let i = c as usize;
        if in_use[i] == 0 && target[i] == 0 && (w.stored[i] > 0 || w.counts[i] > 0) {
            let len = cs.min(w.file_len - c * cs);
            let _ = storage.punch_hole(c * cs, len);
        }
    }
    Ok(table_at)
}
