//! `diskkit boot` from a remote base (issue 15): the boot fixture's Debian root as qcow2 on a
//! test nginx, a cache layer over its URL and an overlay on that, booted once with real QEMU
//! (TCG) and systemd. One boot, which checks several things: the guest's write lands in the
//! overlay, the object on the server is unchanged, the cache layer filled, and the stack read
//! again afterwards is what QEMU reads from the same overlay over the local file.

mod boot_fixture;
#[path = "../../diskkit-deliver/tests/support/mod.rs"]
mod net;
mod support;

use std::fs;
use std::process::{Command, Stdio};

use boot_fixture::{layout, run, sha256, LAYER2_TEXT};
use support::{cached, diskkit, diskkit_bin, diskkit_ok, Dir};

const MIB: u64 = 1 << 20;

#[test]
fn a_guest_boots_from_a_remote_base_through_a_cache_layer() {
    let www = Dir::new();
    let d = Dir::new();
    // The root: the fixture unpacked into a 2 GiB RAW disk, served as qcow2.
    let raw = d.path("root.raw");
    run(Command::new(diskkit_bin())
        .args(["unpack", "--size", "2G"])
        .arg(layout())
        .arg(&raw));
    let object = www.path("debian.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&object));
    fs::remove_file(&raw).unwrap();
    let object_sha = sha256(&object);
    let nginx = net::Nginx::start(www.0.path());
    let host = format!("127.0.0.1:{}", nginx.port);
    let url = nginx.url("debian.qcow2");
    let cache = d.s("cache.asif");
    let vm = d.s("vm.qcow2");
    diskkit_ok(&[
        "layer",
        "create",
        "-q",
        "--type",
        "cache",
        "--allow-remote",
        &host,
        "--parent",
        &url,
        &cache,
    ]);
    // The overlay as `layer create` makes it (naming its parent relatively), given to boot
    // as --persist from another directory.
    diskkit_ok(&[
        "layer",
        "create",
        "-q",
        "--allow-remote",
        &host,
        "--parent",
        &cache,
        &vm,
    ]);
    assert_eq!(cached(&cache).0, 0);

    let runtime = Dir::new();
    let elsewhere = Dir::new();
    let out = Command::new(diskkit_bin())
        .args([
            "boot",
            "-v",
            "--accel",
            "tcg",
            "--memory",
            "1G",
            "--timeout",
            "15m",
        ])
        .args(["--allow-remote", &host, "--persist", &vm, &cache, "--"])
        .args([
            "sh",
            "-c",
            "echo written-in-the-guest > /root/remote-boot && sync && findmnt -no SOURCE / \
             && cat /etc/diskkit-layer2",
        ])
        .current_dir(elsewhere.0.path())
        .env("XDG_RUNTIME_DIR", runtime.path(""))
        .stdin(Stdio::null())
        .output()
        .expect("run diskkit boot");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("diskkit boot: {}\n--- stderr:\n{stderr}", out.status);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("/dev/vda\n{LAYER2_TEXT}")
    );
    assert!(stderr.contains("via diskkit's NBD server"), "{stderr}");
    // No runtime directory left behind.
    let left: Vec<_> = fs::read_dir(runtime.path("diskkit"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("boot-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");

    // The guest's file is in the overlay; the object on the server did not change; the
    // cache layer kept what the boot read (kernel, initramfs, systemd...).
    assert_eq!(
        diskkit_ok(&["cat", "--allow-remote", &host, &format!("{vm}:/root/remote-boot")]),
        "written-in-the-guest\n"
    );
    assert_eq!(sha256(&object), object_sha, "the remote object changed");
    let filled = cached(&cache).0;
    let sent: u64 = nginx.requests_for("debian.qcow2").iter().map(|r| r.1).sum();
    eprintln!("the boot filled {filled} bytes of the cache; nginx sent {sent} bytes");
    assert!(filled >= 32 * MIB, "the boot left {filled} bytes in the cache");
    assert!(sent >= filled / 2, "nginx sent {sent} bytes");

    // A second open of the stack reads what QEMU reads from the same overlay over the local
    // copy of the object.
    let reference = d.s("reference.raw");
    let opts = format!(
        "driver=qcow2,file.filename={vm},backing.driver=qcow2,backing.file.filename={}",
        object.display()
    );
    run(Command::new("qemu-img").args(["convert", "--image-opts", &opts, "-O", "raw", &reference]));
    let out = diskkit(&["compare", "--allow-remote", &host, &vm, &reference]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Images are identical.",
        "{out:?}"
    );
    assert!(
        cached(&cache).0 > filled,
        "the full read filled the cache further"
    );

    // --max-cache-size reaches boot's open of the root: even a --dry-run open trims the
    // cache under the bound.
    diskkit_ok(&[
        "boot",
        "--dry-run",
        "--allow-remote",
        &host,
        "--max-cache-size",
        "64M",
        "--persist",
        &vm,
        &cache,
    ]);
    let trimmed = cached(&cache).0;
    assert!(trimmed <= 64 * MIB, "{trimmed} bytes cached under a 64M bound");
}
