//! Reading ext4 inside images: `partitions`, `ls`, `cat`, `stat`, `cp`, checked against
//! debugfs, sfdisk and sgdisk on fixtures built with `mkfs.ext4 -d`.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use serde_json::Value;
use support::{diskkit, diskkit_ok, tool_ok, Dir, Rng};

/// Build a varied tree: nested directories, modes, symlinks (relative, absolute, escaping,
/// looping), an empty file, a multi-block file, a sparse file, names with spaces.
fn make_tree(root: &Path) {
    let mut rng = Rng(0x5eed);
    fs::create_dir_all(root.join("etc/ssh")).unwrap();
    fs::create_dir_all(root.join("usr/lib/deep/er/still")).unwrap();
    fs::create_dir_all(root.join("srv/with space")).unwrap();
    fs::write(root.join("etc/hostname"), "fixture\n").unwrap();
    fs::write(root.join("etc/ssh/sshd_config"), "PermitRootLogin no\n").unwrap();
    fs::set_permissions(
        root.join("etc/ssh/sshd_config"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    fs::write(root.join("empty"), "").unwrap();
    fs::write(root.join("usr/lib/big.bin"), rng.bytes(3 * 1024 * 1024 + 123)).unwrap();
    fs::write(root.join("usr/lib/deep/er/still/leaf"), rng.bytes(5000)).unwrap();
    let sparse = fs::File::create(root.join("usr/lib/sparse")).unwrap();
    sparse.set_len(8 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    sparse.write_all_at(b"middle", 4 << 20).unwrap();
    fs::write(root.join("srv/with space/file name"), "spaced\n").unwrap();
    fs::set_permissions(root.join("srv/with space"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(root.join("usr/lib/tool"), "#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("usr/lib/tool"), fs::Permissions::from_mode(0o755)).unwrap();
    symlink("../etc/hostname", root.join("usr/hostname-link")).unwrap();
    symlink("/etc/hostname", root.join("abs-link")).unwrap();
    symlink("../../../../../../etc/passwd", root.join("escape-link")).unwrap();
    symlink("loop-b", root.join("loop-a")).unwrap();
    symlink("loop-a", root.join("loop-b")).unwrap();
    fs::create_dir_all(root.join("srv/latin1")).unwrap();
    use std::os::unix::ffi::OsStrExt;
    fs::write(
        root.join("srv/latin1")
            .join(std::ffi::OsStr::from_bytes(b"caf\xe9")),
        "not utf-8\n",
    )
    .unwrap();
    tool_ok("mkfifo", &[&root.join("srv/fifo").to_string_lossy()]);
    fs::create_dir(root.join("ro-dir")).unwrap();
    fs::write(root.join("ro-dir/inside"), "x").unwrap();
    fs::set_permissions(root.join("ro-dir"), fs::Permissions::from_mode(0o555)).unwrap();
}

/// `mkfs.ext4 -d` a tree into a new file of `mib` MiB.
fn mkfs(tree: &Path, image: &Path, mib: u64) {
    fs::File::create(image).unwrap().set_len(mib << 20).unwrap();
    tool_ok(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "root_owner=0:0",
            "-d",
            &tree.to_string_lossy(),
            &image.to_string_lossy(),
        ],
    );
}

fn debugfs(image: &Path, request: &str) -> String {
    tool_ok("debugfs", &["-R", request, &image.to_string_lossy()])
}

/// `debugfs ls -p` as name → (mode with type bits, uid, gid, size or None for dirs).
fn debugfs_ls(image: &Path, dir: &str) -> BTreeMap<String, (u32, u32, u32, Option<u64>)> {
    let mut out = BTreeMap::new();
    for line in debugfs(image, &format!("ls -p \"{dir}\"")).lines() {
        let f: Vec<&str> = line.split('/').collect();
        if f.len() < 7 || f[5] == "." || f[5] == ".." {
            continue;
        }
        out.insert(
            f[5].to_owned(),
            (
                u32::from_str_radix(f[2], 8).unwrap(),
                f[3].parse().unwrap(),
                f[4].parse().unwrap(),
                f[6].parse().ok(),
            ),
        );
    }
    out
}

fn type_bits(t: &str) -> u32 {
    match t {
        "dir" => 0o040000,
        "symlink" => 0o120000,
        "file" => 0o100000,
        "fifo" => 0o010000,
        other => panic!("unexpected type {other}"),
    }
}

/// `diskkit ls --output json` in the same shape as [`debugfs_ls`].
fn diskkit_ls(target: &str) -> BTreeMap<String, (u32, u32, u32, Option<u64>)> {
    let v: Value = serde_json::from_str(&diskkit_ok(&["ls", "--output", "json", target])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let t = e["type"].as_str().unwrap();
            (
                e["name"].as_str().unwrap().to_owned(),
                (
                    type_bits(t) | e["mode"].as_u64().unwrap() as u32,
                    e["uid"].as_u64().unwrap() as u32,
                    e["gid"].as_u64().unwrap() as u32,
                    (t != "dir").then(|| e["size"].as_u64().unwrap()),
                ),
            )
        })
        .collect()
}

const DIRS: [&str; 8] = [
    "/",
    "/etc",
    "/etc/ssh",
    "/usr",
    "/usr/lib",
    "/usr/lib/deep/er/still",
    "/srv",
    "/srv/with space",
];
const FILES: [&str; 8] = [
    "/etc/hostname",
    "/etc/ssh/sshd_config",
    "/empty",
    "/usr/lib/big.bin",
    "/usr/lib/sparse",
    "/usr/lib/deep/er/still/leaf",
    "/srv/with space/file name",
    "/usr/hostname-link",
];

/// Listings and contents of `target_prefix` (IMAGE[@PART]) equal debugfs's on `fs_image`.
fn check_against_debugfs(fs_image: &Path, target_prefix: &str, dir: &Dir) {
    for d in DIRS {
        let ours = diskkit_ls(&format!("{target_prefix}:{d}"));
        let theirs = debugfs_ls(fs_image, d);
        assert!(!theirs.is_empty(), "debugfs listed nothing in {d}");
        assert_eq!(ours, theirs, "listing of {d}");
    }
    for (i, f) in FILES.iter().enumerate() {
        let dumped = dir.path(&format!("dump{i}"));
        let _ = fs::remove_file(&dumped);
        // debugfs dumps the link itself for a symlink; resolve it the way the image does.
        let real = if f.ends_with("-link") { "/etc/hostname" } else { f };
        debugfs(fs_image, &format!("dump \"{real}\" {}", dumped.display()));
        let out = support::diskkit(&["cat", &format!("{target_prefix}:{f}")]);
        assert!(
            out.status.success(),
            "cat {f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout == fs::read(&dumped).unwrap(),
            "contents of {f} differ from debugfs dump"
        );
    }
}

#[test]
fn ls_and_cat_match_debugfs_in_raw_and_asif() {
    let dir = Dir::new();
    make_tree(&dir.path("tree"));
    let raw = dir.path("fs.img");
    mkfs(&dir.path("tree"), &raw, 64);
    check_against_debugfs(&raw, &dir.s("fs.img"), &dir);
    diskkit_ok(&["convert", "-O", "asif", &dir.s("fs.img"), &dir.s("fs.asif")]);
    check_against_debugfs(&raw, &dir.s("fs.asif"), &dir);
    // qcow2 written by diskkit, and one written by qemu-img with compressed clusters.
    diskkit_ok(&["convert", "-O", "qcow2", &dir.s("fs.img"), &dir.s("fs.qcow2")]);
    check_against_debugfs(&raw, &dir.s("fs.qcow2"), &dir);
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-c",
            &dir.s("fs.img"),
            &dir.s("fs-z.qcow2"),
        ],
    );
    // qemu-img map gives no host offset for a compressed cluster: prove some exist.
    let map: Value = serde_json::from_str(&tool_ok(
        "qemu-img",
        &["map", "--output", "json", "-f", "qcow2", &dir.s("fs-z.qcow2")],
    ))
    .unwrap();
    let compressed = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true && e.get("offset").is_none())
        .count();
    assert!(compressed > 0, "no compressed clusters in fs-z.qcow2: {map}");
    check_against_debugfs(&raw, &dir.s("fs-z.qcow2"), &dir);
    // `partitions` on a whole-disk filesystem says so.
    let v: Value = serde_json::from_str(&diskkit_ok(&[
        "partitions",
        "--output",
        "json",
        &dir.s("fs.asif"),
    ]))
    .unwrap();
    assert_eq!(v["table"], "none");
    assert_eq!(v["whole_disk_ext"], true);
}

/// A GPT disk (sgdisk) with an ESP-typed empty partition and the filesystem in partition 2.
fn gpt_disk(dir: &Dir, fs_image: &Path) -> std::path::PathBuf {
    let disk = dir.path("gpt.img");
    let fs_len = fs::metadata(fs_image).unwrap().len();
    fs::File::create(&disk)
        .unwrap()
        .set_len(fs_len + (16 << 20))
        .unwrap();
    let d = disk.to_string_lossy().into_owned();
    tool_ok("sgdisk", &["-n", "1:2048:+4M", "-t", "1:ef00", "-c", "1:EFI", &d]);
    tool_ok(
        "sgdisk",
        &[
            "-n",
            &format!("2:0:+{}K", fs_len / 1024),
            "-t",
            "2:8304",
            "-c",
            "2:root",
            &d,
        ],
    );
    tool_ok("sgdisk", &["-u", "2:11111111-2222-3333-4444-555555555555", &d]);
    let info = tool_ok("sfdisk", &["--json", &d]);
    let v: Value = serde_json::from_str(&info).unwrap();
    let start = v["partitiontable"]["partitions"][1]["start"].as_u64().unwrap();
    tool_ok(
        "dd",
        &[
            &format!("if={}", fs_image.display()),
            &format!("of={d}"),
            "bs=512",
            &format!("seek={start}"),
            "conv=notrunc",
            "status=none",
        ],
    );
    disk
}

/// `partitions --output json` agrees with `sfdisk --json`.
fn check_partitions_match_sfdisk(disk: &str) {
    let ours: Value = serde_json::from_str(&diskkit_ok(&["partitions", "--output", "json", disk])).unwrap();
    let theirs: Value = serde_json::from_str(&tool_ok("sfdisk", &["--json", disk])).unwrap();
    let tp = theirs["partitiontable"]["partitions"].as_array().unwrap();
    let op = ours["partitions"].as_array().unwrap();
    assert_eq!(op.len(), tp.len(), "{ours:#}\n{theirs:#}");
    assert_eq!(
        ours["table"],
        theirs["partitiontable"]["label"]
            .as_str()
            .map(|l| if l == "dos" { "mbr" } else { l })
            .unwrap()
    );
    for (o, t) in op.iter().zip(tp) {
        assert_eq!(o["offset"].as_u64().unwrap(), t["start"].as_u64().unwrap() * 512);
        assert_eq!(o["size"].as_u64().unwrap(), t["size"].as_u64().unwrap() * 512);
        let node = t["node"].as_str().unwrap();
        assert!(
            node.ends_with(&o["number"].as_u64().unwrap().to_string()),
            "{node} vs {o}"
        );
        if let Some(uuid) = t.get("uuid") {
            assert_eq!(o["uuid"].as_str().unwrap(), uuid.as_str().unwrap().to_lowercase());
        }
        if let Some(name) = t.get("name") {
            assert_eq!(o["name"], *name);
        }
    }
}

#[test]
fn gpt_partitions_listed_and_selected() {
    let dir = Dir::new();
    make_tree(&dir.path("tree"));
    let fs_image = dir.path("fs.img");
    mkfs(&dir.path("tree"), &fs_image, 32);
    let disk = gpt_disk(&dir, &fs_image);
    let d = disk.to_string_lossy().into_owned();
    check_partitions_match_sfdisk(&d);
    let human = diskkit_ok(&["partitions", &d]);
    assert!(
        human.contains("gpt") && human.contains("EFI System") && human.contains("root"),
        "{human}"
    );
    // Every way of naming the partition, and automatic selection (the only ext partition).
    check_against_debugfs(&fs_image, &format!("{d}@2"), &dir);
    for sel in ["2", "root", "11111111-2222-3333-4444-555555555555"] {
        assert_eq!(
            diskkit_ok(&["cat", "--partition", sel, &format!("{d}:/etc/hostname")]),
            "fixture\n"
        );
    }
    assert_eq!(diskkit_ok(&["cat", &format!("{d}:/etc/hostname")]), "fixture\n");
    // Partition 1 holds no filesystem: a clear error naming it.
    let out = diskkit(&["ls", &format!("{d}@1:/")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("partition 1"), "{err}");
    // No such partition.
    let err = String::from_utf8_lossy(&diskkit(&["ls", &format!("{d}@7:/")]).stderr).into_owned();
    assert!(err.contains("no partition 7") && err.contains("root"), "{err}");
    // Same through ASIF.
    diskkit_ok(&["convert", "-O", "asif", &d, &dir.s("gpt.asif")]);
    check_partitions_match_sfdisk_via(&dir.s("gpt.asif"), &d);
    assert_eq!(
        diskkit_ok(&["cat", &format!("{}@root:/etc/hostname", dir.s("gpt.asif"))]),
        "fixture\n"
    );
    // And through qcow2: the table, a partition chosen by label, and its contents.
    diskkit_ok(&["convert", "-O", "qcow2", &d, &dir.s("gpt.qcow2")]);
    check_partitions_match_sfdisk_via(&dir.s("gpt.qcow2"), &d);
    check_against_debugfs(&fs_image, &format!("{}@root", dir.s("gpt.qcow2")), &dir);
}

fn check_partitions_match_sfdisk_via(image: &str, raw: &str) {
    let a: Value = serde_json::from_str(&diskkit_ok(&["partitions", "--output", "json", image])).unwrap();
    let b: Value = serde_json::from_str(&diskkit_ok(&["partitions", "--output", "json", raw])).unwrap();
    assert_eq!(a, b);
}

#[test]
fn mbr_partitions_with_logical_partition() {
    let dir = Dir::new();
    make_tree(&dir.path("tree"));
    let fs_image = dir.path("fs.img");
    mkfs(&dir.path("tree"), &fs_image, 32);
    let disk = dir.path("mbr.img");
    fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let d = disk.to_string_lossy().into_owned();
    // 1: primary 4 MiB, 2: extended, 5: logical 6 MiB, 6: logical with the filesystem.
    let script = "label: dos\n2048,8192,83\n10240,,5\n12288,12288,83\n26624,65536,83\n";
    let mut child = std::process::Command::new("sfdisk")
        .args(["-q", &d])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("sfdisk (installed by .ci/run)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    let v: Value = serde_json::from_str(&tool_ok("sfdisk", &["--json", &d])).unwrap();
    let p6 = v["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"].as_str().unwrap().ends_with('6'))
        .unwrap()["start"]
        .as_u64()
        .unwrap();
    tool_ok(
        "dd",
        &[
            &format!("if={}", fs_image.display()),
            &format!("of={d}"),
            "bs=512",
            &format!("seek={p6}"),
            "conv=notrunc",
            "status=none",
        ],
    );
    check_partitions_match_sfdisk(&d);
    check_against_debugfs(&fs_image, &format!("{d}@6"), &dir);
    assert_eq!(diskkit_ok(&["cat", &format!("{d}:/etc/hostname")]), "fixture\n");
}

#[test]
fn stat_reports_metadata() {
    let dir = Dir::new();
    make_tree(&dir.path("tree"));
    mkfs(&dir.path("tree"), &dir.path("fs.img"), 32);
    let img = dir.s("fs.img");
    let v: Value = serde_json::from_str(&diskkit_ok(&[
        "stat",
        "--output",
        "json",
        &format!("{img}:/etc/ssh/sshd_config"),
    ]))
    .unwrap();
    let host = fs::metadata(dir.path("tree/etc/ssh/sshd_config")).unwrap();
    assert_eq!(v["type"], "file");
    assert_eq!(v["mode"], 0o600);
    assert_eq!(v["size"], 19);
    assert_eq!(v["mtime"].as_i64().unwrap(), host.mtime());
    let v: Value = serde_json::from_str(&diskkit_ok(&[
        "stat",
        "--output",
        "json",
        &format!("{img}:/abs-link"),
    ]))
    .unwrap();
    assert_eq!(v["type"], "symlink");
    assert_eq!(v["target"], "/etc/hostname");
    let human = diskkit_ok(&["stat", &format!("{img}:/usr/lib/tool")]);
    assert!(human.contains("0755 (-rwxr-xr-x)"), "{human}");
    assert_eq!(
        diskkit_ok(&["ls", &format!("{img}:/srv/latin1")]),
        "caf\u{fffd}\n"
    );
    let long = diskkit_ok(&["ls", "-l", &format!("{img}:/")]);
    assert!(
        long.contains("lrwxrwxrwx") && long.contains("abs-link -> /etc/hostname"),
        "{long}"
    );
}

#[test]
fn symlinks_resolve_inside_the_image_only() {
    let dir = Dir::new();
    make_tree(&dir.path("tree"));
    fs::write(dir.path("tree/etc/passwd"), "image-passwd\n").unwrap();
    mkfs(&dir.path("tree"), &dir.path("fs.img"), 32);
    let img = dir.s("fs.img");
    // An absolute link and a link climbing out with `..` both land in the image's root.
    assert_eq!(diskkit_ok(&["cat", &format!("{img}:/abs-link")]), "fixture\n");
    assert_eq!(
        diskkit_ok(&["cat", &format!("{img}:/escape-link")]),
        "image-passwd\n"
    );
    assert_eq!(
        diskkit_ok(&["cat", &format!("{img}:/../../etc/hostname")]),
        "fixture\n"
    );
    // A loop is a clear error.
    let out = diskkit(&["cat", &format!("{img}:/loop-a")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("symbolic links") && err.contains("/loop-a"), "{err}");
    // Missing file: names the path.
    let err = String::from_utf8_lossy(&diskkit(&["cat", &format!("{img}:/nope")]).stderr).into_owned();
    assert!(err.contains("/nope") && err.contains("not found"), "{err}");
}

#[test]
fn cp_copies_trees_with_modes_symlinks_and_times() {
    let dir = Dir::new();
    let tree = dir.path("tree");
    make_tree(&tree);
    mkfs(&tree, &dir.path("fs.img"), 64);
    let img = dir.s("fs.img");
    let out = dir.path("out");
    let report: Value = serde_json::from_str(&diskkit_ok(&[
        "cp",
        "--output",
        "json",
        &format!("{img}:/"),
        &dir.s("out"),
    ]))
    .unwrap();
    assert!(report["files"].as_u64().unwrap() >= 8, "{report}");
    assert_eq!(report["skipped"], serde_json::json!(["/srv/fifo"]));
    compare_trees_at(&tree, &out, true);
    let root: Value =
        serde_json::from_str(&diskkit_ok(&["stat", "--output", "json", &format!("{img}:/")])).unwrap();
    assert_eq!(
        fs::metadata(&out).unwrap().mtime(),
        root["mtime"].as_i64().unwrap()
    );
    // Nothing but `out` appeared next to it (no temporary left behind, nothing outside).
    let mut names: Vec<_> = fs::read_dir(dir.0.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["fs.img", "out", "tree"]);
    // The hostile links are copied as links, not followed.
    assert_eq!(
        fs::read_link(out.join("escape-link")).unwrap(),
        Path::new("../../../../../../etc/passwd")
    );
    // Copying again refuses to replace; into an existing directory lands under the name.
    assert!(!diskkit(&["cp", &format!("{img}:/"), &dir.s("out")])
        .status
        .success());
    diskkit_ok(&["cp", &format!("{img}:/usr/lib"), &dir.s("out")]);
    compare_trees(&tree.join("usr/lib"), &out.join("lib"));
    // One file through a symlink (followed inside the image) to a new name.
    diskkit_ok(&["cp", &format!("{img}:/usr/hostname-link"), &dir.s("single")]);
    assert_eq!(fs::read_to_string(dir.path("single")).unwrap(), "fixture\n");
    assert!(
        !diskkit(&["cp", &format!("{img}:/etc/hostname"), &dir.s("single")])
            .status
            .success()
    );
    // Making the ro-dir removable again for the temp dir's cleanup.
    for d in [out.join("ro-dir"), tree.join("ro-dir")] {
        fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn compare_trees(a: &Path, b: &Path) {
    compare_trees_at(a, b, false);
}

/// `root`: the filesystem's root directory, whose mtime mkfs sets to its own run time (and
/// lost+found's creation), not the source's.
fn compare_trees_at(a: &Path, b: &Path, root: bool) {
    let ma = fs::symlink_metadata(a).unwrap();
    let mb = fs::symlink_metadata(b).unwrap();
    assert_eq!(ma.file_type(), mb.file_type(), "{}", b.display());
    if ma.file_type().is_symlink() {
        assert_eq!(fs::read_link(a).unwrap(), fs::read_link(b).unwrap());
        assert_eq!(ma.mtime(), mb.mtime(), "mtime of link {}", b.display());
        return;
    }
    assert_eq!(ma.mode() & 0o7777, mb.mode() & 0o7777, "mode of {}", b.display());
    if !root {
        assert_eq!(ma.mtime(), mb.mtime(), "mtime of {}", b.display());
    }
    if ma.is_dir() {
        let names = |p: &Path| {
            let mut v: Vec<_> = fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name()).collect();
            v.sort();
            v
        };
        let mut na = names(a);
        // lost+found is mkfs's; FIFOs are skipped by cp (and reported).
        na.retain(|n| n != "lost+found" && !fs::symlink_metadata(a.join(n)).unwrap().file_type().is_fifo());
        let mut nb = names(b);
        nb.retain(|n| n != "lost+found");
        assert_eq!(na, nb, "entries of {}", b.display());
        for n in na {
            compare_trees_at(&a.join(&n), &b.join(&n), false);
        }
    } else {
        assert!(
            fs::read(a).unwrap() == fs::read(b).unwrap(),
            "contents of {}",
            b.display()
        );
    }
}

#[test]
fn corrupt_superblock_is_a_clear_error() {
    let dir = Dir::new();
    make_tree(&dir.path("tree"));
    let img = dir.path("fs.img");
    mkfs(&dir.path("tree"), &img, 32);
    // Keep the magic, break the block count and checksum.
    support::poke(&img, 1024 + 4, &[0xff; 4]);
    let out = diskkit(&["ls", &format!("{}:/", img.display())]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the ext filesystem"), "{err}");
    assert_eq!(out.status.code(), Some(2));
    // Not a filesystem at all.
    let blank = dir.path("blank.img");
    support::sparse_file(&blank, 8 << 20);
    let err =
        String::from_utf8_lossy(&diskkit(&["ls", &format!("{}:/", blank.display())]).stderr).into_owned();
    assert!(
        err.contains("no partition table and no ext2/3/4 filesystem"),
        "{err}"
    ); // A truncated image: reads past its end are reported with the offsets.
    let cut = dir.path("cut.img");
    mkfs(&dir.path("tree"), &cut, 32);
    fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let out = diskkit(&["cat", &format!("{}:/usr/lib/big.bin", cut.display())]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("past its end"), "{err}");
}

#[test]
fn corrupt_gpt_is_a_clear_error() {
    let dir = Dir::new();
    make_tree(&dir.path("tree"));
    let fs_image = dir.path("fs.img");
    mkfs(&dir.path("tree"), &fs_image, 16);
    let disk = gpt_disk(&dir, &fs_image);
    // Flip a byte of the entry array: its CRC no longer matches.
    support::poke(&disk, 1024 + 60, &[0x41]);
    let out = diskkit(&["partitions", &disk.to_string_lossy()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CRC"), "{err}");
}

#[test]
fn huge_and_lying_file_sizes() {
    let dir = Dir::new();
    let tree = dir.path("tree");
    make_tree(&tree);
    let img = dir.path("fs.img");
    mkfs(&tree, &img, 32);
    // A file whose inode claims 1 GiB (the data is 8 bytes): copied as a sparse 1 GiB file.
    debugfs_w(&img, "sif /etc/hostname size 0x40000000");
    // One that claims more than ext4 can hold: refused as corrupt, nothing written.
    debugfs_w(&img, "sif /empty size 0x200000000000");
    let i = img.to_string_lossy().into_owned();
    let v: Value = serde_json::from_str(&diskkit_ok(&[
        "stat",
        "--output",
        "json",
        &format!("{i}:/etc/hostname"),
    ]))
    .unwrap();
    assert_eq!(v["size"], 1u64 << 30);
    diskkit_ok(&["cp", &format!("{i}:/etc/hostname"), &dir.s("big")]);
    let m = fs::metadata(dir.path("big")).unwrap();
    assert_eq!(m.len(), 1 << 30);
    assert!(
        m.blocks() * 512 < 1 << 20,
        "output is not sparse: {} blocks",
        m.blocks()
    );
    let head = fs::read(dir.path("big")).unwrap();
    assert_eq!(&head[..8], b"fixture\n");
    let out = diskkit(&["cp", &format!("{i}:/empty"), &dir.s("huge")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt") && err.contains("/empty"), "{err}");
    assert!(!dir.path("huge").exists());
    let leftovers: Vec<_> = fs::read_dir(dir.0.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("diskkit"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn debugfs_w(image: &Path, request: &str) {
    tool_ok("debugfs", &["-w", "-R", request, &image.to_string_lossy()]);
}

#[test]
fn directory_loop_is_bounded_and_cleaned_up() {
    let dir = Dir::new();
    let tree = dir.path("tree");
    fs::create_dir_all(tree.join("a/b")).unwrap();
    fs::write(tree.join("a/b/f"), "x").unwrap();
    let img = dir.path("fs.img");
    mkfs(&tree, &img, 8);
    // A corrupt filesystem: a directory entry in /a/b that points back at /a.
    debugfs_w(&img, "ln /a /a/b/up");
    let i = img.to_string_lossy().into_owned();
    assert_eq!(diskkit_ok(&["ls", &format!("{i}:/a/b/up/b")]), "f\nup\n");
    let out = diskkit(&["cp", &format!("{i}:/a"), &dir.s("out")]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nested deeper than") || err.contains("too long"),
        "{err}"
    );
    let mut names: Vec<_> = fs::read_dir(dir.0.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["fs.img", "tree"], "partial output left behind");
}

#[test]
fn gpt_with_4096_byte_sectors() {
    let dir = Dir::new();
    make_tree(&dir.path("tree"));
    let fs_image = dir.path("fs.img");
    mkfs(&dir.path("tree"), &fs_image, 16);
    let disk = dir.path("4k.img");
    fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let d = disk.to_string_lossy().into_owned();
    // fdisk -b 4096: a GPT laid out in 4 KiB logical sectors (header at byte 4096).
    let mut child = std::process::Command::new("fdisk")
        .args(["-b", "4096", &d])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("fdisk (installed by .ci/run)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"g\nn\n\n256\n+16M\nw\n")
        .unwrap();
    assert!(child.wait().unwrap().success());
    let listing = tool_ok("fdisk", &["-b", "4096", "-l", &d]);
    assert!(listing.contains("256"), "{listing}");
    tool_ok(
        "dd",
        &[
            &format!("if={}", fs_image.display()),
            &format!("of={d}"),
            "bs=4096",
            "seek=256",
            "conv=notrunc",
            "status=none",
        ],
    );
    let v: Value = serde_json::from_str(&diskkit_ok(&["partitions", "--output", "json", &d])).unwrap();
    assert_eq!(v["table"], "gpt");
    assert_eq!(v["sector_size"], 4096);
    assert_eq!(v["partitions"][0]["offset"], 256 * 4096);
    assert_eq!(v["partitions"][0]["size"], 16 << 20);
    assert_eq!(v["partitions"][0]["ext"], true);
    check_against_debugfs(&fs_image, &format!("{d}@1"), &dir);
}
