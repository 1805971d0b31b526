//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz entry points, plus
//! random mutations of each bundle seed (a cheap stand-in for a fuzzing run on stable).

use std::path::Path;

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "empty corpus in {}", dir.display());
    out
}

#[test]
fn bundle_read_corpus() {
    let mut accepted = 0;
    for (name, data) in corpus("bundle_read") {
        let ok = diskkit_deliver::fuzzing::bundle_read(&data).is_some();
        if name.starts_with("valid") {
            assert!(ok, "{name} must be accepted");
        }
        accepted += usize::from(ok);
    }
    assert!(accepted >= 3);
}

#[test]
fn bundle_read_mutations() {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (_, seed) in corpus("bundle_read") {
        for _ in 0..60 {
            let mut d = seed.clone();
            for _ in 0..1 + next() % 4 {
                let i = (next() % d.len() as u64) as usize;
                d[i] = next() as u8;
            }
            if next() % 8 == 0 {
                d.truncate((next() % d.len() as u64) as usize);
            }
            let _ = diskkit_deliver::fuzzing::bundle_read(&d);
        }
    }
}

#[test]
fn machine_json_corpus() {
    for (_, data) in corpus("machine_json") {
        diskkit_deliver::fuzzing::machine_json(&data);
    }
}

#[test]
fn remote_hint_corpus() {
    for (_, data) in corpus("remote_hint") {
        diskkit_deliver::fuzzing::remote_hint(&data);
    }
}
