//! Where `unpack` reads an image from: an OCI layout, an OCI archive, a docker-archive, Apple
//! `container`'s image store, a nested multi-platform index; and corrupt layers fail cleanly,
//! leaving no output behind. The images are checked with e2fsck -fn, debugfs and diskkit's reader.

mod support;

use std::path::Path;
use std::process::Command;

use diskkit_oci::{unpack, NoProgress, UnpackOptions};
use support::{do_unpack, dump, e2fsck, fixtures, layout, listing, run, sha};

#[test]
fn archives_as_sources() {
    let t = tempfile::tempdir().unwrap();
    fixtures(t.path());
    let reference = t.path().join("ref.img");
    do_unpack(&t.path().join("laygz"), None, &reference).unwrap();
    let want = listing(&reference);
    let want_view = support::view_tree(&reference);
    // OCI archive: the layout as a tar.
    let oci = t.path().join("oci.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(t.path().join("laygz"))
        .arg("-cf")
        .arg(&oci)
        .arg("."));
    let img = t.path().join("oci.img");
    do_unpack(&oci, Some("v1"), &img).unwrap();
    e2fsck(&img);
    assert_eq!(listing(&img), want);
    assert_eq!(support::view_tree(&img), want_view);
    // docker-archive written by skopeo.
    let docker = t.path().join("docker.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:v1", t.path().join("laygz").display()))
        .arg(format!("docker-archive:{}:test:v1", docker.display())));
    let img = t.path().join("docker.img");
    do_unpack(&docker, Some("test:v1"), &img).unwrap();
    e2fsck(&img);
    assert_eq!(listing(&img), want);
    assert_eq!(support::view_tree(&img), want_view);
}

/// Apple `container`'s image store layout: `state.json` + `content/blobs/sha256`.
#[test]
fn apple_container_store_as_source() {
    let t = tempfile::tempdir().unwrap();
    fixtures(t.path());
    let lay = t.path().join("lay");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lay.join("index.json")).unwrap()).unwrap();
    let root = t.path().join("apple");
    std::fs::create_dir_all(root.join("content")).unwrap();
    run(Command::new("cp")
        .arg("-r")
        .arg(lay.join("blobs"))
        .arg(root.join("content/blobs")));
    let state = serde_json::json!({ "docker.io/library/fixture:v1": index["manifests"][0] });
    std::fs::write(root.join("state.json"), state.to_string()).unwrap();
    let reference = t.path().join("ref.img");
    do_unpack(&lay, None, &reference).unwrap();
    let img = t.path().join("apple.img");
    do_unpack(&root, Some("fixture:v1"), &img).unwrap();
    e2fsck(&img);
    assert_eq!(listing(&img), listing(&reference));
    assert_eq!(support::view_tree(&img), support::view_tree(&reference));
    let e = do_unpack(&root, Some("other:v1"), &t.path().join("x.img")).unwrap_err();
    assert_eq!(e.kind(), diskkit::ErrorKind::NotFound);
}

/// An index of an index of two platform manifests: `--platform` picks the right one, the
/// host's is the default, a missing platform is a clear error.
#[test]
fn multi_platform_nested_index() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    let multi = d.join("multi");
    let blobs = multi.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut manifests = Vec::new();
    for arch in ["amd64", "arm64"] {
        let src = d.join(format!("src-{arch}"));
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("arch"), arch).unwrap();
        let tar = d.join(format!("{arch}.tar"));
        run(Command::new("tar")
            .arg("-C")
            .arg(&src)
            .arg("-cf")
            .arg(&tar)
            .arg("arch"));
        let lay = d.join(format!("lay-{arch}"));
        layout(&lay, "v1", &[&tar]);
        for e in std::fs::read_dir(lay.join("blobs/sha256")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), blobs.join(e.file_name())).unwrap();
        }
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(lay.join("index.json")).unwrap()).unwrap();
        let mut m = index["manifests"][0].clone();
        m.as_object_mut().unwrap().remove("annotations");
        m["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        manifests.push(m);
    }
    // The inner index is a blob; the layout's index.json points at it.
    let inner = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    })
    .to_string();
    let hex = sha(inner.as_bytes());
    std::fs::write(multi.join("blobs/sha256").join(&hex), &inner).unwrap();
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{hex}"),
            "size": inner.len(),
            "annotations": {"org.opencontainers.image.ref.name": "multi"},
        }],
    });
    std::fs::write(multi.join("index.json"), top.to_string()).unwrap();
    std::fs::write(multi.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    for (platform, want) in [
        (Some("linux/arm64"), "arm64"),
        (Some("linux/amd64"), "amd64"),
        (None, "amd64"),
    ] {
        let img = d.join(format!("{want}-{}.img", platform.is_some()));
        let options = UnpackOptions {
            reference: Some("multi".into()),
            platform: platform.map(|p| p.parse().unwrap()),
            ..UnpackOptions::default()
        };
        if platform.is_none() && diskkit_oci::Platform::host().architecture != "amd64" {
            continue; // the default is the host's platform
        }
        unpack(&multi, &img, &options, &mut NoProgress).unwrap();
        e2fsck(&img);
        assert_eq!(dump(&img, "/arch"), want.as_bytes());
        assert_eq!(support::view_tree(&img)["arch"].sha, sha(want.as_bytes()));
    }
    let options = UnpackOptions {
        platform: Some("linux/riscv64".parse().unwrap()),
        ..UnpackOptions::default()
    };
    let e = unpack(&multi, &d.join("x.img"), &options, &mut NoProgress).unwrap_err();
    assert_eq!(e.kind(), diskkit::ErrorKind::NotFound);
    assert!(e.to_string().contains("linux/riscv64"), "{e}");
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn corrupt_layers_fail_cleanly() {
    let t = tempfile::tempdir().unwrap();
    fixtures(t.path());
    let out = t.path().join("out");
    std::fs::create_dir(&out).unwrap();
    // A truncated plain tar whose digests match its (truncated) bytes.
    let l1 = std::fs::read(t.path().join("l1.tar")).unwrap();
    std::fs::write(t.path().join("trunc.tar"), &l1[..l1.len() / 2 + 100]).unwrap();
    layout(&t.path().join("bad1"), "v1", &[&t.path().join("trunc.tar")]);
    let e = do_unpack(&t.path().join("bad1"), None, &out.join("a.img")).unwrap_err();
    assert_eq!(e.kind(), diskkit::ErrorKind::Corrupt, "{e:?}");
    // A gzip blob cut short (the digest no longer matches either).
    let lay = t.path().join("laygz");
    let blob = std::fs::read_dir(lay.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read(p).unwrap().starts_with(&[0x1f, 0x8b]))
        .unwrap();
    let data = std::fs::read(&blob).unwrap();
    std::fs::write(&blob, &data[..data.len() - 40]).unwrap();
    let e = do_unpack(&lay, None, &out.join("b.img")).unwrap_err();
    assert_eq!(e.kind(), diskkit::ErrorKind::Corrupt, "{e:?}");
    // Flipped bytes in the middle of a zstd layer.
    let lay = t.path().join("lay");
    let blob = std::fs::read_dir(lay.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| std::fs::read(p).unwrap().starts_with(&[0x28, 0xb5, 0x2f, 0xfd]))
        .unwrap();
    let mut data = std::fs::read(&blob).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&blob, &data).unwrap();
    assert!(do_unpack(&lay, None, &out.join("c.img")).is_err());
    assert!(leftovers(&out).is_empty(), "{:?}", leftovers(&out));
}
