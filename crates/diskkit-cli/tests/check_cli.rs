//! `diskkit check`: reports, exit codes and repairs, checked with QEMU's tools.

mod support;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use support::{diskkit, diskkit_ok, tool_ok, Dir};

fn json(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}{}", String::from_utf8_lossy(&out.stderr)))
}

/// `qemu-img check --output=json`.
fn qemu_json(path: &str) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", path])
        .output()
        .expect("qemu-img (installed by .ci/run)");
    json(&out)
}

/// `qemu-img check --output=json`: (corruptions, leaks).
fn qemu_counts(path: &str) -> (u64, u64) {
    let v = qemu_json(path);
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (get("corruptions"), get("leaks"))
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0, |a, &x| (a << 8) | u64::from(x))
}

/// The arguments of `qemu-io -f FMT -c CMD... PATH`.
fn qemu_io_args<'a>(fmt: &'a str, cmds: &[&'a str], path: &'a str) -> Vec<&'a str> {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", *c]);
    }
    args.push(path);
    args
}

/// Create the qcow2 image `img` (`size`, options `opts`, lazy refcounts on among them), run
/// `writes` in qemu-io, then kill qemu-io with SIGKILL: the image keeps its dirty bit and its
/// stale refcounts.
fn qemu_dirty(img: &str, opts: &str, size: &str, writes: &[&str]) {
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, img, size],
    );
    let mut cmds = writes.to_vec();
    cmds.push("sigraise 9");
    let out = Command::new("qemu-io")
        .args(qemu_io_args("qcow2", &cmds, img))
        .output()
        .expect("qemu-io (installed by .ci/run)");
    assert!(!out.status.success(), "qemu-io was to be killed");
}

/// Append `n` clusters to a qcow2 file and give them refcount 1 (leaks), by hand.
fn leak_clusters(path: &Path, n: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut h = [0u8; 104];
    f.read_exact_at(&mut h, 0).unwrap();
    let cs = 1u64 << be(&h[20..24]);
    assert_eq!(be(&h[96..100]), 4, "16-bit refcounts");
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, be(&h[48..56])).unwrap();
    let block = be(&e);
    let len = f.metadata().unwrap().len().next_multiple_of(cs);
    f.set_len(len + n * cs).unwrap();
    for i in 0..n {
        let c = len / cs + i;
        assert!(c < cs / 2);
        f.write_all_at(&1u16.to_be_bytes(), block + 2 * c).unwrap();
    }
}

#[test]
fn dirty_qemu_image_is_refused_reported_and_repaired() {
    let d = Dir::new();
    let img = d.s("dirty.qcow2");
    let raw = d.s("ref.raw");
    let writes = ["write -P 0x3c 0 1M", "write -P 0x4d 3M 200k"];
    tool_ok("qemu-img", &["create", "-q", "-f", "raw", &raw, "4M"]);
    tool_ok("qemu-io", &qemu_io_args("raw", &writes, &raw));
    qemu_dirty(&img, "lazy_refcounts=on", "4M", &writes);
    // Other commands refuse it, naming the command that repairs it.
    let out = diskkit(&["info", &img]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("diskkit check --repair all"), "{err}");
    // check: exit 2 (corruptions), the same count as qemu-img check.
    let out = diskkit(&["check", &img]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("errors were found") && text.contains("dirty bit is set"),
        "{text}"
    );
    let out = diskkit(&["check", "--output", "json", &img]);
    assert_eq!(out.status.code(), Some(2));
    let v = json(&out);
    let (qc, ql) = qemu_counts(&img);
    assert!(qc > 0);
    assert_eq!(v["corruptions"].as_u64(), Some(qc), "{v}");
    assert_eq!(v["leaks"].as_u64(), Some(ql));
    assert_eq!(v["dirty"], serde_json::json!(true));
    let q = qemu_json(&img);
    for key in ["image-end-offset", "total-clusters", "allocated-clusters"] {
        assert_eq!(v[key], q[key], "{key}");
    }
    assert_eq!(v["format"], "qcow2");
    let kinds: Vec<&str> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"refcount-too-low") && kinds.contains(&"copied-flag"),
        "{kinds:?}"
    );
    // Repair: exit 0, the changes listed, qemu-img check clean, data as QEMU wrote it.
    let out = diskkit(&["check", "--repair", "all", "--output", "json", &img]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&out);
    assert_eq!(v["dirty"], serde_json::json!(false));
    let changes = v["changes"].as_array().unwrap();
    assert!(
        changes
            .iter()
            .any(|c| c.as_str().unwrap().contains("refcount structure")),
        "{v}"
    );
    assert!(v["corruptions-fixed"].as_u64().unwrap() > 0);
    assert_eq!(qemu_counts(&img), (0, 0));
    tool_ok("qemu-img", &["check", "-q", &img]);
    let out = tool_ok("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", &raw, &img]);
    assert!(out.contains("identical"));
    // Now it opens.
    diskkit_ok(&["info", &img]);
    let out = diskkit(&["check", &img]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn leaks_exit_3_and_repair_leaks_frees_them() {
    let d = Dir::new();
    let img = d.s("l.qcow2");
    diskkit_ok(&["create", "--format", "qcow2", "--size", "4M", &img]);
    let src = d.s("data");
    std::fs::write(&src, vec![0x61u8; 300_000]).unwrap();
    diskkit_ok(&["write", &img, "--offset", "65536", "--from", &src]);
    let out = diskkit(&["check", &img]);
    assert_eq!(out.status.code(), Some(0));
    leak_clusters(Path::new(&img), 2);
    assert_eq!(qemu_counts(&img), (0, 2));
    let out = diskkit(&["check", "--output", "json", &img]);
    assert_eq!(out.status.code(), Some(3));
    let v = json(&out);
    assert_eq!(
        (v["corruptions"].as_u64(), v["leaks"].as_u64()),
        (Some(0), Some(2)),
        "{v}"
    );
    let out = diskkit(&["check", "-r", "leaks", &img]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2 leaked clusters were repaired"), "{text}");
    assert_eq!(qemu_counts(&img), (0, 0));
    let back = d.s("back");
    diskkit_ok(&[
        "read", &img, "--offset", "65536", "--length", "300000", "--to", &back,
    ]);
    assert_eq!(std::fs::read(&back).unwrap(), vec![0x61u8; 300_000]);
}

#[test]
fn raw_and_asif_open_and_map_cleanly() {
    let d = Dir::new();
    for fmt in ["raw", "asif"] {
        let img = d.s(&format!("x.{fmt}"));
        diskkit_ok(&["create", "--format", fmt, "--size", "8M", &img]);
        let src = d.s("data");
        std::fs::write(&src, vec![0x11u8; 100_000]).unwrap();
        diskkit_ok(&["write", &img, "--offset", "1048576", "--from", &src]);
        let out = diskkit(&["check", "--output", "json", &img]);
        assert_eq!(out.status.code(), Some(0));
        let v = json(&out);
        assert_eq!(v["format"], fmt);
        assert_eq!(v["corruptions"].as_u64(), Some(0));
        assert!(v["allocated-bytes"].as_u64().is_some(), "{v}");
        let out = diskkit(&["check", "--repair", "all", &img]);
        assert_eq!(out.status.code(), Some(0));
    }
}

#[test]
fn unreadable_image_exits_1_and_a_missing_file_2() {
    let d = Dir::new();
    let bad = d.s("bad.qcow2");
    std::fs::write(&bad, b"QFI\xfbnot really a header").unwrap();
    let out = diskkit(&["check", &bad]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot check") && err.contains("bad.qcow2"), "{err}");
    // A file that cannot be opened at all is an error like in every command, not a check
    // that could not complete.
    let out = diskkit(&["check", &d.s("missing.qcow2")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("diskkit: error: cannot open '") && err.contains("missing.qcow2"),
        "{err}"
    );
}

#[test]
fn commands_that_write_repair_a_dirty_image_when_asked() {
    let d = Dir::new();
    let img = d.s("dirty.qcow2");
    let raw = d.s("ref.raw");
    let patch = d.s("patch.bin");
    tool_ok("qemu-img", &["create", "-q", "-f", "raw", &raw, "8M"]);
    let writes = ["write -P 0x11 0 2M", "write -P 0x22 5M 300k"];
    let raw_writes = [writes[0], writes[1], "write -P 0x33 1M 64k"];
    tool_ok("qemu-io", &qemu_io_args("raw", &raw_writes, &raw));
    qemu_dirty(&img, "lazy_refcounts=on,cluster_size=4096", "8M", &writes);
    assert!(qemu_counts(&img).0 > 0, "QEMU left no damage to repair");
    std::fs::write(&patch, vec![0x33u8; 64 << 10]).unwrap();
    // Without --repair the write is refused and the image is untouched.
    let before = std::fs::read(&img).unwrap();
    let out = diskkit(&["write", &img, "--offset", "1M", "--from", &patch]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--repair"));
    assert_eq!(std::fs::read(&img).unwrap(), before);
    // A read-only command cannot repair.
    let out = diskkit(&["info", "--repair", &img]);
    assert_eq!(out.status.code(), Some(2));
    // With --repair: refcounts rebuilt, then the write lands.
    diskkit_ok(&["write", "--repair", &img, "--offset", "1M", "--from", &patch]);
    assert_eq!(qemu_counts(&img), (0, 0));
    tool_ok("qemu-img", &["check", "-q", &img]);
    let out = tool_ok("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", &raw, &img]);
    assert!(out.contains("identical"), "{out}");
}
