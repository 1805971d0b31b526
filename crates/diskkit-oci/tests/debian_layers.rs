//! A real Debian base (`mmdebstrap --variant=minbase bookworm`, cached under
//! `target/test-cache/`) with two layers of deletions, replacements, hard links, xattrs,
//! special bits and device nodes (`fixtures/make_debian_layers.py`), merged by diskkit and by
//! `umoci unpack` run as root; every path must match through debugfs and diskkit's reader, and
//! `e2fsck -fn` must be clean. Needs mmdebstrap, network access to the Debian mirror on the
//! first run, umoci and root (all there in CI): it fails, not skips, without them.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use diskkit_oci::{unpack, NoProgress, UnpackOptions};
use support::{check_image, e2fsck, host_tree, layout, mount, run, umoci_unpack};

/// The Debian base layer as a gzipped tar, built once and kept in `target/test-cache/`.
fn debian_base() -> PathBuf {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-cache");
    let tarball = cache.join("debian-bookworm-minbase.tar.gz");
    if tarball.exists() {
        return tarball;
    }
    std::fs::create_dir_all(&cache).unwrap();
    let tmp = tempfile::tempdir_in(&cache).unwrap();
    let out = tmp.path().join("base.tar.gz");
    run(Command::new("mmdebstrap")
        .args(["--quiet", "--variant=minbase", "--mode=root", "bookworm"])
        .arg(&out));
    std::fs::rename(&out, &tarball).unwrap();
    tarball
}

#[test]
fn debian_base_with_two_layers_matches_umoci() {
    let base = debian_base();
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_debian_layers.py");
    run(Command::new("python3").arg(script).arg(&base).arg(d));
    for l in ["d2.tar", "d3.tar"] {
        run(Command::new("gzip").args(["-n", "-k", "-f"]).arg(d.join(l)));
    }
    let lay = d.join("lay");
    layout(&lay, "v1", &[&base, &d.join("d2.tar.gz"), &d.join("d3.tar.gz")]);
    let img = d.join("debian.img");
    unpack(&lay, &img, &UnpackOptions::default(), &mut NoProgress).unwrap();
    e2fsck(&img);
    let root = umoci_unpack(&lay, "v1", &d.join("bundle")).expect("umoci unpack (as root)");
    let expected = host_tree(&root);
    // The reference shows every case the layers are meant to exercise.
    let kind = |p: &str| expected.get(p).map(|r| r.kind);
    assert!(expected.len() > 5000, "{} paths", expected.len());
    assert_eq!(kind("etc/motd"), Some('f'));
    assert_eq!(expected["usr/share/doc/README"].size, 22);
    assert_eq!(
        expected
            .keys()
            .filter(|k| k.starts_with("usr/share/doc/"))
            .count(),
        1
    );
    assert_eq!(kind("var/cache/debconf"), None);
    let apt: Vec<&String> = expected.keys().filter(|k| k.starts_with("etc/apt/")).collect();
    assert_eq!(
        apt,
        [
            "etc/apt/apt.conf.d",
            "etc/apt/apt.conf.d/99local",
            "etc/apt/sources.list"
        ]
    );
    assert_eq!(kind("etc/hostname"), Some('d'));
    assert_eq!(kind("etc/hostname/name"), None);
    assert_eq!(kind("srv"), Some('l'));
    assert_eq!(kind("etc/os-release"), Some('f'));
    assert_eq!(kind("usr/share/man"), Some('f'));
    assert_eq!(expected["usr/bin/perl"].nlink, 2);
    assert_eq!(
        expected["usr/local/bin/perl-hl"].sha,
        expected["usr/bin/perl"].sha
    );
    assert_eq!(kind("usr/bin/rgrep"), None);
    assert_eq!(expected["usr/local/bin/rgrep-kept"].nlink, 1);
    assert!(expected["usr/local/bin/capbin"]
        .xattrs
        .contains_key("security.capability"));
    assert_eq!(expected["usr/local/bin/suid"].nlink, 2);
    assert_eq!(expected["usr/local/bin/suid"].perm, 0o4755);
    assert_eq!(expected["usr/bin/su"].perm, 0o4755);
    assert_eq!(expected["var/local/shared"].perm, 0o2775);
    assert_eq!(expected["home/big/owned"].uid, 100000);
    assert_eq!(expected["dev/loop9"].rdev, (7, 9));
    assert_eq!(expected["dev/null"].rdev, (1, 3));
    assert_eq!(kind("dev/custom"), Some('f'));
    assert_eq!(kind("run/fifo"), Some('p'));
    check_image("debian", &img, &expected);
    // With metadata_csum: e2fsck and diskkit's reader (which verifies the superblock, inode and
    // directory checksums) on the same tree.
    let csum = d.join("debian-csum.img");
    let options = UnpackOptions {
        metadata_csum: true,
        ..UnpackOptions::default()
    };
    unpack(&lay, &csum, &options, &mut NoProgress).unwrap();
    e2fsck(&csum);
    support::check_view("debian, metadata_csum", &csum, &expected);
    // The kernel as a third reader, where loop mounts work (root in CI): the same tree,
    // xattrs and link counts included, and the system runs (perl through its new hard link).
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if !mount(&img, &mnt, "loop,ro") {
        return;
    }
    let seen = host_tree(&mnt);
    let ran = Command::new("chroot")
        .arg(&mnt)
        .args([
            "/bin/sh",
            "-c",
            "/usr/local/bin/perl-hl -e 'print qq(perl ok\n)'; cat /etc/motd; dpkg-query -W dash",
        ])
        .output();
    run(Command::new("umount").arg(&mnt));
    support::assert_same("debian (kernel mount)", &seen, &expected);
    let ran = ran.unwrap();
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert!(
        ran.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    assert!(stdout.starts_with("perl ok\nwelcome back\ndash\t"), "{stdout}");
}
