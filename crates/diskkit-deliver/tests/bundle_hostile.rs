//! Hostile bundles: every rule broken once. Each must fail with a clear error naming the
//! member and the rule, for `extract` and `verify` alike, and leave nothing on disk.

mod support;

use std::fs;
use std::path::Path;

use diskkit_deliver::bundle::{self, ExtractOptions};
use diskkit_deliver::ErrorKind;
use support::{sh, tree};

/// Builds tar streams by hand, for archives GNU tar will not make.
#[derive(Default)]
struct Tar(Vec<u8>);

fn octal(field: &mut [u8], v: u64) {
    let w = field.len() - 1;
    let s = format!("{v:0w$o}");
    field[..w].copy_from_slice(s.as_bytes());
}

fn base256(field: &mut [u8], v: u64) {
    field.fill(0);
    field[0] = 0x80;
    let n = field.len();
    field[n - 8..].copy_from_slice(&v.to_be_bytes());
}

fn checksum(h: &mut [u8; 512]) {
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

impl Tar {
    fn header(name: &str, typeflag: u8, size: u64, link: &str) -> [u8; 512] {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], 0o644);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], size);
        octal(&mut h[136..148], 1_700_000_000);
        h[156] = typeflag;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..265].copy_from_slice(b"ustar  \0");
        h
    }

    fn entry(mut self, name: &str, typeflag: u8, data: &[u8], link: &str) -> Tar {
        let mut h = Tar::header(name, typeflag, data.len() as u64, link);
        checksum(&mut h);
        self.0.extend_from_slice(&h);
        self.data(data);
        self
    }

    fn file(self, name: &str, data: &[u8]) -> Tar {
        self.entry(name, b'0', data, "")
    }

    fn data(&mut self, data: &[u8]) {
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0u8, pad));
    }

    /// An old GNU sparse member with up to four map entries in the header.
    fn sparse(mut self, name: &str, real_size: u64, map: &[(u64, u64)], data: &[u8]) -> Tar {
        let mut h = Tar::header(name, b'S', data.len() as u64, "");
        for (i, &(off, len)) in map.iter().enumerate() {
            base256(&mut h[386 + 24 * i..398 + 24 * i], off);
            base256(&mut h[398 + 24 * i..410 + 24 * i], len);
        }
        base256(&mut h[483..495], real_size);
        checksum(&mut h);
        self.0.extend_from_slice(&h);
        self.data(data);
        self
    }

    fn end(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        self.0
    }
}

/// Compressed with frame checksums, as the zstd tool writes by default.
fn zstd(data: &[u8]) -> Vec<u8> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    e.include_checksum(true).unwrap();
    std::io::Write::write_all(&mut e, data).unwrap();
    e.finish().unwrap()
}

/// Good members: a 1 MiB disk, a qemu-img layer over it, a machine definition.
struct Good {
    disk: Vec<u8>,
    layer: Vec<u8>,
    machine: Vec<u8>,
}

fn good(dir: &Path) -> Good {
    let g = dir.join("good");
    fs::create_dir_all(&g).unwrap();
    support::sparse_disk(&g.join("disk.img"), 1 << 20, &[(4096, 4096)], 1);
    sh(&g, "qemu-img create -q -f qcow2 -F raw -b disk.img layer.qcow2");
    Good {
        disk: fs::read(g.join("disk.img")).unwrap(),
        layer: fs::read(g.join("layer.qcow2")).unwrap(),
        machine: br#"{"version":1,"memory":1024}"#.to_vec(),
    }
}

/// A layer made by `qemu-img create` with `args` in a scratch directory (plus `then`, a
/// shell script run there afterwards).
fn layer(dir: &Path, args: &str, then: &str) -> Vec<u8> {
    let l = dir.join(format!("l{}", fs::read_dir(dir).unwrap().count()));
    fs::create_dir_all(&l).unwrap();
    support::sparse_disk(&l.join("disk.img"), 1 << 20, &[], 1);
    sh(
        &l,
        &format!("qemu-img create -q -f qcow2 {args} layer.qcow2 1M && {then}"),
    );
    fs::read(l.join("layer.qcow2")).unwrap()
}

/// Extract and verify `bundle`; both must fail with `kind` and a message containing every
/// one of `needles`; nothing may be left in the output's directory.
fn refused(name: &str, bundle: &[u8], kind: ErrorKind, needles: &[&str]) {
    refused_with(name, bundle, kind, needles, &ExtractOptions::default());
}

fn refused_with(name: &str, bundle: &[u8], kind: ErrorKind, needles: &[&str], options: &ExtractOptions) {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    let e = bundle::extract(&mut &bundle[..], &out.join("vm"), options, &mut |_| {})
        .err()
        .unwrap_or_else(|| panic!("{name}: accepted"));
    let msg = format!("{e:#}");
    assert_eq!(e.kind(), kind, "{name}: {msg}");
    for n in needles {
        assert!(msg.contains(n), "{name}: '{msg}' does not mention '{n}'");
    }
    assert!(tree(&out).is_empty(), "{name}: left {:?}", tree(&out));
    let v = bundle::verify(&mut &bundle[..], options, &mut |_| {})
        .err()
        .unwrap_or_else(|| panic!("{name}: verify accepted what extract refused ({msg})"));
    assert_eq!(v.kind(), kind, "{name} (verify): {v:#}");
}

#[test]
fn names_types_duplicates_and_extra_members() {
    let t = tempfile::tempdir().unwrap();
    let g = good(t.path());
    let base = || {
        Tar::default()
            .file("machine.json", &g.machine)
            .file("layer.qcow2", &g.layer)
    };
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "dotdot",
            base().file("../disk.img", &g.disk).end(),
            &["../disk.img", "'..'"],
        ),
        (
            "dotdot inside",
            base().file("x/../disk.img", &g.disk).end(),
            &["'..'"],
        ),
        (
            "absolute",
            base().file("/disk.img", &g.disk).end(),
            &["/disk.img", "absolute"],
        ),
        (
            "slash",
            base().file("sub/disk.img", &g.disk).end(),
            &["sub/disk.img", "'/'"],
        ),
        (
            "dot slash",
            base().file("./disk.img", &g.disk).end(),
            &["./disk.img"],
        ),
        (
            "symlink",
            base().entry("disk.img", b'2', &[], "/etc/passwd").end(),
            &["disk.img", "symbolic link"],
        ),
        (
            "hard link",
            base()
                .file("disk.img", &g.disk)
                .entry("machine.json", b'1', &[], "disk.img")
                .end(),
            &["hard link"],
        ),
        (
            "char device",
            base().entry("disk.img", b'3', &[], "").end(),
            &["character device"],
        ),
        (
            "block device",
            base().entry("disk.img", b'4', &[], "").end(),
            &["block device"],
        ),
        ("fifo", base().entry("disk.img", b'6', &[], "").end(), &["FIFO"]),
        (
            "directory",
            base().entry("disk.img", b'5', &[], "").end(),
            &["directory"],
        ),
        (
            "long name",
            base().entry("././@LongLink", b'L', b"disk.img\0", "").end(),
            &["GNU long name"],
        ),
        (
            "pax",
            base()
                .entry("PaxHeaders/disk.img", b'x', b"18 path=disk.img\n", "")
                .end(),
            &["PAX"],
        ),
        (
            "extra member",
            base().file("disk.img", &g.disk).file("extra.txt", b"x").end(),
            &["extra.txt", "not one of"],
        ),
        (
            "duplicate",
            base()
                .file("disk.img", &g.disk)
                .file("machine.json", &g.machine)
                .end(),
            &["machine.json", "twice"],
        ),
        ("missing", base().end(), &["disk.img", "missing"]),
        ("empty archive", Tar::default().end(), &["missing"]),
        (
            "link name on a file",
            base().entry("disk.img", b'0', &g.disk, "other").end(),
            &["link name"],
        ),
    ];
    for (name, tar, needles) in cases {
        refused(name, &zstd(&tar), ErrorKind::InvalidBundle, needles);
    }
    // GNU tar's own hard links and symlinks.
    let d = t.path().join("links");
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("machine.json"), &g.machine).unwrap();
    fs::write(d.join("layer.qcow2"), &g.layer).unwrap();
    fs::write(d.join("real.img"), &g.disk).unwrap();
    fs::hard_link(d.join("real.img"), d.join("disk.img")).unwrap();
    let b = t.path().join("hl.tar.zst");
    support::gnu_bundle(&d, &["machine.json", "layer.qcow2", "real.img", "disk.img"], &b);
    refused(
        "gnu hard link",
        &fs::read(&b).unwrap(),
        ErrorKind::InvalidBundle,
        &["real.img"],
    );
    fs::remove_file(d.join("disk.img")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", d.join("disk.img")).unwrap();
    support::gnu_bundle(&d, &["machine.json", "layer.qcow2", "disk.img"], &b);
    refused(
        "gnu symlink",
        &fs::read(&b).unwrap(),
        ErrorKind::InvalidBundle,
        &["symbolic link"],
    );
    fs::remove_file(d.join("disk.img")).unwrap();
    sh(&d, "mknod disk.img c 1 3");
    support::gnu_bundle(&d, &["machine.json", "layer.qcow2", "disk.img"], &b);
    refused(
        "gnu device",
        &fs::read(&b).unwrap(),
        ErrorKind::InvalidBundle,
        &["character device"],
    );
    fs::remove_file(d.join("disk.img")).unwrap();
    fs::write(d.join("disk.img"), &g.disk).unwrap();
    sh(
        &d,
        &format!(
            "tar --format=posix -cS -f - machine.json layer.qcow2 disk.img | zstd -q -o '{}' -f",
            b.display()
        ),
    );
    refused(
        "posix tar",
        &fs::read(&b).unwrap(),
        ErrorKind::InvalidBundle,
        &["PAX"],
    );
}

#[test]
fn layers_must_be_clean_and_backed_by_disk_img_as_raw() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let g = good(d);
    let with_layer = |l: &[u8]| {
        zstd(
            &Tar::default()
                .file("machine.json", &g.machine)
                .file("disk.img", &g.disk)
                .file("layer.qcow2", l)
                .end(),
        )
    };
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        (
            "backed by /etc/passwd",
            layer(d, "-u -F raw -b /etc/passwd", "true"),
            &["layer.qcow2", "/etc/passwd", "disk.img"],
        ),
        (
            "backed by another name",
            layer(d, "-u -F raw -b other.img", "true"),
            &["other.img"],
        ),
        (
            "backing format qcow2",
            layer(d, "-F qcow2 -b disk.img -u", "true"),
            &["backing format", "qcow2"],
        ),
        ("no backing", layer(d, "", "true"), &["no backing file"]),
        (
            "external data file",
            layer(d, "-F raw -b disk.img -o data_file=data.bin", "true"),
            &["layer.qcow2", "external data file"],
        ),
        (
            "dirty",
            layer(
                d,
                "-F raw -b disk.img -o lazy_refcounts=on",
                "qemu-io -c 'write -P 1 0 64k' -c 'sigraise 9' layer.qcow2 >/dev/null 2>&1 || true",
            ),
            &["layer.qcow2", "dirty"],
        ),
        (
            "corrupt bit",
            layer(
                d,
                "-F raw -b disk.img",
                "printf '\\002' | dd of=layer.qcow2 bs=1 seek=79 conv=notrunc 2>/dev/null",
            ),
            &["corrupt"],
        ),
        (
            "internal snapshot",
            layer(d, "-F raw -b disk.img", "qemu-img snapshot -c s1 layer.qcow2"),
            &["snapshot"],
        ),
        (
            "not qcow2",
            b"this is not an image".repeat(100),
            &["layer.qcow2", "not a qcow2"],
        ),
    ];
    for (name, l, needles) in cases {
        refused(name, &with_layer(&l), ErrorKind::InvalidBundle, needles);
    }
    // An inconsistent layer: a refcount of a used cluster set to 0.
    let l = layer(
        d,
        "-F raw -b disk.img",
        "qemu-io -c 'write -P 7 0 64k' layer.qcow2 >/dev/null",
    );
    let mut bad = l.clone();
    let rt = u64::from_be_bytes(bad[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(bad[rt..rt + 8].try_into().unwrap()) as usize;
    // Clusters 0.. are the header, L1, refcount table and block, L2, data; zero the last
    // one's refcount (16-bit entries).
    let clusters = l.len() / 65536;
    bad[rb + 2 * (clusters - 1)..rb + 2 * clusters].fill(0);
    refused(
        "refcount zeroed",
        &with_layer(&bad),
        ErrorKind::InvalidBundle,
        &["inconsistent"],
    );
}

#[test]
fn sizes_and_streams() {
    let t = tempfile::tempdir().unwrap();
    let g = good(t.path());
    let full = |machine: &[u8]| {
        Tar::default()
            .file("machine.json", machine)
            .file("layer.qcow2", &g.layer)
            .file("disk.img", &g.disk)
            .end()
    };
    let big_machine = format!(r#"{{"version":1,"uuid":"{}"}}"#, " ".repeat(2 << 20));
    refused(
        "2 MiB machine.json",
        &zstd(&full(big_machine.as_bytes())),
        ErrorKind::InvalidBundle,
        &["machine.json", "1048576"],
    );
    refused(
        "unknown key",
        &zstd(&full(br#"{"version":1,"gpu":true}"#)),
        ErrorKind::InvalidBundle,
        &["machine.json", "gpu"],
    );
    refused(
        "version 0",
        &zstd(&full(br#"{"memory":1024}"#)),
        ErrorKind::InvalidBundle,
        &["machine.json", "version"],
    );
    refused(
        "bad mac",
        &zstd(&full(br#"{"version":1,"mac":"01:02:03:04:05:06"}"#)),
        ErrorKind::InvalidBundle,
        &["mac"],
    );

    // A sparse map claiming 10 TiB: refused from its header, before anything is written.
    let ten_tib = Tar::default()
        .file("machine.json", &g.machine)
        .file("layer.qcow2", &g.layer)
        .sparse(
            "disk.img",
            10 << 40,
            &[(0, 512), ((10 << 40) - 512, 512)],
            &[1u8; 1024],
        )
        .end();
    refused(
        "10 TiB map",
        &zstd(&ten_tib),
        ErrorKind::InvalidBundle,
        &["disk.img", "limit"],
    );
    let past_end = Tar::default()
        .file("machine.json", &g.machine)
        .file("layer.qcow2", &g.layer)
        .sparse("disk.img", 1 << 20, &[(0, 512), (1 << 20, 512)], &[1u8; 1024])
        .end();
    refused(
        "map past the end",
        &zstd(&past_end),
        ErrorKind::InvalidBundle,
        &["disk.img", "past the file's size"],
    );
    let overlap = Tar::default()
        .file("machine.json", &g.machine)
        .file("layer.qcow2", &g.layer)
        .sparse("disk.img", 1 << 20, &[(4096, 1024), (4608, 512)], &[1u8; 1536])
        .end();
    refused(
        "overlapping map",
        &zstd(&overlap),
        ErrorKind::InvalidBundle,
        &["overlap"],
    );
    let short = Tar::default()
        .file("machine.json", &g.machine)
        .file("layer.qcow2", &g.layer)
        .sparse("disk.img", 1 << 20, &[(0, 4096)], &[1u8; 1024])
        .end();
    refused(
        "map longer than the data",
        &zstd(&short),
        ErrorKind::InvalidBundle,
        &["sparse map"],
    );

    // --max-disk-size.
    let limited = ExtractOptions {
        max_disk_size: 512 << 10,
        ..ExtractOptions::default()
    };
    refused_with(
        "disk over the limit",
        &zstd(&full(&g.machine)),
        ErrorKind::InvalidBundle,
        &["limit", "max-disk-size"],
        &limited,
    );

    let good_bundle = zstd(&full(&g.machine));
    bundle::verify(&mut &good_bundle[..], &ExtractOptions::default(), &mut |_| {}).unwrap();
    // Truncated compressed streams, at several points.
    for cut in [
        good_bundle.len() / 4,
        good_bundle.len() / 2,
        good_bundle.len() - 10,
        good_bundle.len() - 1,
    ] {
        refused(
            "truncated zstd",
            &good_bundle[..cut],
            ErrorKind::InvalidBundle,
            &[],
        );
    }
    // A damaged byte in the middle.
    let mut damaged = good_bundle.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x40;
    refused("damaged zstd", &damaged, ErrorKind::InvalidBundle, &[]);
    // Without frame checksums a damaged byte can decode to other valid bytes; the digest
    // catches it.
    let plain = zstd::encode_all(&full(&g.machine)[..], 3).unwrap();
    let digest = support::sha256(&plain);
    let mut damaged = plain.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x40;
    let with_digest = ExtractOptions {
        sha256: Some(digest),
        ..ExtractOptions::default()
    };
    let t2 = tempfile::tempdir().unwrap();
    let e = bundle::extract(
        &mut &damaged[..],
        &t2.path().join("vm"),
        &with_digest,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::DigestMismatch | ErrorKind::InvalidBundle),
        "{e:#}"
    );
    assert!(tree(t2.path()).is_empty());
    // Garbage after the compressed stream; a second frame with data after the archive.
    let mut trailing = good_bundle.clone();
    trailing.extend_from_slice(b"garbage");
    refused(
        "garbage after the stream",
        &trailing,
        ErrorKind::InvalidBundle,
        &[],
    );
    let mut second = good_bundle.clone();
    second.extend(zstd(&Tar::default().file("evil", b"x").end()));
    refused(
        "a second archive",
        &second,
        ErrorKind::InvalidBundle,
        &["after the end-of-archive"],
    );
    // Not compressed, not a tar, no end marker.
    refused(
        "plain tar",
        &full(&g.machine),
        ErrorKind::InvalidBundle,
        &["not a zstd"],
    );
    refused("empty", b"", ErrorKind::InvalidBundle, &["not a zstd"]);
    refused(
        "not a tar",
        &zstd(&[7u8; 4096]),
        ErrorKind::InvalidBundle,
        &["tar header"],
    );
    let mut unterminated = full(&g.machine);
    unterminated.truncate(unterminated.len() - 1024);
    refused(
        "no end marker",
        &zstd(&unterminated),
        ErrorKind::InvalidBundle,
        &["end-of-archive"],
    );
}
