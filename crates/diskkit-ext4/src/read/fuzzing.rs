//! Entry points for fuzzing (used by `fuzz/` and by the corpus replay tests). Each must
//! never panic, whatever the input.

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
