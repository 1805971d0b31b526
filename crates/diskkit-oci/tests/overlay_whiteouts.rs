//! Overlay-style whiteouts (a character device 0:0, `trusted.overlay.opaque=y` or
//! `user.overlay.opaque=y` on a directory), as layers tarred from an overlay upper directory
//! carry them, mean what the OCI `.wh.` entries mean: our image of such a layer equals
//! `umoci unpack` (as root) of the same changes written the OCI way.

mod support;

use std::path::Path;
use std::process::Command;

use diskkit_oci::{unpack, NoProgress, UnpackOptions};
use support::{check_image, e2fsck, host_tree, layout, run, umoci_unpack};

#[test]
fn overlay_whiteouts_equal_oci_whiteouts() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_overlay_layers.py");
    run(Command::new("python3").arg(script).arg(d));
    layout(&d.join("ovl"), "v1", &[&d.join("v1.tar"), &d.join("v2ovl.tar")]);
    layout(&d.join("oci"), "v1", &[&d.join("v1.tar"), &d.join("v2oci.tar")]);
    let expected = host_tree(&umoci_unpack(&d.join("oci"), "v1", &d.join("bundle")).unwrap());
    let names: Vec<&str> = expected.keys().map(String::as_str).collect();
    assert_eq!(names, ["keep", "null", "o", "o/new", "u", "u/new"]);
    for lay in ["ovl", "oci"] {
        let img = d.join(format!("{lay}.img"));
        unpack(&d.join(lay), &img, &UnpackOptions::default(), &mut NoProgress).unwrap();
        e2fsck(&img);
        check_image(lay, &img, &expected);
    }
}
