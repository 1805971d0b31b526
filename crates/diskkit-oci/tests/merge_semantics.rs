//! What the merge of layers means, end to end: fixture layers (python tarfile) → OCI layout
//! (mkoci-layout.sh) → `unpack` → e2fsck -fn, debugfs, and a comparison with `umoci unpack`
//! (rootless and as root) on the semantic fixture, on random layer stacks (`model`) and on a
//! small busybox system; every image is also read back through diskkit's reader
//! (`support::view_tree`) and compared with the same reference.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::{debugfs, do_unpack, dump, e2fsck, fixtures, layout, listing, mount, run, view_listing, walk};

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
    assert_eq!(view, expected, "through diskkit's reader");
}

/// The semantic fixture against `umoci unpack` run as root (exact owners, device numbers,
/// link counts, xattrs, symlink targets), read through debugfs and through diskkit's reader.
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

#[path = "layer_model/mod.rs"]
mod model;

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..Default::default() })]

    /// Random layer stacks (`model`), hard links within and across layers included: diskkit's
    /// merge equals `umoci unpack --rootless` in every field debugfs shows (modes, owners,
    /// sizes, content hashes, symlink targets, link counts) and in which names share an inode,
    /// and in what diskkit's reader reads. A further layer that hard-links a file the stack deleted
    /// (whiteout, opaque directory, replaced parent) fails with `NotFound` and leaves no image;
    /// one that removes a file (whiteout of it or of its parent, opaque parent, a directory in
    /// its place) and then links to it merges as umoci merges the link first.
    #[test]
    fn random_layers_match_umoci(layers in model::layers(), pick in proptest::prelude::any::<usize>()) {
        let t = tempfile::tempdir().unwrap();
        let stack = model::build(t.path(), &layers);
        let tars: Vec<&Path> = stack.tars.iter().map(PathBuf::as_path).collect();
        let lay = t.path().join("lay");
        support::layout_gz(&lay, "v1", &tars);
        let img = t.path().join("out.img");
        do_unpack(&lay, None, &img).unwrap();
        e2fsck(&img);
        let bundle = t.path().join("bundle");
        umoci_rootless(&lay, &bundle);
        same_tree("random layers", &img, &bundle.join("rootfs"))?;
        if !stack.gone.is_empty() {
            let target = &stack.gone[pick % stack.gone.len()];
            let (extra, link) = model::dangling_link(t.path(), target);
            let lay = t.path().join("lay-dangling");
            support::layout_gz(&lay, "v1", &[&tars[..], &[extra.as_path()]].concat());
            let out = t.path().join("out-dangling");
            std::fs::create_dir(&out).unwrap();
            let e = do_unpack(&lay, None, &out.join("x.img")).unwrap_err();
            proptest::prop_assert_eq!(e.kind(), diskkit::ErrorKind::NotFound, "{} -> {}: {:?}", link, target, e);
            proptest::prop_assert!(e.to_string().contains(target.as_str()), "{}", e);
            proptest::prop_assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "no output left behind");
        }
        // Every other case: a further layer links to a file and removes it (whiteout of it or
        // of its parent, opaque parent, a directory in its place), the removal first; diskkit's
        // image must be umoci's merge of the same layer with the link first.
        if pick % 2 == 0 && !stack.files.is_empty() {
            let target = &stack.files[pick / 2 % stack.files.len()];
            let (removed_first, link_first, what) = model::link_to_removed(t.path(), target, pick / 4);
            let lay_rm = t.path().join("lay-removed-first");
            support::layout_gz(&lay_rm, "v1", &[&tars[..], &[removed_first.as_path()]].concat());
            let lay_ln = t.path().join("lay-link-first");
            support::layout_gz(&lay_ln, "v1", &[&tars[..], &[link_first.as_path()]].concat());
            let img = t.path().join("removed-first.img");
            do_unpack(&lay_rm, None, &img).unwrap_or_else(|e| panic!("{what}: {e}"));
            e2fsck(&img);
            let bundle = t.path().join("bundle-link-first");
            umoci_rootless(&lay_ln, &bundle);
            same_tree(&what, &img, &bundle.join("rootfs"))?;
        }
    }
}

fn umoci_rootless(lay: &Path, bundle: &Path) {
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:v1", lay.display()))
        .arg(bundle));
}

/// Our image against umoci's rootfs: every field debugfs shows, which names share an inode,
/// and what diskkit's reader reads.
fn same_tree(what: &str, img: &Path, rootfs: &Path) -> Result<(), proptest::test_runner::TestCaseError> {
    let expected = support::host_tree(rootfs);
    let (ours, inodes) = support::debugfs_tree_inodes(img);
    support::assert_same(what, &ours, &expected);
    proptest::prop_assert_eq!(
        support::link_groups(&inodes),
        support::link_groups(&support::host_inodes(rootfs)),
        "{}: names sharing an inode",
        what
    );
    support::check_view(what, img, &expected);
    Ok(())
}

/// The generator's mix, over many cases (no unpacking): at least 30% of the hard links reach
/// a file of a lower layer, and names of such files are whited out, hidden by an opaque
/// directory and replaced (by new content and by another type) while another name survives,
/// also in layers above the link's.
#[test]
fn random_layers_cover_cross_layer_links() {
    use proptest::strategy::{Strategy, ValueTree};
    let t = tempfile::tempdir().unwrap();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let mut total = model::Stats::default();
    let mut with_gone = 0;
    let cases = 400;
    for _ in 0..cases {
        let layers = model::layers().new_tree(&mut runner).unwrap().current();
        let stack = model::build(t.path(), &layers);
        total.add(&stack.stats);
        with_gone += usize::from(!stack.gone.is_empty());
    }
    eprintln!("{cases} cases: {total:?}, {with_gone} with a deleted file to link to");
    let links = total.same_links + total.cross_links;
    assert!(total.cross_links * 10 >= links * 3, "{total:?}");
    assert!(total.via_symlink * 20 >= links, "{total:?}");
    let each = [
        total.whited_out,
        total.opaque,
        total.replaced_by_file,
        total.replaced_by_other,
        total.in_later_layer,
    ];
    assert!(each.iter().all(|&n| n * 100 >= cases), "{total:?}");
    assert!(with_gone * 10 >= cases, "{with_gone}");
}

/// A small real system (busybox, merged-usr) in three layers with deletions and replacements:
/// e2fsck, umoci comparison, and, where loop mounts work, busybox run from the image.
#[test]
fn busybox_system_in_three_layers() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_busybox_layers.py");
    run(Command::new("python3").arg(script).arg("/usr/bin/busybox").arg(d));
    let mut gz = Vec::new();
    for l in ["b1.tar", "b2.tar", "b3.tar"] {
        run(Command::new("gzip").args(["-n", "-k", "-f"]).arg(d.join(l)));
        gz.push(d.join(format!("{l}.gz")));
    }
    layout(
        &d.join("lay"),
        "v1",
        &gz.iter().map(PathBuf::as_path).collect::<Vec<_>>(),
    );
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
