//! `diskkit unpack` of a root filesystem tarball (plain, gzip, zstd) and of a directory, as
//! one layer: the ext4 filesystem must hold what `mkfs.ext4 -d` puts in one made from the same
//! tree (compared entry by entry through debugfs), pass `e2fsck -fn`, and be readable by QEMU
//! and dissect.hypervisor in the format its name asks for.

mod support;

use std::collections::BTreeMap;
use std::path::Path;

use support::{diskkit, diskkit_ok, dissect_dump, qemu_format, tool_ok, Dir};

/// What debugfs says about one entry: mode, owner, size, xattrs, content or link target,
/// device numbers, and which other names share its inode.
type Listing = BTreeMap<String, String>;

fn debugfs(img: &str, request: &str) -> String {
    tool_ok("debugfs", &["-R", request, img])
}

/// Walk the filesystem in `img` (a RAW ext4 image) with debugfs.
fn listing(img: &str) -> Listing {
    let mut out = Listing::new();
    let mut inodes: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut dirs = vec!["/".to_owned()];
    while let Some(dir) = dirs.pop() {
        for line in debugfs(img, &format!("ls -p \"{dir}\"")).lines() {
            // /INODE/MODE/UID/GID/NAME/SIZE/
            let f: Vec<&str> = line.trim().split('/').collect();
            if f.len() < 7 || f[5] == "." || f[5] == ".." || f[5] == "lost+found" {
                continue;
            }
            let path = if dir == "/" {
                format!("/{}", f[5])
            } else {
                format!("{dir}/{}", f[5])
            };
            let mode = u32::from_str_radix(f[2], 8).unwrap();
            let kind = mode & 0o170000;
            let mut desc = format!("mode {:o} uid {} gid {} size {}", mode, f[3], f[4], f[6]);
            let ea = debugfs(img, &format!("ea_list \"{path}\""));
            let ea: Vec<&str> = ea.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            if !ea.is_empty() {
                desc.push_str(&format!(" xattrs {ea:?}"));
            }
            match kind {
                0o040000 => dirs.push(path.clone()),
                0o100000 => {
                    // The bytes as they are (not through a lossy UTF-8 conversion).
                    let data = std::process::Command::new("debugfs")
                        .args(["-R", &format!("cat \"{path}\""), img])
                        .output()
                        .expect("debugfs")
                        .stdout;
                    assert_eq!(data.len().to_string(), f[6], "debugfs cat {path}");
                    desc.push_str(&format!(" content {:x}", fnv(&data)));
                    inodes.entry(f[1].to_owned()).or_default().push(path.clone());
                }
                0o120000 => {
                    let stat = debugfs(img, &format!("stat \"{path}\""));
                    let target = stat
                        .lines()
                        .find_map(|l| l.trim().strip_prefix("Fast link dest: "))
                        .map(str::to_owned)
                        .unwrap_or_else(|| debugfs(img, &format!("cat \"{path}\"")));
                    desc.push_str(&format!(" -> {target}"));
                }
                _ => {
                    let stat = debugfs(img, &format!("stat \"{path}\""));
                    if let Some(dev) = stat.lines().find(|l| l.contains("major/minor")) {
                        desc.push_str(&format!(" {}", dev.trim()));
                    }
                }
            }
            out.insert(path, desc);
        }
    }
    // Hard links: names sharing an inode, in the same group in both images.
    for names in inodes.values().filter(|n| n.len() > 1) {
        for n in names {
            let others: Vec<&String> = names.iter().filter(|o| *o != n).collect();
            out.get_mut(n).unwrap().push_str(&format!(" links {others:?}"));
        }
    }
    out
}

/// FNV-1a of file contents, to compare listings (not a defence against crafted collisions).
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A root filesystem with every kind of entry `mkfs.ext4 -d` copies.
fn make_tree(root: &Path) {
    let sh = |cmd: &str| tool_ok("sh", &["-ec", cmd]);
    let r = root.to_str().unwrap();
    sh(&format!(
        "mkdir -p {r}/etc/ssh {r}/usr/bin {r}/var/empty {r}/dev {r}/tmp
         printf 'box\\n' > {r}/etc/hostname
         head -c 3000000 /dev/urandom > {r}/usr/bin/big
         printf 'x' > {r}/usr/bin/tool && ln {r}/usr/bin/tool {r}/usr/bin/tool-link
         chmod 4755 {r}/usr/bin/tool && chmod 1777 {r}/tmp
         ln -s ../usr/bin/tool {r}/etc/relative-link
         ln -s /{long} {r}/etc/long-link
         : > {r}/etc/empty
         printf 'k' > {r}/etc/ssh/key && chmod 600 {r}/etc/ssh/key && chown 1234:5678 {r}/etc/ssh/key
         setfattr -n user.diskkit -v yes {r}/etc/hostname
         mkfifo {r}/dev/fifo
         mknod {r}/dev/null c 1 3
         printf 'long' > {r}/etc/{long}",
        long = "n".repeat(150)
    ));
}

#[test]
fn tarballs_and_directories_match_mkfs_ext4_d() {
    let d = Dir::new();
    let tree = d.path("tree");
    make_tree(&tree);
    let t = tree.to_str().unwrap();
    // The reference: mkfs.ext4 -d from the same tree.
    let reference = d.s("ref.raw");
    tool_ok("mkfs.ext4", &["-q", "-F", "-d", t, &reference, "64M"]);
    let want = listing(&reference);
    assert!(want.len() >= 15, "{want:?}");
    if std::env::var_os("SHOW_LISTING").is_some() {
        eprintln!("{want:#?}");
    }
    // GNU tar: plain, gzip, zstd; and the directory itself.
    let tar = d.s("rootfs.tar");
    tool_ok("tar", &["--xattrs", "--numeric-owner", "-C", t, "-cf", &tar, "."]);
    tool_ok(
        "sh",
        &[
            "-ec",
            &format!("gzip -nkc {tar} > {tar}.gz && zstd -q -k {tar} -o {tar}.zst"),
        ],
    );
    let cases = [
        (tar.clone(), "out.raw"),
        (format!("{tar}.gz"), "out.qcow2"),
        (format!("{tar}.zst"), "out.asif"),
        (t.to_owned(), "dir.img"),
    ];
    for (src, name) in cases {
        let out = d.s(name);
        let said = diskkit_ok(&["unpack", &src, &out]);
        let kind = if src == t { "the directory" } else { "the tarball" };
        assert!(
            said.starts_with(&format!("unpacked {kind} '{src}' into '{out}' (")),
            "{said}"
        );
        // Read back with independent readers, as RAW.
        let raw = d.s(&format!("{name}.check.raw"));
        match name.rsplit('.').next().unwrap() {
            "qcow2" => {
                assert_eq!(qemu_format(&out), "qcow2");
                tool_ok("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", &out, &raw]);
            }
            "asif" => {
                dissect_dump(&out, Path::new(&raw));
            }
            _ => {
                assert_eq!(qemu_format(&out), "raw");
                std::fs::copy(&out, &raw).unwrap();
            }
        }
        tool_ok("e2fsck", &["-fn", &raw]);
        let got = listing(&raw);
        assert_eq!(got, want, "{src} -> {name} differs from mkfs.ext4 -d");
    }
}

#[test]
fn reproducible_tarball_images_are_identical_whatever_the_compression() {
    let d = Dir::new();
    let tree = d.path("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "box\n").unwrap();
    let tar = d.s("r.tar");
    tool_ok(
        "tar",
        &[
            "--mtime=@0",
            "--sort=name",
            "-C",
            tree.to_str().unwrap(),
            "-cf",
            &tar,
            ".",
        ],
    );
    tool_ok("sh", &["-ec", &format!("zstd -q -k {tar} -o {tar}.zst")]);
    let a = d.s("a.raw");
    let b = d.s("b.raw");
    diskkit_ok(&["unpack", "--reproducible", &tar, &a]);
    diskkit_ok(&["unpack", "--reproducible", &format!("{tar}.zst"), &b]);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn inputs_that_are_not_root_filesystems_are_clear_errors() {
    let d = Dir::new();
    let tree = d.path("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "box\n").unwrap();
    let tar = d.s("r.tar");
    tool_ok("tar", &["-C", tree.to_str().unwrap(), "-cf", &tar, "."]);
    tool_ok("sh", &["-ec", &format!("xz -k {tar}")]);
    let err = |args: &[&str]| {
        let o = diskkit(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(e.lines().count(), 1, "{e}");
        e
    };
    let e = err(&["unpack", &format!("{tar}.xz"), &d.s("o.raw")]);
    assert!(e.contains("xz-compressed input") && e.contains("zstd"), "{e}");
    let e = err(&["unpack", &format!("{tar}:latest"), &d.s("o.raw")]);
    assert!(
        e.contains("':latest' names an image in an OCI layout or archive"),
        "{e}"
    );
    let e = err(&["unpack", "--platform", "linux/arm64", &tar, &d.s("o.raw")]);
    assert!(
        e.contains("a platform only chooses among an OCI image's variants"),
        "{e}"
    );
    let e = err(&["unpack", "--store", &d.s("store"), &tar]);
    assert!(
        e.contains("give an OCI image, not a tarball or a directory"),
        "{e}"
    );
    // A compressed image archive is not taken for a root filesystem.
    let archive = d.path("archive");
    std::fs::create_dir_all(archive.join("blobs/sha256")).unwrap();
    std::fs::write(archive.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        archive.join("index.json"),
        r#"{"schemaVersion":2,"manifests":[]}"#,
    )
    .unwrap();
    let oci = d.s("image.tar");
    tool_ok("tar", &["-C", archive.to_str().unwrap(), "-cf", &oci, "."]);
    tool_ok("sh", &["-ec", &format!("gzip -k {oci}")]);
    let e = err(&["unpack", &format!("{oci}.gz"), &d.s("o.raw")]);
    assert!(
        e.contains("a gzip-compressed image archive; decompress it first"),
        "{e}"
    );
    // Nor is what an interrupted `skopeo copy` leaves (a layout without index.json).
    std::fs::remove_file(archive.join("index.json")).unwrap();
    let e = err(&["unpack", archive.to_str().unwrap(), &d.s("o.raw")]);
    assert!(e.contains("an OCI layout without index.json"), "{e}");
    assert!(!d.path("o.raw").exists());
}
