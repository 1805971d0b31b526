//! End-to-end: fixture layers (python tarfile) → OCI layout (mkoci-layout.sh) → `unpack` →
//! e2fsck -fn, debugfs, and a comparison with `umoci unpack --rootless`; every image is also
//! read back through ext4-view (`support::view_tree`) and compared with the same reference.

mod support;

use support::mount;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use diskkit::ImageFormat;
use diskkit_oci::{unpack, NoProgress, UnpackOptions};

const MKOCI: &str = "/work/shared/tools/mkoci-layout.sh";

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} must be installed: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mkoci() -> PathBuf {
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mkoci-layout.sh");
    if local.exists() {
        local
    } else {
        PathBuf::from(MKOCI)
    }
}

/// Fixture layers in `dir`: l1.tar.gz, l2.tar.zst, l3.tar plus gz copies of all three.
fn fixtures(dir: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_layers.py");
    run(Command::new("python3").arg(script).arg(dir));
    for l in ["l1.tar", "l2.tar", "l3.tar"] {
        run(Command::new("gzip").args(["-n", "-k", "-f"]).arg(dir.join(l)));
    }
    run(Command::new("zstd").args(["-q", "-f"]).arg(dir.join("l2.tar")));
    run(Command::new("bash")
        .arg(mkoci())
        .arg(dir.join("lay"))
        .arg("v1")
        .arg(dir.join("l1.tar.gz"))
        .arg(dir.join("l2.tar.zst"))
        .arg(dir.join("l3.tar")));
    run(Command::new("bash")
        .arg(mkoci())
        .arg(dir.join("laygz"))
        .arg("v1")
        .arg(dir.join("l1.tar.gz"))
        .arg(dir.join("l2.tar.gz"))
        .arg(dir.join("l3.tar.gz")));
}

fn e2fsck(img: &Path) {
    run(Command::new("e2fsck").arg("-fn").arg(img));
}

fn debugfs(img: &Path, req: &str) -> String {
    run(Command::new("debugfs").args(["-R", req]).arg(img))
}

fn dump(img: &Path, file: &str) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("x");
    debugfs(img, &format!("dump {file} {}", out.display()));
    std::fs::read(out).unwrap_or_default()
}

fn do_unpack(src: &Path, reference: Option<&str>, dst: &Path) -> diskkit::Result<()> {
    let options = UnpackOptions {
        reference: reference.map(str::to_owned),
        ..UnpackOptions::default()
    };
    unpack(src, dst, &options, &mut NoProgress).map(|_| ())
}

/// path -> (octal mode, size, sha256 of content for regular files) from debugfs.
fn listing(img: &Path) -> BTreeMap<String, (String, u64, String)> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![String::new()];
    while let Some(d) = dirs.pop() {
        let ls = debugfs(img, &format!("ls -p /{d}"));
        for line in ls.lines() {
            // /ino/mode/uid/gid/name/size/
            let f: Vec<&str> = line.split('/').collect();
            if f.len() < 7 || f[5] == "." || f[5] == ".." || f[5] == "lost+found" {
                continue;
            }
            let path = if d.is_empty() {
                f[5].to_owned()
            } else {
                format!("{d}/{}", f[5])
            };
            let mode = f[2].to_owned();
            let size = f[6].parse().unwrap_or(0);
            let mut hash = String::new();
            if mode.starts_with("04") {
                dirs.push(path.clone());
            } else if mode.starts_with("10") {
                hash = sha(&dump(img, &format!("/{path}")));
            }
            out.insert(path, (mode, size, hash));
        }
    }
    out
}

/// path -> (octal mode, size (0 for directories), sha256 for regular files) of a real tree.
fn walk(root: &Path) -> BTreeMap<String, (String, u64, String)> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "lost+found" {
                continue;
            }
            let md = std::fs::symlink_metadata(&p).unwrap();
            let mut hash = String::new();
            let mut size = md.size();
            if md.is_dir() {
                stack.push(p.clone());
                size = 0;
            } else if md.is_file() {
                hash = sha(&std::fs::read(&p).unwrap());
            }
            out.insert(rel, (format!("{:06o}", md.mode()), size, hash));
        }
    }
    out
}

/// The image through ext4-view, in `listing`'s format (directory sizes 0).
fn view_listing(img: &Path) -> BTreeMap<String, (String, u64, String)> {
    support::brief(&support::view_tree(img))
}

fn sha(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn merged_semantics() {
    let t = tempfile::tempdir().unwrap();
    fixtures(t.path());
    let img = t.path().join("out.img");
    do_unpack(&t.path().join("lay"), Some("v1"), &img).unwrap();
    e2fsck(&img);
    let l = listing(&img);
    let has = |p: &str| l.contains_key(p);
    // Whiteouts: file, recursive directory, missing target, AUFS metadata skipped.
    assert!(!has("etc/gone") && has("etc/passwd"));
    assert!(!has("olddir") && !has("missing"));
    assert!(!l.keys().any(|k| k.contains(".wh.")), "{l:?}");
    // Opaque marker after its sibling: only the lower layer is hidden.
    assert!(has("opq/new") && !has("opq/old"));
    // Type replacements.
    assert!(l["ftod"].0.starts_with("040700") && has("ftod/inner"));
    assert!(l["dtof"].0.starts_with("100") && !has("dtof/child"));
    assert!(l["dtos"].0.starts_with("120"));
    assert!(l["dev/null"].0 == "010644");
    // Parent through a symlink (merged-usr).
    assert_eq!(dump(&img, "/usr/lib/x.so"), b"through the symlink\n");
    // Contained path, duplicate path (last wins).
    assert_eq!(dump(&img, "/escape"), b"contained\n");
    assert_eq!(dump(&img, "/dup"), b"second\n");
    // Hard links: cross-layer link whose first name is deleted; link whose target is deleted.
    assert_eq!(dump(&img, "/hl2"), b"linked across layers\n");
    assert!(debugfs(&img, "stat /hl2").contains("Links: 1"));
    let st = debugfs(&img, "stat /bin/ping2");
    assert!(st.contains("Mode:  04755") && st.contains("Links: 1"), "{st}");
    assert!(debugfs(&img, "ea_list /bin/ping2").contains("security.capability (20) = 01 00 00 02"));
    // Owners, modes, devices, times, long names and links, xattr spill.
    let st = debugfs(&img, "stat /owner");
    assert!(
        st.contains("User: 70000   Group: 70001") && st.contains("Mode:  02750"),
        "{st}"
    );
    assert!(debugfs(&img, "stat /tmp").contains("Mode:  01777"));
    assert!(debugfs(&img, "stat /dev/sda").contains("Device major/minor number: 08:00"));
    let st = debugfs(&img, "stat /old-time");
    // -12345.5 s: seconds -12346 (0xffffcfc6), nanoseconds 5e8 << 2 = 0x77359400.
    assert!(st.contains("mtime: 0xffffcfc6:77359400"), "{st}");
    assert!(has(&format!("a/{}", "n".repeat(200))));
    assert_eq!(l["longlink"].1, 100);
    // POSIX ACL stored in ext4's format (version 1, short entries for *_OBJ, MASK, OTHER).
    let ea = debugfs(&img, "ea_list /acl");
    assert!(
        ea.contains("system.posix_acl_access (28) = 01 00 00 00 01 00 06 00 02 00 04 00 e8 03 00 00 04 00 04 00 10 00 04 00 20 00 00 00"),
        "{ea}"
    );
    let ea = debugfs(&img, "ea_list /bigxattr");
    assert!(
        ea.contains("user.big (300)") && ea.contains("user.small (1)"),
        "{ea}"
    );
}

#[test]
fn matches_umoci_rootless() {
    let t = tempfile::tempdir().unwrap();
    fixtures(t.path());
    let img = t.path().join("out.img");
    do_unpack(&t.path().join("laygz"), Some("v1"), &img).unwrap();
    e2fsck(&img);
    let bundle = t.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:v1", t.path().join("laygz").display()))
        .arg(&bundle));
    let mut expected = walk(&bundle.join("rootfs"));
    let mut ours = listing(&img);
    for v in ours.values_mut() {
        if v.0.starts_with("04") {
            v.1 = 0;
        }
    }
    let mut view = view_listing(&img);
    // Rootless umoci cannot create device nodes (it writes empty files) nor own files.
    for m in [&mut expected, &mut ours, &mut view] {
        m.remove("dev/sda");
    }
    assert_eq!(ours, expected);
    for p in support::view_refused(&img) {
        expected.remove(&p); // pre-1970 mtime: see support::view_refused
    }
    assert_eq!(view, expected, "through ext4-view");
}

/// The semantic fixture against `umoci unpack` run as root (exact owners, device numbers,
/// link counts, xattrs, symlink targets), read through debugfs and through ext4-view.
#[test]
fn matches_umoci_as_root() {
    let t = tempfile::tempdir().unwrap();
    fixtures(t.path());
    let img = t.path().join("out.img");
    do_unpack(&t.path().join("laygz"), Some("v1"), &img).unwrap();
    e2fsck(&img);
    let root = support::umoci_unpack(&t.path().join("laygz"), "v1", &t.path().join("bundle"))
        .expect("umoci unpack (as root) must work");
    support::check_image("fixture", &img, &support::host_tree(&root));
}

#[test]
fn archives_as_sources() {
    let t = tempfile::tempdir().unwrap();
    fixtures(t.path());
    let reference = t.path().join("ref.img");
    do_unpack(&t.path().join("laygz"), None, &reference).unwrap();
    let want = listing(&reference);
    let want_view = support::view_tree(&reference);
    // OCI archive: the layout as a tar.
    let oci = t.path().join("oci.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(t.path().join("laygz"))
        .arg("-cf")
        .arg(&oci)
        .arg("."));
    let img = t.path().join("oci.img");
    do_unpack(&oci, Some("v1"), &img).unwrap();
    e2fsck(&img);
    assert_eq!(listing(&img), want);
    assert_eq!(support::view_tree(&img), want_view);
    // docker-archive written by skopeo.
    let docker = t.path().join("docker.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:v1", t.path().join("laygz").display()))
        .arg(format!("docker-archive:{}:test:v1", docker.display())));
    let img = t.path().join("docker.img");
    do_unpack(&docker, Some("test:v1"), &img).unwrap();
    e2fsck(&img);
    assert_eq!(listing(&img), want);
    assert_eq!(support::view_tree(&img), want_view);
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn corrupt_layers_fail_cleanly() {
    let t = tempfile::tempdir().unwrap();
    fixtures(t.path());
    let out = t.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // A truncated plain tar whose digests match its (truncated) bytes.
    let l1 = std::fs::read(t.path().join("l1.tar")).unwrap();
    std::fs::write(t.path().join("trunc.tar"), &l1[..l1.len() / 2 + 100]).unwrap();
    run(Command::new("bash")
        .arg(mkoci())
        .arg(t.path().join("bad1"))
        .arg("v1")
        .arg(t.path().join("trunc.tar")));
    let e = do_unpack(&t.path().join("bad1"), None, &out.join("a.img")).unwrap_err();
    assert_eq!(e.kind(), diskkit::ErrorKind::Corrupt, "{e:?}");
    // A gzip blob cut short (the digest no longer matches either).
    let lay = t.path().join("laygz");
    let blob = std::fs::read_dir(lay.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read(p).unwrap().starts_with(&[0x1f, 0x8b]))
        .unwrap();
    let data = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &data[..data.len() - 40]).unwrap();
    let e = do_unpack(&lay, None, &out.join("b.img")).unwrap_err();
    assert_eq!(e.kind(), diskkit::ErrorKind::Corrupt, "{e:?}");
    // Flipped bytes in the middle of a zstd layer.
    let lay = t.path().join("lay");
    let blob = std::fs::read_dir(lay.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read(p).unwrap().starts_with(&[0x28, 0xb5, 0x2f, 0xfd]))
        .unwrap();
    let mut data = std::fs::read(&blob).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&blob, &data).unwrap();
    assert!(do_unpack(&lay, None, &out.join("c.img")).is_err());
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
}

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
        run(Command::new("bash").arg(mkoci()).arg(&lay).arg("v1").arg(&tar));
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
            "ext4-view: {format} {extra:?}"
        );
        // Zero ranges are not written: the image file stays small on the host.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&img).unwrap().blocks() * 512 < 4 << 20);
    }
}

/// The kernel's ext4 driver reads the image (loop mount, read-only) and sees what umoci
/// extracts. Runs where loop mounts are allowed (root in CI); prints why and returns otherwise.
#[test]
fn kernel_mount_matches_umoci() {
    let t = tempfile::tempdir().unwrap();
    fixtures(t.path());
    let bundle = t.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:v1", t.path().join("laygz").display()))
        .arg(&bundle));
    let mut expected = walk(&bundle.join("rootfs"));
    expected.remove("dev/sda");
    expected.remove("dev/null");
    for csum in [false, true] {
        let img = t.path().join(format!("k{csum}.img"));
        let options = UnpackOptions {
            metadata_csum: csum,
            ..UnpackOptions::default()
        };
        unpack(&t.path().join("laygz"), &img, &options, &mut NoProgress).unwrap();
        let mnt = t.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        if !mount(&img, &mnt, "loop,ro") {
            return;
        }
        let seen = walk(&mnt);
        let cap = Command::new("getfattr")
            .args(["-n", "security.capability", "-e", "hex"])
            .arg(mnt.join("bin/ping2"))
            .output();
        let sda = std::fs::symlink_metadata(mnt.join("dev/sda")).map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.rdev(), m.uid())
        });
        // The kernel converts the stored ACL back to the user-space format: it must be the
        // ACL the layer carried (ids of the *_OBJ, MASK and OTHER entries read as -1).
        let acl = Command::new("getfattr")
            .args(["-n", "system.posix_acl_access", "-e", "hex"])
            .arg(mnt.join("acl"))
            .output();
        let owner = std::fs::symlink_metadata(mnt.join("owner")).map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.uid(), m.gid())
        });
        run(Command::new("umount").arg(&mnt));
        let mut seen = seen;
        seen.remove("dev/sda");
        seen.remove("dev/null");
        assert_eq!(seen, expected, "metadata_csum={csum}");
        let cap = cap.expect("getfattr (attr) must be installed");
        assert!(
            String::from_utf8_lossy(&cap.stdout).contains("0x0100000200200000"),
            "{}",
            String::from_utf8_lossy(&cap.stdout)
        );
        assert_eq!(sda.unwrap(), (8 << 8, 0));
        assert_eq!(owner.unwrap(), (70000, 70001));
        let acl = String::from_utf8_lossy(&acl.unwrap().stdout).into_owned();
        assert!(
            acl.contains(
                "0x0200000001000600ffffffff02000400e803000004000400ffffffff10000400ffffffff20000000ffffffff"
            ),
            "{acl}"
        );
    }
}

/// Apple `container`'s image store layout: `state.json` + `content/blobs/sha256`.
#[test]
fn apple_container_store_as_source() {
    let t = tempfile::tempdir().unwrap();
    fixtures(t.path());
    let lay = t.path().join("lay");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lay.join("index.json")).unwrap()).unwrap();
    let root = t.path().join("apple");
    std::fs::create_dir_all(root.join("content")).unwrap();
    run(Command::new("cp")
        .arg("-r")
        .arg(lay.join("blobs"))
        .arg(root.join("content/blobs")));
    let state = serde_json::json!({ "docker.io/library/fixture:v1": index["manifests"][0] });
    std::fs::write(root.join("state.json"), state.to_string()).unwrap();
    let reference = t.path().join("ref.img");
    do_unpack(&lay, None, &reference).unwrap();
    let img = t.path().join("apple.img");
    do_unpack(&root, Some("fixture:v1"), &img).unwrap();
    e2fsck(&img);
    assert_eq!(listing(&img), listing(&reference));
    assert_eq!(support::view_tree(&img), support::view_tree(&reference));
    let e = do_unpack(&root, Some("other:v1"), &t.path().join("x.img")).unwrap_err();
    assert_eq!(e.kind(), diskkit::ErrorKind::NotFound);
}

mod model {
    //! Random layer stacks, merged by diskkit and by `umoci unpack --rootless`; the trees must
    //! match. Generated cases avoid the one place where umoci knowingly departs from the image
    //! spec (a whiteout of a name the same layer already created) and device nodes, which
    //! rootless umoci cannot make.

    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    const NAMES: [&str; 3] = ["a", "b", "c"];
    const DIR_MODES: [u32; 3] = [0o755, 0o700, 0o1777];
    const FILE_MODES: [u32; 4] = [0o644, 0o600, 0o755, 0o4755];
    const TARGETS: [&str; 4] = ["a", "../b", "/c/a", "nowhere"];

    fn paths() -> Vec<String> {
        let mut out = Vec::new();
        for a in NAMES {
            out.push(a.to_string());
            for b in NAMES {
                out.push(format!("{a}/{b}"));
                for c in NAMES {
                    out.push(format!("{a}/{b}/{c}"));
                }
            }
        }
        out
    }

    #[derive(Clone, Debug)]
    pub(super) enum Op {
        File(usize, Vec<u8>, usize),
        Dir(usize, usize),
        Symlink(usize, usize),
        Fifo(usize),
        HardLink(usize, usize),
        Whiteout(usize),
        Opaque(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (any::<usize>(), prop::collection::vec(any::<u8>(), 0..600), any::<usize>())
                .prop_map(|(p, d, m)| Op::File(p, d, m)),
            2 => (any::<usize>(), any::<usize>()).prop_map(|(p, m)| Op::Dir(p, m)),
            1 => (any::<usize>(), any::<usize>()).prop_map(|(p, t)| Op::Symlink(p, t)),
            1 => any::<usize>().prop_map(Op::Fifo),
            1 => (any::<usize>(), any::<usize>()).prop_map(|(p, t)| Op::HardLink(p, t)),
            2 => any::<usize>().prop_map(Op::Whiteout),
            1 => any::<usize>().prop_map(Op::Opaque),
        ]
    }

    pub(super) fn layers() -> impl Strategy<Value = Vec<Vec<Op>>> {
        prop::collection::vec(prop::collection::vec(op(), 1..10), 1..4)
    }

    fn ancestors(p: &str) -> Vec<String> {
        let parts: Vec<&str> = p.split('/').collect();
        (1..parts.len()).map(|i| parts[..i].join("/")).collect()
    }

    fn under(p: &str, root: &str) -> bool {
        p.starts_with(&format!("{root}/"))
    }

    struct Layer {
        builder: tar::Builder<Vec<u8>>,
        /// Paths emitted in this layer, with whether they are directories.
        emitted: BTreeMap<String, bool>,
        /// Regular files of this layer that are still reachable by their path.
        files: Vec<String>,
    }

    impl Layer {
        fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_size(size);
            h
        }

        fn put(&mut self, path: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>) {
            let mut h = Self::header(kind, mode, data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            let name = if kind == tar::EntryType::Directory {
                format!("{path}/")
            } else {
                path.to_string()
            };
            self.builder.append_data(&mut h, name, data).unwrap();
        }

        /// Emit `p` (after its ancestors as directories) and track what it replaces.
        fn emit(&mut self, p: &str, kind: tar::EntryType, mode: u32, data: &[u8], link: Option<&str>) {
            for a in ancestors(p) {
                if self.emitted.get(&a) != Some(&true) {
                    self.put(&a, tar::EntryType::Directory, 0o755, &[], None);
                    self.files.retain(|f| f != &a);
                    self.emitted.insert(a, true);
                }
            }
            self.put(p, kind, mode, data, link);
            let is_dir = kind == tar::EntryType::Directory;
            if !is_dir {
                self.files.retain(|f| !under(f, p));
                self.emitted.retain(|e, _| !under(e, p));
            }
            self.files.retain(|f| f != p);
            if kind == tar::EntryType::Regular || kind == tar::EntryType::Link {
                self.files.push(p.to_string());
            }
            self.emitted.insert(p.to_string(), is_dir);
        }
    }

    pub(super) fn build(dir: &Path, layers: &[Vec<Op>]) -> Vec<PathBuf> {
        let all = paths();
        let mut out = Vec::new();
        for (i, ops) in layers.iter().enumerate() {
            let mut l = Layer {
                builder: tar::Builder::new(Vec::new()),
                emitted: BTreeMap::new(),
                files: Vec::new(),
            };
            for op in ops {
                match op {
                    Op::File(p, data, m) => {
                        let p = &all[p % all.len()];
                        l.emit(
                            p,
                            tar::EntryType::Regular,
                            FILE_MODES[m % FILE_MODES.len()],
                            data,
                            None,
                        );
                    }
                    Op::Dir(p, m) => {
                        let p = &all[p % all.len()];
                        l.emit(
                            p,
                            tar::EntryType::Directory,
                            DIR_MODES[m % DIR_MODES.len()],
                            &[],
                            None,
                        );
                    }
                    Op::Symlink(p, t) => {
                        let p = &all[p % all.len()];
                        l.emit(
                            p,
                            tar::EntryType::Symlink,
                            0o777,
                            &[],
                            Some(TARGETS[t % TARGETS.len()]),
                        );
                    }
                    Op::Fifo(p) => {
                        let p = &all[p % all.len()];
                        l.emit(p, tar::EntryType::Fifo, 0o644, &[], None);
                    }
                    Op::HardLink(p, t) => {
                        if l.files.is_empty() {
                            continue;
                        }
                        let p = all[p % all.len()].clone();
                        let target = l.files[t % l.files.len()].clone();
                        if target == p || under(&target, &p) || under(&p, &target) {
                            continue;
                        }
                        l.emit(&p, tar::EntryType::Link, 0o644, &[], Some(&target));
                    }
                    Op::Whiteout(p) => {
                        let p = all[p % all.len()].clone();
                        if l.emitted.keys().any(|e| e == &p || under(e, &p)) {
                            continue; // umoci would delete same-layer entries; the spec keeps them
                        }
                        let (parent, name) = p
                            .rsplit_once('/')
                            .map_or((None, p.as_str()), |(d, n)| (Some(d), n));
                        let wh = match parent {
                            Some(d) => format!("{d}/.wh.{name}"),
                            None => format!(".wh.{name}"),
                        };
                        l.emit(&wh, tar::EntryType::Regular, 0o644, &[], None);
                        l.emitted.remove(&wh);
                        l.files.retain(|f| f != &wh);
                    }
                    Op::Opaque(p) => {
                        let p = all[p % all.len()].clone();
                        // A late marker over same-layer files directly inside is the interesting
                        // case; same-layer subdirectories are where umoci's handling is unclear.
                        let depth = |x: &str| x.matches('/').count();
                        if l.emitted
                            .iter()
                            .any(|(e, &is_dir)| under(e, &p) && (is_dir || depth(e) > depth(&p) + 1))
                        {
                            continue;
                        }
                        l.emit(&p, tar::EntryType::Directory, 0o755, &[], None);
                        let marker = format!("{p}/.wh..wh..opq");
                        l.emit(&marker, tar::EntryType::Regular, 0o644, &[], None);
                        l.emitted.remove(&marker);
                        l.files.retain(|f| f != &marker);
                    }
                }
            }
            let path = dir.join(format!("m{i}.tar"));
            std::fs::write(&path, l.builder.into_inner().unwrap()).unwrap();
            out.push(path);
        }
        out
    }

    pub(super) fn names_of(m: &BTreeMap<String, (String, u64, String)>) -> BTreeSet<String> {
        m.keys().cloned().collect()
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

    /// Random layer stacks: diskkit's merge equals umoci's.
    #[test]
    fn random_layers_match_umoci(layers in model::layers()) {
        let t = tempfile::tempdir().unwrap();
        let tars = model::build(t.path(), &layers);
        let lay = t.path().join("lay");
        let mut cmd = Command::new("bash");
        cmd.arg(mkoci()).arg(&lay).arg("v1");
        for tar in &tars {
            run(Command::new("gzip").args(["-n", "-k", "-f"]).arg(tar));
            cmd.arg(tar.with_extension("tar.gz"));
        }
        run(&mut cmd);
        let img = t.path().join("out.img");
        do_unpack(&lay, None, &img).unwrap();
        e2fsck(&img);
        let bundle = t.path().join("bundle");
        run(Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:v1", lay.display()))
            .arg(&bundle));
        let expected = walk(&bundle.join("rootfs"));
        let mut ours = listing(&img);
        for v in ours.values_mut() {
            if v.0.starts_with("04") {
                v.1 = 0;
            }
        }
        proptest::prop_assert_eq!(model::names_of(&ours), model::names_of(&expected));
        proptest::prop_assert_eq!(view_listing(&img), expected.clone(), "through ext4-view");
        proptest::prop_assert_eq!(ours, expected);
    }
}

/// A small real system (busybox, merged-usr) in three layers with deletions and replacements:
/// e2fsck, umoci comparison, and, where loop mounts work, busybox run from the image.
#[test]
fn busybox_system_in_three_layers() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_busybox_layers.py");
    run(Command::new("python3").arg(script).arg("/usr/bin/busybox").arg(d));
    let mut cmd = Command::new("bash");
    cmd.arg(mkoci()).arg(d.join("lay")).arg("v1");
    for l in ["b1.tar", "b2.tar", "b3.tar"] {
        run(Command::new("gzip").args(["-n", "-k", "-f"]).arg(d.join(l)));
        cmd.arg(d.join(format!("{l}.gz")));
    }
    run(&mut cmd);
    let img = d.join("root.img");
    do_unpack(&d.join("lay"), Some("v1"), &img).unwrap();
    e2fsck(&img);
    let l = listing(&img);
    assert!(!l.contains_key("usr/bin/cat") && !l.contains_key("usr/bin/busybox"));
    assert_eq!(l["bin"].0, "120777");
    assert!(l.contains_key("usr/bin/hello"));
    assert!(l.contains_key("var/log/new.log") && !l.contains_key("var/log/old.log"));
    assert!(l.contains_key("etc/motd/10-welcome"));
    assert_eq!(l["usr/local"].0, "120777");
    let st = debugfs(&img, "stat /usr/bin/sh");
    assert!(st.contains("Links: 11"), "{st}");
    let bundle = d.join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:v1", d.join("lay").display()))
        .arg(&bundle));
    let mut expected = walk(&bundle.join("rootfs"));
    let mut ours = l.clone();
    for v in ours.values_mut() {
        if v.0.starts_with("04") {
            v.1 = 0;
        }
    }
    for m in [&mut expected, &mut ours] {
        m.remove("dev/null");
        m.remove("dev/zero");
    }
    assert_eq!(ours, expected);
    // Everything, devices and owners included, against umoci run as root.
    let root = support::umoci_unpack(&d.join("lay"), "v1", &d.join("bundle-root"))
        .expect("umoci unpack (as root) must work");
    support::check_image("busybox", &img, &support::host_tree(&root));
    // Run busybox from the image under the kernel's ext4 driver.
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if !mount(&img, &mnt, "loop,ro") {
        return;
    }
    let ran = Command::new("chroot")
        .arg(&mnt)
        .args(["/bin/sh", "-c", "/bin/hello; id -u; ls /etc/motd"])
        .output();
    run(Command::new("umount").arg(&mnt));
    let ran = ran.unwrap();
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert_eq!(stdout, "hello from layer 2\n0\n10-welcome\n");
}

/// A 100 GiB sparse file with 5 bytes of data: the holes are found in the spool with
/// SEEK_DATA and never read or written, and the bytes land in the right block.
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
    let tar = d.join("l.tar");
    run(Command::new("tar")
        .args(["--sparse", "--format=pax", "-C"])
        .arg(&src)
        .arg("-cf")
        .arg(&tar)
        .arg("huge"));
    run(Command::new("bash")
        .arg(mkoci())
        .arg(d.join("lay"))
        .arg("v1")
        .arg(&tar));
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

/// An index of an index of two platform manifests: `--platform` picks the right one, the
/// host's is the default, a missing platform is a clear error.
#[test]
fn multi_platform_nested_index() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let multi = d.join("multi");
    let blobs = multi.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut manifests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let src = d.join(format!("src-{arch}"));
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("arch"), arch).unwrap();
        let tar = d.join(format!("{arch}.tar"));
        run(Command::new("tar")
            .arg("-C")
            .arg(&src)
            .arg("-cf")
            .arg(&tar)
            .arg("arch"));
        let lay = d.join(format!("lay-{arch}"));
        run(Command::new("bash").arg(mkoci()).arg(&lay).arg("v1").arg(&tar));
        for e in std::fs::read_dir(lay.join("blobs/sha256")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), blobs.join(e.file_name())).unwrap();
        }
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(lay.join("index.json")).unwrap()).unwrap();
        let mut m = index["manifests"][0].clone();
        m.as_object_mut().unwrap().remove("annotations");
        m["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        manifests.push(m);
    }
    // The inner index is a blob; the layout's index.json points at it.
    let inner = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    })
    .to_string();
    let hex = sha(inner.as_bytes());
    std::fs::write(multi.join("blobs/sha256").join(&hex), &inner).unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{hex}"),
            "size": inner.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }],
    });
    std::fs::write(multi.join("index.json"), top.to_string()).unwrap();
    std::fs::write(multi.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    for (platform, want) in [
        (Some("linux/arm64"), "arm64"),
        (Some("linux/amd64"), "amd64"),
        (None, "amd64"),
    ] {
        let img = d.join(format!("{want}-{}.img", platform.is_some()));
        let options = UnpackOptions {
            reference: Some("multi".into()),
            platform: platform.map(|p| p.parse().unwrap()),
            ..UnpackOptions::default()
        };
        if platform.is_none() && diskkit_oci::Platform::host().architecture != "amd64" {
            continue; // the default is the host's platform
        }
        unpack(&multi, &img, &options, &mut NoProgress).unwrap();
        e2fsck(&img);
        assert_eq!(dump(&img, "/arch"), want.as_bytes());
        assert_eq!(support::view_tree(&img)["arch"].sha, sha(want.as_bytes()));
    }
    let options = UnpackOptions {
        platform: Some("linux/riscv64".parse().unwrap()),
        ..UnpackOptions::default()
    };
    let e = unpack(&multi, &d.join("x.img"), &options, &mut NoProgress).unwrap_err();
    assert_eq!(e.kind(), diskkit::ErrorKind::NotFound);
    assert!(e.to_string().contains("linux/riscv64"), "{e}");
}

/// The kernel mounts the image read-write and allocates from it (the free-block and
/// free-inode accounting, bitmaps and group descriptors must be right): e2fsck stays clean.
#[test]
fn kernel_writes_to_the_image() {
    let t = tempfile::tempdir().unwrap();
    fixtures(t.path());
    for csum in [false, true] {
        let img = t.path().join(format!("rw{csum}.img"));
        let options = UnpackOptions {
            metadata_csum: csum,
            size: Some(256 << 20),
            ..UnpackOptions::default()
        };
        unpack(&t.path().join("lay"), &img, &options, &mut NoProgress).unwrap();
        let mnt = t.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        if !mount(&img, &mnt, "loop") {
            return;
        }
        let work = || -> std::io::Result<()> {
            // Read everything first: a bad inode, directory, extent or xattr-block checksum
            // is an I/O error here.
            walk(&mnt);
            let ea = Command::new("getfattr")
                .args(["-d", "-m", "-"])
                .arg(mnt.join("bigxattr"))
                .output()?;
            assert!(ea.status.success() && String::from_utf8_lossy(&ea.stdout).contains("user.big="));
            std::fs::write(mnt.join("etc/new"), vec![7u8; 3 << 20])?;
            for i in 0..300 {
                std::fs::create_dir_all(mnt.join(format!("many/d{i}")))?;
                std::fs::write(mnt.join(format!("many/d{i}/f")), b"x")?;
            }
            std::fs::remove_file(mnt.join("usr/lib/libx.so"))?;
            std::fs::remove_dir_all(mnt.join("opq"))?;
            std::fs::write(mnt.join("bigxattr"), b"rewritten")?;
            Ok(())
        };
        let res = work();
        run(Command::new("umount").arg(&mnt));
        res.unwrap();
        e2fsck(&img);
        assert_eq!(dump(&img, "/many/d299/f"), b"x");
        // ext4-view reads what the kernel wrote into our image.
        let view = support::view_tree(&img);
        assert_eq!(view["many/d299/f"].sha, sha(b"x"));
        assert_eq!(view["bigxattr"].sha, sha(b"rewritten"));
        assert!(!view.contains_key("opq"));
    }
}

/// A sparse file of ten islands needs an extent leaf block: with metadata_csum the kernel
/// verifies its checksum when it reads the file back.
#[test]
fn kernel_reads_extent_blocks_with_checksums() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let src = d.join("src");
    std::fs::create_dir(&src).unwrap();
    let f = std::fs::File::create(src.join("holes")).unwrap();
    f.set_len(1 << 30).unwrap();
    for i in 0..10u64 {
        std::os::unix::fs::FileExt::write_all_at(&f, b"isle!", i * 100_000_007).unwrap();
    }
    drop(f);
    let tar = d.join("l.tar");
    run(Command::new("tar")
        .args(["--sparse", "--format=pax", "-C"])
        .arg(&src)
        .arg("-cf")
        .arg(&tar)
        .arg("holes"));
    run(Command::new("bash")
        .arg(mkoci())
        .arg(d.join("lay"))
        .arg("v1")
        .arg(&tar));
    let img = d.join("out.img");
    let options = UnpackOptions {
        metadata_csum: true,
        ..UnpackOptions::default()
    };
    unpack(&d.join("lay"), &img, &options, &mut NoProgress).unwrap();
    e2fsck(&img);
    assert!(debugfs(&img, "stat /holes").contains("Blockcount: 88\n"));
    // ext4-view follows the extent leaf block (and checks the image's checksums) too.
    for i in 0..10u64 {
        let at = i * 100_000_007;
        assert_eq!(support::view_read_at(&img, "/holes", at, 7), b"isle!\0\0");
    }
    assert_eq!(support::view_tree_shallow(&img)["holes"].size, 1 << 30);
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if !mount(&img, &mnt, "loop") {
        return;
    }
    let same = std::fs::read(mnt.join("holes")).map(|b| b == std::fs::read(src.join("holes")).unwrap());
    run(Command::new("umount").arg(&mnt));
    assert!(same.unwrap());
}
