//! Apple `container` image stores: a store laid out like the container tool's (content blobs,
//! `state.json`, a multi-platform index, per-manifest ext4 snapshots) resolved for
//! linux/amd64 and linux/arm64, read with `ls`, `cat` and `kernel`, and left untouched.

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde_json::{json, Value};
use support::{diskkit, diskkit_ok, tool_ok, Dir};

fn sha256(data: &[u8], dir: &Dir) -> String {
    let tmp = dir.path("hash-input");
    fs::write(&tmp, data).unwrap();
    let out = tool_ok("sha256sum", &[&tmp.to_string_lossy()]);
    out.split_whitespace().next().unwrap().to_owned()
}

/// Store `data` as a blob; returns its descriptor digest.
fn blob(root: &Path, dir: &Dir, data: &[u8]) -> String {
    let hex = sha256(data, dir);
    fs::write(root.join("content/blobs/sha256").join(&hex), data).unwrap();
    format!("sha256:{hex}")
}

/// An ext4 snapshot holding an arch marker and a kernel.
fn snapshot(root: &Path, dir: &Dir, manifest_digest: &str, arch: &str, info: &str) {
    let tree = dir.path(&format!("tree-{arch}"));
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::create_dir_all(tree.join("usr/lib/modules/6.12.0")).unwrap();
    fs::write(tree.join("etc/arch"), format!("{arch}\n")).unwrap();
    fs::write(
        tree.join("usr/lib/modules/6.12.0/vmlinuz"),
        format!("kernel-{arch}"),
    )
    .unwrap();
    fs::write(
        tree.join("usr/lib/modules/6.12.0/initramfs.img"),
        format!("initramfs-{arch}"),
    )
    .unwrap();
    let hex = manifest_digest.strip_prefix("sha256:").unwrap();
    let snap_dir = root.join("snapshots").join(hex);
    fs::create_dir_all(&snap_dir).unwrap();
    let snap = snap_dir.join("snapshot");
    // Sparse, like the container tool's (which uses 512 GiB; 1 GiB keeps mkfs quick).
    fs::File::create(&snap).unwrap().set_len(1 << 30).unwrap();
    tool_ok(
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-d",
            &tree.to_string_lossy(),
            &snap.to_string_lossy(),
        ],
    );
    fs::write(
        snap_dir.join("snapshot-info"),
        info.replace("@SOURCE@", &snap.to_string_lossy().replace('/', "\\/")),
    )
    .unwrap();
}

/// Build the store; returns its root.
fn make_store(dir: &Dir) -> std::path::PathBuf {
    let root = dir.path("store");
    for d in ["content/blobs/sha256", "content/ingest", "snapshots/ingest"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    let layer = blob(&root, dir, b"not really a tarball");
    let mut manifests = Vec::new();
    for (arch, variant) in [("amd64", None), ("arm64", Some("v8"))] {
        let config = blob(
            &root,
            dir,
            json!({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})
                .to_string()
                .as_bytes(),
        );
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 1},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": 20}],
        })
        .to_string();
        let digest = blob(&root, dir, manifest.as_bytes());
        let mut platform = json!({"architecture": arch, "os": "linux"});
        if let Some(v) = variant {
            platform["variant"] = json!(v);
        }
        manifests.push((arch, digest, platform, manifest.len()));
    }
    let mut entries: Vec<Value> = vec![json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{}", "e".repeat(64)),
        "size": 100,
        "platform": {"architecture": "unknown", "os": "unknown"},
        "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
    })];
    entries.push(json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": format!("sha256:{}", "7".repeat(64)),
        "size": 100,
        "platform": {"architecture": "arm", "os": "linux", "variant": "v7"},
    }));
    for (_, digest, platform, size) in &manifests {
        entries.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": size, "platform": platform,
        }));
    }
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}).to_string();
    let index_digest = blob(&root, dir, index.as_bytes());
    // state.json as Swift's JSONEncoder writes it: `/` escaped.
    let state = format!(
        r#"{{"docker.io\/library\/demo:latest":{{"size":{},"digest":"{index_digest}","mediaType":"application\/vnd.oci.image.index.v1+json"}}}}"#,
        index.len()
    );
    fs::write(root.join("state.json"), state).unwrap();
    // Current snapshot-info encoding for amd64, the legacy one (plain strings) for arm64.
    snapshot(
        &root,
        dir,
        &manifests[0].1,
        "amd64",
        r#"{"type":{"block":{"format":"ext4","cache":{"on":{}},"sync":{"fsync":{}}}},"source":"@SOURCE@","destination":"\/","options":[]}"#,
    );
    snapshot(
        &root,
        dir,
        &manifests[1].1,
        "arm64",
        r#"{"options":[],"destination":"/","source":"/elsewhere/snapshot","type":{"block":{"sync":"full","cache":"auto","format":"ext4"}}}"#,
    );
    root
}

/// Every file under `root` with its size, mtime and contents hash.
fn fingerprint(root: &Path, dir: &Dir) -> BTreeMap<String, (u64, i64, String)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            let hash = if m.is_file() && m.len() < (1 << 20) {
                sha256(&fs::read(&p).unwrap(), dir)
            } else {
                String::new()
            };
            out.insert(p.to_string_lossy().into_owned(), (m.len(), m.mtime(), hash));
        }
    }
    out
}

#[test]
fn store_resolves_per_platform_and_stays_untouched() {
    let dir = Dir::new();
    let root = make_store(&dir);
    let r = root.to_string_lossy().into_owned();
    let before = fingerprint(&root, &dir);

    // Short and full references, both platforms (aarch64 normalises to arm64/v8).
    for (platform, arch) in [
        ("linux/amd64", "amd64"),
        ("linux/x86_64", "amd64"),
        ("linux/arm64", "arm64"),
        ("linux/aarch64", "arm64"),
        ("linux/arm64/v8", "arm64"),
    ] {
        for reference in ["demo", "demo:latest", "docker.io/library/demo:latest"] {
            let out = diskkit_ok(&[
                "cat",
                "--apple-store",
                &r,
                "--platform",
                platform,
                &format!("{reference}:/etc/arch"),
            ]);
            assert_eq!(out, format!("{arch}\n"), "{reference} for {platform}");
        }
    }
    let ls = diskkit_ok(&[
        "ls",
        "--apple-store",
        &r,
        "--platform",
        "linux/arm64",
        "demo:/usr/lib/modules/6.12.0",
    ]);
    assert_eq!(ls, "initramfs.img\nvmlinuz\n");

    // Kernel extraction from the store, per platform.
    for arch in ["amd64", "arm64"] {
        let out = dir.path(&format!("kernel-{arch}"));
        let j: Value = serde_json::from_str(&diskkit_ok(&[
            "kernel",
            "--output",
            "json",
            "--apple-store",
            &r,
            "--platform",
            &format!("linux/{arch}"),
            "--out",
            &out.to_string_lossy(),
            "demo",
        ]))
        .unwrap();
        assert_eq!(j["chosen"]["kernel"], "/usr/lib/modules/6.12.0/vmlinuz");
        assert_eq!(
            fs::read_to_string(out.join("vmlinuz")).unwrap(),
            format!("kernel-{arch}")
        );
        assert_eq!(
            fs::read_to_string(out.join("initramfs")).unwrap(),
            format!("initramfs-{arch}")
        );
    }

    // A platform the index lacks: the error lists what it has (not the attestation).
    let out = diskkit(&["ls", "--apple-store", &r, "--platform", "linux/riscv64", "demo:/"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("linux/amd64") && err.contains("linux/arm64/v8") && err.contains("linux/arm/v7"),
        "{err}"
    );
    assert!(!err.contains("unknown/unknown"), "{err}");
    // A platform in the index but never unpacked.
    let err = String::from_utf8_lossy(
        &diskkit(&["ls", "--apple-store", &r, "--platform", "linux/arm/v7", "demo:/"]).stderr,
    )
    .into_owned();
    assert!(err.contains("has not been unpacked"), "{err}");
    // An unknown reference lists the store's images.
    let err = String::from_utf8_lossy(&diskkit(&["ls", "--apple-store", &r, "other:/"]).stderr).into_owned();
    assert!(
        err.contains("docker.io/library/other:latest") && err.contains("docker.io/library/demo:latest"),
        "{err}"
    );

    // Nothing in the store changed.
    assert_eq!(before, fingerprint(&root, &dir));
}

#[test]
fn missing_snapshot_info_is_tolerated_with_a_warning() {
    let dir = Dir::new();
    let root = make_store(&dir);
    for e in fs::read_dir(root.join("snapshots")).unwrap() {
        let p = e.unwrap().path().join("snapshot-info");
        if p.exists() {
            fs::write(&p, "{ not json").unwrap();
        }
    }
    let out = diskkit(&[
        "cat",
        "--apple-store",
        &root.to_string_lossy(),
        "--platform",
        "linux/amd64",
        "demo:/etc/arch",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, b"amd64\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));
}
