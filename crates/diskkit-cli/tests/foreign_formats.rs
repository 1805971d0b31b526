//! Formats diskkit does not read are refused by name (images made by `qemu-img create`),
//! unless `-f raw` asks for their bytes; a file read as RAW whose name says otherwise gets a
//! warning.

mod support;

use support::{diskkit, diskkit_ok, tool_ok, Dir};

/// (qemu-img format, extra create options, file name, the name diskkit must give).
const MADE_BY_QEMU: &[(&str, &[&str], &str, &str)] = &[
    ("vmdk", &[], "sparse.vmdk", "VMDK (sparse)"),
    (
        "vmdk",
        &["-o", "subformat=streamOptimized"],
        "stream.vmdk",
        "VMDK (stream-optimized)",
    ),
    (
        "vmdk",
        &["-o", "subformat=monolithicFlat"],
        "flat.vmdk",
        "VMDK (descriptor)",
    ),
    ("vhdx", &[], "disk.vhdx", "VHDX"),
    ("vpc", &[], "disk.vhd", "VHD"),
    ("vpc", &["-o", "subformat=fixed"], "fixed.vhd", "VHD (fixed)"),
    ("vdi", &[], "disk.vdi", "VDI"),
    ("qed", &[], "disk.qed", "QED"),
    ("parallels", &[], "disk.hdd", "Parallels"),
];

fn refused_as(d: &Dir, file: &str, name: &str) {
    let path = d.s(file);
    for args in [
        vec!["info", path.as_str()],
        vec!["map", path.as_str()],
        vec!["read", path.as_str(), "--length", "512"],
    ] {
        let out = diskkit(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} was not refused: {err}");
        assert!(
            err.contains(&format!("unsupported format: {name};")) && err.contains("qemu-img"),
            "{args:?}: {err}"
        );
    }
    // Converting it is refused too, and leaves nothing behind.
    let out = diskkit(&["convert", "-O", "asif", &path, &d.s("out.asif")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!d.path("out.asif").exists());
    // -f raw reads the container's bytes as they are.
    let len = std::fs::metadata(&path).unwrap().len();
    let n = len.min(65536) - len.min(65536) % 512;
    let bytes = diskkit_ok(&[
        "read",
        "-f",
        "raw",
        &path,
        "--length",
        &n.to_string(),
        "--to",
        &d.s("bytes"),
    ]);
    assert!(bytes.is_empty());
    assert_eq!(
        std::fs::read(d.path("bytes")).unwrap(),
        std::fs::read(&path).unwrap()[..n as usize],
        "{file}: -f raw did not read the file's bytes"
    );
    let info = diskkit_ok(&["info", "-f", "raw", &path]);
    assert!(info.contains("raw"), "{info}");
}

#[test]
fn images_made_by_qemu_img_are_refused_by_name() {
    let d = Dir::new();
    for (format, extra, file, name) in MADE_BY_QEMU {
        let mut args = vec!["create", "-q", "-f", format];
        args.extend_from_slice(extra);
        let path = d.s(file);
        args.extend_from_slice(&[path.as_str(), "16M"]);
        tool_ok("qemu-img", &args);
        refused_as(&d, file, name);
    }
}

#[test]
fn luks_and_dmg_are_refused_by_name() {
    let d = Dir::new();
    let args = [
        "create",
        "-q",
        "-f",
        "luks",
        "--object",
        "secret,id=sec0,data=diskkit",
        "-o",
        "key-secret=sec0,iter-time=10",
        &d.s("disk.luks"),
        "16M",
    ];
    // qemu-img times PBKDF2 on the CPU to choose the iteration count, and on a busy machine
    // that measurement can fail ("Unable to get accurate CPU usage"): try again then.
    for attempt in 1.. {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("cannot run qemu-img");
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            break;
        }
        assert!(
            attempt < 10 && err.contains("accurate CPU usage"),
            "qemu-img {args:?} failed: {err}"
        );
    }
    refused_as(&d, "disk.luks", "LUKS");
    // A UDIF image ends with its `koly` trailer (no tool here writes DMGs).
    let mut dmg = vec![0u8; 1 << 20];
    let n = dmg.len();
    dmg[n - 512..n - 508].copy_from_slice(b"koly");
    std::fs::write(d.path("disk.dmg"), &dmg).unwrap();
    refused_as(&d, "disk.dmg", "DMG (UDIF)");
}

#[test]
fn raw_named_like_another_format_gets_a_warning() {
    let d = Dir::new();
    std::fs::write(d.path("blank.vmdk"), vec![0u8; 1 << 20]).unwrap();
    let out = diskkit(&["info", &d.s("blank.vmdk")]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("named like a VMDK image") && err.contains("RAW"),
        "{err}"
    );
    // Saying the format is enough to quiet it.
    let out = diskkit(&["info", "-f", "raw", &d.s("blank.vmdk")]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).is_empty());
    // And plain names get none.
    std::fs::write(d.path("blank.img"), vec![0u8; 1 << 20]).unwrap();
    let out = diskkit(&["info", &d.s("blank.img")]);
    assert!(String::from_utf8_lossy(&out.stderr).is_empty());
}
