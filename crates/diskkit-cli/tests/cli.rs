//! The command line as a subprocess: results, exit codes and error messages.

mod support;

use support::{diskkit, diskkit_ok, Dir};

fn assert_error(args: &[&str], needle: &str) {
    let out = diskkit(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "diskkit {args:?}: expected exit 2, got {:?}; stderr: {stderr}",
        out.status
    );
    assert!(
        stderr.contains(needle),
        "diskkit {args:?}: stderr {stderr:?} lacks {needle:?}"
    );
    assert!(
        !stderr.contains("panicked"),
        "diskkit {args:?} panicked: {stderr}"
    );
    assert!(stderr.starts_with("diskkit: error: "), "{stderr}");
    // Usage errors are clap's whole message (usage, tips, the subcommand's help); every other
    // error is one line.
    if !stderr.contains("For more information, try 'diskkit") {
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one-line message expected: {stderr}"
        );
    }
}

#[test]
fn create_info_round_trip_json() {
    let d = Dir::new();
    let img = d.s("a.asif");
    diskkit_ok(&["create", "--format", "asif", "--size", "40G", &img]);
    let info: serde_json::Value =
        serde_json::from_str(&diskkit_ok(&["info", "--output", "json", &img])).unwrap();
    assert_eq!(info["format"], "asif");
    assert_eq!(info["virtual_size"], 40u64 << 30);
    assert_eq!(info["block_size"], 512);
    assert_eq!(info["block_count"], (40u64 << 30) / 512);
    assert_eq!(info["open_mode"], "read-only");
    assert!(info["layer_type"].is_null());
    assert!(info["parent_uuid"].is_null());
    assert!(info["layer_uuid"].as_str().unwrap().len() == 36);
    assert!(info["stable_uuid"].as_str().unwrap().len() == 36);
    // The whole 40 GiB image is a few MiB on the host.
    assert!(info["file_size"].as_u64().unwrap() <= 4 << 20);
}

#[test]
fn sizes_accept_units() {
    let d = Dir::new();
    for (arg, bytes) in [
        ("40G", 40u64 << 30),
        ("40GB", 40 << 30),
        ("40GiB", 40 << 30),
        ("512M", 512 << 20),
        ("1000B", 1024),
        ("0x100000", 1 << 20),
    ] {
        let p = d.s(&format!("{arg}.raw"));
        diskkit_ok(&["create", "--format", "raw", "--size", arg, &p]);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), bytes, "{arg}");
    }
    let p = d.s("b4k.asif");
    diskkit_ok(&[
        "create",
        "--format",
        "asif",
        "--block-size",
        "4096",
        "--size",
        "1G",
        &p,
    ]);
    let info: serde_json::Value =
        serde_json::from_str(&diskkit_ok(&["info", "--output", "json", &p])).unwrap();
    assert_eq!(info["block_size"], 4096);
    assert_eq!(info["block_count"], (1u64 << 30) / 4096);
}

#[test]
fn bad_arguments_exit_2() {
    let d = Dir::new();
    let p = d.s("x.asif");
    assert_error(
        &["create", "--format", "asif", "--size", "12X", &p],
        "unknown unit",
    );
    assert_error(
        &["create", "--format", "asif", "--size", "0", &p],
        "greater than zero",
    );
    assert_error(&["create", "--format", "asif", "--size", "17E", &p], "too large");
    assert_error(
        &[
            "create",
            "--format",
            "asif",
            "--size",
            "1G",
            "--block-size",
            "1000",
            &p,
        ],
        "block size",
    );
    assert_error(
        &[
            "create",
            "--format",
            "asif",
            "--size",
            "1G",
            "--chunk-size",
            "1000",
            &p,
        ],
        "chunk size",
    );
    assert_error(&["create", "--format", "asif", "--size", "5P", &p], "exceeds");
    assert_error(&["info", &d.s("missing.asif")], "No such file");
    assert_error(&["frobnicate"], "unrecognized subcommand");
    assert!(!d.path("x.asif").exists(), "nothing left behind");
}

#[test]
fn refuses_to_overwrite_without_force() {
    let d = Dir::new();
    let p = d.s("a.img");
    diskkit_ok(&["create", "--format", "raw", "--size", "1M", &p]);
    assert_error(&["create", "--format", "asif", "--size", "1M", &p], "exists");
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20, "untouched");
    diskkit_ok(&["create", "--format", "asif", "--size", "1M", "--force", &p]);
    let info: serde_json::Value =
        serde_json::from_str(&diskkit_ok(&["info", "--output", "json", &p])).unwrap();
    assert_eq!(info["format"], "asif");
    // convert too
    let q = d.s("b.raw");
    diskkit_ok(&["create", "--format", "raw", "--size", "1M", &q]);
    assert_error(&["convert", "-O", "raw", &p, &q], "exists");
    diskkit_ok(&["convert", "-O", "raw", "--force", &p, &q]);
}

#[test]
fn corrupt_images_are_clear_errors() {
    let d = Dir::new();
    let p = d.path("c.asif");
    diskkit_ok(&["create", "--format", "asif", "--size", "64M", p.to_str().unwrap()]);
    let good = std::fs::read(&p).unwrap();
    type Mutation = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Mutation, &str)> = vec![
        (
            "version",
            Box::new(|b: &mut Vec<u8>| b[4..8].copy_from_slice(&9u32.to_be_bytes())),
            "version 9",
        ),
        (
            "block size",
            Box::new(|b: &mut Vec<u8>| b[0x44..0x46].copy_from_slice(&0u16.to_be_bytes())),
            "block size",
        ),
        (
            "truncated",
            Box::new(|b: &mut Vec<u8>| b.truncate(300)),
            "truncated",
        ),
        (
            "directory entry",
            Box::new(|b: &mut Vec<u8>| b[0x208..0x210].copy_from_slice(&999u64.to_be_bytes())),
            "outside",
        ),
        (
            "sectors",
            Box::new(|b: &mut Vec<u8>| b[0x30..0x38].copy_from_slice(&0u64.to_be_bytes())),
            "sector count",
        ),
    ];
    for (name, mutate, needle) in cases {
        let mut b = good.clone();
        mutate(&mut b);
        let q = d.path(&format!("{}.asif", name.replace(' ', "_")));
        std::fs::write(&q, &b).unwrap();
        assert_error(&["info", q.to_str().unwrap()], needle);
        assert_error(&["read", q.to_str().unwrap(), "--length", "4096"], needle);
    }
}

#[test]
fn read_write_discard_resize() {
    let d = Dir::new();
    let img = d.s("rw.asif");
    diskkit_ok(&["create", "--format", "asif", "--size", "8M", &img]);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(d.path("in.bin"), &data).unwrap();
    diskkit_ok(&["write", &img, "--offset", "12345", "--from", &d.s("in.bin")]);
    diskkit_ok(&[
        "read",
        &img,
        "--offset",
        "12345",
        "--length",
        "300000",
        "--to",
        &d.s("out.bin"),
    ]);
    assert_eq!(std::fs::read(d.path("out.bin")).unwrap(), data);
    // stdout
    let out = diskkit(&["read", &img, "--offset", "12345", "--length", "1000"]);
    assert_eq!(&out.stdout[..], &data[..1000]);
    diskkit_ok(&["discard", &img, "--offset", "0", "--length", "4M"]);
    let out = diskkit(&["read", &img, "--offset", "12345", "--length", "1000"]);
    assert!(out.stdout.iter().all(|&b| b == 0));
    diskkit_ok(&["resize", &img, "+8M"]);
    let info: serde_json::Value =
        serde_json::from_str(&diskkit_ok(&["info", "--output", "json", &img])).unwrap();
    assert_eq!(info["virtual_size"], 16u64 << 20);
    diskkit_ok(&["resize", &img, "-12M"]);
    let info: serde_json::Value =
        serde_json::from_str(&diskkit_ok(&["info", "--output", "json", &img])).unwrap();
    assert_eq!(info["virtual_size"], 4u64 << 20);
    assert_error(&["resize", &img, "-4M"], "shrink");
    assert_error(&["read", &img, "--offset", "4M", "--length", "1"], "past the end");
    std::fs::write(d.path("big.bin"), vec![1u8; 5 << 20]).unwrap();
    assert_error(&["write", &img, "--from", &d.s("big.bin")], "does not fit");
    // From a pipe the length is not known beforehand: what fits is written, and said so.
    let out = std::process::Command::new(support::diskkit_bin())
        .args(["write", &img])
        .stdin(
            std::fs::File::open(d.path("big.bin"))
                .map(std::process::Stdio::from)
                .unwrap(),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("the input runs past the end") && err.contains("the first 4194304 bytes were written"),
        "{err}"
    );
    // stdin
    let mut child = std::process::Command::new(support::diskkit_bin())
        .args(["write", &img, "--offset", "512"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"from stdin").unwrap();
    assert!(child.wait().unwrap().success());
    let out = diskkit(&["read", &img, "--offset", "512", "--length", "10"]);
    assert_eq!(&out.stdout, b"from stdin");
}

#[test]
fn compare_exit_codes() {
    let d = Dir::new();
    let a = d.s("a.raw");
    let b = d.s("b.asif");
    diskkit_ok(&["create", "--format", "raw", "--size", "4M", &a]);
    diskkit_ok(&["create", "--format", "asif", "--size", "4M", &b]);
    assert!(diskkit_ok(&["compare", &a, &b]).contains("identical"));
    std::fs::write(d.path("x"), b"x").unwrap();
    diskkit_ok(&["write", &b, "--offset", "3000000", "--from", &d.s("x")]);
    let out = diskkit(&["compare", &a, &b]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Content mismatch at offset 3000000!"));
}

#[test]
fn map_reports_data_zero_and_absent() {
    let d = Dir::new();
    let img = d.s("m.asif");
    diskkit_ok(&["create", "--format", "asif", "--size", "8M", &img]);
    std::fs::write(d.path("x"), vec![7u8; 4096]).unwrap();
    diskkit_ok(&["write", &img, "--offset", "1M", "--from", &d.s("x")]);
    std::fs::write(d.path("y"), vec![9u8; 1 << 20]).unwrap();
    diskkit_ok(&["write", &img, "--offset", "4M", "--from", &d.s("y")]);
    // Discarding a written chunk leaves it in the zero state (10); a never-written one stays absent.
    diskkit_ok(&["discard", &img, "--offset", "4M", "--length", "2M"]);
    let runs: serde_json::Value =
        serde_json::from_str(&diskkit_ok(&["map", "--output", "json", &img])).unwrap();
    let runs = runs.as_array().unwrap();
    let find = |start: u64| {
        runs.iter()
            .find(|r| r["start"] == start)
            .unwrap_or_else(|| panic!("no run at {start}: {runs:?}"))
    };
    assert_eq!(find(1 << 20)["data"], true);
    assert_eq!(find(1 << 20)["length"], 4096);
    assert_eq!(find(1 << 20)["depth"], 1);
    assert_eq!(find(4 << 20)["zero"], true);
    assert_eq!(find(4 << 20)["present"], true);
    assert_eq!(find(4 << 20)["length"], 1 << 20);
    assert_eq!(find(5 << 20)["present"], false);
    assert_eq!(find(0)["present"], false);
    let total: u64 = runs.iter().map(|r| r["length"].as_u64().unwrap()).sum();
    assert_eq!(total, 8 << 20);
}
