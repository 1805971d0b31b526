//! Helpers shared by the CLI's integration tests.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of the diskkit binary under test.
pub fn diskkit_bin() -> &'static str {
    env!("CARGO_BIN_EXE_diskkit")
}

/// Run diskkit with `args`; returns the output (never panics on failure exit codes).
pub fn diskkit(args: &[&str]) -> Output {
    Command::new(diskkit_bin())
        .args(args)
        .output()
        .expect("run diskkit")
}

/// Run diskkit and require success.
pub fn diskkit_ok(args: &[&str]) -> String {
    let out = diskkit(args);
    assert!(
        out.status.success(),
        "diskkit {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run an external tool and require success; the tool must be installed (CI installs them).
pub fn tool_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed? .ci/run installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A deterministic pseudo-random byte stream.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// A temporary directory and paths in it.
pub struct Dir(pub tempfile::TempDir);

impl Dir {
    pub fn new() -> Dir {
        Dir(tempfile::tempdir().expect("tempdir"))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    pub fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}

/// Write `data` at `offset` of a plain file (a reference RAW disk).
pub fn poke(path: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open reference");
    f.write_all_at(data, offset).expect("write reference");
}

/// Zero `len` bytes at `offset` of a plain file.
pub fn zero(path: &Path, offset: u64, len: u64) {
    poke(path, offset, &vec![0u8; len as usize]);
}

/// Make a sparse reference file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    std::fs::File::create(path)
        .expect("create")
        .set_len(size)
        .expect("set_len");
}

/// Read an ASIF image with dissect.hypervisor (an independent reader): its virtual disk goes to
/// `out`, its metadata is returned.
pub fn dissect_dump(img: &str, out: &Path) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/asif_dump.py");
    let json = tool_ok("python3", &[script.to_str().unwrap(), img, out.to_str().unwrap()]);
    serde_json::from_str(&json).unwrap()
}

/// The format `qemu-img info` sees in a file (`raw` for anything it does not know, ASIF too).
pub fn qemu_format(path: &str) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&tool_ok("qemu-img", &["info", "--output=json", path])).unwrap();
    info["format"].as_str().unwrap().to_owned()
}

/// Whether dissect.hypervisor opens a file as ASIF (its header and directories parse).
pub fn is_asif(path: &str) -> bool {
    let program = "import sys\nfrom dissect.hypervisor.disk.asif import ASIF\n\
                   ASIF(open(sys.argv[1], 'rb'))";
    Command::new("python3")
        .args(["-c", program, path])
        .output()
        .expect("python3 with dissect.hypervisor (.ci/run installs it)")
        .status
        .success()
}

/// Bytes of data the cache layer at `path` holds (its own map, without the remote base), and
/// the ranges they are in.
pub fn cached(path: &str) -> (u64, Vec<(u64, u64)>) {
    let json = diskkit_ok(&["map", "--detached", "--output", "json", path]);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let ranges: Vec<(u64, u64)> = entries
        .iter()
        .filter(|e| e["data"].as_bool().unwrap())
        .map(|e| {
            let start = e["start"].as_u64().unwrap();
            (start, start + e["length"].as_u64().unwrap())
        })
        .collect();
    (ranges.iter().map(|(s, e)| e - s).sum(), ranges)
}
