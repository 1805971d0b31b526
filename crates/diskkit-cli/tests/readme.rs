//! The README's quick start works as written: its shell blocks run, in order, in one scratch
//! directory, with this build of diskkit first on PATH. Blocks that need the network or a VM are
//! marked `<!-- readme-test: not run (...) -->` in the README and are not run here (the test
//! prints which); `/tmp/` in the recipes is the scratch directory, so runs do not collide.

mod support;

use std::path::Path;
use std::process::Command;

use support::Dir;

/// The quick start's ```sh blocks, each with whether it is run.
fn quick_start_blocks(readme: &str) -> Vec<(bool, String)> {
    let start = readme
        .find("\n## Quick start")
        .expect("README has a Quick start section");
    let section = &readme[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |i| i + 3);
    let section = &section[..end];
    let mut blocks = Vec::new();
    let mut lines = section.lines().peekable();
    let mut previous = "";
    while let Some(line) = lines.next() {
        if line.trim() == "```sh" {
            let run = !previous.trim().starts_with("<!-- readme-test: not run");
            let mut body = String::new();
            for l in lines.by_ref() {
                if l.trim() == "```" {
                    break;
                }
                body.push_str(l);
                body.push('\n');
            }
            blocks.push((run, body));
        }
        if !line.trim().is_empty() {
            previous = line;
        }
    }
    blocks
}

#[test]
fn quick_start_runs_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
        .expect("README.md");
    let blocks = quick_start_blocks(&readme);
    let run: Vec<&String> = blocks.iter().filter(|(r, _)| *r).map(|(_, b)| b).collect();
    assert!(run.len() >= 5, "too few runnable recipes: {blocks:?}");
    for (_, b) in blocks.iter().filter(|(r, _)| !*r) {
        eprintln!("not run (marked in the README):\n{b}");
    }
    let d = Dir::new();
    let scratch = d.path("work");
    std::fs::create_dir(&scratch).unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_diskkit")).parent().unwrap();
    let mut script = String::from("set -euo pipefail\n");
    for b in &run {
        script.push_str(&b.replace("/tmp/", &format!("{}/", scratch.display())));
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(&scratch)
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin_dir.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the quick start failed:\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    // What the recipes say they make, they make.
    for (needle, what) in [
        ("created 'disk.qcow2' (qcow2, 20 GiB)", "create"),
        ("converted 'disk.asif' to 'vm.img' (qcow2, 20 GiB)", "convert -O"),
        ("froze 'vm.qcow2' as 'vm.snap1.qcow2'", "snapshot"),
        (
            "unpacked the tarball 'rootfs.tar.zst' into 'root.qcow2' (qcow2, 1 GiB)",
            "unpack",
        ),
        (
            "serving 'vm.qcow2' (qcow2, 20 GiB) read-write at nbd+unix:///?socket=",
            "serve",
        ),
    ] {
        assert!(stdout.contains(needle), "{what}: no '{needle}' in\n{stdout}");
    }
    assert!(stdout.contains("hello\n"), "cat: {stdout}");
    assert_eq!(
        std::fs::read_to_string(scratch.join("etc-copy/motd")).unwrap(),
        "hello\n"
    );
}
