//! A real guest: QEMU (TCG) boots Debian's cloud kernel with a busybox initramfs built here,
//! with a virtio disk served by `diskkit serve` from an ASIF image. The guest reads what the
//! host put on the disk, writes a pattern with fsync, and powers off; the test then finds the
//! pattern in the image.

mod nbd_support;
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nbd_support::*;
use support::{diskkit_ok, Dir, Rng};

/// The newest /boot/vmlinuz-* with its module directory (linux-image-cloud-amd64).
fn kernel() -> (PathBuf, PathBuf) {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .expect("/boot")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("vmlinuz-"))
        .collect();
    found.sort();
    let k = found
        .pop()
        .expect("no /boot/vmlinuz-*: install linux-image-cloud-amd64 (.ci/run does)");
    let ver = k.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_owned();
    (k, Path::new("/lib/modules").join(ver))
}

const MODULES: [&str; 6] = [
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
];

const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /sys /dev
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  $B insmod /m/$m.ko 2>/dev/null
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do $B sleep 0.1; i=$((i+1)); done
echo "HOST-SUM $($B dd if=/dev/vda bs=65536 count=16 2>/dev/null | $B md5sum)"
$B dd if=/m/pattern of=/dev/vda bs=65536 seek=32 conv=fsync 2>/dev/null
echo "GUEST-WROTE $?"
$B sync
$B poweroff -f
"#;

fn initramfs(d: &Dir, pattern: &[u8]) -> PathBuf {
    let (_, modules) = kernel();
    let root = d.path("initrd");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("m")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static must be installed");
    for m in MODULES {
        let src = modules.join("kernel").join(m);
        let name = Path::new(m).file_name().unwrap();
        std::fs::copy(&src, root.join("m").join(name)).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    }
    std::fs::write(root.join("m/pattern"), pattern).unwrap();
    std::fs::write(root.join("init"), INIT).unwrap();
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = d.path("initrd.cpio");
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            root.display(),
            out.display()
        ))
        .status()
        .expect("cpio must be installed");
    assert!(st.success());
    out
}

#[test]
fn qemu_guest_writes_through_diskkit_serve() {
    let d = Dir::new();
    let img = d.s("guest.asif");
    diskkit_ok(&["create", "--format", "asif", "--size", "64M", &img]);
    let host_data = Rng(77).bytes(1 << 20);
    std::fs::write(d.path("host.bin"), &host_data).unwrap();
    diskkit_ok(&["write", &img, "--from", &d.s("host.bin")]);
    let pattern = Rng(78).bytes(256 << 10);
    let initrd = initramfs(&d, &pattern);
    let log = d.path("server.log");
    let s = Served::start_logged(&d.path("g.sock"), &["--export", "disk", &img], &log);
    let (kernel, _) = kernel();
    let drive = format!("file={},format=raw,if=virtio,cache=writeback", s.uri("disk"));
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "256",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet", "-drive", &drive])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(d.path("console.txt")).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-x86_64 must be installed");
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(st) = qemu.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            panic!(
                "guest did not finish: {}",
                std::fs::read_to_string(d.path("console.txt")).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = std::fs::read_to_string(d.path("console.txt")).unwrap();
    assert!(status.success(), "qemu: {status}\n{console}");
    // The guest saw what the host wrote (md5 of the first MiB).
    let want = Command::new("md5sum").arg(d.path("host.bin")).output().unwrap();
    let want = String::from_utf8_lossy(&want.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert!(console.contains(&format!("HOST-SUM {want}")), "{console}");
    assert!(console.contains("GUEST-WROTE 0"), "{console}");
    let server_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        server_log.contains(": WRITE offset=2097152 "),
        "guest writes reached the server"
    );
    assert!(
        server_log.contains(": FLUSH "),
        "the guest's fsync became an NBD FLUSH"
    );
    assert!(s.stop().success());
    let back = d.path("back.bin");
    diskkit_ok(&[
        "read",
        &img,
        "--offset",
        "2M",
        "--length",
        "256K",
        "--to",
        back.to_str().unwrap(),
    ]);
    assert!(
        std::fs::read(&back).unwrap() == pattern,
        "the guest's pattern is in the image"
    );
}
