//! Shared helpers for the writer tests: in-memory content, image creation, e2fsck and debugfs.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod oracle;

use std::path::Path;
use std::process::Command;

use diskkit::{CreateOptions, DiskImage, ImageFormat};
use diskkit_ext4::writer::{ContentSource, Options, Plan, Tree};

/// File contents held in memory; the token is the index.
#[derive(Default)]
pub struct Contents(pub Vec<Vec<u8>>);

impl Contents {
    pub fn add(&mut self, data: Vec<u8>) -> u64 {
        self.0.push(data);
        self.0.len() as u64 - 1
    }
}

impl ContentSource for Contents {
    fn read_content(&mut self, content: u64, offset: u64, buf: &mut [u8]) -> diskkit::Result<()> {
        let d = &self.0[content as usize];
        let o = offset as usize;
        buf.copy_from_slice(&d[o..o + buf.len()]);
        Ok(())
    }
}

/// Write `tree` into a new image at `path` of `format`.
pub fn build(tree: &Tree, contents: &mut Contents, path: &Path, format: ImageFormat, options: Options) {
    let plan = Plan::new(tree, options).expect("plan");
    let size = plan.size_bytes();
    let create = match format {
        ImageFormat::Asif => CreateOptions::asif(size / 4096, 4096),
        f => CreateOptions::new(f, size),
    };
    let pending = DiskImage::create_pending(path, &create).expect("create");
    plan.write(pending.image(), contents).expect("write");
    pending.persist().expect("persist");
}

/// Run `e2fsck -fn` on a raw filesystem image and assert exit 0.
pub fn e2fsck(path: &Path) {
    let out = Command::new("e2fsck")
        .args(["-fn"])
        .arg(path)
        .output()
        .expect("e2fsck must be installed");
    assert!(
        out.status.success(),
        "e2fsck -fn failed ({:?}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run one debugfs request and return stdout.
pub fn debugfs(path: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(path)
        .output()
        .expect("debugfs must be installed");
    assert!(
        out.status.success(),
        "debugfs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `debugfs dump` a file to bytes.
pub fn dump(path: &Path, file: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    debugfs(path, &format!("dump {file} {}", out.display()));
    std::fs::read(&out).unwrap_or_default()
}

/// The reader reads back everything debugfs reads from `path` (a raw image), field for field.
pub fn read_back(path: &Path) {
    let theirs = oracle::debugfs_tree(path);
    let ours = oracle::reader_tree(path).unwrap_or_else(|e| panic!("reader: {e}"));
    let c = oracle::compare(&ours, &theirs);
    assert!(
        c.is_exact() && c.matched > 0,
        "{}: {}",
        path.display(),
        c.summary()
    );
}
