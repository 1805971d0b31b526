//! The CLI on qcow2 images, checked with QEMU's tools.

mod support;

use support::{diskkit, diskkit_ok, poke, sparse_file, tool_ok, Dir, Rng};

#[test]
fn convert_to_and_from_qcow2_is_sparse_clean_and_identical() {
    let d = Dir::new();
    let size = 64u64 << 20;
    let src = d.path("src.raw");
    sparse_file(&src, size);
    let mut rng = Rng(7);
    for c in (0..64u64).filter(|c| c % 3 == 0) {
        let mut data = rng.bytes(1 << 20);
        data[200_000..400_000].fill(0);
        poke(&src, c << 20, &data);
    }
    let s = src.to_str().unwrap();
    for cluster in ["512", "65536", "2M"] {
        let q = d.s(&format!("out-{cluster}.qcow2"));
        diskkit_ok(&["convert", "-O", "qcow2", "--cluster-size", cluster, s, &q]);
        tool_ok("qemu-img", &["check", "-q", &q]);
        let out = tool_ok("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s, &q]);
        assert!(out.contains("identical"), "{cluster}: {out}");
        // Sparse: zero ranges were not written.
        let alloc: u64 = {
            let v: serde_json::Value =
                serde_json::from_str(&tool_ok("qemu-img", &["info", "--output=json", &q])).unwrap();
            v["actual-size"].as_u64().unwrap()
        };
        // (2 MiB clusters hold whole 1 MiB data runs plus their neighbours: not checked.)
        if cluster != "2M" {
            assert!(alloc < size / 2, "{q} uses {alloc} bytes");
        }
        // Back to RAW and to ASIF through diskkit.
        for fmt in ["raw", "asif"] {
            let back = d.s(&format!("back-{cluster}.{fmt}"));
            diskkit_ok(&["convert", "-O", fmt, &q, &back]);
            let out = diskkit(&["compare", s, &back]);
            assert!(out.status.success(), "{cluster} -> {fmt}");
        }
    }
    // qemu-img's own conversion reads the same in diskkit.
    let theirs = d.s("theirs.qcow2");
    tool_ok("qemu-img", &["convert", "-O", "qcow2", s, &theirs]);
    let out = diskkit(&["compare", s, &theirs]);
    assert!(out.status.success());
}

#[test]
fn create_with_backing_records_it_and_map_detached_shows_absent() {
    let d = Dir::new();
    let base = d.path("base.raw");
    sparse_file(&base, 4 << 20);
    poke(&base, 0, &[0x77; 65536]);
    let top = d.s("top.qcow2");
    diskkit_ok(&[
        "create",
        "--format",
        "qcow2",
        "--size",
        "4M",
        "--backing",
        "base.raw",
        "--backing-format",
        "raw",
        &top,
    ]);
    let info = tool_ok("qemu-img", &["info", "--backing-chain", "--output=json", &top]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v[0]["backing-filename"], "base.raw", "{info}");
    assert_eq!(v[0]["backing-filename-format"], "raw", "{info}");
    assert_eq!(v.as_array().unwrap().len(), 2);
    tool_ok("qemu-io", &["-f", "qcow2", "-c", "write -P 0x11 1M 64k", &top]);
    // By default the CLI follows the backing file in the same directory: the base's data
    // shows at depth 2, the layer's own write at depth 1.
    let stacked = diskkit_ok(&["map", "--output", "json", &top]);
    let runs: Vec<serde_json::Value> = serde_json::from_str(&stacked).unwrap();
    assert!(
        runs.iter()
            .any(|r| r["start"] == 0 && r["depth"] == 2 && r["data"] == true),
        "{stacked}"
    );
    assert!(
        runs.iter().any(|r| r["start"] == 1 << 20 && r["depth"] == 1),
        "{stacked}"
    );
    // Detached, only the layer itself is seen.
    let map = diskkit_ok(&["map", "--detached", "--output", "json", &top]);
    let runs: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let absent: u64 = runs
        .iter()
        .filter(|r| r["depth"] == 0 && r["present"] == false)
        .map(|r| r["length"].as_u64().unwrap())
        .sum();
    assert_eq!(absent, (4 << 20) - 65536, "{map}");
    assert!(
        runs.iter().any(|r| r["data"] == true && r["start"] == 1 << 20),
        "{map}"
    );
    let info = diskkit_ok(&["info", "--detached", &top]);
    assert!(info.contains("backing file: base.raw"), "{info}");
    assert!(info.contains("backing format: raw"), "{info}");
    assert!(info.contains("compression type: zlib"), "{info}");
    assert!(info.contains("dirty: no"), "{info}");
    // Writing a layer without its parent is refused.
    let out = diskkit(&["discard", "--detached", &top, "--offset", "0", "--length", "64k"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn write_discard_resize_through_the_cli_stay_clean() {
    let d = Dir::new();
    let q = d.s("w.qcow2");
    diskkit_ok(&[
        "create",
        "--format",
        "qcow2",
        "--size",
        "8M",
        "--cluster-size",
        "4k",
        &q,
    ]);
    let payload = d.path("payload");
    std::fs::write(&payload, vec![0x42u8; 300_000]).unwrap();
    diskkit_ok(&[
        "write",
        &q,
        "--offset",
        "12345",
        "--from",
        payload.to_str().unwrap(),
    ]);
    diskkit_ok(&["discard", &q, "--offset", "65536", "--length", "100000"]);
    diskkit_ok(&["resize", &q, "+8M"]);
    diskkit_ok(&["resize", &q, "-1M"]);
    tool_ok("qemu-img", &["check", "-q", &q]);
    let reference = d.path("ref.raw");
    sparse_file(&reference, 15 << 20);
    poke(&reference, 12345, &vec![0x42u8; 300_000]);
    support::zero(&reference, 65536, 100_000);
    let out = tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            reference.to_str().unwrap(),
            &q,
        ],
    );
    assert!(out.contains("identical"), "{out}");
}
