//! Helpers shared by the qcow2 check tests: running QEMU's tools, reading and damaging
//! qcow2 metadata by hand, and checking a repair against QEMU.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use diskkit::formats::qcow2::{self, Repair};
use diskkit::{DiskImage, OpenOptions};

pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed? .ci/run installs it): {e}"))
}

pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create -q -f qcow2 OPTIONS... IMG [SIZE]`.
pub fn qemu_create_qcow2(img: &Path, options: &[&str], size: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(options);
    args.push(s(img));
    args.extend(size);
    run_ok("qemu-img", &args);
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `qemu-img check --output=json`: (corruptions, leaks, exit code).
pub fn qemu_check(path: &Path) -> (u64, u64, i32) {
    let (v, code) = qemu_check_json(path);
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    (get("corruptions"), get("leaks"), code)
}

/// `qemu-img check --output=json` as JSON, and its exit code (check errors must be 0).
pub fn qemu_check_json(path: &Path) -> (serde_json::Value, i32) {
    let out = run("qemu-img", &["check", "--output=json", s(path)]);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("qemu-img check: {text}{}", String::from_utf8_lossy(&out.stderr)));
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    assert_eq!(get("check-errors"), 0, "{text}");
    (v, out.status.code().unwrap_or(-1))
}

pub fn assert_qemu_clean(path: &Path) {
    let (c, l, code) = qemu_check(path);
    assert_eq!((c, l, code), (0, 0, 0), "qemu-img check {}", path.display());
}

pub fn assert_identical(a: &Path, fa: &str, b: &Path, fb: &str) {
    let out = run_ok("qemu-img", &["compare", "-f", fa, "-F", fb, s(a), s(b)]);
    assert!(out.contains("identical"), "{out}");
}

pub fn qemu_io(img: &Path, fmt: &str, cmds: &[&str]) -> Output {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(s(img));
    run("qemu-io", &args)
}

/// Create the qcow2 image `img` (`size`, lazy refcounts on, plus `opts` if not empty), run
/// `writes` in qemu-io, then kill qemu-io with SIGKILL: the image keeps its dirty bit and its
/// stale refcounts.
pub fn qemu_dirty(img: &Path, opts: &str, size: &str, writes: &[&str]) {
    let opts = if opts.is_empty() {
        "lazy_refcounts=on".to_string()
    } else {
        format!("lazy_refcounts=on,{opts}")
    };
    qemu_create_qcow2(img, &["-o", &opts], Some(size));
    let mut cmds = writes.to_vec();
    cmds.push("sigraise 9");
    let out = qemu_io(img, "qcow2", &cmds);
    assert!(!out.status.success(), "qemu-io was to be killed");
}

pub fn copy(from: &Path, to: &Path) -> PathBuf {
    std::fs::copy(from, to).unwrap();
    to.to_path_buf()
}

/// What the tests need of a header: cluster size, refcount table offset, refcount order.
pub struct Geo {
    pub cs: u64,
    pub reftable: u64,
    pub order: u32,
}

pub fn be(b: &[u8], at: usize, n: usize) -> u64 {
    b[at..at + n].iter().fold(0, |a, &x| (a << 8) | u64::from(x))
}

pub fn geo(path: &Path) -> Geo {
    let b = std::fs::read(path).unwrap();
    Geo {
        cs: 1 << be(&b, 20, 4),
        reftable: be(&b, 48, 8),
        order: be(&b, 96, 4) as u32,
    }
}

pub fn pwrite(path: &Path, at: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, at).unwrap();
}

pub fn pread(path: &Path, at: u64, n: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; n];
    f.read_exact_at(&mut b, at).unwrap();
    b
}

/// Set the 16-bit refcount of `cluster` (covered by the first refcount block) by hand.
pub fn set_refcount(path: &Path, cluster: u64, value: u16) {
    let g = geo(path);
    assert_eq!(g.order, 4);
    let block = be(&pread(path, g.reftable, 8), 0, 8);
    assert_ne!(block, 0, "the first refcount block is gone");
    assert!(cluster < g.cs / 2, "cluster {cluster} is not in the first block");
    pwrite(path, block + 2 * cluster, &value.to_be_bytes());
}

pub fn refcount(path: &Path, cluster: u64) -> u16 {
    let g = geo(path);
    let block = be(&pread(path, g.reftable, 8), 0, 8);
    be(&pread(path, block + 2 * cluster, 2), 0, 2) as u16
}

pub fn set_incompatible(path: &Path, bits: u64) {
    pwrite(path, 72, &bits.to_be_bytes());
}

/// Host clusters of the data clusters qemu-img map reports in the image itself (not its
/// backing file).
pub fn data_clusters(path: &Path) -> Vec<u64> {
    let text = run_ok("qemu-img", &["map", "--output=json", s(path)]);
    let runs: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let cs = geo(path).cs;
    let mut out = Vec::new();
    for r in runs {
        let own = r["depth"].as_u64() == Some(0);
        if let (Some(off), true) = (r["offset"].as_u64(), own && r["data"].as_bool().unwrap_or(false)) {
            let len = r["length"].as_u64().unwrap();
            out.extend((0..len / cs).map(|i| off / cs + i));
        }
    }
    out
}

/// diskkit's check (without repair) counts what qemu-img check counts.
/// So do the image end offset, the total, allocated, compressed and fragmented clusters.
pub fn assert_counts_agree(path: &Path) -> (u64, u64) {
    let (v, _) = qemu_check_json(path);
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let (qc, ql) = (get("corruptions"), get("leaks"));
    let r = qcow2::check_file(path, Repair::None).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks),
        (qc, ql),
        "diskkit vs qemu-img check on {}: {:#?}",
        path.display(),
        r.problems
    );
    assert_eq!(
        (
            r.image_end_offset,
            r.total_clusters,
            r.allocated_clusters,
            r.compressed_clusters,
            r.fragmented_clusters
        ),
        (
            get("image-end-offset"),
            get("total-clusters"),
            get("allocated-clusters"),
            get("compressed-clusters"),
            get("fragmented-clusters")
        ),
        "diskkit vs qemu-img check statistics on {}",
        path.display()
    );
    (qc, ql)
}

/// Repair with diskkit; afterwards qemu-img check is clean and the data is what `reference`
/// (format `rfmt`) holds.
pub fn repair_and_verify(path: &Path, reference: &Path, rfmt: &str) {
    let r = qcow2::check_file(path, Repair::All).unwrap();
    assert!(r.is_clean(), "after repair: {r:#?}");
    assert!(!r.dirty && !r.corrupt, "{r:#?}");
    assert_qemu_clean(path);
    assert_identical(reference, rfmt, path, "qcow2");
    // A second check finds nothing and changes nothing.
    let again = qcow2::check_file(path, Repair::All).unwrap();
    assert!(again.is_clean() && again.changes.is_empty(), "{again:#?}");
    DiskImage::open(
        path,
        &OpenOptions::new()
            .format(diskkit::ImageFormat::Qcow2)
            .detached(true),
    )
    .unwrap();
}

pub const WRITES: &[&str] = &[
    "write -P 0xab 0 3M",
    "write -P 0xcd 4M 64k",
    "write -P 0x11 5M 4k",
    "write -z 1M 128k",
    "write -P 0x22 7M 1M",
];

/// The RAW image `path` (8 MiB) with [`WRITES`] made by qemu-io: what the qcow2 images the
/// tests damage should read as.
pub fn writes_raw(path: &Path) -> PathBuf {
    run_ok("qemu-img", &["create", "-q", "-f", "raw", s(path), "8M"]);
    assert!(qemu_io(path, "raw", WRITES).status.success());
    path.to_path_buf()
}

/// A clean qcow2 image QEMU wrote, and its RAW twin.
pub fn clean_pair(dir: &Path, name: &str, cluster: &str) -> (PathBuf, PathBuf) {
    let img = dir.join(format!("{name}.qcow2"));
    let raw = dir.join(format!("{name}.raw"));
    let opts = format!("cluster_size={cluster}");
    run_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", &opts, s(&img), "8M"],
    );
    assert!(qemu_io(&img, "qcow2", WRITES).status.success());
    writes_raw(&raw);
    assert_qemu_clean(&img);
    (img, raw)
}
