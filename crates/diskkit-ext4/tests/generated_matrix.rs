//! A generated matrix: one source tree made into filesystems by `mke2fs -d` with many
//! feature sets and block sizes, then changed by `debugfs` (fallocated files with unwritten
//! extents, punched holes, and journal transactions left for recovery: committed, revoked and
//! uncommitted), and read file by file by diskkit's reader against `debugfs` (names, types,
//! modes, owners, sizes, link counts, times, symlink targets, device numbers, xattrs, bytes).
//!
//! Every image must pass `e2fsck -fn` after e2fsck's own journal replay (`-E journal_only`) on
//! a copy, and the reader, replaying the journal in memory on the original, must read exactly
//! what debugfs reads on that copy. Needs root (device nodes, owners), e2fsprogs and attr; it
//! fails without them.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use support::oracle::{compare, debugfs_tree, reader_tree};

fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The source tree: every kind of file, sizes around the inline and block boundaries, a
/// sparse file, long and short symlinks, hard links, a directory big enough for an htree,
/// xattrs small and large, devices, special bits, odd owners and times before 1970.
fn make_tree(root: &Path) {
    let w = |p: &str, data: &[u8]| std::fs::write(root.join(p), data).unwrap();
    std::fs::create_dir_all(root.join("dir/sub/deeper")).unwrap();
    std::fs::create_dir_all(root.join("big")).unwrap();
    std::fs::create_dir_all(root.join("empty")).unwrap();
    for (i, size) in [
        0usize, 1, 59, 60, 61, 100, 1023, 1024, 1025, 4095, 4096, 4097, 65536, 300_000,
    ]
    .into_iter()
    .enumerate()
    {
        w(&format!("dir/f{size}"), &pseudo_random(size, i as u64 + 1));
    }
    w("dir/sub/deeper/two_mib", &pseudo_random(2 << 20, 99));
    // A sparse file: data, a 3 MiB hole, data, a hole at the end.
    {
        let f = std::fs::File::create(root.join("sparse")).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&pseudo_random(5000, 7), 0).unwrap();
        f.write_all_at(&pseudo_random(7000, 8), 3 << 20).unwrap();
        f.set_len(6 << 20).unwrap();
    }
    for i in 0..700 {
        w(
            &format!("big/entry-with-a-longish-name-{i:04}"),
            format!("{i}\n").as_bytes(),
        );
    }
    std::os::unix::fs::symlink("dir/f100", root.join("short_link")).unwrap();
    let long = format!("/{}", "very-long-symlink-target/".repeat(12));
    std::os::unix::fs::symlink(&long, root.join("long_link")).unwrap();
    std::os::unix::fs::symlink("../../sparse", root.join("dir/sub/rel_link")).unwrap();
    std::fs::hard_link(root.join("dir/f4096"), root.join("hardlink")).unwrap();
    sh(&format!(
        "mknod '{0}/chardev' c 1 3 && mknod '{0}/blockdev' b 259 70000 && mkfifo '{0}/fifo'",
        root.display()
    ));
    sh(&format!(
        "cd '{0}' && setfattr -n user.small -v hello dir/f1 && setfattr -n user.empty dir/f59 \
         && setfattr -n trusted.t -v 0x000102ff dir/sub \
         && setfattr -n user.big -v 0x{1} dir/f61 \
         && setfattr -n security.selinux -v system_u:object_r:etc_t:s0 short_link",
        root.display(),
        hex(&pseudo_random(700, 5)),
    ));
    sh(&format!(
        "cd '{0}' && setfacl -m u:1234:r-x,g:99:rw- dir/f0 && setfacl -d -m u:42:rwx dir/sub",
        root.display()
    ));
    std::fs::set_permissions(root.join("dir/f1023"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::set_permissions(root.join("dir/sub"), std::fs::Permissions::from_mode(0o3770)).unwrap();
    sh(&format!(
        "chown 1234:5678 '{0}/dir/f1024' && chown -h 70000:70001 '{0}/short_link'",
        root.display()
    ));
    sh(&format!(
        "touch -h -d '1960-03-04 05:06:07.123456789 UTC' '{0}/dir/f1025' '{0}/long_link' \
         && touch -d '2100-01-01 00:00:01.5 UTC' '{0}/dir/f4097' && touch -d '1901-12-14 00:00:00 UTC' '{0}/dir/f65536'",
        root.display()
    ));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A block of `path` in `img` (debugfs `bmap`).
fn bmap(img: &Path, path: &str, lblk: u64) -> u64 {
    let out = Command::new("debugfs")
        .args(["-R", &format!("bmap {path} {lblk}")])
        .arg(img)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("bmap {path} {lblk}: {}", String::from_utf8_lossy(&out.stderr)))
}

struct Case {
    name: &'static str,
    mkfs: &'static str,
    /// Default directory hash (set by tune2fs after mke2fs; directories are then reindexed by
    /// e2fsck -D).
    hash: Option<&'static str>,
    /// Unsigned directory hashes (set in the superblock flags the same way).
    unsigned_hash: bool,
    /// Journal transactions to leave for recovery: `jo` options, or None.
    journal: Option<&'static str>,
}

const fn case(name: &'static str, mkfs: &'static str) -> Case {
    Case {
        name,
        mkfs,
        hash: None,
        unsigned_hash: false,
        journal: None,
    }
}

fn cases() -> Vec<Case> {
    vec![
        case("ext2-nofiletype", "-t ext2 -O ^filetype,^dir_index -b 1024"),
        case("ext2", "-t ext2 -b 4096"),
        case("ext3-1k", "-t ext3 -b 1024"),
        case("ext3-2k-128", "-t ext3 -b 2048 -I 128"),
        case("ext4", "-t ext4"),
        case("ext4-1k-128-csum", "-t ext4 -b 1024 -I 128 -O metadata_csum"),
        case("ext4-uninit-bg", "-t ext4 -O ^metadata_csum,uninit_bg"),
        case("ext4-32bit-noflex", "-t ext4 -O ^64bit,^flex_bg"),
        case("ext4-meta-bg", "-t ext4 -b 1024 -O meta_bg,^resize_inode"),
        case("ext4-bigalloc", "-t ext4 -O bigalloc -C 16384"),
        case("ext4-bigalloc-1k", "-t ext4 -b 1024 -O bigalloc -C 4096"),
        case("ext4-inline", "-t ext4 -O inline_data"),
        case("ext4-ea-inode", "-t ext4 -O ea_inode,large_dir"),
        case("ext4-8k", "-t ext4 -b 8192"),
        case("ext4-16k", "-t ext4 -b 16384"),
        case("ext4-32k", "-t ext4 -b 32768"),
        case("ext4-64k", "-t ext4 -b 65536"),
        case("ext4-casefold", "-t ext4 -O casefold"),
        case("ext4-encrypt", "-t ext4 -O encrypt"),
        Case {
            hash: Some("legacy"),
            ..case("ext4-hash-legacy", "-t ext4")
        },
        Case {
            hash: Some("tea"),
            ..case("ext4-hash-tea", "-t ext4")
        },
        Case {
            hash: Some("half_md4"),
            unsigned_hash: true,
            ..case("ext4-hash-half-md4-unsigned", "-t ext4")
        },
        Case {
            hash: Some("tea"),
            unsigned_hash: true,
            ..case("ext4-hash-tea-unsigned", "-t ext4")
        },
        Case {
            hash: Some("legacy"),
            unsigned_hash: true,
            ..case("ext2-hash-legacy-unsigned", "-t ext2")
        },
        Case {
            journal: Some(""),
            ..case("journal-ext3", "-t ext3 -b 1024")
        },
        Case {
            journal: Some("-c -v 3"),
            ..case("journal-ext4-64bit-csum-v3", "-t ext4")
        },
        Case {
            journal: Some("-c -v 2"),
            ..case("journal-ext4-32bit-csum-v2", "-t ext4 -O ^64bit")
        },
        Case {
            journal: Some(""),
            ..case("journal-ext4-64bit-nocsum", "-t ext4 -O ^metadata_csum")
        },
    ]
}

fn build(case: &Case, tree: &Path, dir: &Path) -> std::path::PathBuf {
    let img = dir.join(format!("{}.img", case.name));
    sh(&format!(
        "mke2fs -q -F -o Linux -N 2000 {} -d '{}' '{}' 64M",
        case.mkfs,
        tree.display(),
        img.display()
    ));
    if let Some(h) = case.hash {
        sh(&format!("tune2fs -E hash_alg={h} '{}'", img.display()));
    }
    if case.unsigned_hash {
        sh(&format!("debugfs -w -R 'ssv flags 2' '{}'", img.display()));
    }
    // Index every large directory (mke2fs -d writes them linear).
    let _ = Command::new("e2fsck").args(["-fyD"]).arg(&img).output();
    // Unwritten extents and holes made by debugfs.
    let extents = !case.mkfs.contains("ext2") && !case.mkfs.contains("ext3");
    let inline = case.mkfs.contains("inline_data");
    let cmds = dir.join("cmds");
    let mut c = String::new();
    if extents && !inline {
        c.push_str("write /dev/null /falloc\nfallocate /falloc 0 39\nsif /falloc size 200000\n");
        c.push_str("fallocate /dir/f300000 80 99\n");
    }
    c.push_str("punch /dir/sub/deeper/two_mib 10 19\npunch /dir/f65536 3 3\n");
    if case.mkfs.contains("ea_inode") {
        // A value larger than a block lives in its own inode.
        let v = dir.join("big_value");
        std::fs::write(&v, &pseudo_random(70000, 6)[..65000]).unwrap();
        c.push_str(&format!("ea_set -f {} /dir/f100 user.huge\n", v.display()));
    }
    std::fs::write(&cmds, c).unwrap();
    sh(&format!("debugfs -w -f '{}' '{}'", cmds.display(), img.display()));
    // debugfs leaves some accounting to e2fsck (i_blocks of a new value inode).
    let _ = Command::new("e2fsck").args(["-fy"]).arg(&img).output();
    if let Some(jo) = case.journal {
        // Three transactions over blocks of files the comparison reads: one rewrites a data
        // block of f4096 and one of the 2 MiB file, one revokes the 2 MiB file's block again
        // (so the older copy must not be replayed), one is left uncommitted.
        let host = dir.join("jdata");
        std::fs::write(&host, pseudo_random(65536 * 4, 42)).unwrap();
        let a = bmap(&img, "/dir/f4096", 0);
        let b = bmap(&img, "/dir/sub/deeper/two_mib", 1);
        let c2 = bmap(&img, "/dir/f300000", 0);
        let d = bmap(&img, "/dir/f1024", 0);
        let script = format!(
            "jo {jo}\njw -b {a},{b} {h}\njw -r {b}\njw -b {c2} {h}\njw -b {d} -c {h}\njc\n",
            h = host.display()
        );
        std::fs::write(&cmds, script).unwrap();
        sh(&format!("debugfs -w -f '{}' '{}'", cmds.display(), img.display()));
    }
    img
}

#[test]
fn generated_filesystems_read_like_debugfs() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    make_tree(&tree);
    let filter = std::env::var("DISKKIT_MATRIX_ONLY").ok();
    let mut failures = Vec::new();
    let mut total = 0;
    for case in cases() {
        if filter.as_ref().is_some_and(|f| !case.name.contains(f.as_str())) {
            continue;
        }
        let img = build(&case, &tree, t.path());
        let copy = t.path().join("replayed.img");
        sh(&format!(
            "cp --sparse=always '{}' '{}'",
            img.display(),
            copy.display()
        ));
        let _ = Command::new("e2fsck")
            .args(["-E", "journal_only", "-y"])
            .arg(&copy)
            .output();
        let fsck = Command::new("e2fsck").args(["-fn"]).arg(&copy).output().unwrap();
        if !fsck.status.success() {
            failures.push(format!(
                "{}: e2fsck -fn is not clean:\n{}",
                case.name,
                String::from_utf8_lossy(&fsck.stdout)
            ));
            continue;
        }
        let theirs = debugfs_tree(&copy);
        let ours = match reader_tree(&img) {
            Ok(t) => t,
            Err(e) => {
                failures.push(format!("{}: the reader refused it: {e}", case.name));
                continue;
            }
        };
        let c = compare(&ours, &theirs);
        eprintln!("{}: {}", case.name, c.summary());
        if case.journal.is_some() {
            // The transactions were pending, and the reader replayed them: without the
            // replay the rewritten files read differently.
            let fs = support::oracle::open(&img).unwrap();
            assert_eq!(fs.replayed_transactions(), 3, "{}: {:?}", case.name, fs.notes());
            let unreplayed = debugfs_tree(&img);
            for p in ["/dir/f4096", "/dir/f300000"] {
                let p = p.as_bytes();
                let before = unreplayed[p].as_ref().unwrap().content;
                let after = ours[p].as_ref().unwrap().content;
                assert_ne!(
                    before,
                    after,
                    "{}: {} unchanged by the replay",
                    case.name,
                    String::from_utf8_lossy(p)
                );
            }
            // The revoked block and the uncommitted transaction were not applied.
            for p in ["/dir/sub/deeper/two_mib", "/dir/f1024"] {
                let p = p.as_bytes();
                assert_eq!(
                    unreplayed[p].as_ref().unwrap().content,
                    ours[p].as_ref().unwrap().content
                );
            }
        }
        if !c.is_exact() || c.matched < 730 {
            failures.push(format!("{}: {}", case.name, c.summary()));
        }
        total += c.matched;
        if let Some(keep) = std::env::var_os("DISKKIT_MATRIX_KEEP") {
            std::fs::copy(&img, Path::new(&keep).join(format!("{}.img", case.name))).unwrap();
        }
        std::fs::remove_file(&img).unwrap();
        std::fs::remove_file(&copy).unwrap();
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{total} paths matched debugfs");
}

/// Debugging aid: compare one image given in `DISKKIT_ORACLE_IMG` and print every path.
#[test]
#[ignore = "debugging aid: set DISKKIT_ORACLE_IMG"]
fn oracle_one_image() {
    let img = std::path::PathBuf::from(std::env::var_os("DISKKIT_ORACLE_IMG").unwrap());
    let theirs = debugfs_tree(&img);
    let ours = reader_tree(&img).unwrap();
    for (p, n) in &theirs {
        eprintln!(
            "debugfs {}: {:?}",
            String::from_utf8_lossy(p),
            n.as_ref().map(|n| n.kind)
        );
    }
    for (p, n) in &ours {
        eprintln!(
            "reader {}: {:?}",
            String::from_utf8_lossy(p),
            n.as_ref().map(|n| n.kind)
        );
    }
    eprintln!("{}", compare(&ours, &theirs).summary());
}
