//! Bundles against the peers: GNU tar + zstd both ways, and qemu-img on the layers.

mod support;

use std::fs;
use std::path::Path;

use diskkit::ImageFormat;
use diskkit_deliver::bundle::{self, CreateOptions, ExtractOptions, Machine};
use support::{allocated, gnu_bundle, gnu_extract, sh, sparse_disk, tool_ok};

fn create(image: &Path, out: &Path) -> bundle::CreateReport {
    bundle::create(image, out, &CreateOptions::default(), &mut |_, _| {}).unwrap()
}

fn qemu_info(path: &Path) -> serde_json::Value {
    serde_json::from_str(&tool_ok(
        "qemu-img",
        &["info", "--output=json", path.to_str().unwrap()],
    ))
    .unwrap()
}

/// Same length and bytes; `qemu-img compare` skips holes, where `cmp` would read gigabytes
/// of zeroes.
fn same_bytes(a: &Path, b: &Path) {
    assert_eq!(fs::metadata(a).unwrap().len(), fs::metadata(b).unwrap().len());
    tool_ok(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-s",
            "-f",
            "raw",
            "-F",
            "raw",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
}

/// diskkit's bundle of a sparse RAW image extracts with `zstd -dc | tar -xS` to the same
/// disk, still sparse, with a layer qemu-img accepts (backing disk.img, raw, consistent).
#[test]
fn diskkit_bundles_extract_with_gnu_tar() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src.raw");
    // More than 4 data regions (extension blocks) and data past 8 GiB (base-256 numbers).
    let data: Vec<(u64, u64)> = (0..40)
        .map(|i| (i * (1 << 20) + 4096, 8192))
        .chain([(9 << 30, 1 << 20), ((12 << 30) - 4096, 4096)])
        .collect();
    sparse_disk(&src, 12 << 30, &data, 7);
    let out = t.path().join("b.tar.zst");
    let r = create(&src, &out);
    assert!(!r.split);
    assert_eq!(r.disk_size, 12 << 30);
    let stored: u64 = data.iter().map(|d| d.1).sum();
    // Data is read in whole file-system blocks at most.
    assert!(
        r.disk_stored >= stored && r.disk_stored <= stored + 42 * 8192,
        "{}",
        r.disk_stored
    );
    let x = t.path().join("x");
    gnu_extract(&out, &x);
    assert_eq!(support::tree(&x), vec!["disk.img", "layer.qcow2", "machine.json"]);
    same_bytes(&src, &x.join("disk.img"));
    assert!(allocated(&x.join("disk.img")) < 8 << 20, "GNU tar kept the holes");
    let info = qemu_info(&x.join("layer.qcow2"));
    assert_eq!(info["backing-filename"], "disk.img");
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(info["virtual-size"], 12u64 << 30);
    tool_ok("qemu-img", &["check", x.join("layer.qcow2").to_str().unwrap()]);
    tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            src.to_str().unwrap(),
            x.join("layer.qcow2").to_str().unwrap(),
        ],
    );
    Machine::parse(&fs::read(x.join("machine.json")).unwrap()).unwrap();
}

/// A stack (RAW base + qcow2 overlay written by qemu-io: whole and partial clusters, zero
/// writes) becomes disk.img = the base and layer.qcow2 = the overlay; GNU tar extracts it
/// and qemu-img reads the same disk through the new layer as through the original stack.
#[test]
fn stacks_split_into_base_and_layer() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    sparse_disk(
        &d.join("base.raw"),
        64 << 20,
        &[(0, 1 << 20), (10 << 20, 3 << 20), (40 << 20, 8192)],
        3,
    );
    sh(
        d,
        "qemu-img create -q -f qcow2 -F raw -b base.raw top.qcow2 && \
         qemu-io -c 'write -P 0x11 0 64k' -c 'write -P 0x22 1000k 100k' -c 'write -z 10m 1m' \
                 -c 'write -P 0x33 41m 512' -c 'write -P 0x44 63m 1m' top.qcow2 >/dev/null",
    );
    let out = d.join("b.tar.zst");
    let r = create(&d.join("top.qcow2"), &out);
    assert!(r.split);
    let x = d.join("x");
    gnu_extract(&out, &x);
    same_bytes(&d.join("base.raw"), &x.join("disk.img"));
    tool_ok("qemu-img", &["check", x.join("layer.qcow2").to_str().unwrap()]);
    tool_ok(
        "qemu-img",
        &[
            "compare",
            d.join("top.qcow2").to_str().unwrap(),
            x.join("layer.qcow2").to_str().unwrap(),
        ],
    );
    // The layer holds the overlay's clusters, not the base's.
    let map = tool_ok(
        "qemu-img",
        &["map", "--output=json", x.join("layer.qcow2").to_str().unwrap()],
    );
    let runs: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
    let top_bytes: u64 = runs
        .iter()
        .filter(|r| r["depth"] == 0 && r["data"] == true)
        .map(|r| r["length"].as_u64().unwrap())
        .sum();
    assert!(
        ((64 << 10) + (100 << 10) + 512 + (1 << 20)..=4 << 20).contains(&top_bytes),
        "{top_bytes}"
    );

    // An ASIF overlay made by diskkit over the same base (block-granular presence).
    let lib = diskkit::OpenOptions::new().parents(diskkit::ParentPolicy::same_directory());
    let mut stack = diskkit::DiskImage::open(d.join("base.raw"), &lib).unwrap();
    stack
        .append_new(d.join("over.asif"), &diskkit::LayerOptions::overlay())
        .unwrap();
    stack.write_at(&[0x55; 1536], 3 * 512).unwrap();
    stack.write_zeroes(10 << 20, 2 << 20, true).unwrap();
    stack.flush().unwrap();
    drop(stack);
    let out2 = d.join("c.tar.zst");
    assert!(create(&d.join("over.asif"), &out2).split);
    let y = d.join("y");
    gnu_extract(&out2, &y);
    tool_ok("qemu-img", &["check", y.join("layer.qcow2").to_str().unwrap()]);
    let flat = d.join("flat.raw");
    let stack = diskkit::DiskImage::open(d.join("over.asif"), &lib).unwrap();
    let dst = diskkit::DiskImage::create(&flat, &diskkit::CreateOptions::raw(stack.size())).unwrap();
    diskkit::copy::copy(&stack, &dst, &mut |_| {}).unwrap();
    drop(dst);
    tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            flat.to_str().unwrap(),
            y.join("layer.qcow2").to_str().unwrap(),
        ],
    );
}

/// Bundles made by `tar -cS --format=gnu | zstd` (a layer written by qemu-io) are read:
/// extracted as RAW (sparse, same bytes) and as ASIF (the layer re-pointed), and described.
#[test]
fn gnu_tar_bundles_are_read() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let g = d.join("g");
    fs::create_dir(&g).unwrap();
    let data: Vec<(u64, u64)> = (0..30)
        .map(|i| (i * (2 << 20), 12288))
        .chain([((10 << 30) + 512, 1 << 20)])
        .collect();
    sparse_disk(&g.join("disk.img"), 11 << 30, &data, 11);
    sh(
        &g,
        "qemu-img create -q -f qcow2 -F raw -b disk.img layer.qcow2 && \
         qemu-io -c 'write -P 0x66 5m 200k' layer.qcow2 >/dev/null && \
         printf '{\"version\":1,\"memory\":2048,\"cores\":2,\"mac\":\"02:00:00:00:00:01\"}' > machine.json",
    );
    let b = d.join("g.tar.zst");
    gnu_bundle(&g, &["disk.img", "layer.qcow2", "machine.json"], &b);
    let sha = tool_ok("sha256sum", &[b.to_str().unwrap()]);
    let sha = bundle::parse_sha256(sha.split_whitespace().next().unwrap()).unwrap();

    let info = bundle::verify_file(
        &b,
        &ExtractOptions {
            sha256: Some(sha),
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(info.disk.size, 11 << 30);
    assert!(info.disk.sparse && info.disk.regions >= 31);
    assert_eq!(info.machine.memory, Some(2048));
    assert_eq!(info.machine.cpus(), 2);
    assert_eq!(info.layer.backing_file, "disk.img");
    assert!(info.layer.allocated_clusters >= 3);

    let x = d.join("x");
    let mut progress = 0;
    bundle::extract_file(&b, &x, &ExtractOptions::default(), &mut |n| progress = n).unwrap();
    assert_eq!(progress, fs::metadata(&b).unwrap().len());
    same_bytes(&g.join("disk.img"), &x.join("disk.img"));
    assert!(allocated(&x.join("disk.img")) < 4 << 20);
    tool_ok(
        "qemu-img",
        &[
            "compare",
            g.join("layer.qcow2").to_str().unwrap(),
            x.join("layer.qcow2").to_str().unwrap(),
        ],
    );
    assert_eq!(
        fs::read(g.join("machine.json")).unwrap(),
        fs::read(x.join("machine.json")).unwrap()
    );

    let a = d.join("a");
    let asif = ExtractOptions {
        format: ImageFormat::Asif,
        ..Default::default()
    };
    bundle::extract_file(&b, &a, &asif, &mut |_| {}).unwrap();
    assert_eq!(
        support::tree(&a),
        vec!["disk.asif", "layer.qcow2", "machine.json"]
    );
    let lib = diskkit::OpenOptions::new().parents(diskkit::ParentPolicy::same_directory());
    let via_asif = diskkit::DiskImage::open(a.join("layer.qcow2"), &lib).unwrap();
    assert_eq!(via_asif.layer_count(), 2);
    assert_eq!(via_asif.describe_layers().unwrap()[1].format, ImageFormat::Asif);
    let via_raw = diskkit::DiskImage::open(g.join("layer.qcow2"), &lib).unwrap();
    assert_eq!(
        diskkit::copy::compare(&via_asif, &via_raw, &mut |_| {}).unwrap(),
        None
    );
    // qemu-img still reads the re-pointed layer's own clusters (it cannot open ASIF).
    let info = qemu_info(&a.join("layer.qcow2"));
    assert_eq!(info["backing-filename"], "disk.asif");

    // A wrong digest is refused, and nothing is left.
    let mut bad = sha;
    bad[0] ^= 1;
    let e = bundle::extract_file(
        &b,
        &d.join("z"),
        &ExtractOptions {
            sha256: Some(bad),
            ..Default::default()
        },
        &mut |_| {},
    )
    .unwrap_err();
    assert_eq!(e.kind(), diskkit_deliver::ErrorKind::DigestMismatch);
    assert_eq!(
        support::tree(d),
        support::tree(d)
            .into_iter()
            .filter(|p| !p.starts_with(".z"))
            .collect::<Vec<_>>()
    );
    assert!(!d.join("z").exists());
}

/// A bundle stored without holes (`tar -c`, no -S) still extracts to a sparse disk.img.
#[test]
fn dense_members_extract_sparse() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let g = d.join("g");
    fs::create_dir(&g).unwrap();
    sparse_disk(
        &g.join("disk.img"),
        32 << 20,
        &[(1 << 20, 4096), (20 << 20, 1 << 20)],
        5,
    );
    sh(
        &g,
        "qemu-img create -q -f qcow2 -F raw -b disk.img layer.qcow2 && echo '{\"version\":1}' > machine.json",
    );
    let b = d.join("dense.tar.zst");
    sh(
        &g,
        &format!(
            "tar -c --format=gnu -f - machine.json disk.img layer.qcow2 | zstd -q -o '{}'",
            b.display()
        ),
    );
    let info = bundle::verify_file(&b, &ExtractOptions::default(), &mut |_| {}).unwrap();
    assert!(!info.disk.sparse);
    assert_eq!(info.disk.stored, 32 << 20);
    let x = d.join("x");
    bundle::extract_file(&b, &x, &ExtractOptions::default(), &mut |_| {}).unwrap();
    same_bytes(&g.join("disk.img"), &x.join("disk.img"));
    assert!(
        allocated(&x.join("disk.img")) <= 2 << 20,
        "zero blocks were not written"
    );
}

/// Round trip through diskkit alone with a given machine definition and a stack, then
/// `bundle create` of the extracted layer gives the same disk again.
#[test]
fn round_trip_keeps_machine_and_disk() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    sparse_disk(&d.join("disk.raw"), 8 << 20, &[(0, 4096), (4 << 20, 65536)], 9);
    let machine =
        Machine::parse(br#"{"version":1,"memory":512,"network":"rtl8139","mac":"0e:00:00:00:00:02"}"#)
            .unwrap();
    let opts = CreateOptions {
        machine: Some(machine.clone()),
        ..CreateOptions::default()
    };
    let b = d.join("b.tar.zst");
    bundle::create(&d.join("disk.raw"), &b, &opts, &mut |_, _| {}).unwrap();
    // Not replaced without overwrite.
    assert_eq!(
        bundle::create(&d.join("disk.raw"), &b, &opts, &mut |_, _| {})
            .unwrap_err()
            .kind(),
        diskkit_deliver::ErrorKind::AlreadyExists
    );
    let x = d.join("x");
    let info = bundle::extract_file(&b, &x, &ExtractOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(info.machine, machine);
    assert_eq!(info.members, vec!["machine.json", "layer.qcow2", "disk.img"]);
    // Extracting into an existing directory is refused.
    assert_eq!(
        bundle::extract_file(&b, &x, &ExtractOptions::default(), &mut |_| {})
            .unwrap_err()
            .kind(),
        diskkit_deliver::ErrorKind::AlreadyExists
    );
    let b2 = d.join("b2.tar.zst");
    let r = bundle::create(&x.join("layer.qcow2"), &b2, &opts, &mut |_, _| {}).unwrap();
    assert!(r.split);
    let y = d.join("y");
    bundle::extract_file(&b2, &y, &ExtractOptions::default(), &mut |_| {}).unwrap();
    same_bytes(&d.join("disk.raw"), &y.join("disk.img"));
    assert_eq!(support::tree(d).iter().filter(|p| p.contains(".tmp-")).count(), 0);
}
