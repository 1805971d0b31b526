//! Hard links whose target a whiteout removes, checked against `umoci unpack` (as root).
//!
//! The spec applies a layer's whiteouts "regardless of the ordering in which the whiteout
//! file was encountered". umoci (and containerd) extract in archive order: a link placed
//! *before* the whiteout of its target reaches the lower file, one placed *after* it fails.
//! diskkit gives both orders the first meaning, so our image of the whiteouts-first layer
//! must equal umoci's merge of the links-first layer (and, were umoci ever to accept the
//! whiteouts-first layer, its merge too). A target an earlier layer deleted is gone: both fail.

mod support;

use std::path::Path;
use std::process::Command;

use diskkit_oci::{unpack, NoProgress, UnpackOptions};
use support::{check_image, e2fsck, host_tree, layout, run, umoci_unpack};

fn fixtures(d: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_hardlink_layers.py");
    run(Command::new("python3").arg(script).arg(d));
}

fn ours(lay: &Path, img: &Path) -> diskkit::Result<()> {
    unpack(lay, img, &UnpackOptions::default(), &mut NoProgress).map(|_| ())
}

#[test]
fn link_to_a_name_whited_out_in_the_same_layer_matches_umoci() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fixtures(d);
    layout(&d.join("whfirst"), "v1", &[&d.join("h1.tar"), &d.join("h2a.tar")]);
    layout(&d.join("lnfirst"), "v1", &[&d.join("h1.tar"), &d.join("h2b.tar")]);
    let expected = host_tree(
        &umoci_unpack(&d.join("lnfirst"), "v1", &d.join("b-ln")).expect("umoci accepts links first"),
    );
    // The reference itself: the lower inodes survive under the new names, the old names go.
    for gone in ["a", "d", "p", "o/y", "o/z"] {
        assert!(!expected.contains_key(gone), "umoci kept {gone}");
    }
    assert_eq!(expected["b"].perm, 0o4755);
    assert_eq!((expected["b"].uid, expected["b"].nlink), (1000, 1));
    assert_eq!(expected["q"].nlink, 2);
    assert_eq!(expected["q"].sha, expected["p2"].sha);
    assert!(expected["b"].xattrs.contains_key("user.origin"));
    for lay in ["whfirst", "lnfirst"] {
        let img = d.join(format!("{lay}.img"));
        ours(&d.join(lay), &img).unwrap();
        e2fsck(&img);
        check_image(lay, &img, &expected);
    }
    // umoci rejects the whiteouts-first order today; should it ever accept it, it must agree.
    if let Ok(root) = umoci_unpack(&d.join("whfirst"), "v1", &d.join("b-wh")) {
        support::assert_same("umoci, whiteouts first", &host_tree(&root), &expected);
    }
}

#[test]
fn link_to_a_name_an_earlier_layer_deleted_fails_like_umoci() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fixtures(d);
    let lay = d.join("cross");
    layout(
        &lay,
        "v1",
        &[&d.join("h1.tar"), &d.join("hdel.tar"), &d.join("hlink.tar")],
    );
    let err = umoci_unpack(&lay, "v1", &d.join("bundle")).unwrap_err();
    assert!(err.contains("no such file"), "{err}");
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    let e = ours(&lay, &out.join("x.img")).unwrap_err();
    assert_eq!(e.kind(), diskkit::ErrorKind::NotFound, "{e:?}");
    assert!(e.to_string().contains("/b -> /a"), "{e}");
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        0,
        "no output left behind"
    );
}

/// The same failing link in a layer whose bytes are damaged (past the end-of-archive marker,
/// so the tar still parses and the merge still fails): the damage is what is reported, since
/// entries merge while the layer streams but the digests are checked before a merge error.
#[test]
fn a_damaged_layer_is_reported_as_damaged_before_its_merge_error() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    fixtures(d);
    let lay = d.join("cross");
    layout(
        &lay,
        "v1",
        &[&d.join("h1.tar"), &d.join("hdel.tar"), &d.join("hlink.tar")],
    );
    let hlink = std::fs::read(d.join("hlink.tar")).unwrap();
    let blob = lay.join("blobs/sha256").join(support::sha(&hlink));
    let mut damaged = hlink.clone();
    *damaged.last_mut().unwrap() ^= 0xff;
    std::fs::remove_file(&blob).unwrap(); // a hard link of the original tar
    std::fs::write(&blob, &damaged).unwrap();
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    let e = ours(&lay, &out.join("x.img")).unwrap_err();
    assert_eq!(e.kind(), diskkit::ErrorKind::Corrupt, "{e:?}");
    assert!(e.to_string().contains("mismatch"), "{e}");
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        0,
        "no output left behind"
    );
}
