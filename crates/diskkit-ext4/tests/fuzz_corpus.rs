//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz entry points.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        f(&data);
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
}

#[test]
fn partition_table_corpus() {
    replay("partition_table", diskkit_ext4::read::fuzzing::partition_table);
}

#[test]
fn pe_sections_corpus() {
    replay("pe_sections", diskkit_ext4::read::fuzzing::pe_sections);
}
