//! What `unpack` writes: reproducible images, ASIF output, and sparse files (GNU and PAX sparse
//! tar entries, a 100 GiB file with 5 bytes of data) that stay sparse in the image. Checked
//! with e2fsck -fn, debugfs and diskkit's reader.

mod support;

use std::process::Command;

use diskkit::ImageFormat;
use diskkit_oci::{unpack, NoProgress, UnpackOptions};
use support::{debugfs, do_unpack, dump, e2fsck, fixtures, layout, listing, run, sha, sparse_layout};

#[test]
fn reproducible_and_asif() {
    let t = tempfile::tempdir().unwrap();
    fixtures(t.path());
    let mut bytes = Vec::new();
    for name in ["r1.img", "r2.img"] {
        let options = UnpackOptions {
            reproducible: true,
            ..UnpackOptions::default()
        };
        let img = t.path().join(name);
        unpack(&t.path().join("lay"), &img, &options, &mut NoProgress).unwrap();
        bytes.push(std::fs::read(&img).unwrap());
    }
    assert!(bytes[0] == bytes[1], "reproducible images differ");
    let options = UnpackOptions {
        format: ImageFormat::Asif,
        size: Some(1 << 30),
        ..UnpackOptions::default()
    };
    let asif = t.path().join("out.asif");
    unpack(&t.path().join("lay"), &asif, &options, &mut NoProgress).unwrap();
    let image = diskkit::DiskImage::open(&asif, &diskkit::OpenOptions::new()).unwrap();
    assert_eq!(image.format(), ImageFormat::Asif);
    assert_eq!(image.size(), 1 << 30);
    let raw = t.path().join("asif.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(image.size()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < image.size() {
        image.read_at(&mut buf, off).unwrap();
        if buf.iter().any(|&b| b != 0) {
            std::os::unix::fs::FileExt::write_all_at(&f, &buf, off).unwrap();
        }
        off += buf.len() as u64;
    }
    e2fsck(&raw);
    assert_eq!(listing(&raw), listing(&t.path().join("r1.img")));
    assert_eq!(
        support::view_tree(&raw),
        support::view_tree(&t.path().join("r1.img"))
    );
}

#[test]
fn gnu_sparse_files() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let src = d.join("src");
    std::fs::create_dir(&src).unwrap();
    let f = std::fs::File::create(src.join("sparse.bin")).unwrap();
    f.set_len(10 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"hello", 5_000_000).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"tail", (10 << 20) - 4).unwrap();
    drop(f);
    let mut expected = vec![0u8; 10 << 20];
    expected[5_000_000..5_000_005].copy_from_slice(b"hello");
    expected[(10 << 20) - 4..].copy_from_slice(b"tail");
    // PAX 1.0 (GNU tar's default with --format=pax), PAX 0.1 and old GNU sparse.
    for (format, extra) in [("pax", None), ("pax", Some("0.1")), ("gnu", None)] {
        let tar = d.join("l.tar");
        let mut cmd = Command::new("tar");
        cmd.args(["--sparse", &format!("--format={format}"), "-C"])
            .arg(&src);
        if let Some(v) = extra {
            cmd.arg(format!("--sparse-version={v}"));
        }
        run(cmd.arg("-cf").arg(&tar).arg("sparse.bin"));
        let lay = d.join(format!("lay-{format}-{}", extra.unwrap_or("")));
        layout(&lay, "v1", &[&tar]);
        let img = d.join("sparse.img");
        let _ = std::fs::remove_file(&img);
        do_unpack(&lay, None, &img).unwrap();
        e2fsck(&img);
        let l = listing(&img);
        assert_eq!(
            l.keys().collect::<Vec<_>>(),
            ["sparse.bin"],
            "{format} {extra:?}: {l:?}"
        );
        assert!(
            dump(&img, "/sparse.bin") == expected,
            "{format} {extra:?}: content differs"
        );
        let view = support::view_tree(&img);
        assert_eq!(view.len(), 1);
        assert_eq!(
            view["sparse.bin"].sha,
            sha(&expected),
            "reader: {format} {extra:?}"
        );
        // Zero ranges are not written: the image file stays small on the host.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&img).unwrap().blocks() * 512 < 4 << 20);
    }
}

/// A 100 GiB sparse file with 5 bytes of data: only its data block is stored (the sparse map
/// says where the data is; the holes are never written), and the bytes land in the right block.
#[test]
fn huge_sparse_file_is_cheap() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let src = d.join("src");
    std::fs::create_dir(&src).unwrap();
    let f = std::fs::File::create(src.join("huge")).unwrap();
    let size = 100u64 << 30;
    f.set_len(size).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"hello", 50 << 30).unwrap();
    drop(f);
    sparse_layout(&src, "huge", &d.join("lay"));
    let img = d.join("out.img");
    do_unpack(&d.join("lay"), None, &img).unwrap();
    e2fsck(&img);
    assert!(debugfs(&img, "stat /huge").contains(&format!("Size: {size}")));
    let blk: u64 = debugfs(&img, &format!("bmap /huge {}", (50u64 << 30) / 4096))
        .trim()
        .parse()
        .unwrap();
    let f = std::fs::File::open(&img).unwrap();
    let mut b = [0u8; 5];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, blk * 4096).unwrap();
    assert_eq!(&b, b"hello");
    use std::os::unix::fs::MetadataExt;
    assert!(std::fs::metadata(&img).unwrap().blocks() * 512 < 64 << 20);
    // The holes are holes in ext4 too: one data block, and a small filesystem.
    let st = debugfs(&img, "stat /huge");
    assert!(st.contains("Blockcount: 8\n"), "{st}");
    assert!(std::fs::metadata(&img).unwrap().len() < 64 << 20);
    let view = support::view_tree_shallow(&img);
    assert_eq!(view["huge"].size, size);
    let at = (50u64 << 30) - 3;
    assert_eq!(support::view_read_at(&img, "/huge", at, 11), b"\0\0\0hello\0\0\0");
}
