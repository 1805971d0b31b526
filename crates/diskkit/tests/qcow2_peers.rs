//! qcow2 against QEMU's own tools (qemu-img, qemu-io; QEMU 7.2 or later).
//!
//! Images diskkit writes must pass `qemu-img check` with no errors and no leaks, read the same
//! in `qemu-img compare` as a RAW reference, and map the same in `qemu-img map`; images QEMU
//! writes (plain, zero clusters, compressed with zlib and zstd, every cluster size, with a
//! backing file) must read the same in diskkit. A tool that is missing fails the test.

mod qcow2_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use diskkit::storage::{FileStorage, Storage};
use diskkit::{open_layer, CreateOptions, DiskImage, ErrorKind, ImageFormat, Mapping, OpenOptions};
use qcow2_support::{qemu_create_qcow2, qemu_dirty, run, run_ok, s};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `qemu-img check` must report no errors and no leaks. (`-U`: diskkit may still hold the
/// image open; what it flushed must be consistent on disk.)
fn check_clean(path: &Path) {
    let out = run("qemu-img", &["check", "-U", "--output=json", s(path)]);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("qemu-img check: {text}{}", String::from_utf8_lossy(&out.stderr)));
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            v.get(key).and_then(|x| x.as_u64()).unwrap_or(0),
            0,
            "{key} in {text}"
        );
    }
    assert!(out.status.success(), "qemu-img check: {text}");
}

fn compare(a: &Path, fa: &str, b: &Path, fb: &str) {
    run_ok("qemu-img", &["compare", "-U", "-f", fa, "-F", fb, s(a), s(b)]);
}

/// Random writes, zeroes, discards and resizes on `image` and on `model`.
fn scribble(image: &DiskImage, model: &mut Vec<u8>, seed: u64, ops: usize) {
    let mut rng = Rng(seed | 1);
    for _ in 0..ops {
        let size = model.len() as u64;
        let off = match rng.below(3) {
            0 => rng.below(size),
            1 => rng.below(size / 512) * 512,
            _ => rng.below((size / 65536).max(1)) * 65536,
        };
        let len = (1 + rng.below(300_000)).min(size - off);
        match rng.below(10) {
            0..=5 => {
                let b = (rng.next() as u8) | 1;
                let data: Vec<u8> = (0..len).map(|i| b.wrapping_add(i as u8)).collect();
                image.write_at(&data, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            6 | 7 => {
                let unmap = rng.below(2) == 0;
                image.write_zeroes(off, len, unmap).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            8 => {
                let new = (128 + rng.below(size * 3 / 2 / 512)) * 512;
                image.resize(new).unwrap();
                model.resize(new as usize, 0);
            }
            _ => image.flush().unwrap(),
        }
    }
    image.flush().unwrap();
}

fn write_raw(path: &Path, model: &[u8]) {
    std::fs::write(path, model).unwrap();
}

/// Every run `qemu-img map` reports must agree with diskkit's status of the same bytes.
fn map_agrees(path: &Path, image: &DiskImage) {
    let text = run_ok("qemu-img", &["map", "-U", "--output=json", s(path)]);
    let runs: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    for r in runs {
        let start = r["start"].as_u64().unwrap();
        let length = r["length"].as_u64().unwrap();
        let data = r["data"].as_bool().unwrap();
        let present = r["present"].as_bool().unwrap();
        let qoff = r.get("offset").and_then(|o| o.as_u64());
        let mut pos = start;
        while pos < start + length {
            let e = image.status(pos, start + length - pos).unwrap();
            match e.kind {
                diskkit::ExtentKind::Data => {
                    assert!(data, "diskkit data at {pos}, qemu {r}");
                    if let (Some(h), Some(q)) = (e.host_offset, qoff) {
                        assert_eq!(h, q + (pos - start), "host offset at {pos}, qemu {r}");
                    }
                }
                diskkit::ExtentKind::Zero => assert!(!data && present, "diskkit zero at {pos}, qemu {r}"),
                diskkit::ExtentKind::Absent => {
                    assert!(!data && !present, "diskkit absent at {pos}, qemu {r}")
                }
            }
            pos += e.length;
        }
    }
}

#[test]
fn diskkit_writes_pass_qemu_img_check_compare_and_map() {
    let dir = tempfile::tempdir().unwrap();
    for (i, cluster) in [512u32, 4096, 65536, 2 << 20].into_iter().enumerate() {
        let img = dir.path().join(format!("w{cluster}.qcow2"));
        let raw = dir.path().join(format!("w{cluster}.raw"));
        let size = 8u64 << 20;
        let opts = CreateOptions::new(ImageFormat::Qcow2, size).cluster_size(cluster);
        let image = DiskImage::create(&img, &opts).unwrap();
        let mut model = vec![0u8; size as usize];
        scribble(&image, &mut model, 0x1234 + i as u64, 60);
        check_clean(&img);
        write_raw(&raw, &model);
        compare(&img, "qcow2", &raw, "raw");
        map_agrees(&img, &image);
        drop(image);
        // Reopen and go on writing: the second session must keep the image clean too.
        let image = DiskImage::open(&img, &OpenOptions::new().writable(true)).unwrap();
        scribble(&image, &mut model, 0x9876 + i as u64, 40);
        drop(image);
        check_clean(&img);
        write_raw(&raw, &model);
        compare(&img, "qcow2", &raw, "raw");
        let info = run_ok("qemu-img", &["info", "--output=json", s(&img)]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(v["cluster-size"].as_u64(), Some(u64::from(cluster)));
        assert_eq!(v["virtual-size"].as_u64(), Some(model.len() as u64));
    }
}

/// Read an image through diskkit into a RAW file.
fn diskkit_to_raw(img: &Path, out: &Path) -> DiskImage {
    let image = DiskImage::open(img, &OpenOptions::new()).unwrap();
    let mut buf = vec![0u8; image.size() as usize];
    image.read_at(&mut buf, 0).unwrap();
    std::fs::write(out, &buf).unwrap();
    image
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    run_ok("qemu-io", &args);
}

#[test]
fn qemu_written_images_read_identically() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in ["512", "4096", "65536", "2097152"] {
        let img = dir.path().join(format!("q{cluster}.qcow2"));
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cluster}"),
                s(&img),
                "6M",
            ],
        );
        qemu_io(
            &img,
            &[
                "write -P 0x11 0 100k",
                "write -P 0x22 1000k 3000",
                "write -z 64k 128k",
                "write -P 0x33 3M 1M",
                "write -z -u 3M 512k",
                "discard 5M 64k",
                "write -P 0x44 6143k 1k",
            ],
        );
        let ours = dir.path().join(format!("q{cluster}.ours.raw"));
        let image = diskkit_to_raw(&img, &ours);
        compare(&img, "qcow2", &ours, "raw");
        map_agrees(&img, &image);
        // Compressed copies, zlib and zstd.
        for ctype in ["zlib", "zstd"] {
            let c = dir.path().join(format!("c{cluster}{ctype}.qcow2"));
            run_ok(
                "qemu-img",
                &[
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    &format!("compression_type={ctype},cluster_size={cluster}"),
                    s(&img),
                    s(&c),
                ],
            );
            let ours = dir.path().join(format!("c{cluster}{ctype}.ours.raw"));
            let image = diskkit_to_raw(&c, &ours);
            compare(&c, "qcow2", &ours, "raw");
            let layer = image.top_layer();
            assert_eq!(layer.format(), ImageFormat::Qcow2);
            let special = (0..image.size())
                .step_by(4096)
                .any(|o| layer.map(o, 1).unwrap().0 == Mapping::Special);
            assert!(
                special,
                "{ctype} copy with {cluster}-byte clusters has compressed clusters"
            );
        }
    }
}

#[test]
fn compressed_clusters_can_be_overwritten_and_stay_clean() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.qcow2");
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&src), "4M"]);
    qemu_io(&src, &["write -P 0x5a 0 4M"]);
    for ctype in ["zlib", "zstd"] {
        let c = dir.path().join(format!("{ctype}.qcow2"));
        run_ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ctype}"),
                s(&src),
                s(&c),
            ],
        );
        let image = DiskImage::open(&c, &OpenOptions::new().writable(true)).unwrap();
        let mut model = vec![0x5au8; 4 << 20];
        image.write_at(&[1u8; 1000], 70_000).unwrap();
        model[70_000..71_000].fill(1);
        image.write_zeroes(0, 65536, true).unwrap();
        model[..65536].fill(0);
        image.resize(3_000_000 / 512 * 512).unwrap();
        model.truncate(3_000_000 / 512 * 512);
        image.flush().unwrap();
        drop(image);
        check_clean(&c);
        let raw = dir.path().join(format!("{ctype}.raw"));
        write_raw(&raw, &model);
        compare(&c, "qcow2", &raw, "raw");
    }
}

#[test]
fn backing_file_is_recorded_not_opened_and_unallocated_is_absent() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0xabu8; 4 << 20]).unwrap();
    let top = dir.path().join("top.qcow2");
    qemu_create_qcow2(&top, &["-b", "base.raw", "-F", "raw"], None);
    qemu_io(&top, &["write -P 0x01 64k 64k", "write -z 1M 64k"]);
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&top, false).unwrap());
    let layer = open_layer(storage, &OpenOptions::new()).unwrap();
    let info = layer.layer_info();
    assert_eq!(info.parent_path.as_deref(), Some("base.raw"));
    assert_eq!(info.parent_format, Some(ImageFormat::Raw));
    assert_eq!(layer.map(0, 65536).unwrap(), (Mapping::Absent, 65536));
    assert!(matches!(layer.map(65536, 65536).unwrap().0, Mapping::Data { .. }));
    assert_eq!(layer.map(1 << 20, 65536).unwrap(), (Mapping::Zero, 65536));
    assert_eq!(layer.map(2 << 20, 2 << 20).unwrap(), (Mapping::Absent, 2 << 20));

    // diskkit creates an overlay that QEMU follows to its backing file.
    let ours = dir.path().join("ours.qcow2");
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::create_new(&ours).unwrap());
    let layer = diskkit::formats::qcow2::Qcow2Image::create(
        storage,
        &diskkit::formats::qcow2::Qcow2CreateOptions {
            size: 4 << 20,
            cluster_size: 65536,
            backing_file: Some("base.raw".into()),
            backing_format: Some(ImageFormat::Raw),
        },
    )
    .unwrap();
    use diskkit::Layer;
    // Zeroing in a layer with a backing file hides the backing file.
    layer
        .zero(&diskkit::layer::Zeroing {
            offset: 0,
            len: 65536,
            unmap: true,
            hide_below: false,
            mode: diskkit::layer::WriteMode::Replace,
        })
        .unwrap();
    layer.flush().unwrap();
    drop(layer);
    check_clean(&ours);
    let chain = run_ok(
        "qemu-img",
        &["info", "--backing-chain", "--output=json", s(&ours)],
    );
    let v: serde_json::Value = serde_json::from_str(&chain).unwrap();
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{chain}");
    let mut expect = vec![0xabu8; 4 << 20];
    expect[..65536].fill(0);
    let raw = dir.path().join("expect.raw");
    write_raw(&raw, &expect);
    compare(&ours, "qcow2", &raw, "raw");
}

#[test]
fn dirty_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dirty.qcow2");
    // qemu-io dies by SIGKILL with the dirty bit still set.
    qemu_dirty(&img, "", "1M", &["write 0 64k"]);
    let e = DiskImage::open(&img, &OpenOptions::new()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("dirty"), "{e}");
    // After QEMU repairs it, it opens.
    run_ok("qemu-img", &["check", "-q", "-r", "all", s(&img)]);
    DiskImage::open(&img, &OpenOptions::new()).unwrap();
}

#[test]
fn grow_and_shrink_match_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r.qcow2");
    // 512-byte clusters make the L1 table grow (and move) quickly.
    let opts = CreateOptions::new(ImageFormat::Qcow2, 1 << 20).cluster_size(512);
    let image = DiskImage::create(&img, &opts).unwrap();
    image.write_at(&[3u8; 4096], (1 << 20) - 4096).unwrap();
    image.resize(64 << 20).unwrap();
    image.write_at(&[4u8; 8192], (64 << 20) - 8192).unwrap();
    image.resize((1 << 20) - 1024).unwrap();
    image.resize(2 << 20).unwrap();
    image.flush().unwrap();
    drop(image);
    check_clean(&img);
    let mut expect = vec![0u8; 2 << 20];
    expect[(1 << 20) - 4096..(1 << 20) - 1024].fill(3);
    let raw: PathBuf = dir.path().join("r.raw");
    write_raw(&raw, &expect);
    compare(&img, "qcow2", &raw, "raw");
}

#[test]
fn layer_uuids_live_in_a_header_extension_qemu_keeps() {
    use diskkit::{LayerInfo, LayerType};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("u.qcow2");
    let image = DiskImage::create(&img, &CreateOptions::new(ImageFormat::Qcow2, 4 << 20)).unwrap();
    let first = image
        .layer_uuid()
        .expect("diskkit-made qcow2 images have a layer UUID");
    let stable = image.top_layer().layer_info().stable_uuid.unwrap();
    image.write_at(&[1u8; 4096], 0).unwrap();
    let second = image.layer_uuid().unwrap();
    assert_ne!(first, second, "the layer UUID changes on the first write");
    image.write_at(&[2u8; 4096], 8192).unwrap();
    assert_eq!(image.layer_uuid(), Some(second), "and only once per open");
    image.flush().unwrap();
    drop(image);
    check_clean(&img);
    // QEMU rewrites the header (amend, resize) and keeps the extension.
    run_ok("qemu-img", &["amend", "-o", "lazy_refcounts=on", s(&img)]);
    run_ok("qemu-img", &["resize", s(&img), "8M"]);
    check_clean(&img);
    let image = DiskImage::open(&img, &OpenOptions::new()).unwrap();
    let info = image.top_layer().layer_info();
    assert_eq!(info.layer_uuid, Some(second));
    assert_eq!(info.stable_uuid, Some(stable));
    assert_eq!(image.size(), 8 << 20);
    drop(image);

    // Recording a parent: the backing file for QEMU, the parent UUID and type for diskkit.
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x61u8; 8 << 20]).unwrap();
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&img, true).unwrap());
    let layer = open_layer(storage, &OpenOptions::new().writable(true)).unwrap();
    let parent = uuid::Uuid::new_v4();
    layer
        .set_layer_info(&LayerInfo {
            layer_type: Some(LayerType::Overlay),
            parent_uuid: Some(parent),
            parent_path: Some("base.raw".into()),
            parent_format: Some(ImageFormat::Raw),
            ..layer.layer_info()
        })
        .unwrap();
    drop(layer);
    check_clean(&img);
    let v: serde_json::Value =
        serde_json::from_str(&run_ok("qemu-img", &["info", "--output=json", s(&img)])).unwrap();
    assert_eq!(v["backing-filename"], "base.raw");
    assert_eq!(v["backing-filename-format"], "raw");
    let storage: Arc<dyn Storage> = Arc::new(FileStorage::open(&img, false).unwrap());
    let info = open_layer(storage, &OpenOptions::new()).unwrap().layer_info();
    assert_eq!(info.layer_type, Some(LayerType::Overlay));
    assert_eq!(info.parent_uuid, Some(parent));
    assert_eq!(info.parent_path.as_deref(), Some("base.raw"));
    assert_eq!(info.parent_format, Some(ImageFormat::Raw));
    assert_eq!(info.stable_uuid, Some(stable));
    // QEMU reads through the new backing file where no cluster was allocated (cluster 0 was
    // allocated by the writes, the rest of it zeroes).
    let mut expect = vec![0x61u8; 8 << 20];
    expect[..65536].fill(0);
    expect[..4096].fill(1);
    expect[8192..12288].fill(2);
    let raw = dir.path().join("expect.raw");
    write_raw(&raw, &expect);
    compare(&img, "qcow2", &raw, "raw");
}

#[test]
fn preallocation_modes_read_identically_and_take_writes() {
    let dir = tempfile::tempdir().unwrap();
    for prealloc in ["off", "metadata", "falloc", "full"] {
        let img = dir.path().join(format!("{prealloc}.qcow2"));
        let o = format!("preallocation={prealloc},cluster_size=65536");
        run_ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &o, s(&img), "8M"],
        );
        qemu_io(
            &img,
            &[
                "write -P 0x61 100k 200k",
                "write -z 1M 64k",
                "write -P 0x62 7M 4k",
            ],
        );
        // diskkit reads what QEMU wrote, including preallocated (allocated, zero) clusters.
        let raw = dir.path().join(format!("{prealloc}.raw"));
        drop(diskkit_to_raw(&img, &raw));
        compare(&img, "qcow2", &raw, "raw");
        // diskkit writes into preallocated clusters; QEMU finds the image clean and identical.
        let image = DiskImage::open(&img, &OpenOptions::new().writable(true)).unwrap();
        let data = vec![0x63u8; 70_000];
        image.write_at(&data, 3 << 20).unwrap();
        image.discard(100 << 10, 64 << 10).unwrap();
        image.flush().unwrap();
        drop(image);
        let mut model = std::fs::read(&raw).unwrap();
        model[3 << 20..(3 << 20) + 70_000].copy_from_slice(&data);
        model[100 << 10..164 << 10].fill(0);
        write_raw(&raw, &model);
        check_clean(&img);
        compare(&img, "qcow2", &raw, "raw");
    }
}
