//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) through the fuzz entry points, plus
//! random mutations of each seed (a cheap stand-in for a fuzzing run on stable).

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

/// Feed `rounds` random mutations of each seed of `target` (a few bytes changed, sometimes
/// cut short) to `run`.
fn mutations(target: &str, rounds: usize, run: impl Fn(&[u8])) {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (_, seed) in corpus(target) {
        for _ in 0..rounds {
            let mut d = seed.clone();
            for _ in 0..1 + next() % 4 {
                if d.is_empty() {
                    break;
                }
                let i = (next() % d.len() as u64) as usize;
                d[i] = next() as u8;
            }
            if next() % 8 == 0 && !d.is_empty() {
                d.truncate((next() % d.len() as u64) as usize);
            }
            run(&d);
        }
    }
}

#[test]
fn bundle_read_mutations() {
    mutations("bundle_read", 60, |d| {
        let _ = diskkit_deliver::fuzzing::bundle_read(d);
    });
}

#[test]
fn machine_json_corpus() {
    for (_, data) in corpus("machine_json") {
        diskkit_deliver::fuzzing::machine_json(&data);
    }
}

#[test]
fn registry_manifest_corpus_and_mutations() {
    for (name, data) in corpus("registry_manifest") {
        let got = diskkit_deliver::fuzzing::registry_manifest(&data);
        let want = match name.as_str() {
            n if n.starts_with("valid-tart") => Some("tart"),
            n if n.starts_with("valid") && n.contains("index") || n.contains("list") => Some("index"),
            n if n.starts_with("valid") || n.starts_with("untyped") || n.starts_with("tart") => {
                Some("manifest")
            }
            _ => None,
        };
        assert_eq!(got, want, "{name}");
    }
    mutations("registry_manifest", 300, |d| {
        diskkit_deliver::fuzzing::registry_manifest(d);
    });
}

#[test]
fn registry_manifest_seeds_are_what_they_say() {
    use diskkit_deliver::registry::manifest;
    for (name, data) in corpus("registry_manifest") {
        let body = data[1..].split(|&b| b == 0).next().unwrap();
        let parsed = manifest::parse(body, None, None);
        if name.starts_with("valid") || name.starts_with("untyped") || name.starts_with("tart") {
            assert!(parsed.is_ok(), "{name}: {:?}", parsed.err());
        } else {
            assert!(parsed.is_err(), "{name} must be refused");
        }
    }
}

#[test]
fn registry_reference_corpus_and_mutations() {
    let mut accepted = 0;
    for (_, data) in corpus("registry_reference") {
        diskkit_deliver::fuzzing::registry_reference(&data);
        accepted += usize::from(
            diskkit_deliver::registry::Reference::parse(std::str::from_utf8(&data).unwrap()).is_ok(),
        );
    }
    assert!(accepted >= 8, "{accepted} seeds parse");
    mutations(
        "registry_reference",
        500,
        diskkit_deliver::fuzzing::registry_reference,
    );
}

#[test]
fn auth_header_corpus_and_mutations() {
    for (_, data) in corpus("auth_header") {
        diskkit_deliver::fuzzing::auth_header(&data);
    }
    mutations("auth_header", 500, diskkit_deliver::fuzzing::auth_header);
}

#[test]
fn apple_lz4_corpus_and_mutations() {
    for (name, data) in corpus("apple_lz4") {
        diskkit_deliver::fuzzing::apple_lz4(&data);
        let ok = diskkit_deliver::tart::lz4::decode(&data, 1 << 24).is_ok();
        assert_eq!(ok, name.starts_with("valid") || name == "empty", "{name}");
    }
    mutations("apple_lz4", 500, diskkit_deliver::fuzzing::apple_lz4);
}

#[test]
fn remote_hint_corpus() {
    for (_, data) in corpus("remote_hint") {
        diskkit_deliver::fuzzing::remote_hint(&data);
    }
}
