//! The kernel's ext4 driver on unpacked images (loop mounts, as root): it reads what umoci
//! extracts, allocates from the image read-write with e2fsck staying clean, and verifies the
//! checksums of extent blocks.

mod support;

use std::process::Command;

use diskkit_oci::{unpack, NoProgress, UnpackOptions};
use support::{debugfs, dump, e2fsck, fixtures, mount, run, sha, sparse_layout, walk};

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
        // diskkit's reader reads what the kernel wrote into our image.
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
    sparse_layout(&src, "holes", &d.join("lay"));
    let img = d.join("out.img");
    let options = UnpackOptions {
        metadata_csum: true,
        ..UnpackOptions::default()
    };
    unpack(&d.join("lay"), &img, &options, &mut NoProgress).unwrap();
    e2fsck(&img);
    assert!(debugfs(&img, "stat /holes").contains("Blockcount: 88\n"));
    // diskkit's reader follows the extent leaf block (and checks the image's checksums) too.
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
