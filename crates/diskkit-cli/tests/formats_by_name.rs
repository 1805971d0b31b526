//! The format of every new image follows `-O`, else the file name's extension, else RAW, for
//! each command that writes one (create, convert, flatten, layer create, unpack); checked with
//! `qemu-img info` (qcow2, RAW) and dissect.hypervisor (ASIF, which QEMU does not know).

mod support;

use support::{diskkit, diskkit_ok, is_asif, qemu_format, Dir};

/// What the file at `path` must be: `qcow2`, `raw` or `asif`.
fn assert_format(path: &str, want: &str) {
    match want {
        "asif" => {
            assert!(is_asif(path), "{path} is not ASIF");
        }
        _ => {
            assert_eq!(qemu_format(path), want, "qemu-img info {path}");
            assert!(!is_asif(path), "{path} is ASIF");
        }
    }
}

/// Names and the format each must get without `-O`.
const NAMES: [(&str, &str); 5] = [
    ("x.qcow2", "qcow2"),
    ("x.asif", "asif"),
    ("x.raw", "raw"),
    ("x.img", "raw"),
    ("x", "raw"),
];

#[test]
fn create_convert_flatten_follow_the_name() {
    let d = Dir::new();
    let src = d.s("src.qcow2");
    diskkit_ok(&["create", "--size", "16M", &src]);
    assert_format(&src, "qcow2");
    let top = d.s("top.asif");
    diskkit_ok(&["layer", "create", "--parent", &src, &top]);
    assert_format(&top, "asif");
    for (name, want) in NAMES {
        for (cmd, input) in [("create", None), ("convert", Some(&src)), ("flatten", Some(&top))] {
            let out = d.s(&format!("{cmd}-{name}"));
            let mut args = vec![cmd];
            match input {
                None => args.extend(["--size", "16M"]),
                Some(i) => args.push(i),
            }
            args.push(&out);
            let said = diskkit_ok(&args);
            assert!(said.contains(&format!("({want}, 16 MiB)")), "{said}");
            assert_format(&out, want);
        }
    }
    // -O decides where the name does not: .img and unknown names take any format.
    for (name, flag) in [("o.img", "qcow2"), ("o", "asif"), ("o2.img", "asif")] {
        let out = d.s(name);
        diskkit_ok(&["convert", "-O", flag, &src, &out]);
        assert_format(&out, flag);
    }
    // -O that contradicts the name is refused and leaves nothing behind.
    for (name, flag) in [("c.qcow2", "raw"), ("c.asif", "qcow2"), ("c.raw", "asif")] {
        let out = d.s(name);
        let o = diskkit(&["create", "--size", "16M", "-O", flag, &out]);
        assert_eq!(o.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&o.stderr).contains("contradicts the name"));
        assert!(!d.path(name).exists());
    }
}

#[test]
fn layer_create_follows_the_name() {
    let d = Dir::new();
    let base = d.s("base.raw");
    diskkit_ok(&["create", "--size", "16M", &base]);
    for (name, want) in [("l.qcow2", "qcow2"), ("l.asif", "asif")] {
        let out = d.s(name);
        diskkit_ok(&["layer", "create", "--parent", &base, &out]);
        assert_format(&out, want);
    }
    let out = d.s("l.img");
    diskkit_ok(&["layer", "create", "-O", "qcow2", "--parent", &base, &out]);
    assert_format(&out, "qcow2");
    // A RAW layer cannot record its parent: refused, with what to do instead.
    for name in ["l.raw", "l2.img", "l3"] {
        let o = diskkit(&["layer", "create", "--parent", &base, &d.s(name)]);
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("name the layer .qcow2 or .asif, or give -O qcow2 or -O asif"),
            "{err}"
        );
        assert!(!d.path(name).exists());
    }
}

#[test]
fn unpack_follows_the_name() {
    let d = Dir::new();
    let tree = d.path("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/hostname"), "box\n").unwrap();
    for (name, want) in NAMES {
        let out = d.s(&format!("u-{name}"));
        let said = diskkit_ok(&["unpack", tree.to_str().unwrap(), &out]);
        assert!(said.contains(&format!("({want}, ")), "{said}");
        assert_format(&out, want);
    }
    let out = d.s("u-o.img");
    diskkit_ok(&["unpack", "-O", "qcow2", tree.to_str().unwrap(), &out]);
    assert_format(&out, "qcow2");
}
