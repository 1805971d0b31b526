//! Stack operations that would break a stack are refused, and the unsafe rebase: commit of a
//! layer others depend on, rebase -u onto a copy, snapshot of a RAW top. Checked with
//! `qemu-img` (which follows the same qcow2 backing chains) and `diskkit compare`.

mod support;

use support::{diskkit, diskkit_ok, tool_ok, Dir};

fn write(d: &Dir, image: &str, offset: &str, byte: u8, len: usize) {
    let input = d.path("in.bin");
    std::fs::write(&input, vec![byte; len]).unwrap();
    diskkit_ok(&[
        "write",
        image,
        "--offset",
        offset,
        "--from",
        input.to_str().unwrap(),
    ]);
}

fn refused(args: &[&str]) -> String {
    let out = diskkit(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "diskkit {args:?} was not refused: {err}"
    );
    err
}

fn identical(a: &str, b: &str) {
    let out = tool_ok("qemu-img", &["compare", a, b]);
    assert!(
        out.contains("Images are identical"),
        "qemu-img compare {a} {b}: {out}"
    );
    let out = diskkit_ok(&["compare", a, b]);
    assert!(out.contains("identical"), "diskkit compare {a} {b}: {out}");
}

/// base <- mid <- top, all qcow2, each holding data; `ref.raw` is what top reads.
fn three_layers(d: &Dir) -> (String, String, String) {
    let (base, mid, top) = (d.s("base.qcow2"), d.s("mid.qcow2"), d.s("top.qcow2"));
    diskkit_ok(&["create", "--format", "qcow2", "--size", "32M", &base]);
    write(d, &base, "0", 0x11, 3 << 20);
    diskkit_ok(&["layer", "create", "--format", "qcow2", "--parent", &base, &mid]);
    write(d, &mid, "1M", 0x22, 1 << 20);
    diskkit_ok(&["layer", "create", "--format", "qcow2", "--parent", &mid, &top]);
    write(d, &top, "2M", 0x33, 64 << 10);
    tool_ok("qemu-img", &["convert", "-O", "raw", &top, &d.s("ref.raw")]);
    (base, mid, top)
}

#[test]
fn commit_of_a_layer_others_depend_on_is_refused() {
    let d = Dir::new();
    let (base, mid, top) = three_layers(&d);
    let before: Vec<Vec<u8>> = [&base, &mid, &top]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    // mid is top's parent: committing it would change mid's UUID (and base's) under top.
    let err = refused(&["commit", &mid]);
    assert!(err.contains("depend") && err.contains("top.qcow2"), "{err}");
    let after: Vec<Vec<u8>> = [&base, &mid, &top]
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    assert!(before == after, "a refused commit changed a file");
    identical(&top, &d.s("ref.raw"));
    for f in [&base, &mid, &top] {
        tool_ok("qemu-img", &["check", f]);
    }

    // A sibling on the same base: committing one layer into the base would break the other.
    let other = d.s("other.qcow2");
    diskkit_ok(&["layer", "create", "--format", "qcow2", "--parent", &base, &other]);
    diskkit_ok(&[
        "layer",
        "create",
        "--format",
        "qcow2",
        "--parent",
        &base,
        &d.s("sibling.qcow2"),
    ]);
    let err = refused(&["commit", &other]);
    assert!(
        err.contains("sibling.qcow2") && err.contains("mid.qcow2"),
        "{err}"
    );

    // Committing the top itself (into mid, which nothing else depends on) works.
    std::fs::remove_file(d.path("sibling.qcow2")).unwrap();
    std::fs::remove_file(d.path("other.qcow2")).unwrap();
    diskkit_ok(&["commit", &top]);
    identical(&top, &d.s("ref.raw"));
    identical(&mid, &d.s("ref.raw"));
    for f in [&base, &mid, &top] {
        tool_ok("qemu-img", &["check", f]);
    }
}

#[test]
fn unsafe_rebase_onto_a_copy_reads_the_same() {
    let d = Dir::new();
    let (base, mid, top) = three_layers(&d);
    // A copy of the two lower layers as one image, then the old parent changes: the stack
    // breaks (top's parent UUID no longer matches) and a safe rebase cannot even open it.
    diskkit_ok(&["flatten", "-O", "qcow2", &mid, &d.s("copy.qcow2")]);
    write(&d, &mid, "0", 0x44, 4096);
    let err = refused(&["read", &top, "--length", "512"]);
    assert!(err.contains("expects parent UUID"), "{err}");
    let err = refused(&["rebase", "-b", &d.s("copy.qcow2"), &top]);
    assert!(err.contains("expects parent UUID"), "{err}");
    // The unsafe rebase only records the new parent.
    diskkit_ok(&["rebase", "-u", "-b", &d.s("copy.qcow2"), &top]);
    identical(&top, &d.s("ref.raw"));
    let info = tool_ok("qemu-img", &["info", "--output=json", &top]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["backing-filename"], "copy.qcow2", "{info}");
    tool_ok("qemu-img", &["check", &top]);
    // The safe rebase back onto the (changed) mid copies the differences: still the same.
    diskkit_ok(&["rebase", "-b", &mid, &top]);
    identical(&top, &d.s("ref.raw"));
    let _ = base;
}

#[test]
fn snapshot_keeps_each_file_in_the_format_its_name_says() {
    let d = Dir::new();
    // A RAW top: an overlay under disk.raw would be read as a raw disk by QEMU. Refused.
    let raw = d.s("disk.raw");
    diskkit_ok(&["create", "--format", "raw", "--size", "16M", &raw]);
    write(&d, &raw, "0", 0x55, 8192);
    let before = std::fs::read(&raw).unwrap();
    let err = refused(&["snapshot", &raw]);
    assert!(err.contains("RAW"), "{err}");
    assert_eq!(std::fs::read(&raw).unwrap(), before);
    assert!(!d.path("disk.snap1.raw").exists());
    let info = tool_ok("qemu-img", &["info", "--output=json", &raw]);
    assert!(info.contains("\"format\": \"raw\""), "{info}");

    // A qcow2 top: the new top is qcow2 too, backed by the frozen one.
    let top = d.s("vm.qcow2");
    diskkit_ok(&["create", "--format", "qcow2", "--size", "16M", &top]);
    write(&d, &top, "0", 0x66, 8192);
    tool_ok("qemu-img", &["convert", "-O", "raw", &top, &d.s("vm.raw")]);
    let frozen = diskkit_ok(&["snapshot", &top]);
    assert!(frozen.contains("vm.snap1.qcow2"), "{frozen}");
    let info = tool_ok("qemu-img", &["info", "--output=json", &top]);
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["backing-filename"], "vm.snap1.qcow2", "{info}");
    identical(&top, &d.s("vm.raw"));
}
