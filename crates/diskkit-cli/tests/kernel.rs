//! `diskkit kernel`: one test per kernel layout, UKI splitting, and a real Debian kernel
//! extracted from an ext4 image and booted under QEMU (TCG) to a busybox marker.

mod support;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use diskkit_ext4::read::pe::build_test_pe;
use serde_json::Value;
use support::{diskkit, diskkit_ok, tool_ok, Dir};

/// A fixture: files to put in the tree, then `mkfs.ext4 -d` into `fs.img`.
struct Fixture {
    dir: Dir,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = Dir::new();
        fs::create_dir(dir.path("tree")).unwrap();
        Fixture { dir }
    }

    fn file(&self, path: &str, data: &[u8]) -> &Self {
        let p = self.dir.path("tree").join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
        self
    }

    fn link(&self, path: &str, target: &str) -> &Self {
        let p = self.dir.path("tree").join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        symlink(target, p).unwrap();
        self
    }

    fn mkdir(&self, path: &str) -> &Self {
        fs::create_dir_all(self.dir.path("tree").join(path.trim_start_matches('/'))).unwrap();
        self
    }

    /// Build the image (RAW, `mib` MiB) and return its path.
    fn build(&self, mib: u64) -> String {
        let img = self.dir.path("fs.img");
        fs::File::create(&img).unwrap().set_len(mib << 20).unwrap();
        tool_ok(
            "mkfs.ext4",
            &["-q", "-F", "-d", &self.dir.s("tree"), &img.to_string_lossy()],
        );
        img.to_string_lossy().into_owned()
    }

    fn out(&self) -> PathBuf {
        self.dir.path("out")
    }
}

fn kernel_json(args: &[&str]) -> Value {
    let mut a = vec!["kernel", "--output", "json"];
    a.extend_from_slice(args);
    serde_json::from_str(&diskkit_ok(&a)).unwrap()
}

fn kernel_err(args: &[&str]) -> String {
    let mut a = vec!["kernel"];
    a.extend_from_slice(args);
    let out = diskkit(&a);
    assert!(!out.status.success(), "kernel {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The ext filesystem UUID of an image file (blkid).
fn fs_uuid(img: &str) -> String {
    tool_ok("blkid", &["-p", "-o", "value", "-s", "UUID", img])
        .trim()
        .to_owned()
}

/// `cmdline` is what `diskkit boot` would give the kernel: the image's own line without its
/// root and ro/rw, then the root diskkit found and `rw` (the fake kernels here have no
/// recognisable architecture, so no console).
fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn uki(version: &str, linux: &[u8], initrd: &[u8], cmdline: &str) -> Vec<u8> {
    build_test_pe(&[
        (".osrel", b"ID=test\n"),
        (".cmdline", cmdline.as_bytes()),
        (".uname", version.as_bytes()),
        (".initrd", initrd),
        (".linux", linux),
    ])
}

#[test]
fn uki_in_boot_efi_linux_recursive_and_case_insensitive_split() {
    let f = Fixture::new();
    let linux = b"MZ-fake-linux-kernel".repeat(300);
    let initrd = b"070701-fake-initrd".repeat(500);
    let image = uki(
        "6.9.0-100.fc41.x86_64",
        &linux,
        &initrd,
        "root=LABEL=root ro quiet",
    );
    f.file("/boot/EFI/Linux/bootc/fedora-6.9.0-100.fc41.x86_64.EFI", &image)
        .mkdir("/boot/EFI/Linux/decoy.efi")
        .file("/etc/kernel/cmdline", b"ignored-for-split\n");
    let img = f.build(16);
    let out = f.out();
    let v = kernel_json(&["--split-uki", "--out", &out.to_string_lossy(), &img]);
    assert_eq!(v["chosen"]["kind"], "uki");
    assert_eq!(v["chosen"]["version"], "6.9.0-100.fc41.x86_64");
    assert_eq!(
        v["chosen"]["kernel"],
        "/boot/EFI/Linux/bootc/fedora-6.9.0-100.fc41.x86_64.EFI"
    );
    assert_eq!(read(&out.join("uki.efi")), image);
    assert_eq!(read(&out.join("vmlinuz")), linux);
    assert_eq!(read(&out.join("initramfs")), initrd);
    assert_eq!(
        String::from_utf8(read(&out.join("cmdline"))).unwrap(),
        format!("quiet root=UUID={} rw\n", fs_uuid(&img))
    );
    // Without splitting: the UKI and the image's cmdline file only.
    let out2 = f.dir.path("out2");
    kernel_json(&["--out", &out2.to_string_lossy(), &img]);
    let mut names: Vec<_> = fs::read_dir(&out2)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["cmdline", "uki.efi"]);
    // The UKI's PE header says x86-64: the serial console is ttyS0.
    assert_eq!(
        String::from_utf8(read(&out2.join("cmdline"))).unwrap(),
        format!("ignored-for-split root=UUID={} rw console=ttyS0\n", fs_uuid(&img))
    );
    // Re-running refuses to overwrite, --force replaces.
    assert!(kernel_err(&["--out", &out2.to_string_lossy(), &img]).contains("exists"));
    kernel_json(&["--force", "--out", &out2.to_string_lossy(), &img]);
}

#[test]
fn uki_in_modules_dir_wins_over_pair() {
    let f = Fixture::new();
    let linux = b"uki-linux".repeat(100);
    let image = uki("6.8.0", &linux, b"uki-initrd", "console=ttyS0");
    f.file("/usr/lib/modules/6.8.0/vmlinuz-virt.efi", &image)
        .file("/usr/lib/modules/6.8.0/vmlinuz", b"pair-kernel")
        .file("/usr/lib/modules/6.8.0/initramfs.img", b"pair-initramfs")
        .file(
            "/usr/lib/modules/6.8.0/vmlinuz-virt.efi.extra.d/x.addon.efi",
            b"not a UKI",
        );
    let img = f.build(16);
    let out = f.out();
    let v = kernel_json(&["--split-uki", "--out", &out.to_string_lossy(), &img]);
    assert_eq!(v["chosen"]["kind"], "uki");
    assert_eq!(v["chosen"]["kernel"], "/usr/lib/modules/6.8.0/vmlinuz-virt.efi");
    assert!(
        v["note"].as_str().unwrap().contains("UKIs take precedence"),
        "{v}"
    );
    assert_eq!(read(&out.join("vmlinuz")), linux);
    assert_eq!(read(&out.join("initramfs")), b"uki-initrd");
    assert_eq!(v["candidates"].as_array().unwrap().len(), 2);
}

#[test]
fn modules_dir_pair() {
    let f = Fixture::new();
    f.file("/usr/lib/modules/6.5.0-1.x86_64/vmlinuz", b"modules-kernel")
        .file(
            "/usr/lib/modules/6.5.0-1.x86_64/initramfs.img",
            b"modules-initramfs",
        )
        .file("/usr/lib/modules/6.5.0-1.x86_64/modules.dep", b"")
        .file("/usr/lib/kernel/cmdline", b"# comment\nrw  console=hvc0\n");
    let img = f.build(16);
    let out = f.out();
    let v = kernel_json(&["--out", &out.to_string_lossy(), &img]);
    assert_eq!(v["chosen"]["layout"], "modules");
    assert_eq!(v["chosen"]["version"], "6.5.0-1.x86_64");
    assert!(v["note"].is_null());
    assert_eq!(read(&out.join("vmlinuz")), b"modules-kernel");
    assert_eq!(read(&out.join("initramfs")), b"modules-initramfs");
    assert_eq!(
        String::from_utf8(read(&out.join("cmdline"))).unwrap(),
        format!("console=hvc0 root=UUID={} rw\n", fs_uuid(&img))
    );
}

#[test]
fn debian_boot_layout() {
    let f = Fixture::new();
    f.file("/boot/vmlinuz-6.1.0-9-amd64", b"debian-kernel")
        .file("/boot/initrd.img-6.1.0-9-amd64", b"debian-initrd")
        .file("/boot/config-6.1.0-9-amd64", b"CONFIG_X=y");
    let img = f.build(16);
    let out = f.out();
    let v = kernel_json(&["--out", &out.to_string_lossy(), &img]);
    assert_eq!(v["chosen"]["kernel"], "/boot/vmlinuz-6.1.0-9-amd64");
    assert_eq!(v["chosen"]["initramfs"], "/boot/initrd.img-6.1.0-9-amd64");
    assert_eq!(read(&out.join("vmlinuz")), b"debian-kernel");
    assert_eq!(read(&out.join("initramfs")), b"debian-initrd");
    // The image has no command line of its own: diskkit's part only.
    assert_eq!(
        String::from_utf8(read(&out.join("cmdline"))).unwrap(),
        format!("root=UUID={} rw\n", fs_uuid(&img))
    );
}

#[test]
fn fedora_boot_layout_ignores_rescue_kernel() {
    let f = Fixture::new();
    let v = "6.7.1-200.fc39.x86_64";
    f.file(&format!("/boot/vmlinuz-{v}"), b"fedora-kernel")
        .file(&format!("/boot/initramfs-{v}.img"), b"fedora-initramfs")
        .file("/boot/vmlinuz-0-rescue-0123456789abcdef", b"rescue-kernel")
        .file(
            "/boot/initramfs-0-rescue-0123456789abcdef.img",
            b"rescue-initramfs",
        )
        .file("/etc/kernel/cmdline", b"root=UUID=1234 ro\n");
    let img = f.build(16);
    let out = f.out();
    let j = kernel_json(&["--out", &out.to_string_lossy(), &img]);
    assert_eq!(j["chosen"]["version"], v);
    assert_eq!(j["chosen"]["initramfs"], format!("/boot/initramfs-{v}.img"));
    assert_eq!(read(&out.join("vmlinuz")), b"fedora-kernel");
    assert_eq!(read(&out.join("initramfs")), b"fedora-initramfs");
    assert_eq!(
        String::from_utf8(read(&out.join("cmdline"))).unwrap(),
        format!("root=UUID={} rw\n", fs_uuid(&img))
    );
}

#[test]
fn symlinked_vmlinuz_is_followed_inside_the_image_only() {
    let f = Fixture::new();
    f.file("/usr/lib/kernels/6.2.0/vmlinuz", b"linked-kernel")
        .file("/usr/lib/kernels/6.2.0/initrd", b"linked-initrd")
        .link("/boot/vmlinuz-6.2.0", "/usr/lib/kernels/6.2.0/vmlinuz")
        .link("/boot/initrd.img-6.2.0", "../usr/lib/kernels/6.2.0/initrd")
        .link("/boot/vmlinuz", "vmlinuz-6.2.0")
        .link("/boot/initrd.img", "initrd.img-6.2.0")
        // Climbs out with `..`: inside the image this is /boot/vmlinuz-6.1.0-56-cloud-amd64,
        // which exists on the host but not in the image.
        .link(
            "/boot/vmlinuz-9.9.9",
            "../../../../../../../boot/vmlinuz-6.1.0-56-cloud-amd64",
        )
        .link("/boot/vmlinuz-9.9.8", "/boot/vmlinuz-9.9.8");
    let img = f.build(16);
    let out = f.out();
    let j = kernel_json(&["--out", &out.to_string_lossy(), &img]);
    assert_eq!(j["chosen"]["kernel"], "/boot/vmlinuz-6.2.0");
    assert_eq!(read(&out.join("vmlinuz")), b"linked-kernel");
    assert_eq!(read(&out.join("initramfs")), b"linked-initrd");
    let warnings = j["warnings"].to_string();
    assert!(
        warnings.contains("/boot/vmlinuz-9.9.9: dangling symlink"),
        "{warnings}"
    );
    assert!(
        warnings.contains("/boot/vmlinuz-9.9.8: symlink loop"),
        "{warnings}"
    );
    // The unversioned link points at a kernel already listed: not a second candidate.
    assert_eq!(j["candidates"].as_array().unwrap().len(), 1, "{j}");
}

#[test]
fn several_versions_pick_the_highest_and_say_so() {
    let f = Fixture::new();
    for v in ["5.10.0-30-amd64", "6.10.0-1-amd64", "6.9.12-1-amd64"] {
        f.file(&format!("/boot/vmlinuz-{v}"), format!("kernel-{v}").as_bytes())
            .file(&format!("/boot/initrd.img-{v}"), format!("initrd-{v}").as_bytes());
    }
    let img = f.build(16);
    let out = f.out();
    let j = kernel_json(&["--out", &out.to_string_lossy(), &img]);
    assert_eq!(j["chosen"]["version"], "6.10.0-1-amd64");
    let note = j["note"].as_str().unwrap();
    assert!(
        note.contains("3 kernel versions") && note.contains("--kernel-version"),
        "{note}"
    );
    assert_eq!(read(&out.join("vmlinuz")), b"kernel-6.10.0-1-amd64");
    assert_eq!(read(&out.join("initramfs")), b"initrd-6.10.0-1-amd64");
    let j = kernel_json(&[
        "--kernel-version",
        "5.10.0-30-amd64",
        "--force",
        "--out",
        &out.to_string_lossy(),
        &img,
    ]);
    assert_eq!(j["chosen"]["version"], "5.10.0-30-amd64");
    assert_eq!(read(&out.join("vmlinuz")), b"kernel-5.10.0-30-amd64");
    let list = diskkit_ok(&["kernel", "--list", &img]);
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines[0].starts_with("* kernel 6.10.0-1-amd64"), "{list}");
    assert!(
        lines[1].contains("6.9.12-1-amd64") && lines[2].contains("5.10.0-30-amd64"),
        "{list}"
    );
    let err = kernel_err(&["--kernel-version", "4.0", &img]);
    assert!(
        err.contains("no kernel version '4.0'") && err.contains("6.9.12-1-amd64"),
        "{err}"
    );
}

#[test]
fn kernel_without_initramfs() {
    let f = Fixture::new();
    f.file("/boot/vmlinuz-6.3.0", b"lonely-kernel");
    let img = f.build(16);
    let out = f.out();
    let j = kernel_json(&["--out", &out.to_string_lossy(), &img]);
    assert!(j["chosen"]["initramfs"].is_null());
    assert_eq!(read(&out.join("vmlinuz")), b"lonely-kernel");
    assert!(!out.join("initramfs").exists());
    assert!(diskkit_ok(&["kernel", &img]).contains("(no initramfs)"));
}

#[test]
fn no_kernel_lists_the_places_searched() {
    let f = Fixture::new();
    f.file("/etc/hostname", b"empty\n")
        .mkdir("/boot")
        .mkdir("/usr/lib/modules/6.0.0");
    let img = f.build(16);
    let err = kernel_err(&["--out", &f.out().to_string_lossy(), &img]);
    for place in [
        "/boot/EFI/Linux",
        "/usr/lib/modules/<version>/*.efi",
        "initramfs.img",
        "/boot/vmlinuz-<version>",
        "/boot/initramfs-<version>.img",
    ] {
        assert!(err.contains(place), "{place} missing from: {err}");
    }
    assert!(!f.out().exists() || fs::read_dir(f.out()).unwrap().next().is_none());
}

/// The installed Debian cloud kernel.
fn host_kernel() -> (PathBuf, String) {
    let k = fs::read_dir("/boot")
        .expect("/boot")
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64")
        })
        .expect("linux-image-cloud-amd64 must be installed (.ci/run installs it)");
    let v = k.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_owned();
    (k, v)
}

/// The md5 dpkg recorded for `boot/vmlinuz-<version>` in the md5sums of the package owning
/// `kernel` (found with `dpkg -S`). Panics if the owner or the entry cannot be found.
fn package_md5(kernel: &Path, version: &str) -> String {
    let owner = tool_ok("dpkg", &["-S", &kernel.to_string_lossy()]);
    // "linux-image-6.1.0-56-cloud-amd64: /boot/vmlinuz-6.1.0-56-cloud-amd64"
    let pkg = owner
        .lines()
        .next()
        .and_then(|l| l.split_once(": "))
        .map(|(p, _)| p.trim().to_owned())
        .unwrap_or_else(|| panic!("dpkg -S gave no owner for {}: {owner}", kernel.display()));
    assert_eq!(
        pkg.split(':').next(),
        Some(format!("linux-image-{version}").as_str())
    );
    let info = Path::new("/var/lib/dpkg/info");
    let sums = [format!("{pkg}.md5sums"), format!("{pkg}:amd64.md5sums")]
        .iter()
        .map(|n| info.join(n))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no md5sums file for {pkg} in {}", info.display()));
    let text = fs::read_to_string(&sums).unwrap();
    let want = format!("boot/vmlinuz-{version}");
    text.lines()
        .find_map(|l| {
            let (md5, path) = l.split_once("  ")?;
            (path == want).then(|| md5.to_owned())
        })
        .unwrap_or_else(|| panic!("{want} not listed in {}", sums.display()))
}

/// A busybox initramfs whose /init prints a marker and powers off.
fn busybox_initramfs(dir: &Dir, marker: &str) -> Vec<u8> {
    let root = dir.path("initramfs-root");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static must be installed");
    fs::write(
        root.join("init"),
        format!("#!/bin/busybox sh\n/bin/busybox echo {marker}\n/bin/busybox poweroff -f\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("find . | cpio --quiet -o -H newc")
        .current_dir(&root)
        .output()
        .expect("cpio must be installed");
    assert!(
        out.status.success(),
        "cpio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn real_debian_kernel_extracts_byte_identical_and_boots() {
    let (kernel_path, version) = host_kernel();
    let kernel = read(&kernel_path);
    let f = Fixture::new();
    let marker = "DISKKIT-BOOT-MARKER-7f3a";
    let initramfs = busybox_initramfs(&f.dir, marker);
    f.file(&format!("/boot/vmlinuz-{version}"), &kernel)
        .file(&format!("/boot/initrd.img-{version}"), &initramfs)
        .link("/boot/vmlinuz", &format!("vmlinuz-{version}"))
        .file("/etc/kernel/cmdline", b"console=ttyS0 panic=-1\n");
    let img = f.build(64);
    // Through ASIF, as a partitioned disk would be read too.
    diskkit_ok(&["convert", "-O", "asif", &img, &f.dir.s("fs.asif")]);
    let out = f.out();
    let j = kernel_json(&["--out", &out.to_string_lossy(), &f.dir.s("fs.asif")]);
    assert_eq!(j["chosen"]["version"], version.as_str());
    assert!(
        read(&out.join("vmlinuz")) == kernel,
        "extracted kernel differs from {}",
        kernel_path.display()
    );
    // And it is the package's file, not just whatever /boot holds now: its md5 is the one
    // dpkg recorded for boot/vmlinuz-<version> in the owning package's md5sums.
    let recorded = package_md5(&kernel_path, &version);
    let ours = tool_ok("md5sum", &[&out.join("vmlinuz").to_string_lossy()]);
    let ours = ours.split_whitespace().next().unwrap_or_default();
    assert_eq!(ours, recorded, "extracted vmlinuz md5 vs the package's md5sums");
    assert!(read(&out.join("initramfs")) == initramfs);
    // The image's line, then the root, rw and the x86 serial console (a real bzImage).
    let cmdline = fs::read_to_string(out.join("cmdline")).unwrap();
    assert_eq!(
        cmdline.trim(),
        format!(
            "console=ttyS0 panic=-1 root=UUID={} rw console=ttyS0",
            fs_uuid(&img)
        )
    );
    let console = boot(&out.join("vmlinuz"), &out.join("initramfs"), cmdline.trim());
    assert!(
        console.contains(marker),
        "marker not printed; console:\n{console}"
    );
}

/// Boot under QEMU TCG; returns the serial console. A generous limit guards against a hang
/// (it only kills QEMU; the assertion is on the console contents).
fn boot(kernel: &Path, initrd: &Path, cmdline: &str) -> String {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new("qemu-system-x86_64")
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
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-system-x86_64 must be installed");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        if rx.recv_timeout(std::time::Duration::from_secs(600)).is_err() {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    });
    let mut console = String::new();
    child.stdout.take().unwrap().read_to_string(&mut console).unwrap();
    let status = child.wait().unwrap();
    let _ = tx.send(());
    guard.join().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success(), "qemu failed ({status}): {err}\n{console}");
    console
}

#[test]
fn lying_kernel_size_is_refused_before_writing() {
    let f = Fixture::new();
    f.file("/boot/vmlinuz-6.4.0", b"kernel")
        .file("/boot/initrd.img-6.4.0", b"initrd");
    let img = f.build(16);
    tool_ok(
        "debugfs",
        &["-w", "-R", "sif /boot/initrd.img-6.4.0 size 0x10000000000", &img],
    );
    let err = kernel_err(&["--out", &f.out().to_string_lossy(), &img]);
    assert!(
        err.contains("/boot/initrd.img-6.4.0") && err.contains("more than any kernel"),
        "{err}"
    );
    assert!(!f.out().exists());
}

#[test]
fn fedora_modules_kernel_pairs_with_boot_initramfs() {
    // Classic Fedora: the kernel in /usr/lib/modules/<v>/ and /boot, the initramfs only in /boot.
    let f = Fixture::new();
    let v = "6.11.4-301.fc41.x86_64";
    f.file(&format!("/usr/lib/modules/{v}/vmlinuz"), b"fedora-kernel")
        .file(&format!("/boot/vmlinuz-{v}"), b"fedora-kernel")
        .file(&format!("/boot/initramfs-{v}.img"), b"fedora-initramfs");
    let img = f.build(16);
    let j = kernel_json(&["--out", &f.out().to_string_lossy(), &img]);
    assert_eq!(j["chosen"]["kernel"], format!("/usr/lib/modules/{v}/vmlinuz"));
    assert_eq!(j["chosen"]["initramfs"], format!("/boot/initramfs-{v}.img"));
    assert!(j["note"].as_str().unwrap().contains("2 copies"), "{j}");
    assert_eq!(read(&f.out().join("initramfs")), b"fedora-initramfs");
}

#[test]
fn kernel_in_a_gpt_root_partition() {
    let f = Fixture::new();
    f.file("/boot/vmlinuz-6.6.0", b"partitioned-kernel")
        .file("/boot/initrd.img-6.6.0", b"partitioned-initrd");
    let fs_img = f.build(16);
    let disk = f.dir.path("disk.img");
    fs::File::create(&disk).unwrap().set_len(24 << 20).unwrap();
    let d = disk.to_string_lossy().into_owned();
    tool_ok(
        "sgdisk",
        &[
            "-n",
            "1:2048:+2M",
            "-t",
            "1:ef00",
            "-n",
            "2:0:+16M",
            "-t",
            "2:8304",
            "-c",
            "2:root",
            &d,
        ],
    );
    let start = 2048 + 2 * 2048;
    tool_ok(
        "dd",
        &[
            &format!("if={fs_img}"),
            &format!("of={d}"),
            "bs=512",
            &format!("seek={start}"),
            "conv=notrunc",
            "status=none",
        ],
    );
    diskkit_ok(&["convert", "-O", "asif", &d, &f.dir.s("disk.asif")]);
    diskkit_ok(&["convert", "-O", "qcow2", &d, &f.dir.s("disk.qcow2")]);
    for (i, image) in [
        d.clone(),
        f.dir.s("disk.asif"),
        f.dir.s("disk.qcow2"),
        format!("{}@root", f.dir.s("disk.qcow2")),
        format!("{d}@2"),
        format!("{d}@root"),
    ]
    .into_iter()
    .enumerate()
    {
        let out = f.dir.path(&format!("out-{i}"));
        let j = kernel_json(&["--out", &out.to_string_lossy(), &image]);
        assert_eq!(j["chosen"]["version"], "6.6.0", "{image}");
        assert_eq!(read(&out.join("vmlinuz")), b"partitioned-kernel");
    }
}

#[test]
fn separate_boot_partition_next_to_root() {
    // Fedora-style: /boot is its own partition (kernels at its root), the root holds the cmdline.
    let boot = Fixture::new();
    let v = "6.5.6-300.fc39.x86_64";
    boot.file(&format!("/vmlinuz-{v}"), b"boot-part-kernel")
        .file(&format!("/initramfs-{v}.img"), b"boot-part-initramfs")
        .mkdir("/loader/entries");
    let boot_img = boot.build(16);
    let root = Fixture::new();
    root.file("/etc/kernel/cmdline", b"root=LABEL=root ro\n")
        .mkdir("/usr/lib/modules");
    let root_img = root.build(16);
    let disk = root.dir.path("disk.img");
    fs::File::create(&disk).unwrap().set_len(40 << 20).unwrap();
    let d = disk.to_string_lossy().into_owned();
    // Root first in the table: the boot partition must still be preferred for the kernel.
    tool_ok(
        "sgdisk",
        &[
            "-n",
            "1:2048:+16M",
            "-t",
            "1:8304",
            "-c",
            "1:root",
            "-n",
            "2:0:+16M",
            "-t",
            "2:ea00",
            "-c",
            "2:boot",
            &d,
        ],
    );
    for (img, start) in [(&root_img, 2048u64), (&boot_img, 2048 + 16 * 2048)] {
        tool_ok(
            "dd",
            &[
                &format!("if={img}"),
                &format!("of={d}"),
                "bs=512",
                &format!("seek={start}"),
                "conv=notrunc",
                "status=none",
            ],
        );
    }
    let out = root.out();
    let res = diskkit(&["kernel", "--output", "json", "--out", &out.to_string_lossy(), &d]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(String::from_utf8_lossy(&res.stderr).contains("partition 2"));
    let j: Value = serde_json::from_slice(&res.stdout).unwrap();
    assert_eq!(j["chosen"]["kernel"], format!("/vmlinuz-{v}"));
    assert_eq!(j["chosen"]["layout"], "boot-partition");
    assert_eq!(j["partition"], 2);
    assert_eq!(read(&out.join("vmlinuz")), b"boot-part-kernel");
    assert_eq!(read(&out.join("initramfs")), b"boot-part-initramfs");
    // The root is partition 1, named by its GPT GUID (the image's own root= is replaced).
    let info = tool_ok("sgdisk", &["-i", "1", &d]);
    let guid = info
        .lines()
        .find_map(|l| l.strip_prefix("Partition unique GUID: "))
        .unwrap()
        .trim()
        .to_ascii_lowercase();
    assert_eq!(
        String::from_utf8(read(&out.join("cmdline"))).unwrap(),
        format!("root=PARTUUID={guid} rw\n")
    );
    // Naming the root partition: no kernel there, and the error says where it looked.
    let err = kernel_err(&[&format!("{d}@root")]);
    assert!(err.contains("no kernel found"), "{err}");
    // File access picks the one Linux-root-typed partition among several ext ones...
    assert_eq!(
        diskkit_ok(&["cat", &format!("{d}:/etc/kernel/cmdline")]),
        "root=LABEL=root ro\n"
    );
    // ...and needs a choice when none is root-typed.
    tool_ok("sgdisk", &["-t", "1:8300", &d]);
    let err = String::from_utf8_lossy(&diskkit(&["ls", &format!("{d}:/")]).stderr).into_owned();
    assert!(
        err.contains("several partitions") && err.contains("\"boot\"") && err.contains("\"root\""),
        "{err}"
    );
}
