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
fn asif_open_corpus() {
    replay("asif_open", diskkit::fuzzing::asif_open);
}

#[test]
fn stack_metadata_corpus() {
    replay("stack_metadata", diskkit::fuzzing::stack_metadata);
}

#[test]
fn qcow2_open_corpus() {
    replay("qcow2_open", diskkit::fuzzing::qcow2_open);
}

#[test]
fn probe_corpus() {
    replay("probe", diskkit::fuzzing::probe);
}

#[test]
fn qcow2_check_corpus() {
    replay("qcow2_check", diskkit::fuzzing::qcow2_check);
}

/// A cheap stand-in for a fuzzing run on stable: every qcow2 seed with a few random bytes
/// changed (header fields, table entries, compressed data) must not panic.
#[test]
fn qcow2_open_survives_mutated_seeds() {
    mutated_seeds("qcow2_open", diskkit::fuzzing::qcow2_open, 1000);
}

/// The same for the consistency check and repair.
#[test]
fn qcow2_check_survives_mutated_seeds() {
    mutated_seeds("qcow2_check", diskkit::fuzzing::qcow2_check, 300);
}

fn mutated_seeds(target: &str, f: fn(&[u8]), rounds: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        // Only the named seeds; the files libFuzzer found (named by their SHA-1) are replayed
        // as they are by the corpus tests.
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let seed = std::fs::read(&path).unwrap();
        if seed.len() < 8 {
            continue;
        }
        for _ in 0..rounds {
            let mut data = seed.clone();
            for _ in 0..1 + next() % 4 {
                // Half the changes hit the header cluster.
                let span = if next() % 2 == 0 {
                    data.len().min(512)
                } else {
                    data.len()
                };
                let at = (next() % span as u64) as usize;
                data[at] = next() as u8;
            }
            f(&data);
        }
    }
}
