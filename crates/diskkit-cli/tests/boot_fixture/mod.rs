//! The bootable fixture of the `diskkit boot` tests: Debian bookworm from `mmdebstrap` with
//! `linux-image-cloud-amd64`, `systemd-sysv`, `udev` and `openssh-server` (systemd-networkd
//! enabled for DHCP on the virtio NIC), as an OCI layout of two layers: the second adds
//! `/etc/diskkit-layer2` and deletes `/etc/motd` (a whiteout). Built once and kept in
//! `target/test-cache/boot-fixture/` (about 100 MB; mmdebstrap needs root and the Debian
//! mirror the first time).
#![allow(dead_code, unreachable_pub)]

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

/// Contents of the file the second layer adds.
pub const LAYER2_TEXT: &str = "added by layer two\n";

/// Run `cmd`, which must succeed; its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?} must be installed (.ci/run installs it): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-cache/boot-fixture")
}

/// The OCI layout (tag `v1`), built on first use.
pub fn layout() -> &'static Path {
    static LAYOUT: OnceLock<PathBuf> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        let done = cache_dir().join("layout");
        if done.join("index.json").is_file() {
            return done;
        }
        let parent = cache_dir();
        fs::create_dir_all(&parent).unwrap();
        let tmp = tempfile::tempdir_in(&parent).unwrap();
        let base = tmp.path().join("base.tar.zst");
        let network = r#"printf '[Match]\nName=en*\n\n[Network]\nDHCP=yes\n' > "$1/etc/systemd/network/20-wired.network""#;
        run(Command::new("mmdebstrap")
            .args(["--quiet", "--mode=root", "--variant=minbase"])
            .arg("--include=linux-image-cloud-amd64,systemd-sysv,udev,openssh-server")
            .args([
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
            ])
            .arg(format!("--customize-hook={network}"))
            .arg("--customize-hook=chroot \"$1\" systemctl enable systemd-networkd.service")
            .arg("bookworm")
            .arg(&base));
        let l2 = tmp.path().join("l2");
        fs::create_dir_all(l2.join("etc")).unwrap();
        fs::write(l2.join("etc/diskkit-layer2"), LAYER2_TEXT).unwrap();
        fs::write(l2.join("etc/.wh.motd"), b"").unwrap();
        let l2tar = tmp.path().join("l2.tar");
        run(Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
            .arg(&l2)
            .arg("-cf")
            .arg(&l2tar)
            .arg("etc"));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../diskkit-oci/tests/fixtures/mkoci-layout.sh");
        let lay = tmp.path().join("layout");
        run(Command::new("bash").arg(script).arg(&lay).arg("v1").arg(&base).arg(&l2tar));
        fs::rename(&lay, &done).unwrap();
        done
    })
}

/// SHA-256 of a file (hex), read in full: sparse files are small in these tests (2 GiB).
pub fn sha256(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    format!("{:x}", h.finalize())
}

/// SHA-256 of every file under `dir` (relative path → digest).
pub fn tree_digests(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.push((rel, sha256(&p)));
            }
        }
    }
    out.sort();
    out
}

/// Make an Apple `container` store at `root` holding the fixture as
/// `docker.io/library/diskkit-boot:latest` (amd64): its blobs under `content/`, an index
/// with the platform, `state.json`, and the snapshot `diskkit unpack --store` writes.
pub fn apple_store(root: &Path, diskkit: &str) {
    let lay = layout();
    let blobs = root.join("content/blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    fs::create_dir_all(root.join("content/ingest")).unwrap();
    for e in fs::read_dir(lay.join("blobs/sha256")).unwrap().flatten() {
        fs::copy(e.path(), blobs.join(e.file_name())).unwrap();
    }
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(lay.join("index.json")).unwrap()).unwrap();
    let mut manifest = index["manifests"][0].clone();
    manifest["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
    manifest.as_object_mut().unwrap().remove("annotations");
    let apple_index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest],
    }))
    .unwrap();
    let digest = format!("{:x}", Sha256::digest(&apple_index));
    fs::write(blobs.join(&digest), &apple_index).unwrap();
    let state = serde_json::json!({
        "docker.io/library/diskkit-boot:latest": {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": format!("sha256:{digest}"),
            "size": apple_index.len(),
        }
    });
    fs::write(root.join("state.json"), serde_json::to_vec(&state).unwrap()).unwrap();
    run(Command::new(diskkit)
        .args(["unpack", "--size", "2G", "--store"])
        .arg(root)
        .arg(lay));
}
