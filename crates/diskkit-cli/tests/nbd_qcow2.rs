//! `diskkit serve` of a qcow2 image made by QEMU (normal, zero and zlib-compressed clusters),
//! checked against qemu-nbd serving the same file, then written over NBD and checked with
//! `qemu-img check` and `qemu-img compare` against a RAW reference given the same writes.

mod nbd_support;
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbd_support::*;
use support::{poke, sparse_file, tool_ok, Dir, Rng};

/// `qemu-nbd` serving a file read-only on a Unix socket; killed when dropped.
struct QemuNbd(Child);

impl QemuNbd {
    fn start(sock: &Path, image: &Path) -> QemuNbd {
        let child = Command::new("qemu-nbd")
            .args(["-r", "-t", "-f", "qcow2", "-x", "disk", "-k"])
            .arg(sock)
            .arg(image)
            .env("PATH", debian_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot run qemu-nbd (is it installed? .ci/run installs it)");
        let mut q = QemuNbd(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            if let Some(st) = q.0.try_wait().expect("poll qemu-nbd") {
                panic!("qemu-nbd exited early: {st}");
            }
            assert!(Instant::now() < deadline, "qemu-nbd did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        q
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const M: u64 = 1 << 20;

/// The writes sent over NBD, and applied to the RAW reference with the same qemu-io commands.
const WRITES: [&str; 7] = [
    // Inside a zlib-compressed cluster (16M+192k is the 4th cluster of the compressed run).
    "write -P 0xa1 16982016 4k",
    // Zeroes over a whole compressed cluster (its second half is rewritten by the last write).
    "write -z 17760256 64k",
    // Inside an allocated zero cluster ('write -z' over data keeps the allocation).
    "write -P 0xa2 8454144 8k",
    // Inside a plain zero cluster.
    "write -P 0xa3 33558528 4k",
    // Unallocated space, and a normal data cluster.
    "write -P 0xa4 40M 64k",
    "write -P 0xa5 100k 4k",
    // Across the end of the compressed run into unallocated space.
    "write -P 0xa6 17793024 64k",
];

/// The expected `nbdinfo --map` of the image (qemu-nbd 7.2 reports the same).
const MAP: &str = "         0     1048576    0  data
   1048576     7602176    3  hole,zero
   8650752      786432    0  data
   9437184     7471104    3  hole,zero
  16908288      917504    0  data
  17825792    49283072    3  hole,zero
";

fn qemu_io(fmt: &str, target: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(target);
    let out = client_ok("qemu-io", &args);
    assert!(!out.contains("failed"), "qemu-io {args:?}:\n{out}");
    out
}

#[test]
fn qemu_made_qcow2_with_zero_and_compressed_clusters() {
    let d = Dir::new();
    let src = d.path("src.raw");
    sparse_file(&src, 64 * M);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    poke(&src, 0, &rng.bytes(M as usize));
    poke(&src, 8 * M, &rng.bytes(M as usize));
    // Compressible but not uniform: a random 64-byte line repeated over each 4 KiB.
    let text: Vec<u8> = (0..256).flat_map(|_| rng.bytes(64).repeat(64)).collect();
    poke(&src, 16 * M, &text);

    let img = d.s("vm.qcow2");
    tool_ok(
        "qemu-img",
        &["convert", "-c", "-f", "raw", "-O", "qcow2", &d.s("src.raw"), &img],
    );
    qemu_io(
        "qcow2",
        &img,
        &["write -z 8M 256k", "write -z 16M 128k", "write -z 32M 1M"],
    );
    let check = tool_ok("qemu-img", &["check", &img]);
    assert!(check.contains("No errors were found"), "{check}");
    assert!(
        check.contains("30.43% compressed clusters"),
        "the image should hold 14 compressed clusters of 46:\n{check}"
    );
    let json = tool_ok("qemu-img", &["map", "--output=json", &img]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let zero_alloc =
        v.as_array().unwrap().iter().any(|e| {
            e["start"] == 8 * M && e["zero"] == true && e["present"] == true && e["offset"].is_u64()
        });
    assert!(zero_alloc, "no allocated zero cluster at 8M:\n{json}");

    let reference = d.path("ref.raw");
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            &img,
            reference.to_str().unwrap(),
        ],
    );

    let s = Served::start(&d.path("dk.sock"), &["-f", "qcow2", "--export", "disk", &img]);
    let u = s.uri("disk");
    {
        // qemu-nbd serves a byte-for-byte copy: diskkit holds the image's write lock.
        let copy = d.path("copy.qcow2");
        std::fs::copy(&img, &copy).unwrap();
        let q = QemuNbd::start(&d.path("q.sock"), &copy);
        let qu = format!("nbd+unix:///disk?socket={}", d.s("q.sock"));
        let theirs = client_ok("nbdinfo", &["--map", &qu]);
        let ours = client_ok("nbdinfo", &["--map", &u]);
        assert_eq!(theirs, MAP, "qemu-nbd's map changed");
        assert_eq!(ours, MAP);
        let out = client_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", &u, &qu]);
        assert!(out.contains("Images are identical"), "{out}");
        drop(q);
    }
    let out = client_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &u,
            reference.to_str().unwrap(),
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");

    // Writes over NBD, then the same writes on the RAW reference.
    qemu_io("raw", &u, &WRITES);
    let reads = [
        "read -P 0xa1 16982016 4k",
        "read -P 0 17760256 32k",
        "read -P 0xa2 8454144 8k",
        "read -P 0 8388608 64k",
        "read -P 0xa3 33558528 4k",
        "read -P 0 33554432 4k",
        "read -P 0xa4 40M 64k",
        "read -P 0xa5 100k 4k",
        "read -P 0xa6 17793024 64k",
    ];
    qemu_io("raw", &u, &reads);
    qemu_io("raw", reference.to_str().unwrap(), &WRITES);
    let out = client_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &u,
            reference.to_str().unwrap(),
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
    assert!(s.stop().success());

    let check = tool_ok("qemu-img", &["check", &img]);
    assert!(check.contains("No errors were found"), "{check}");
    let out = tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            &img,
            reference.to_str().unwrap(),
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
    // QEMU reads the written clusters back from the file itself.
    qemu_io("qcow2", &img, &reads);
}
