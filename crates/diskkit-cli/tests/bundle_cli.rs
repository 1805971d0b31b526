//! `diskkit bundle` on the command line: what it prints, -q, JSON, errors, standard input.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn diskkit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_diskkit"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = diskkit(args);
    assert!(
        o.status.success(),
        "diskkit {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.stderr.is_empty(),
        "diskkit {args:?} wrote to stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn create_extract_verify_info() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let raw = d.join("disk.raw");
    let f = fs::File::create(&raw).unwrap();
    f.set_len(16 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xabu8; 65536], 1 << 20).unwrap();
    fs::write(d.join("m.json"), br#"{"version":1,"memory":1536,"cores":2}"#).unwrap();
    let b = d.join("b.tar.zst");
    let line = ok(&[
        "bundle",
        "create",
        "--machine",
        p(&d.join("m.json")),
        p(&raw),
        p(&b),
    ]);
    assert!(
        line.starts_with(&format!("created {}: disk.img 16 MiB", b.display())),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1);
    // Refused without --force, with one error line; allowed with it (quietly).
    let o = diskkit(&["bundle", "create", p(&raw), p(&b)]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("diskkit: error: ") && err.contains("--force") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(
        ok(&[
            "bundle",
            "create",
            "-q",
            "--force",
            "--machine",
            p(&d.join("m.json")),
            p(&raw),
            p(&b)
        ]),
        ""
    );

    let v = ok(&["bundle", "verify", p(&b)]);
    assert!(v.contains("valid bundle") && v.contains("sha256"), "{v}");
    assert_eq!(ok(&["bundle", "verify", "-q", p(&b)]), "");
    let info: serde_json::Value =
        serde_json::from_str(&ok(&["bundle", "info", "--output", "json", p(&b)])).unwrap();
    assert_eq!(info["machine"]["memory"], 1536);
    assert_eq!(info["disk"]["size"], 16 << 20);
    assert_eq!(info["disk"]["sparse"], true);
    assert_eq!(info["layer"]["backing_file"], "disk.img");
    assert_eq!(
        info["members"],
        serde_json::json!(["machine.json", "layer.qcow2", "disk.img"])
    );
    let human = ok(&["bundle", "info", p(&b)]);
    assert!(
        human.contains("memory 1536 MiB") && human.contains("cores 2"),
        "{human}"
    );

    let x = d.join("x");
    let line = ok(&["bundle", "extract", p(&b), p(&x)]);
    assert!(line.starts_with("extracted"), "{line}");
    assert_eq!(fs::read(x.join("disk.img")).unwrap(), fs::read(&raw).unwrap());
    // From standard input, as ASIF.
    let y = d.join("y");
    let mut child = Command::new(env!("CARGO_BIN_EXE_diskkit"))
        .args(["bundle", "extract", "-q", "--format", "asif", "-", p(&y)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&fs::read(&b).unwrap())
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());
    assert!(y.join("disk.asif").exists() && y.join("layer.qcow2").exists());
    let cmp = diskkit(&["compare", p(&raw), p(&y.join("layer.qcow2"))]);
    assert!(cmp.status.success(), "{}", String::from_utf8_lossy(&cmp.stderr));

    // Errors: one line, exit 2; nothing left behind.
    fs::write(d.join("junk.tar.zst"), b"not a bundle").unwrap();
    for args in [
        vec!["bundle", "extract", p(&d.join("junk.tar.zst")), p(&d.join("z"))],
        vec!["bundle", "verify", p(&d.join("junk.tar.zst"))],
        vec!["bundle", "verify", "--max-disk-size", "1M", p(&b)],
        vec!["bundle", "verify", "--sha256", "00", p(&b)],
        vec!["bundle", "info", p(&d.join("missing.tar.zst"))],
        vec!["bundle", "verify", p(d)],
    ] {
        let o = diskkit(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with("diskkit: error: ") && err.lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    assert!(!d.join("z").exists());
    let names: Vec<String> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
}
