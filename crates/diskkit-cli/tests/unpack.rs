//! `diskkit unpack` from the command line.

mod support;

use support::{diskkit, diskkit_ok, tool_ok, Dir};

fn layout(d: &Dir) -> String {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../diskkit-oci/tests/fixtures");
    tool_ok("python3", &[&format!("{fixtures}/make_layers.py"), &d.s("")]);
    tool_ok("gzip", &["-n", "-k", &d.s("l1.tar")]);
    tool_ok(
        "bash",
        &[
            &format!("{fixtures}/mkoci-layout.sh"),
            &d.s("lay"),
            "v1",
            &d.s("l1.tar.gz"),
            &d.s("l2.tar"),
        ],
    );
    d.s("lay")
}

#[test]
fn unpack_raw_and_asif() {
    let d = Dir::new();
    let lay = layout(&d);
    let out = diskkit_ok(&["unpack", "--reproducible", &format!("{lay}:v1"), &d.s("root.img")]);
    assert!(out.contains("(2 layers)"), "{out}");
    tool_ok("e2fsck", &["-fn", &d.s("root.img")]);
    let ls = tool_ok("debugfs", &["-R", "ls -p /opq", &d.s("root.img")]);
    assert!(ls.contains("/new/") && !ls.contains("/old/"), "{ls}");
    // Refuses to replace without --force.
    let o = diskkit(&["unpack", &lay, &d.s("root.img")]);
    assert!(!o.status.success());
    diskkit_ok(&[
        "unpack",
        "--force",
        "--format",
        "asif",
        "--size",
        "1G",
        &lay,
        &d.s("root.img"),
    ]);
    let info = diskkit_ok(&["info", &d.s("root.img")]);
    assert!(info.to_lowercase().contains("asif"), "{info}");
    // Straight into qcow2: QEMU finds the image clean and the filesystem inside is too.
    diskkit_ok(&["unpack", "--format", "qcow2", &lay, &d.s("root.qcow2")]);
    tool_ok("qemu-img", &["check", &d.s("root.qcow2")]);
    tool_ok(
        "qemu-img",
        &["convert", "-O", "raw", &d.s("root.qcow2"), &d.s("from-qcow2.raw")],
    );
    tool_ok("e2fsck", &["-fn", &d.s("from-qcow2.raw")]);
    let ls = tool_ok("debugfs", &["-R", "ls -p /opq", &d.s("from-qcow2.raw")]);
    assert!(ls.contains("/new/") && !ls.contains("/old/"), "{ls}");
}

#[test]
fn unpack_errors() {
    let d = Dir::new();
    let lay = layout(&d);
    let o = diskkit(&["unpack", &format!("{lay}:nope"), &d.s("x.img")]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no image nope"));
    let o = diskkit(&["unpack", "--platform", "linux/s390x", &lay, &d.s("x.img")]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("linux/s390x"));
    assert!(!d.path("x.img").exists());
}

#[test]
fn unpack_into_store() {
    let d = Dir::new();
    let lay = layout(&d);
    let store = d.s("store");
    let out = diskkit_ok(&["unpack", "--store", &store, &format!("{lay}:v1")]);
    assert!(out.starts_with("stored '"), "{out}");
    let snapshots = d.path("store/snapshots");
    let entries: Vec<String> = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "ingest")
        .collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].len(), 64);
    let dir = snapshots.join(&entries[0]);
    tool_ok("e2fsck", &["-fn", &dir.join("snapshot").to_string_lossy()]);
    // Store entries are made to boot: 64 GiB (sparse), journaled, labelled.
    assert_eq!(std::fs::metadata(dir.join("snapshot")).unwrap().len(), 64 << 30);
    let sb = tool_ok("dumpe2fs", &["-h", &dir.join("snapshot").to_string_lossy()]);
    assert!(
        sb.lines()
            .any(|l| l.starts_with("Filesystem features:") && l.contains("has_journal")),
        "{sb}"
    );
    assert!(sb.contains("Filesystem volume name:   root"), "{sb}");
    assert!(
        sb.contains("Journal size:             64M") || sb.contains("Total journal size:       64M"),
        "{sb}"
    );
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("snapshot-info")).unwrap()).unwrap();
    assert_eq!(info["type"]["block"]["format"], "ext4");
    assert_eq!(
        info["source"],
        dir.canonicalize()
            .unwrap()
            .join("snapshot")
            .to_string_lossy()
            .as_ref()
    );
    // The ingest directory is left empty.
    assert_eq!(std::fs::read_dir(snapshots.join("ingest")).unwrap().count(), 0);
    let out = diskkit_ok(&["unpack", "--store", &store, &format!("{lay}:v1")]);
    assert!(out.starts_with("reused '"), "{out}");
}

#[test]
fn failed_store_unpack_leaves_nothing() {
    let d = Dir::new();
    let lay = layout(&d);
    // Corrupt the (gzip) first layer: the digest check fails after the layer was read.
    let blobs = d.path("lay/blobs/sha256");
    let gz = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read(p).unwrap().starts_with(&[0x1f, 0x8b]))
        .unwrap();
    let mut data = std::fs::read(&gz).unwrap();
    let n = data.len();
    data.truncate(n - 30);
    std::fs::write(&gz, data).unwrap();
    let o = diskkit(&["unpack", "--store", &d.s("store"), &lay]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("layer sha256:"), "{err}");
    let snapshots = d.path("store/snapshots");
    let names: Vec<String> = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["ingest"]);
    assert_eq!(std::fs::read_dir(snapshots.join("ingest")).unwrap().count(), 0);
}
