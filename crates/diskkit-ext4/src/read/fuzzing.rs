//! Entry points for fuzzing (used by `fuzz/` and by the corpus replay tests). Each must
//! never panic, whatever the input.

use std::sync::Arc;

use super::fs::{FileType, Fs, Inode, ROOT_INO};
use super::partition::read_partition_table;
use super::pe::parse_pe;

/// Parse `data` as a disk's partition table, with both sector sizes.
pub fn partition_table(data: &[u8]) {
    for sector in [512, 4096] {
        if let Ok(Some(t)) = read_partition_table(data, sector) {
            for p in &t.partitions {
                assert!(p
                    .offset
                    .checked_add(p.size)
                    .is_some_and(|e| e <= data.len() as u64));
            }
        }
    }
}

/// Parse `data` as a PE file and read every section's file range.
pub fn pe_sections(data: &[u8]) {
    if let Ok(pe) = parse_pe(data) {
        for s in &pe.sections {
            let (off, len) = s.file_range();
            if len > 0 {
                assert!(off + len <= data.len() as u64);
                let _ = &data[off as usize..(off + len) as usize];
            }
        }
        let _ = pe.is_uki();
    }
}

/// Open `data` as an ext2/3/4 filesystem (replaying its journal in memory) and walk it:
/// every directory listed (at most 2000 inodes, 32 levels), every inode's metadata, xattrs
/// and symlink target, and up to 256 KiB of every regular file, each at two offsets.
pub fn ext4_read(data: &[u8]) {
    let Ok(fs) = Fs::open(Arc::new(data.to_vec())) else {
        return;
    };
    let _ = fs.lookup_path(b"/a/../b/./c", true);
    let Ok(root) = fs.inode(ROOT_INO) else {
        return;
    };
    let mut queue = vec![(root, 0u32)];
    let mut visited = 0u32;
    while let Some((dir, depth)) = queue.pop() {
        let Ok(entries) = fs.read_dir(&dir) else {
            continue;
        };
        for e in entries {
            visited += 1;
            if visited > 2000 {
                return;
            }
            let Ok(inode) = fs.inode(e.ino) else {
                continue;
            };
            let _ = fs.lookup(&dir, &e.name);
            walk_one(&fs, &inode);
            if inode.file_type() == FileType::Directory && depth < 32 {
                queue.push((inode, depth + 1));
            }
        }
    }
}

fn walk_one(fs: &Fs, inode: &Inode) {
    let _ = fs.xattrs(inode);
    match inode.file_type() {
        FileType::Symlink => {
            let _ = fs.read_link(inode);
        }
        FileType::Regular => {
            if let Ok(mut r) = fs.open_file(inode) {
                let mut buf = vec![0u8; 64 << 10];
                let mut pos = 0u64;
                while pos < r.size().min(256 << 10) {
                    match r.read_at(pos, &mut buf) {
                        Ok(n) if n > 0 => pos += n as u64,
                        _ => break,
                    }
                }
                let _ = r.read_at(r.size().saturating_sub(5000), &mut buf);
            }
        }
        _ => {
            let _ = inode.device();
        }
    }
}
