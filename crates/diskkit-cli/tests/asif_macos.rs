//! An ASIF image made by macOS, against diskkit's own ASIF output.
//!
//! The image is `tests/_data/disk/asif/basic.asif.gz` of dissect.hypervisor 3.20's source
//! release on PyPI (a 488 MiB disk whose MiB i holds byte i for i < 100, and more data after). It is not
//! committed: `scripts/fetch-dissect-source.sh` (run by `.ci/run`) caches the release in
//! `target/test-cache/`. Without it the test fails (set `DISKKIT_DISSECT_TARBALL` to use
//! another copy).
//!
//! diskkit must read it as dissect.hypervisor does, and an ASIF image diskkit creates with the same size must
//! carry the same header (but for its UUID) and the same metadata block (but for the stable
//! UUID's value): tart's ASIF disks go to Macs.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{diskkit_ok, Dir};

const MIB: usize = 1 << 20;

fn tarball() -> PathBuf {
    if let Some(p) = std::env::var_os("DISKKIT_DISSECT_TARBALL") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-cache/dissect_hypervisor-3.20.tar.gz")
}

/// The macOS image, decompressed into `dir`.
fn macos_image(dir: &Dir) -> PathBuf {
    let tb = tarball();
    assert!(
        tb.exists(),
        "{} is missing: run scripts/fetch-dissect-source.sh (CI does, in .ci/run)",
        tb.display()
    );
    let out = dir.path("basic.asif");
    let status = Command::new("sh")
        .arg("-c")
        .arg(r#"tar -xzOf "$1" dissect_hypervisor-3.20/tests/_data/disk/asif/basic.asif.gz | gunzip > "$2""#)
        .arg("sh")
        .arg(&tb)
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "extracting basic.asif from {}", tb.display());
    out
}

/// The metadata block of an ASIF file: from its `meta` magic, the header sector and the
/// (rounded) data.
fn metadata_block(file: &[u8]) -> &[u8] {
    let at = file
        .windows(8)
        .position(|w| w == b"meta\0\0\0\x01")
        .expect("a metadata block");
    &file[at..at + 1024]
}

#[test]
fn a_macos_image_reads_right_and_diskkit_writes_the_same_header_and_metadata() {
    let d = Dir::new();
    let macos = macos_image(&d);
    let info: serde_json::Value = serde_json::from_str(&diskkit_ok(&[
        "info",
        "--output",
        "json",
        &macos.to_string_lossy(),
    ]))
    .unwrap();
    assert_eq!(info["format"], "asif", "{info}");
    assert_eq!(info["virtual_size"], 512_000_000u64, "{info}");

    // Contents: MiB i holds byte i for i < 100 (as dissect's own test says).
    diskkit_ok(&["convert", &macos.to_string_lossy(), &d.s("basic.raw")]);
    let raw = std::fs::read(d.path("basic.raw")).unwrap();
    assert_eq!(raw.len(), 512_000_000);
    for i in 0..100 {
        assert!(
            raw[i * MIB..(i + 1) * MIB].iter().all(|&b| b == i as u8),
            "MiB {i} is not all {i:#x}"
        );
    }
    // All of it as dissect.hypervisor reads it.
    let script = "import hashlib, sys\n\
from dissect.hypervisor.disk.asif import ASIF\n\
s = ASIF(open(sys.argv[1], 'rb')).open()\n\
h = hashlib.sha256()\n\
for b in iter(lambda: s.read(1 << 20), b''): h.update(b)\n\
print(h.hexdigest())\n";
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(&macos)
        .output()
        .expect("python3 with dissect.hypervisor (.ci/run installs it)");
    assert!(
        out.status.success(),
        "dissect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dissect = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let ours = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&raw));
    assert_eq!(
        ours, dissect,
        "diskkit and dissect.hypervisor read different disks"
    );
    drop(raw);

    // diskkit's image of the same size: the same header but for the UUID at 0x20.
    diskkit_ok(&["create", "--size", "512000000B", &d.s("dk.asif")]);
    let ours = std::fs::read(d.path("dk.asif")).unwrap();
    let theirs = std::fs::read(&macos).unwrap();
    let (mut a, mut b) = (ours[..512].to_vec(), theirs[..512].to_vec());
    a[0x20..0x30].fill(0);
    b[0x20..0x30].fill(0);
    assert_eq!(a, b, "the headers differ beyond the UUID");

    // The metadata block: the same bytes once the stable UUID is the same (data size
    // rounded up to 512, the plist ending in a newline, the UUID in lower case).
    let dk_uuid = serde_json::from_str::<serde_json::Value>(&diskkit_ok(&[
        "info",
        "--output",
        "json",
        &d.s("dk.asif"),
    ]))
    .unwrap()["stable_uuid"]
        .as_str()
        .expect("a stable uuid")
        .to_string();
    assert_eq!(dk_uuid, dk_uuid.to_lowercase());
    let macos_uuid = info["stable_uuid"].as_str().unwrap();
    assert_eq!(macos_uuid, "13db9632-b79f-4e95-aada-835d5ef97bba");
    let ours = String::from_utf8_lossy(metadata_block(&ours)).replace(&dk_uuid, macos_uuid);
    let theirs = String::from_utf8_lossy(metadata_block(&theirs)).into_owned();
    assert_eq!(ours, theirs, "the metadata blocks differ");
}
