//! `diskkit push` and `diskkit pull` against Debian's docker-registry: VM disks in tart's
//! layout (RAW, ASIF and qcow2 stacks with large holes pushed, pulled and compared; zero
//! slices cheap; a re-push uploads only the changed slice; a cut connection mid-slice
//! resumes), a tart artifact built by hand from the documented format, damaged artifacts,
//! `unpack` straight from a registry (the same ext4 as from the local layout), and
//! one-line errors.

#[path = "../../diskkit-deliver/tests/support/mod.rs"]
mod deliver_support;
#[path = "../../diskkit-deliver/tests/support/registry.rs"]
mod registry_support;
mod support;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use deliver_support::{Fault, FaultProxy};
use registry_support::{digest, skopeo, tar_layer, Auth, DockerRegistry, LayoutBuilder};
use support::{diskkit, diskkit_ok, poke, sparse_file, tool_ok, Dir, Rng};

const MIB: u64 = 1 << 20;

fn uploads(reg: &DockerRegistry, from: usize) -> usize {
    reg.requests()[from..]
        .iter()
        .filter(|(m, p, _)| m == "POST" && p.contains("/blobs/uploads/"))
        .count()
}

fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

fn compare(a: &str, b: &str) {
    let out = diskkit(&["compare", a, b]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "diskkit compare {a} {b}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn raw_disks_push_and_pull_sparse_and_a_changed_slice_is_the_only_upload() {
    let reg = DockerRegistry::start(&Auth::None);
    let d = Dir::new();
    let host = reg.host();
    // 1.25 GiB: slice 1 holds data at its start and end, slice 2 is all holes, slice 3
    // (256 MiB) holds data across its middle.
    let disk = d.path("disk.raw");
    sparse_file(&disk, 1280 * MIB);
    let mut rng = Rng(11);
    poke(&disk, 0, &rng.bytes(3 * MIB as usize));
    poke(&disk, 512 * MIB - 8192, &rng.bytes(8192));
    poke(&disk, 1100 * MIB + 123, &rng.bytes(2 * MIB as usize));
    let data = 3 * MIB + 8192 + 2 * MIB;
    let out = diskkit_ok(&["push", &d.s("disk.raw"), &format!("{host}/vms/raw:1")]);
    assert!(
        out.contains("raw disk of 1.25 GiB, 3 slices (1 all zero)"),
        "{out}"
    );
    // Stored: the compressed data, and a few KiB for the zero slice.
    let stored = reg.stored_bytes();
    assert!(
        stored < data + 6 * MIB,
        "the registry stores {stored} bytes for {data} bytes of data"
    );
    let reference = format!("{host}/vms/raw:1");
    for (name, extra) in [
        ("back.raw", None),
        ("back.qcow2", None),
        ("back-asif", Some("asif")),
    ] {
        let path = d.s(name);
        let mut args = vec!["pull", "--disk", &path];
        if let Some(f) = extra {
            args.extend(["-O", f]);
        }
        args.push(&reference);
        let out = diskkit_ok(&args);
        assert!(out.contains("3 slices (1 all zero)"), "{out}");
        compare(&d.s("disk.raw"), &d.s(name));
    }
    tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "qcow2",
            &d.s("disk.raw"),
            &d.s("back.qcow2"),
        ],
    );
    // No zero data written: the pulled RAW file allocates about what holds data.
    let a = allocated(&d.path("back.raw"));
    assert!(
        a <= data + 2 * MIB,
        "back.raw allocates {a} bytes for {data} bytes of data"
    );
    assert_eq!(fs::metadata(d.path("back.raw")).unwrap().len(), 1280 * MIB);
    // Re-pushing the same disk uploads nothing; changing one byte uploads one slice.
    let before = reg.requests().len();
    let out = diskkit_ok(&["push", &d.s("disk.raw"), &format!("{host}/vms/raw:2")]);
    assert!(out.contains(", 0 uploaded,"), "{out}");
    assert_eq!(uploads(&reg, before), 0);
    poke(&disk, 1200 * MIB, b"changed");
    let before = reg.requests().len();
    let out = diskkit_ok(&["push", "-q", &d.s("disk.raw"), &format!("{host}/vms/raw:3")]);
    assert!(out.is_empty(), "-q printed {out}");
    assert_eq!(uploads(&reg, before), 1, "one changed slice, one upload");
    diskkit_ok(&[
        "pull",
        "-q",
        "--disk",
        &d.s("v3.raw"),
        &format!("{host}/vms/raw:3"),
    ]);
    compare(&d.s("disk.raw"), &d.s("v3.raw"));
    // The output exists: refused without --force, replaced with it.
    let o = diskkit(&["pull", "--disk", &d.s("v3.raw"), &format!("{host}/vms/raw:1")]);
    assert_eq!(o.status.code(), Some(2));
    diskkit_ok(&[
        "pull",
        "--force",
        "--disk",
        &d.s("v3.raw"),
        &format!("{host}/vms/raw:1"),
    ]);
}

#[test]
fn qcow2_and_asif_stacks_push_flattened_and_pull_identical() {
    let reg = DockerRegistry::start(&Auth::None);
    let d = Dir::new();
    let host = reg.host();
    // A qcow2 stack with holes, written by qemu-io.
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &d.s("base.qcow2"), "1100M"],
    );
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 4M",
            "-c",
            "write -P 0x22 1000M 3M",
            &d.s("base.qcow2"),
        ],
    );
    tool_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &d.s("top.qcow2"),
        ],
    );
    tool_ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x33 2M 4M",
            "-c",
            "write -z 1001M 1M",
            &d.s("top.qcow2"),
        ],
    );
    let out = diskkit_ok(&["push", &d.s("top.qcow2"), &format!("{host}/vms/qcow:1")]);
    assert!(out.contains("raw disk of"), "{out}");
    diskkit_ok(&["pull", "--disk", &d.s("q.qcow2"), &format!("{host}/vms/qcow:1")]);
    compare(&d.s("top.qcow2"), &d.s("q.qcow2"));
    tool_ok("qemu-img", &["compare", &d.s("top.qcow2"), &d.s("q.qcow2")]);
    tool_ok("qemu-img", &["check", "-q", &d.s("q.qcow2")]);

    // An ASIF stack: pushed as a standalone ASIF file (label asif), pulled as ASIF, RAW.
    diskkit_ok(&["create", "--format", "asif", "--size", "1100M", &d.s("base.asif")]);
    let mut rng = Rng(5);
    fs::write(d.path("a.bin"), rng.bytes(3 * MIB as usize)).unwrap();
    fs::write(d.path("b.bin"), rng.bytes(MIB as usize)).unwrap();
    diskkit_ok(&[
        "write",
        &d.s("base.asif"),
        "--offset",
        "0",
        "--from",
        &d.s("a.bin"),
    ]);
    diskkit_ok(&["layer", "create", "--parent", &d.s("base.asif"), &d.s("top.asif")]);
    diskkit_ok(&[
        "write",
        &d.s("top.asif"),
        "--offset",
        "1050M",
        "--from",
        &d.s("b.bin"),
    ]);
    let out = diskkit_ok(&["push", &d.s("top.asif"), &format!("{host}/vms/asif:1")]);
    assert!(out.contains("asif disk of"), "{out}");
    diskkit_ok(&["pull", "--disk", &d.s("s.asif"), &format!("{host}/vms/asif:1")]);
    compare(&d.s("top.asif"), &d.s("s.asif"));
    let info: serde_json::Value =
        serde_json::from_str(&diskkit_ok(&["info", "--output", "json", &d.s("s.asif")])).unwrap();
    assert_eq!(info["format"], "asif", "{info}");
    diskkit_ok(&["pull", "--disk", &d.s("s.raw"), &format!("{host}/vms/asif:1")]);
    compare(&d.s("top.asif"), &d.s("s.raw"));
    // The same ASIF pushed as raw (--disk-format raw) reads the same too.
    diskkit_ok(&[
        "push",
        "--disk-format",
        "raw",
        &d.s("top.asif"),
        &format!("{host}/vms/asif:raw"),
    ]);
    diskkit_ok(&["pull", "--disk", &d.s("r.qcow2"), &format!("{host}/vms/asif:raw")]);
    compare(&d.s("top.asif"), &d.s("r.qcow2"));
}

/// Apple LZ4 frames written from the documented format, independently of diskkit's
/// encoder: stored blocks, compressed blocks of literals, and a block whose match copies
/// from the previous block's output.
fn apple_lz4(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let literals = |d: &[u8]| {
        let mut b = Vec::new();
        let n = d.len();
        if n < 15 {
            b.push((n as u8) << 4);
        } else {
            b.push(0xF0);
            let mut rest = n - 15;
            while rest >= 255 {
                b.push(255);
                rest -= 255;
            }
            b.push(rest as u8);
        }
        b.extend_from_slice(d);
        b
    };
    let mut pos = 0;
    let mut i = 0;
    while pos < data.len() {
        let n = (data.len() - pos).min(40_000);
        let chunk = &data[pos..pos + n];
        match i % 3 {
            0 => {
                out.extend_from_slice(b"bv4-");
                out.extend_from_slice(&(n as u32).to_le_bytes());
                out.extend_from_slice(chunk);
            }
            1 => {
                let p = literals(chunk);
                out.extend_from_slice(b"bv41");
                out.extend_from_slice(&(n as u32).to_le_bytes());
                out.extend_from_slice(&(p.len() as u32).to_le_bytes());
                out.extend_from_slice(&p);
            }
            _ => {
                // If this chunk starts with a copy of the previous block's first 64 bytes,
                // encode those as a match reaching back into it.
                let prev_start = pos - 40_000;
                if n > 80 && chunk[..64] == data[prev_start..prev_start + 64] {
                    let offset = 40_000u16;
                    let mut p = vec![
                        0x0F,
                        (offset & 0xff) as u8,
                        (offset >> 8) as u8,
                        (64 - 4 - 15) as u8,
                    ];
                    p.extend(literals(&chunk[64..]));
                    out.extend_from_slice(b"bv41");
                    out.extend_from_slice(&(n as u32).to_le_bytes());
                    out.extend_from_slice(&(p.len() as u32).to_le_bytes());
                    out.extend_from_slice(&p);
                } else {
                    let p = literals(chunk);
                    out.extend_from_slice(b"bv41");
                    out.extend_from_slice(&(n as u32).to_le_bytes());
                    out.extend_from_slice(&(p.len() as u32).to_le_bytes());
                    out.extend_from_slice(&p);
                }
            }
        }
        pos += n;
        i += 1;
    }
    out.extend_from_slice(b"bv4$");
    out
}

/// Upload a blob with curl (POST, then a monolithic PUT).
fn curl_blob(host: &str, repo: &str, data: &[u8], dir: &Dir) -> (String, u64) {
    let dg = digest(data);
    let f = dir.path(&format!("blob-{}", &dg[7..19]));
    fs::write(&f, data).unwrap();
    let out = tool_ok(
        "curl",
        &[
            "-sSf",
            "-X",
            "POST",
            "-D",
            "-",
            "-o",
            "/dev/null",
            &format!("http://{host}/v2/{repo}/blobs/uploads/"),
        ],
    );
    let loc = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .unwrap()
        .trim()
        .to_string();
    let url = if loc.starts_with("http") {
        loc
    } else {
        format!("http://{host}{loc}")
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    tool_ok(
        "curl",
        &[
            "-sSf",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", f.display()),
            &format!("{url}{sep}digest={}", dg.replace(':', "%3A")),
        ],
    );
    (dg, data.len() as u64)
}

fn curl_manifest(host: &str, repo: &str, tag: &str, manifest: &serde_json::Value, dir: &Dir) {
    let f = dir.path("manifest.json");
    fs::write(&f, manifest.to_string()).unwrap();
    tool_ok(
        "curl",
        &[
            "-sSf",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/vnd.oci.image.manifest.v1+json",
            "--data-binary",
            &format!("@{}", f.display()),
            &format!("http://{host}/v2/{repo}/manifests/{tag}"),
        ],
    );
}

#[test]
fn a_tart_artifact_built_from_the_documented_format_is_read() {
    let reg = DockerRegistry::start(&Auth::None);
    let d = Dir::new();
    let host = reg.host();
    let repo = "tart/fixture";
    // Three slices: 1 MiB of data (with repeats, so that matches cross blocks), 2 MiB of
    // zeroes, 300 KiB of data.
    let mut rng = Rng(3);
    let mut s1 = rng.bytes(MIB as usize);
    // Blocks are 40,000 bytes; every third one (from the third on) starts with a copy of
    // the start of the block before it.
    for k in (80_000..s1.len() - 64).step_by(120_000) {
        let (a, b) = s1.split_at_mut(k);
        b[..64].copy_from_slice(&a[k - 40_000..k - 40_000 + 64]);
    }
    let s2 = vec![0u8; 2 * MIB as usize];
    let s3 = rng.bytes(300 << 10);
    let mut layers = Vec::new();
    let cfg = br#"{"version":1,"os":"linux","arch":"arm64","cpuCountMin":2,"cpuCount":2,"memorySizeMin":4294967296,"memorySize":4294967296,"macAddress":"6a:00:00:00:00:01","display":{"width":1024,"height":768},"diskFormat":"raw"}"#;
    let (cd, cs) = curl_blob(&host, repo, cfg, &d);
    layers.push(serde_json::json!({"mediaType": "application/vnd.cirruslabs.tart.config.v1", "digest": cd, "size": cs}));
    for s in [&s1, &s2, &s3] {
        let (dg, size) = curl_blob(&host, repo, &apple_lz4(s), &d);
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.cirruslabs.tart.disk.v2", "digest": dg, "size": size,
            "annotations": {
                "org.cirruslabs.tart.uncompressed-size": s.len().to_string(),
                "org.cirruslabs.tart.uncompressed-content-digest": digest(s),
            },
        }));
    }
    let nvram = b"NVRAM: an EFI variable store would be here".to_vec();
    let (nd, ns) = curl_blob(&host, repo, &nvram, &d);
    layers.push(serde_json::json!({"mediaType": "application/vnd.cirruslabs.tart.nvram.v1", "digest": nd, "size": ns}));
    let config = br#"{"architecture":"arm64","os":"linux","config":{"Labels":{"org.cirruslabs.tart.disk.format":"raw"}}}"#;
    let (ocd, ocs) = curl_blob(&host, repo, config, &d);
    let total = s1.len() + s2.len() + s3.len();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": ocd, "size": ocs},
        "layers": layers,
        "annotations": {
            "org.cirruslabs.tart.uncompressed-disk-size": total.to_string(),
            "org.cirruslabs.tart.upload-time": "2026-12-07T03:10:37Z",
        },
    });
    curl_manifest(&host, repo, "v1", &manifest, &d);
    let before = reg.requests().len();
    let out = diskkit_ok(&[
        "pull",
        "--disk",
        &d.s("vm.raw"),
        "--nvram",
        &d.s("nvram.bin"),
        "--vm-config",
        &d.s("config.json"),
        &format!("{host}/{repo}:v1"),
    ]);
    assert!(out.contains("3 slices (1 all zero)"), "{out}");
    let expected = [s1.as_slice(), &s2, &s3].concat();
    assert_eq!(fs::read(d.path("vm.raw")).unwrap(), expected);
    assert_eq!(fs::read(d.path("nvram.bin")).unwrap(), nvram);
    assert_eq!(fs::read(d.path("config.json")).unwrap(), cfg);
    // The zero slice was never downloaded.
    let zero_blob = layers[2]["digest"].as_str().unwrap();
    assert!(
        !reg.requests()[before..]
            .iter()
            .any(|(m, p, _)| m == "GET" && p.ends_with(zero_blob)),
        "the all-zero slice was downloaded"
    );

    // Damaged artifacts: clear errors, no output left.
    let check_refused = |tag: &str, layer: serde_json::Value, want: &str| {
        let mut m = manifest.clone();
        m["layers"][3] = layer;
        curl_manifest(&host, repo, tag, &m, &d);
        let o = diskkit(&["pull", "--disk", &d.s("bad.raw"), &format!("{host}/{repo}:{tag}")]);
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.starts_with("diskkit: error: ") && err.lines().count() == 1,
            "{err}"
        );
        assert!(err.contains(want), "{err}");
        assert!(!d.path("bad.raw").exists());
        assert_eq!(
            fs::read_dir(d.0.path())
                .unwrap()
                .filter(|e| e
                    .as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".bad"))
                .count(),
            0
        );
    };
    // Not LZ4 at all.
    let junk = b"bv41\x10\x00\x00\x00\x04\x00\x00\x00\xff\xff\xff\xffbv4$".to_vec();
    let (jd, js) = curl_blob(&host, repo, &junk, &d);
    check_refused(
        "junk",
        serde_json::json!({"mediaType": "application/vnd.cirruslabs.tart.disk.v2", "digest": jd, "size": js,
            "annotations": {"org.cirruslabs.tart.uncompressed-size": s3.len().to_string(), "org.cirruslabs.tart.uncompressed-content-digest": digest(&s3)}}),
        "does not decompress",
    );
    // Decompresses, but not to the content its annotation names.
    let mut l = layers[3].clone();
    l["annotations"]["org.cirruslabs.tart.uncompressed-content-digest"] = digest(b"something else").into();
    check_refused("lying", l, "not the");
    // tart's old layer type.
    let mut l = layers[3].clone();
    l["mediaType"] = "application/vnd.cirruslabs.tart.disk.v1".into();
    check_refused("v1", l, "old disk layer type");
}

#[test]
fn a_cut_connection_mid_slice_resumes() {
    let reg = DockerRegistry::start(&Auth::None);
    let d = Dir::new();
    let disk = d.path("noise.raw");
    sparse_file(&disk, 64 * MIB);
    poke(&disk, 5 * MIB, &Rng(9).bytes(12 * MIB as usize));
    diskkit_ok(&["push", &d.s("noise.raw"), &format!("{}/vms/noise:1", reg.host())]);
    // The second connection (the first is the HTTPS attempt) is cut 5 MB into the slice.
    let proxy = FaultProxy::start(reg.port, &[Fault::None, Fault::CutAfter(5_000_000)]);
    let before = reg.requests().len();
    diskkit_ok(&[
        "pull",
        "--jobs",
        "1",
        "--disk",
        &d.s("back.raw"),
        &format!("127.0.0.1:{}/vms/noise:1", proxy.port),
    ]);
    compare(&d.s("noise.raw"), &d.s("back.raw"));
    let resumed = reg.requests()[before..]
        .iter()
        .filter(|(m, p, s)| m == "GET" && p.contains("/blobs/") && *s == 206)
        .count();
    assert_eq!(resumed, 1, "one ranged GET continues the cut slice");
}

#[test]
fn unpack_from_a_registry_matches_the_local_layout() {
    let reg = DockerRegistry::start(&Auth::None);
    let d = Dir::new();
    let b = LayoutBuilder::new(&d.path("lay"));
    let mut rng = Rng(1);
    let big = rng.bytes(2 * MIB as usize);
    let l1 = tar_layer(&[
        ("etc/hostname", b"test\n"),
        ("usr/bin/tool", b"#!/bin/sh\necho hi\n"),
    ]);
    let l2 = tar_layer(&[("usr/share/big", &big), ("etc/motd", b"hello\n")]);
    let m = b.manifest("amd64", &[l1, l2]);
    b.finish("v1", &[("amd64", m)]);
    let host = reg.host();
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", d.s("lay")),
        &format!("docker://{host}/test/root:v1"),
    ]);
    let unpack = |src: &str, out: &str| {
        let o = Command::new(support::diskkit_bin())
            .args(["unpack", "--reproducible", src, out])
            .env("XDG_CACHE_HOME", d.path("cache"))
            .env("SOURCE_DATE_EPOCH", "0")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "unpack {src}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    unpack(&format!("{host}/test/root:v1"), &d.s("from-registry.raw"));
    unpack(&format!("{}:v1", d.s("lay")), &d.s("from-layout.raw"));
    compare(&d.s("from-registry.raw"), &d.s("from-layout.raw"));
    tool_ok("e2fsck", &["-fn", &d.s("from-registry.raw")]);
    assert!(d.path("cache/diskkit/oci/index.json").is_file());
    // Again: the blobs are in the cache, only the manifest is asked for.
    let before = reg.requests().len();
    unpack(&format!("docker://{host}/test/root:v1"), &d.s("again.raw"));
    assert!(!reg.requests()[before..]
        .iter()
        .any(|(m, p, _)| m == "GET" && p.contains("/blobs/")));
    compare(&d.s("again.raw"), &d.s("from-layout.raw"));
}

#[test]
fn errors_are_one_line() {
    let reg = DockerRegistry::start(&Auth::None);
    let d = Dir::new();
    let b = LayoutBuilder::new(&d.path("lay"));
    let m = b.manifest("amd64", &[tar_layer(&[("a", b"a")])]);
    b.finish("v1", &[("amd64", m)]);
    let host = reg.host();
    let out = diskkit_ok(&["push", &d.s("lay"), &format!("{host}/test/c:v1")]);
    assert!(
        out.starts_with(&format!("pushed '{}' to {host}/test/c:v1 (sha256:", d.s("lay"))),
        "{out}"
    );
    let out = diskkit_ok(&["pull", "--layout", &d.s("out"), &format!("{host}/test/c:v1")]);
    assert!(out.contains("2 blobs, 2 fetched"), "{out}");
    let err = |args: &[&str], want: &str| {
        let o = diskkit(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.starts_with("diskkit: error: ") && e.lines().count() == 1, "{e}");
        assert!(e.contains(want), "{args:?}: {e}");
    };
    err(
        &["pull", "--disk", &d.s("x.raw"), &format!("{host}/test/c:v1")],
        "not a VM disk in tart's layout",
    );
    err(
        &["pull", "--layout", &d.s("o2"), &format!("{host}/test/none:v1")],
        "not found",
    );
    err(
        &["pull", "--layout", &d.s("o2"), "Bad Name"],
        "invalid image reference",
    );
    err(
        &["push", &d.s("missing.raw"), &format!("{host}/test/c:v2")],
        "missing.raw",
    );
    err(
        &[
            "pull",
            "--layout",
            &d.s("o3"),
            "--creds",
            "nocolon",
            &format!("{host}/test/c:v1"),
        ],
        "USER:PASSWORD",
    );
    assert!(!d.path("x.raw").exists());
}

/// `diskkit boot` takes a registry reference: the image is pulled into the shared layout and
/// unpacked into the store as the same entry as from the local layout (a dry run: the whole
/// path up to QEMU's command line, with this machine's kernel in the image).
#[test]
fn boot_from_a_registry_is_the_same_as_from_the_local_layout() {
    let reg = DockerRegistry::start(&Auth::None);
    let d = Dir::new();
    let kernel = fs::read_dir("/boot")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("vmlinuz-"))
        .expect("a kernel in /boot (.ci/run installs linux-image-cloud-amd64)");
    let kernel = fs::read(kernel).unwrap();
    let b = LayoutBuilder::new(&d.path("lay"));
    let layer = tar_layer(&[
        ("boot/vmlinuz-6.1.0-test", &kernel),
        ("boot/initrd.img-6.1.0-test", b"initrd"),
        ("sbin/init", b"#!/bin/sh\n"),
    ]);
    let m = b.manifest("amd64", &[layer]);
    b.finish("v1", &[("amd64", m)]);
    let host = reg.host();
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", d.s("lay")),
        &format!("docker://{host}/test/boot:v1"),
    ]);
    let dry_run = |src: &str, store: &str| -> serde_json::Value {
        let o = Command::new(support::diskkit_bin())
            .args([
                "boot",
                "--dry-run",
                "--output",
                "json",
                "--accel",
                "tcg",
                "--store",
                store,
                src,
            ])
            .env("XDG_CACHE_HOME", d.path("cache"))
            .env("XDG_RUNTIME_DIR", d.path("run"))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "boot {src}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    };
    fs::create_dir_all(d.path("run")).unwrap();
    let remote = dry_run(&format!("{host}/test/boot:v1"), &d.s("store-r"));
    let local = dry_run(&format!("{}:v1", d.s("lay")), &d.s("store-l"));
    assert!(d.path("cache/diskkit/oci/index.json").is_file());
    // The same store entry (named by the manifest digest) and the same kernel.
    let entries = |store: &str| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d.path(store).join("snapshots"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "ingest")
            .collect();
        v.sort();
        v
    };
    assert_eq!(entries("store-r"), entries("store-l"));
    assert_eq!(entries("store-r").len(), 1);
    let kernel_hash = |v: &serde_json::Value| -> String {
        let args = v["args"].as_array().unwrap();
        let i = args.iter().position(|a| a == "-kernel").unwrap();
        let p = Path::new(args[i + 1].as_str().unwrap());
        p.parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    assert_eq!(kernel_hash(&remote), kernel_hash(&local));
    // A second boot of the reference fetches no blob.
    let before = reg.requests().len();
    dry_run(&format!("docker://{host}/test/boot:v1"), &d.s("store-r"));
    assert!(!reg.requests()[before..]
        .iter()
        .any(|(m, p, _)| m == "GET" && p.contains("/blobs/")));
}
