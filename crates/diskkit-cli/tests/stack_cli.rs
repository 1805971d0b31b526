//! Stacks through the CLI: layer creation, the parent policy, snapshot / restore / commit /
//! flatten / rebase, with the results checked against a RAW reference written by `qemu-io`
//! and compared with `qemu-img compare`.

mod support;

use std::path::Path;

use serde_json::Value;
use support::{diskkit, diskkit_ok, tool_ok};

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Write `len` bytes of `pattern` at `offset` into the stack (diskkit) and into the RAW
/// reference (qemu-io, a peer).
fn write_both(top: &Path, reference: &Path, offset: u64, len: u64, pattern: u8) {
    let data = vec![pattern; len as usize];
    let tmp = top.with_extension("in");
    std::fs::write(&tmp, &data).unwrap();
    diskkit_ok(&[
        "write",
        p(top),
        "--offset",
        &offset.to_string(),
        "--from",
        p(&tmp),
    ]);
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -P {pattern} {offset} {len}"),
            p(reference),
        ],
    );
}

fn flatten_matches(top: &Path, reference: &Path) {
    let flat = top.with_extension("flat.raw");
    diskkit_ok(&["flatten", "-O", "raw", "--force", p(top), p(&flat)]);
    tool_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", p(&flat), p(reference)],
    );
    // diskkit's own compare agrees, on the stack itself.
    diskkit_ok(&["compare", p(top), p(reference)]);
}

fn info_json(path: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["info", "--output", "json"];
    args.extend_from_slice(extra);
    args.push(p(path));
    serde_json::from_str(&diskkit_ok(&args)).unwrap()
}

#[test]
fn stack_lifecycle_matches_a_raw_reference() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    let reference = d.join("reference.raw");
    let cache = d.join("cache.asif");
    let vm = d.join("vm.asif");
    diskkit_ok(&["create", "--format", "raw", "--size", "16M", p(&base)]);
    tool_ok("qemu-img", &["create", "-f", "raw", p(&reference), "16M"]);
    write_both(&base, &reference, 1 << 20, 300_000, 0x11);

    diskkit_ok(&[
        "layer",
        "create",
        "--type",
        "cache",
        "--parent",
        p(&base),
        p(&cache),
    ]);
    diskkit_ok(&[
        "layer",
        "create",
        "--type",
        "overlay",
        "--chunk-size",
        "64K",
        "--parent",
        p(&cache),
        p(&vm),
    ]);
    // A second cache in the same stack is refused.
    let out = diskkit(&[
        "layer",
        "create",
        "--type",
        "cache",
        "--parent",
        p(&vm),
        p(&d.join("c2.asif")),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only one"),
        "{out:?}"
    );

    write_both(&vm, &reference, 5 << 20, 70_000, 0x22);
    write_both(&vm, &reference, (1 << 20) + 4096, 512, 0x23);
    flatten_matches(&vm, &reference);

    // info shows the chain; map reports the depth each range comes from.
    let info = info_json(&vm, &[]);
    let layers = info["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3);
    let types: Vec<_> = layers
        .iter()
        .map(|l| l["layer_type"].as_str().unwrap_or("base"))
        .collect();
    assert_eq!(types, ["overlay", "cache", "base"]);
    assert_eq!(layers[0]["parent_uuid"], layers[1]["layer_uuid"]);
    let map: Value = serde_json::from_str(&diskkit_ok(&["map", "--output", "json", p(&vm)])).unwrap();
    let depth_at = |off: u64| {
        map.as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["start"].as_u64().unwrap() <= off
                    && off < e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap()
            })
            .map(|e| e["depth"].as_u64().unwrap())
            .unwrap()
    };
    assert_eq!(depth_at(5 << 20), 1);
    assert_eq!(depth_at((1 << 20) + 4096), 1);
    // Flatten read the base through the cache, so the cache (depth 2) now holds it.
    assert_eq!(depth_at((1 << 20) + 100_000), 2);

    // Snapshot, write, restore: back to the snapshot.
    let said = diskkit_ok(&["snapshot", p(&vm)]);
    assert!(said.contains("vm.snap1.asif' (asif, "), "{said}");
    let before_restore = d.join("before.raw");
    std::fs::copy(&reference, &before_restore).unwrap();
    write_both(&vm, &reference, 0, 8192, 0x33);
    flatten_matches(&vm, &reference);
    diskkit_ok(&["restore", p(&vm)]);
    flatten_matches(&vm, &before_restore);
    std::fs::copy(&before_restore, &reference).unwrap();

    // Commit: the top's data moves into the frozen layer; the stack reads the same.
    write_both(&vm, &reference, 3 << 20, 100_000, 0x44);
    diskkit_ok(&["commit", p(&vm)]);
    flatten_matches(&vm, &reference);
    flatten_matches(&d.join("vm.snap1.asif"), &reference);

    // The base was never written through the stack.
    let mut base_ref = vec![0u8; 16 << 20];
    base_ref[1 << 20..(1 << 20) + 300_000].fill(0x11);
    assert!(std::fs::read(&base).unwrap() == base_ref, "the base changed");
}

#[test]
fn parent_policy_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.asif");
    std::fs::create_dir(d.join("layers")).unwrap();
    let child = d.join("layers/child.asif");
    diskkit_ok(&["create", "--size", "4M", p(&base)]);
    diskkit_ok(&["layer", "create", "--parent", p(&base), p(&child)]);
    let info = info_json(&child, &["--allow-parent-dir", p(d)]);
    assert_eq!(info["layers"][0]["parent_path"], "../base.asif");
    // By default only the child's own directory is trusted.
    let out = diskkit(&["info", p(&child)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not allowed") && err.contains("../base.asif"),
        "{err}"
    );
    diskkit_ok(&["info", "--allow-any-parent", p(&child)]);
    // The refusal names the option that follows it.
    let canonical = d.canonicalize().unwrap();
    assert!(
        err.trim_end().ends_with(&format!(
            "; to follow it, add --allow-parent-dir {}",
            canonical.display()
        )),
        "{err}"
    );
    // The base written after the layer was made: the mismatch names both UUIDs, as `info`
    // prints them (lowercase).
    let recorded = info["parent_uuid"].as_str().unwrap().to_owned();
    diskkit_ok(&["discard", p(&base), "--offset", "0", "--length", "4096"]);
    let now = info_json(&base, &[])["layer_uuid"].as_str().unwrap().to_owned();
    let out = diskkit(&["info", "--allow-any-parent", p(&child)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains(&format!("expects parent UUID {recorded}")), "{err}");
    assert!(err.contains(&format!("layer UUID is {now}")), "{err}");
}

#[test]
fn rebase_keeps_content() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base.raw");
    let reference = d.join("reference.raw");
    let top = d.join("top.asif");
    diskkit_ok(&["create", "--format", "raw", "--size", "8M", p(&base)]);
    tool_ok("qemu-img", &["create", "-f", "raw", p(&reference), "8M"]);
    write_both(&base, &reference, 0, 1 << 20, 0x55);
    diskkit_ok(&["layer", "create", "--parent", p(&base), p(&top)]);
    write_both(&top, &reference, 2 << 20, 4096, 0x66);
    // The new parent differs from the old one in part of the first MiB.
    let other = d.join("other.asif");
    diskkit_ok(&["convert", "-O", "asif", p(&base), p(&other)]);
    let patch = d.join("patch.bin");
    std::fs::write(&patch, vec![0x77u8; 10_000]).unwrap();
    diskkit_ok(&["write", p(&other), "--offset", "500000", "--from", p(&patch)]);
    diskkit_ok(&["rebase", "-b", p(&other), p(&top)]);
    let info = info_json(&top, &[]);
    assert_eq!(info["layers"][1]["format"], "asif");
    flatten_matches(&top, &reference);
}

/// Copy every file of `from` into a new directory `to` (layers name their parents relatively,
/// so the copy is a complete stack).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

#[test]
fn sigkill_during_commit_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let golden = dir.path().join("golden");
    std::fs::create_dir(&golden).unwrap();
    let base = golden.join("base.asif");
    let top = golden.join("top.asif");
    let expected = dir.path().join("expected.raw");
    diskkit_ok(&["create", "--size", "64M", "--chunk-size", "64K", p(&base)]);
    let mut rng = support::Rng(0x5eed);
    let chunk = dir.path().join("chunk.bin");
    for i in 0..8u64 {
        std::fs::write(&chunk, vec![(i as u8) | 0x80; 1 << 20]).unwrap();
        let off = (i * 7 % 64) << 20;
        diskkit_ok(&[
            "write",
            p(&base),
            "--offset",
            &off.to_string(),
            "--from",
            p(&chunk),
        ]);
    }
    diskkit_ok(&[
        "layer",
        "create",
        "--chunk-size",
        "64K",
        "--parent",
        p(&base),
        p(&top),
    ]);
    for i in 0..48u64 {
        let len = 4096 + rng.below(400_000);
        let off = rng.below((64 << 20) - len);
        std::fs::write(&chunk, vec![(i as u8) | 1; len as usize]).unwrap();
        diskkit_ok(&[
            "write",
            p(&top),
            "--offset",
            &off.to_string(),
            "--from",
            p(&chunk),
        ]);
        if i % 8 == 7 {
            diskkit_ok(&[
                "discard",
                p(&top),
                "--offset",
                &off.to_string(),
                "--length",
                "65536",
            ]);
        }
    }
    diskkit_ok(&["flatten", "-O", "raw", p(&top), p(&expected)]);

    commit_under_sigkill(
        dir.path(),
        &golden,
        "top.asif",
        &expected,
        12,
        &mut rng,
        |_| {},
        |_| {},
    );
}

/// Commit copies of the stack in `golden` (top layer `top_name` over `base.asif`): once without
/// interruption (timed; `after_full` checks the top afterwards), then `rounds` times killed with
/// SIGKILL at a random moment within that time. After every kill `after_kill` checks the top,
/// the stack (and, after the commit is run again to the end, the base alone) reads `expected`.
#[allow(clippy::too_many_arguments)]
fn commit_under_sigkill(
    dir: &Path,
    golden: &Path,
    top_name: &str,
    expected: &Path,
    rounds: u64,
    rng: &mut support::Rng,
    after_full: impl Fn(&Path),
    after_kill: impl Fn(&Path),
) {
    let probe = dir.join("probe");
    copy_dir(golden, &probe);
    let start = std::time::Instant::now();
    diskkit_ok(&["commit", p(&probe.join(top_name))]);
    let full = start.elapsed().as_micros() as u64;
    flatten_matches(&probe.join(top_name), expected);
    after_full(&probe.join(top_name));
    for round in 0..rounds {
        let work = dir.join(format!("round{round}"));
        copy_dir(golden, &work);
        let wtop = work.join(top_name);
        let mut child = std::process::Command::new(support::diskkit_bin())
            .args(["commit", p(&wtop)])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_micros(rng.below(full * 6 / 5 + 1)));
        let _ = child.kill();
        let _ = child.wait();
        after_kill(&wtop);
        // Whatever moment the kill hit, the stack opens and reads as before the commit...
        flatten_matches(&wtop, expected);
        // ...and running the commit again finishes it.
        diskkit_ok(&["commit", p(&wtop)]);
        flatten_matches(&wtop, expected);
        flatten_matches(&work.join("base.asif"), expected);
    }
}

#[test]
fn qcow2_backing_and_data_files_go_through_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("vm")).unwrap();
    let outside = d.join("outside.raw");
    tool_ok("qemu-img", &["create", "-q", "-f", "raw", p(&outside), "1M"]);
    let inside = d.join("vm/inside.raw");
    tool_ok("qemu-img", &["create", "-q", "-f", "raw", p(&inside), "1M"]);
    let cases = [
        ("passwd.qcow2", "/etc/passwd".to_owned()),
        ("dotdot.qcow2", "../outside.raw".to_owned()),
        ("absolute.qcow2", p(&inside).to_owned()),
    ];
    for (name, backing) in &cases {
        let img = d.join("vm").join(name);
        tool_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                backing,
                "-F",
                "raw",
                p(&img),
                "1M",
            ],
        );
        let out = diskkit(&["info", p(&img)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(
            err.contains("not allowed") && err.contains(backing.as_str()),
            "{name}: {err}"
        );
        // Reading it anyway needs an explicit choice.
        if *name != "passwd.qcow2" {
            diskkit_ok(&["info", "--allow-any-parent", p(&img)]);
        }
    }
    // The same backing file named relatively, in the same directory, is followed by default.
    let ok = d.join("vm/ok.qcow2");
    tool_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "inside.raw",
            "-F",
            "raw",
            p(&ok),
            "1M",
        ],
    );
    let info = info_json(&ok, &[]);
    assert_eq!(info["layers"].as_array().unwrap().len(), 2);
    // An external data file is refused outright.
    let data = d.join("vm/data.qcow2");
    let raw_data = d.join("vm/data.bin");
    tool_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("data_file={}", p(&raw_data)),
            p(&data),
            "1M",
        ],
    );
    let out = diskkit(&["info", "--allow-any-parent", p(&data)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data file"), "{err}");
}

#[test]
fn qcow2_top_commit_survives_sigkill() {
    // A qcow2 overlay over an ASIF base: commit killed at random moments, then finished.
    let dir = tempfile::tempdir().unwrap();
    let golden = dir.path().join("golden");
    std::fs::create_dir(&golden).unwrap();
    let base = golden.join("base.asif");
    let top = golden.join("top.qcow2");
    let expected = dir.path().join("expected.raw");
    diskkit_ok(&["create", "--size", "32M", p(&base)]);
    let chunk = dir.path().join("chunk.bin");
    std::fs::write(&chunk, vec![0x81u8; 3 << 20]).unwrap();
    diskkit_ok(&["write", p(&base), "--offset", "1M", "--from", p(&chunk)]);
    diskkit_ok(&[
        "layer",
        "create",
        "--format",
        "qcow2",
        "--parent",
        p(&base),
        p(&top),
    ]);
    let mut rng = support::Rng(0xc0ffee);
    for i in 0..32u64 {
        let len = 512 + rng.below(300_000);
        let off = rng.below((32 << 20) - len);
        std::fs::write(&chunk, vec![(i as u8) | 1; len as usize]).unwrap();
        diskkit_ok(&[
            "write",
            p(&top),
            "--offset",
            &off.to_string(),
            "--from",
            p(&chunk),
        ]);
    }
    diskkit_ok(&["discard", p(&top), "--offset", "1M", "--length", "128K"]);
    diskkit_ok(&["flatten", "-O", "raw", p(&top), p(&expected)]);
    let alone = |path: &Path| {
        format!(
            r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{}"}}}}"#,
            p(path)
        )
    };
    commit_under_sigkill(
        dir.path(),
        &golden,
        "top.qcow2",
        &expected,
        8,
        &mut rng,
        |top| {
            tool_ok("qemu-img", &["check", &alone(top)]);
        },
        // Every layer still opens and QEMU finds the qcow2 layer sound (leaks allowed).
        |top| {
            let check = std::process::Command::new("qemu-img")
                .args(["check", &alone(top)])
                .output()
                .unwrap();
            assert!(matches!(check.status.code(), Some(0 | 3)), "{check:?}");
        },
    );
}
