//! A whiteout and entries of the same layer below the name it removes (entries whose parent
//! directories have no entry of their own): the spec applies whiteouts to lower layers only,
//! "regardless of the ordering", so the same-layer entries stay in either order. Checked
//! against `umoci unpack` (as root) of the same layers, through debugfs and diskkit's reader. (The
//! implicit parent directories keep the lower attributes when the whiteout comes last and get
//! 0755 when it comes first, in umoci and in diskkit alike.)

mod support;

use std::path::Path;
use std::process::Command;

use diskkit_oci::{unpack, NoProgress, UnpackOptions};
use support::{check_image, e2fsck, host_tree, layout, run, umoci_unpack};

#[test]
fn whiteouts_keep_same_layer_entries_in_either_order() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_whiteout_order_layers.py");
    run(Command::new("python3").arg(script).arg(d));
    for order in ["late", "early"] {
        let lay = d.join(order);
        layout(
            &lay,
            "v1",
            &[&d.join("w1.tar"), &d.join(format!("w2{order}.tar"))],
        );
        let expected = host_tree(&umoci_unpack(&lay, "v1", &d.join(format!("bundle-{order}"))).unwrap());
        let names: Vec<&str> = expected.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "d",
                "d/y",
                "lib",
                "o",
                "o/e",
                "o/e/y",
                "usr",
                "usr/lib",
                "usr/lib/y"
            ],
            "{order}"
        );
        let img = d.join(format!("{order}.img"));
        unpack(&lay, &img, &UnpackOptions::default(), &mut NoProgress).unwrap();
        e2fsck(&img);
        check_image(order, &img, &expected);
    }
}
