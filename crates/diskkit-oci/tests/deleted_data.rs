//! Deleted content does not stay in the image: files that later layers delete (whiteouts,
//! opaque directories, replacement) give their blocks back, the blocks are discarded and
//! reused, and no byte of the deleted files is left in the output (RAW file bytes, and the
//! disk QEMU reads out of the ASIF and qcow2 outputs). Kept files, including a hard link whose
//! first name was deleted, keep their content. Checked with e2fsck -fn, debugfs and qemu-img.

mod support;

use std::path::Path;
use std::process::Command;

use diskkit::ImageFormat;
use diskkit_oci::{unpack, NoProgress, UnpackOptions};
use support::{debugfs, dump, e2fsck, layout, run};

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn fill(tag: &str, size: usize) -> Vec<u8> {
    let unit = format!("{tag}\n").into_bytes();
    unit.iter().copied().cycle().take(size).collect()
}

fn layers(dir: &Path) -> std::path::PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_delete_layers.py");
    run(Command::new("python3").arg(script).arg(dir));
    run(Command::new("zstd").args(["-q", "-f"]).arg(dir.join("d2.tar")));
    let lay = dir.join("lay");
    layout(
        &lay,
        "v1",
        &[&dir.join("d1.tar"), &dir.join("d2.tar.zst"), &dir.join("d3.tar")],
    );
    lay
}

/// The checks on a RAW filesystem image holding the merged tree.
fn check_fs(raw: &Path) {
    e2fsck(raw);
    let bytes = std::fs::read(raw).unwrap();
    assert!(!contains(&bytes, b"GONE-"), "deleted content left in the image");
    for (name, want) in [
        ("new", fill("KEEP-NEW", 3 << 20)),
        ("linked-2", fill("KEEP-LINKED", 50_000)),
        ("small-01", fill("KEEP-SMALL-01", 10_000)),
        ("small-39", fill("KEEP-SMALL-39", 10_000)),
        ("dir/z", fill("KEEP-Z", 5_000)),
        ("keep-2", fill("KEEP-TWO", 1 << 20)),
    ] {
        assert!(dump(raw, name) == want, "{name}");
    }
    let ls = debugfs(raw, "ls -l /");
    for gone in ["big", "small-00", "small-38", "linked "] {
        assert!(!ls.contains(&format!(" {gone}\n")), "{gone} still listed:\n{ls}");
    }
    assert!(!debugfs(raw, "ls /dir").contains(" a "));
    assert!(debugfs(raw, "stat linked-2").contains("Links: 1"));
}

#[test]
fn deleted_files_leave_no_data_and_give_their_blocks_back() {
    let t = tempfile::tempdir().unwrap();
    let lay = layers(t.path());
    let raw = t.path().join("out.img");
    let report = unpack(&lay, &raw, &UnpackOptions::default(), &mut NoProgress).unwrap();
    check_fs(&raw);
    // Blocks come free when the deleting layer is done (its whiteouts apply to the whole
    // layer): `keep-2` (1 MiB, layer 3) goes into the 4 MiB `big` gave back in layer 2, below
    // everything layer 1 wrote after `big`; `new` (layer 2) could not and went to the end.
    let first = |f: &str| -> u64 { debugfs(&raw, &format!("bmap {f} 0")).trim().parse().unwrap() };
    assert!(
        first("keep-2") < first("small-01"),
        "keep-2 was not put in big's blocks"
    );
    assert!(first("new") > first("linked-2"));
    // Data in use: the kept files (about 4.5 MiB) and metadata, not the 9.5 MiB written.
    assert!(report.bytes_used < 9 << 20, "{report:?}");
    let on_disk = std::fs::metadata(&raw).unwrap();
    let allocated = std::os::unix::fs::MetadataExt::blocks(&on_disk) * 512;
    assert!(allocated < 8 << 20, "{allocated} bytes allocated");

    // The same layers into ASIF and qcow2: QEMU reads the disk out, and the container file
    // itself keeps no deleted bytes either.
    for (format, name, qemu) in [
        (ImageFormat::Asif, "out.asif", None),
        (ImageFormat::Qcow2, "out.qcow2", Some("qcow2")),
    ] {
        let img = t.path().join(name);
        let options = UnpackOptions {
            format,
            ..UnpackOptions::default()
        };
        unpack(&lay, &img, &options, &mut NoProgress).unwrap();
        let out = t.path().join(format!("{name}.raw"));
        match qemu {
            Some(fmt) => {
                run(Command::new("qemu-img")
                    .args(["convert", "-f", fmt, "-O", "raw"])
                    .arg(&img)
                    .arg(&out));
                run(Command::new("qemu-img").args(["check", "-f", fmt]).arg(&img));
            }
            None => {
                let image = diskkit::DiskImage::open(&img, &diskkit::OpenOptions::new()).unwrap();
                let mut buf = vec![0u8; image.size() as usize];
                image.read_at(&mut buf, 0).unwrap();
                std::fs::write(&out, &buf).unwrap();
            }
        }
        check_fs(&out);
        let container = std::fs::read(&img).unwrap();
        assert!(
            !contains(&container, b"GONE-"),
            "{name}: deleted bytes left in the file"
        );
    }
}
