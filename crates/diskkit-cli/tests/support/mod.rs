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
