//! jbd2 journal recovery, in memory.
//!
//! The same three passes as e2fsck's (and the kernel's) `recovery.c`: SCAN finds the end of
//! the log (checking descriptor, revoke and commit block checksums, v1 `crc32_be` transaction
//! checksums, and commit times to tell a damaged transaction from stale blocks of an older
//! log), REVOKE collects revoke records, REPLAY records, for every logged block not revoked by
//! the same or a later transaction, that its newest copy lives in the journal. A logged block
//! whose tag checksum fails is skipped and the rest of the transaction and later ones still
//! apply; an error part-way through keeps what was replayed before it, as e2fsck's writes
//! would. The result is an overlay the reader consults; the image is never written.

mod superblock;

use std::collections::{BTreeMap, HashMap};

use diskkit::{Error, ErrorKind, Result};

use super::bytes::{be16, be32, be64};
use super::device::Replayed;
use super::file::{BlockMap, RunKind};
use super::inode::{FileType, Inode};
use super::Fs;
use crate::crc::{crc32c, Crc32Be};
use superblock::{
    JournalSuperblock, COMPAT_CHECKSUM, INCOMPAT_64BIT, INCOMPAT_ASYNC_COMMIT, INCOMPAT_CSUM_V3,
    INCOMPAT_FAST_COMMIT, MIN_JOURNAL_BLOCKS,
};

pub(crate) const JBD2_MAGIC: u32 = 0xC03B_3998;
pub(crate) const BLOCK_DESCRIPTOR: u32 = 1;
pub(crate) const BLOCK_COMMIT: u32 = 2;
pub(crate) const BLOCK_REVOKE: u32 = 5;

const FLAG_ESCAPE: u32 = 1;
const FLAG_SAME_UUID: u32 = 2;
const FLAG_LAST_TAG: u32 = 8;
const HEADER: usize = 12;
const TAIL: usize = 4;
const CRC32_CHKSUM: u8 = 1;
const CRC32_CHKSUM_SIZE: u8 = 4;
const FC_TAG_HEAD: u16 = 9;

/// What recovery did.
#[derive(Debug, Default)]
pub(crate) struct Recovery {
    pub(crate) overlay: BTreeMap<u64, Replayed>,
    /// Transactions replayed.
    pub(crate) transactions: u32,
    /// Problems e2fsck would also have reported (recovery went on or stopped early).
    pub(crate) warnings: Vec<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Scan,
    Revoke,
    Replay,
}

fn tid_gt(x: u32, y: u32) -> bool {
    (x.wrapping_sub(y) as i32) > 0
}

fn tid_geq(x: u32, y: u32) -> bool {
    (x.wrapping_sub(y) as i32) >= 0
}

/// The journal as e2fsck opens it.
struct Journal<'a> {
    fs: &'a Fs,
    sb: JournalSuperblock,
    map: BlockMap,
    total_len: u32,
    first: u32,
    wrap_last: u32,
    bs: usize,
}

impl Journal<'_> {
    /// Filesystem block of journal block `n`.
    fn bmap(&mut self, n: u32) -> Result<u64> {
        if n >= self.total_len {
            return Err(Error::corrupt(format!(
                "journal block {n} is past the journal's end ({} blocks)",
                self.total_len
            )));
        }
        let run = self.map.find(self.fs, u64::from(n))?;
        Ok(match run.kind {
            RunKind::Data(p) => p,
            // e2fsck maps a hole in the journal to block 0 and reads that.
            RunKind::Hole | RunKind::Unwritten => 0,
        })
    }

    fn read(&mut self, n: u32) -> Result<(u64, Vec<u8>)> {
        let p = self.bmap(n)?;
        let mut buf = vec![0u8; self.bs];
        self.fs.dev().read_blocks(p, &mut buf)?;
        Ok((p, buf))
    }

    fn wrap(&self, n: u32) -> u32 {
        if n >= self.wrap_last {
            n.wrapping_sub(self.wrap_last.wrapping_sub(self.first))
        } else {
            n
        }
    }

    fn block_csum_ok(&self, b: &[u8]) -> bool {
        if !self.sb.csum_v2or3() {
            return true;
        }
        let mut copy = b.to_vec();
        let n = copy.len();
        let tail = n.saturating_sub(TAIL);
        if let Some(t) = copy.get_mut(tail..) {
            t.fill(0);
        }
        crc32c(self.sb.csum_seed, &copy) == be32(b, tail)
    }

    fn commit_csum_ok(&self, b: &[u8]) -> bool {
        if !self.sb.csum_v2or3() {
            return true;
        }
        let mut copy = b.to_vec();
        copy[16..20].fill(0);
        crc32c(self.sb.csum_seed, &copy) == be32(b, 16)
    }

    fn tag_csum_ok(&self, tag: &[u8], data: &[u8], sequence: u32) -> bool {
        if !self.sb.csum_v2or3() {
            return true;
        }
        let c = crc32c(crc32c(self.sb.csum_seed, &sequence.to_be_bytes()), data);
        if self.sb.has(INCOMPAT_CSUM_V3) {
            be32(tag, 12) == c
        } else {
            u32::from(be16(tag, 4)) == c & 0xFFFF
        }
    }

    /// Tags of a descriptor block: (offset, flags), up to the last-tag flag.
    fn tags(&self, b: &[u8]) -> Vec<(usize, u32)> {
        let tag_bytes = self.sb.tag_bytes();
        let size = if self.sb.csum_v2or3() {
            self.bs.saturating_sub(TAIL)
        } else {
            self.bs
        };
        let mut out = Vec::new();
        let mut p = HEADER;
        while p.saturating_add(tag_bytes) <= size {
            let flags = u32::from(be16(b, p.saturating_add(6)));
            out.push((p, flags));
            p = p.saturating_add(tag_bytes);
            if flags & FLAG_SAME_UUID == 0 {
                p = p.saturating_add(16);
            }
            if flags & FLAG_LAST_TAG != 0 {
                break;
            }
        }
        out
    }

    fn tag_block(&self, b: &[u8], off: usize) -> u64 {
        let lo = u64::from(be32(b, off));
        if self.sb.has(INCOMPAT_64BIT) {
            lo | (u64::from(be32(b, off.saturating_add(8))) << 32)
        } else {
            lo
        }
    }
}

#[derive(Default)]
struct Info {
    end_transaction: u32,
    revoked: HashMap<u64, u32>,
}

impl Fs {
    /// Recover the journal in memory, if it needs it. `Ok(None)`: nothing to replay.
    pub(crate) fn recover_journal(&self) -> Result<Option<Recovery>> {
        let sb = self.sb();
        if sb.journal_inum == 0 {
            return Err(Error::unsupported(
                "the filesystem needs recovery from an external journal device, which is not available here",
            ));
        }
        let mut rec = Recovery::default();
        let mut journal = match self.open_journal() {
            Ok(j) => j,
            Err(e) => {
                // e2fsck would not replay such a journal either (it offers to clear it).
                rec.warnings.push(format!("journal not replayed: {e}"));
                return Ok(Some(rec));
            }
        };
        if journal.sb.start == 0 {
            return Ok(None);
        }
        let mut info = Info::default();
        let mut result = run_pass(&mut journal, &mut info, Pass::Scan, &mut rec);
        if result.is_ok() {
            result = run_pass(&mut journal, &mut info, Pass::Revoke, &mut rec);
        }
        if result.is_ok() {
            result = run_pass(&mut journal, &mut info, Pass::Replay, &mut rec);
        }
        if let Err(e) = result {
            if e.kind() == ErrorKind::Unsupported {
                return Err(e);
            }
            rec.warnings.push(format!("journal recovery stopped early: {e}"));
        }
        Ok(Some(rec))
    }

    fn open_journal(&self) -> Result<Journal<'_>> {
        let sb = self.sb();
        let ino = sb.journal_inum;
        if ino > sb.group_count.saturating_mul(sb.inodes_per_group) {
            return Err(Error::corrupt(format!(
                "journal inode number {ino} is out of range"
            )));
        }
        let bs = sb.block_size();
        let usable = |i: &Inode| {
            i.links != 0
                && i.file_type == FileType::Regular
                && !i.is_encrypted()
                && i.size.checked_div(bs as u64).unwrap_or(0) >= u64::from(MIN_JOURNAL_BLOCKS)
        };
        let inode = match self.inode(ino) {
            Ok(i) if usable(&i) => i,
            first => {
                let backup = self.backup_journal_inode(ino).filter(usable);
                match (backup, first) {
                    (Some(b), _) => b,
                    (None, Err(e)) => return Err(e),
                    (None, Ok(_)) => {
                        return Err(Error::corrupt(format!(
                            "journal inode {ino} is not a usable journal (unused, not a regular file, or under {MIN_JOURNAL_BLOCKS} blocks)"
                        )))
                    }
                }
            }
        };
        let map = BlockMap::new(self, &inode)?;
        let total = u32::try_from(inode.size.checked_div(bs as u64).unwrap_or(0)).unwrap_or(u32::MAX);
        let mut j = Journal {
            fs: self,
            sb: placeholder_sb(),
            map,
            total_len: total,
            first: 0,
            wrap_last: 0,
            bs,
        };
        let (_, b0) = j.read(0)?;
        let jsb = JournalSuperblock::parse(&b0)?;
        if jsb.block_size as usize != bs {
            return Err(Error::corrupt(format!(
                "journal block size {} differs from the filesystem's {bs}",
                jsb.block_size
            )));
        }
        if jsb.maxlen < j.total_len {
            j.total_len = jsb.maxlen;
        } else if jsb.maxlen > j.total_len {
            return Err(Error::corrupt("the journal is shorter than its superblock says"));
        }
        j.first = jsb.first;
        if jsb.has(INCOMPAT_FAST_COMMIT) && jsb.maxlen.saturating_sub(jsb.num_fc_blocks) < MIN_JOURNAL_BLOCKS
        {
            return Err(Error::corrupt("the journal's fast-commit area is too large"));
        }
        // The log wraps at the end of the journal (e2fsprogs 1.47 wraps there with fast
        // commits too).
        j.wrap_last = jsb.maxlen;
        j.sb = jsb;
        Ok(j)
    }

    /// The journal inode e2fsck rebuilds from the superblock's backup copy of `i_block`.
    fn backup_journal_inode(&self, ino: u32) -> Option<Inode> {
        let sb = self.sb();
        if sb.jnl_backup_type != 1 {
            return None;
        }
        let mut block = [0u8; 60];
        for (chunk, v) in block.chunks_exact_mut(4).zip(sb.jnl_blocks.iter()) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        Some(Inode {
            ino,
            mode: 0o100600,
            file_type: FileType::Regular,
            uid: 0,
            gid: 0,
            size: super::bytes::hilo(sb.jnl_blocks[16], sb.jnl_blocks[15]),
            links: 1,
            atime: Default::default(),
            ctime: Default::default(),
            mtime: Default::default(),
            crtime: None,
            flags: 0,
            generation: 0,
            file_acl: 0,
            blocks: 0,
            block,
            xattr_area: Vec::new(),
        })
    }
}

fn placeholder_sb() -> JournalSuperblock {
    // Only a placeholder until the real superblock is read.
    JournalSuperblock {
        block_size: 0,
        maxlen: 0,
        first: 0,
        sequence: 0,
        start: 0,
        compat: 0,
        incompat: 0,
        num_fc_blocks: 0,
        csum_seed: 0,
    }
}

/// One pass over the log, as `do_one_pass` walks it.
fn run_pass(j: &mut Journal<'_>, info: &mut Info, pass: Pass, rec: &mut Recovery) -> Result<()> {
    let mut next_commit = j.sb.sequence;
    let mut next_block = j.sb.start;
    let mut crc32_sum = Crc32Be::new();
    let mut need_check_commit_time = false;
    let mut last_commit_time = 0u64;
    let mut failure: Option<Error> = None;
    // Each iteration consumes at least one log block; a log longer than the journal itself
    // would have to wrap onto blocks already seen with a different sequence number, so this
    // bound is never reached by a valid journal.
    let mut budget = u64::from(j.total_len).saturating_mul(2).saturating_add(16);
    loop {
        budget = budget.saturating_sub(1);
        if budget == 0 {
            return Err(Error::corrupt("the journal log does not end"));
        }
        if pass != Pass::Scan && tid_geq(next_commit, info.end_transaction) {
            break;
        }
        let (_, b) = j.read(next_block)?;
        next_block = j.wrap(next_block.wrapping_add(1));
        if be32(&b, 0) != JBD2_MAGIC {
            break;
        }
        let blocktype = be32(&b, 4);
        let sequence = be32(&b, 8);
        if sequence != next_commit {
            break;
        }
        match blocktype {
            BLOCK_DESCRIPTOR => {
                let csum_size = if j.sb.csum_v2or3() { TAIL } else { 0 };
                if csum_size > 0 && !j.block_csum_ok(&b) {
                    if pass != Pass::Scan {
                        return Err(Error::corrupt(format!(
                            "journal descriptor block {} checksum mismatch",
                            next_block.wrapping_sub(1)
                        )));
                    }
                    need_check_commit_time = true;
                }
                let tags = j.tags(&b);
                if pass != Pass::Replay {
                    if pass == Pass::Scan
                        && j.sb.compat & COMPAT_CHECKSUM != 0
                        && !need_check_commit_time
                        && info.end_transaction == 0
                    {
                        crc32_sum.update(&b);
                        let mut io_failed = false;
                        for _ in 0..tags.len() {
                            let io = next_block;
                            next_block = j.wrap(next_block.wrapping_add(1));
                            match j.read(io) {
                                Ok((_, d)) => crc32_sum.update(&d),
                                Err(_) => {
                                    io_failed = true;
                                    break;
                                }
                            }
                        }
                        if io_failed {
                            break;
                        }
                        continue;
                    }
                    next_block = j.wrap(next_block.wrapping_add(tags.len() as u32));
                    continue;
                }
                for (off, flags) in tags {
                    let io = next_block;
                    next_block = j.wrap(next_block.wrapping_add(1));
                    let (from, data) = match j.read(io) {
                        Ok(x) => x,
                        Err(e) => {
                            rec.warnings
                                .push(format!("journal block {io} could not be read: {e}"));
                            failure.get_or_insert(e);
                            continue;
                        }
                    };
                    let target = j.tag_block(&b, off);
                    if info
                        .revoked
                        .get(&target)
                        .is_some_and(|&seq| !tid_gt(next_commit, seq))
                    {
                        continue;
                    }
                    let tag = b.get(off..).unwrap_or_default();
                    if !j.tag_csum_ok(tag, &data, sequence) {
                        let e = Error::corrupt(format!(
                            "journal copy of block {target} (journal block {io}) has a bad checksum; that block was skipped"
                        ));
                        rec.warnings.push(e.to_string());
                        failure.get_or_insert(e);
                        continue;
                    }
                    rec.overlay.insert(
                        target,
                        Replayed {
                            from,
                            escaped: flags & FLAG_ESCAPE != 0,
                        },
                    );
                }
                continue;
            }
            BLOCK_COMMIT => {
                let commit_time = be64(&b, 48);
                let mut chksum_error = false;
                if need_check_commit_time {
                    if commit_time >= last_commit_time {
                        return Err(Error::corrupt(format!(
                            "journal transaction {next_commit} has a bad checksum"
                        )));
                    }
                    // Stale blocks of an older log: the log ends here.
                    break;
                }
                if pass == Pass::Scan && j.sb.compat & COMPAT_CHECKSUM != 0 {
                    let found = be32(&b, 16);
                    let (kind, size) = (b[12], b[13]);
                    if info.end_transaction != 0 {
                        break;
                    }
                    let ok =
                        (crc32_sum.value() == found && kind == CRC32_CHKSUM && size == CRC32_CHKSUM_SIZE)
                            || (kind == 0 && size == 0 && found == 0);
                    if !ok {
                        chksum_error = true;
                    }
                    crc32_sum = Crc32Be::new();
                }
                if pass == Pass::Scan && (chksum_error || !j.commit_csum_ok(&b)) {
                    if commit_time < last_commit_time {
                        break;
                    }
                    info.end_transaction = next_commit;
                    if !j.sb.has(INCOMPAT_ASYNC_COMMIT) {
                        break;
                    }
                }
                if pass == Pass::Scan {
                    last_commit_time = commit_time;
                }
                if pass == Pass::Replay {
                    rec.transactions = rec.transactions.saturating_add(1);
                }
                next_commit = next_commit.wrapping_add(1);
                continue;
            }
            BLOCK_REVOKE => {
                if pass == Pass::Scan && !j.block_csum_ok(&b) {
                    need_check_commit_time = true;
                }
                if pass != Pass::Revoke {
                    continue;
                }
                let csum_size = if j.sb.csum_v2or3() { TAIL } else { 0 };
                let rcount = be32(&b, 12) as usize;
                if rcount > j.bs.saturating_sub(csum_size) {
                    return Err(Error::corrupt(format!(
                        "journal revoke block claims {rcount} bytes of records"
                    )));
                }
                let rec_len = if j.sb.has(INCOMPAT_64BIT) { 8 } else { 4 };
                let mut off = 16usize;
                while off.saturating_add(rec_len) <= rcount {
                    let blk = if rec_len == 4 {
                        u64::from(be32(&b, off))
                    } else {
                        be64(&b, off)
                    };
                    off = off.saturating_add(rec_len);
                    let e = info.revoked.entry(blk).or_insert(next_commit);
                    if tid_gt(next_commit, *e) {
                        *e = next_commit;
                    }
                }
                continue;
            }
            _ => break,
        }
    }
    if pass == Pass::Scan {
        if info.end_transaction == 0 {
            info.end_transaction = next_commit;
        }
        if j.sb.has(INCOMPAT_FAST_COMMIT) {
            check_fast_commit(j, info)?;
        }
    } else if info.end_transaction != next_commit {
        failure.get_or_insert_with(|| {
            Error::corrupt(format!(
                "journal recovery pass ended at transaction {next_commit}, expected {}",
                info.end_transaction
            ))
        });
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// e2fsck replays fast-commit records after the last full transaction; this reader does
/// not, so it refuses a journal that holds some for the transaction that would follow.
fn check_fast_commit(j: &mut Journal<'_>, info: &Info) -> Result<()> {
    let first = j.sb.maxlen.saturating_sub(j.sb.num_fc_blocks).saturating_add(1);
    let Ok((_, b)) = j.read(first) else {
        return Ok(());
    };
    let tag = u16::from_le_bytes([b[0], b[1]]);
    let tid = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    if tag == FC_TAG_HEAD && tid == info.end_transaction {
        return Err(Error::unsupported(
            "the journal holds fast-commit records to replay, which this reader does not implement",
        ));
    }
    Ok(())
}
