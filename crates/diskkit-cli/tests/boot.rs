//! `diskkit boot` against real QEMU (TCG) and a real Debian bookworm guest (see
//! `boot_fixture`). Every boot checks several things, since a TCG boot takes 30–60 s on an
//! idle 2-core machine: seven full boots (an OCI layout, a RAW disk twice with --persist, a
//! GPT-partitioned qcow2 disk, an ASIF disk over SSH, an Apple store entry, an image cache
//! instance in `boot_instance`) and a few that are stopped early. Every run gets its own XDG_RUNTIME_DIR, which must be empty afterwards
//! with no QEMU left running.

mod boot_fixture;
mod boot_instance;
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use boot_fixture::{apple_store, layout, run, sha256, tree_digests, LAYER2_TEXT};
use support::{diskkit_bin, Dir};

/// Generous: TCG on a loaded 2-core machine can take minutes to boot.
const COME_UP: &str = "15m";

/// A store with the fixture unpacked into it once (2 GiB root, by `unpack --store`) and its
/// kernel cached (by `boot --dry-run`), shared by the tests that boot the layout: they must
/// leave it unchanged.
fn shared_store() -> &'static Path {
    static STORE: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &STORE
        .get_or_init(|| {
            let d = tempfile::tempdir().unwrap();
            let store = d.path().join("store");
            run(Command::new(diskkit_bin())
                .args(["unpack", "--size", "2G", "--store"])
                .arg(&store)
                .arg(layout()));
            run(Command::new(diskkit_bin())
                .args(["boot", "--dry-run", "--store"])
                .arg(&store)
                .arg(layout()));
            assert!(store.join("diskkit/kernels").is_dir());
            (d, store)
        })
        .1
}

/// One `diskkit boot` run with its own runtime directory.
struct Boot {
    runtime: Dir,
}

impl Boot {
    fn new() -> Boot {
        Boot { runtime: Dir::new() }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(diskkit_bin());
        c.arg("boot");
        // A cache instance's memory comes from its machine definition.
        if !args.contains(&"--memory") && !args.contains(&"--instance") {
            c.args(["--memory", "1G"]);
        }
        if !args.contains(&"--accel") {
            c.args(["--accel", "tcg"]);
        }
        if !args.contains(&"--timeout") {
            c.args(["--timeout", COME_UP]);
        }
        c.args(args)
            .env("XDG_RUNTIME_DIR", self.runtime.path(""))
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("run diskkit");
        eprintln!(
            "diskkit boot {args:?}: {}\n--- stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The runtime directory base diskkit uses.
    fn base(&self) -> PathBuf {
        self.runtime.path("diskkit")
    }

    /// `boot-*` directories left in the runtime directory.
    fn leftovers(&self) -> Vec<String> {
        match fs::read_dir(self.base()) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("boot-"))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Processes whose command line mentions this run's runtime directory (QEMU).
    fn qemus(&self) -> Vec<u32> {
        let needle = self.runtime.s("");
        let mut pids = Vec::new();
        for e in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let text = String::from_utf8_lossy(&cmdline);
            if text.contains("qemu-system") && text.contains(needle.trim_end_matches('/')) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Nothing left behind: no runtime directory, no QEMU.
    fn assert_clean(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.qemus().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(self.qemus(), Vec::<u32>::new(), "QEMU still running");
        assert_eq!(self.leftovers(), Vec::<String>::new(), "runtime directories left");
        if let Ok(rd) = fs::read_dir(self.base()) {
            let names: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with("kvm-probe-"))
                .collect();
            assert!(names.is_empty(), "files left in the runtime directory: {names:?}");
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A RAW file of `len` pseudo-random bytes.
fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let data = support::Rng(seed).bytes(len);
    fs::write(path, &data).unwrap();
    data
}

fn hex_sha(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

/// The file `path` inside the fixture's filesystem, read by debugfs from the store entry.
fn debugfs_cat(img: &Path, path: &str) -> String {
    run(Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(img))
}

/// The store entry's snapshot (the only one in the store).
fn snapshot_of(store: &Path) -> PathBuf {
    let snaps = store.join("snapshots");
    let entry = fs::read_dir(&snaps)
        .unwrap()
        .flatten()
        .find(|e| e.file_name() != "ingest")
        .expect("a store entry");
    entry.path().join("snapshot")
}

/// An OCI layout booted with a command: Debian's os-release on stdout, the command's stderr
/// apart from its stdout, its exit status 7, the layers merged (the second layer's file there,
/// the file it deleted gone), two extra disks (a RAW file read-only, an ASIF image written
/// through diskkit's NBD server) as /dev/vdb and /dev/vdc, and a guest write that leaves the
/// store untouched.
#[test]
fn oci_layout_runs_a_command_with_disks_and_leaves_the_store_alone() {
    let store = shared_store();
    let before = tree_digests(store);
    let d = Dir::new();
    let vdb = random_file(&d.path("vdb.raw"), 4 << 20, 7);
    // The ASIF disk: 8 MiB, written by the guest at offset 1 MiB.
    run(Command::new(diskkit_bin()).args(["create", "--format", "asif", "--size", "8M", &d.s("vdc.asif")]));
    let script = "cat /etc/os-release; \
        test -f /etc/diskkit-layer2 && cat /etc/diskkit-layer2; \
        test -e /etc/motd || echo motd-is-gone; \
        echo vdb=$(head -c 4194304 /dev/vdb | sha256sum); \
        printf diskkit-was-here | dd of=/dev/vdc bs=1M seek=1 conv=notrunc,fsync status=none; \
        echo written-in-the-guest > /root/throwaway; sync; \
        echo to-stderr >&2; exit 7";
    let b = Boot::new();
    let out = b.run(&[
        "--store",
        &s(store),
        "--disk",
        &format!("{},ro", d.s("vdb.raw")),
        "--disk",
        &d.s("vdc.asif"),
        &s(layout()),
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(out.status.code(), Some(7), "exit status of the command");
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    let os_release = debugfs_cat(&snapshot_of(store), "/usr/lib/os-release");
    assert!(os_release.contains("ID=debian"), "{os_release}");
    assert!(stdout.starts_with(&os_release), "stdout:\n{stdout}");
    assert!(stdout.contains(LAYER2_TEXT), "{stdout}");
    assert!(stdout.contains("motd-is-gone"), "{stdout}");
    // (`echo $(...)` joins sha256sum's two fields with one space.)
    assert!(stdout.contains(&format!("vdb={} -\n", hex_sha(&vdb))), "{stdout}");
    assert!(
        !stdout.contains("to-stderr"),
        "stderr leaked into stdout: {stdout}"
    );
    assert!(stderr.contains("to-stderr\n"), "{stderr}");
    assert!(!stderr.contains("diskkit: error"), "{stderr}");
    // Console noise went nowhere near stdout.
    assert!(
        !stdout.contains("systemd") && !stdout.contains("Linux version"),
        "{stdout}"
    );
    // The guest's write reached the ASIF image through NBD: read it back with diskkit and
    // check the image with qemu-img's peer... via diskkit convert to RAW and cmp.
    run(Command::new(diskkit_bin()).args(["convert", "-O", "raw", &d.s("vdc.asif"), &d.s("vdc.raw")]));
    let vdc = fs::read(d.path("vdc.raw")).unwrap();
    assert_eq!(&vdc[1 << 20..(1 << 20) + 16], b"diskkit-was-here");
    assert!(vdc[..1 << 20].iter().all(|&b| b == 0));
    // The read-only disk and the store are unchanged; nothing is left behind.
    assert_eq!(fs::read(d.path("vdb.raw")).unwrap(), vdb);
    assert_eq!(tree_digests(store), before, "the store changed");
    b.assert_clean();
}

/// A RAW disk image (what `diskkit unpack` makes) booted twice with --persist: the first
/// boot's write is there in the second; the RAW base never changes.
#[test]
fn raw_root_with_persist_keeps_writes_across_boots() {
    let d = Dir::new();
    let raw = d.path("root.raw");
    run(Command::new(diskkit_bin())
        .args(["unpack", "--size", "2G"])
        .arg(layout())
        .arg(&raw));
    let base = sha256(&raw);
    let persist = d.path("state.qcow2");
    let b = Boot::new();
    let out = b.run(&[
        "--persist",
        &s(&persist),
        &s(&raw),
        "--",
        "sh",
        "-c",
        "echo first-boot > /root/persisted && findmnt -no SOURCE,FSTYPE /",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout).trim(), "/dev/vda ext4");
    b.assert_clean();
    assert!(persist.is_file());
    // QEMU's own check of the overlay (it opens the RAW base named in it).
    run(Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&persist));
    let out = b.run(&[
        "--persist",
        &s(&persist),
        &s(&raw),
        "--",
        "cat",
        "/root/persisted",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), "first-boot\n");
    assert_eq!(sha256(&raw), base, "the RAW base changed");
    b.assert_clean();
    // A throwaway boot of the same base does not see it.
    let out = b.run(&["--dry-run", &s(&raw)]);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("throwaway"), "{}", text(&out.stdout));
}

/// A GPT disk with the root in partition 2 (Linux root x86-64 type), converted to qcow2 by
/// qemu-img: the kernel gets root=PARTUUID=<that partition's GUID>.
#[test]
fn gpt_partitioned_qcow2_root_boots_by_partuuid() {
    let d = Dir::new();
    let fs_img = d.path("fs.raw");
    run(Command::new(diskkit_bin())
        .args(["unpack", "--size", "1500M"])
        .arg(layout())
        .arg(&fs_img));
    let disk = d.path("disk.raw");
    fs::File::create(&disk).unwrap().set_len(1600 << 20).unwrap();
    run(Command::new("sgdisk")
        .args(["-n", "1:2048:+32M", "-t", "1:ef00", "-c", "1:esp"])
        .args(["-n", "2:0:+1500M", "-t", "2:8304", "-c", "2:root"])
        .arg(&disk));
    let info = run(Command::new("sgdisk").args(["-i", "2"]).arg(&disk));
    let guid = info
        .lines()
        .find_map(|l| l.strip_prefix("Partition unique GUID: "))
        .unwrap()
        .trim()
        .to_ascii_lowercase();
    let first = info
        .lines()
        .find_map(|l| l.strip_prefix("First sector: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    run(Command::new("dd")
        .arg(format!("if={}", s(&fs_img)))
        .arg(format!("of={}", s(&disk)))
        .args([
            "bs=512",
            &format!("seek={first}"),
            "conv=notrunc,sparse",
            "status=none",
        ]));
    let qcow2 = d.path("disk.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&disk)
        .arg(&qcow2));
    let before = sha256(&qcow2);
    let b = Boot::new();
    let out = b.run(&[
        &s(&qcow2),
        "--",
        "sh",
        "-c",
        "cat /proc/cmdline; findmnt -no SOURCE /; cat /etc/diskkit-layer2",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("root=PARTUUID={guid} rw console=ttyS0")),
        "{stdout}"
    );
    assert!(stdout.contains("/dev/vda2\n"), "{stdout}");
    assert!(stdout.contains(LAYER2_TEXT), "{stdout}");
    assert_eq!(sha256(&qcow2), before, "the qcow2 image changed");
    b.assert_clean();
}

/// An ASIF root (QEMU cannot open ASIF: it goes through diskkit's NBD server) with --ssh:
/// a fresh key, readiness by a completed SSH session, the command's status returned.
#[test]
fn asif_root_over_nbd_with_ssh() {
    let d = Dir::new();
    let asif = d.path("root.asif");
    run(Command::new(diskkit_bin())
        .args(["unpack", "--format", "asif", "--size", "2G"])
        .arg(layout())
        .arg(&asif));
    let before = sha256(&asif);
    let b = Boot::new();
    let out = b.run(&[
        "-v",
        "--ssh",
        &s(&asif),
        "--",
        "sh",
        "-c",
        "id -un; test -s /root/.ssh/authorized_keys && echo key-installed; echo via-ssh >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(stdout, "root\nkey-installed\n");
    assert!(stderr.contains("via-ssh"), "{stderr}");
    assert!(stderr.contains("root is "), "{stderr}");
    assert!(stderr.contains("via diskkit's NBD server"), "{stderr}");
    assert!(stderr.contains("SSH answered after"), "{stderr}");
    assert_eq!(sha256(&asif), before, "the ASIF base changed");
    b.assert_clean();
}

/// An Apple `container` store entry (`--apple-store ROOT REF`): resolved through state.json
/// and the index to the snapshot; the Apple store is only read, the kernel cached in
/// diskkit's store.
#[test]
fn apple_store_entry_boots() {
    let d = Dir::new();
    let apple = d.path("com.apple.container");
    apple_store(&apple, diskkit_bin());
    let before = tree_digests(&apple);
    let store = d.path("diskkit-store");
    let b = Boot::new();
    let out = b.run(&[
        "--store",
        &s(&store),
        "--apple-store",
        &s(&apple),
        "diskkit-boot",
        "--",
        "cat",
        "/etc/diskkit-layer2",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout), LAYER2_TEXT);
    assert_eq!(tree_digests(&apple), before, "the Apple store changed");
    let kernels = store.join("diskkit/kernels");
    assert_eq!(
        fs::read_dir(kernels).unwrap().count(),
        1,
        "one kernel cache entry"
    );
    b.assert_clean();
}

/// Wait until this run's QEMU is up (the process exists), for at most `limit`.
fn wait_for_qemu(b: &Boot, limit: Duration) {
    let deadline = Instant::now() + limit;
    while b.qemus().is_empty() {
        assert!(Instant::now() < deadline, "QEMU did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGINT during boot: QEMU stopped, exit 130, nothing left.
#[test]
fn sigint_during_boot_stops_qemu_and_cleans_up() {
    let b = Boot::new();
    let child = b
        .command(&["--store", &s(shared_store()), &s(layout()), "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_qemu(&b, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    run(Command::new("kill").args(["-INT", &child.id().to_string()]));
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("SIGINT: stopped the VM"));
    b.assert_clean();
}

/// QEMU crashing mid-boot (killed with SIGKILL here): reported with its status, exit 2,
/// nothing left.
#[test]
fn qemu_crash_is_reported_and_cleaned_up() {
    let b = Boot::new();
    let child = b
        .command(&["--store", &s(shared_store()), &s(layout()), "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_qemu(&b, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    for pid in b.qemus() {
        run(Command::new("kill").args(["-KILL", &pid.to_string()]));
    }
    let out = child.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.lines().last().unwrap_or_default(),
        "diskkit: error: QEMU failed (killed by signal 9)",
        "{err}"
    );
    b.assert_clean();
}

/// SIGKILL of diskkit mid-boot: QEMU dies with it (parent-death signal); the runtime
/// directory it leaves is removed by the next run, here one that fails at once because
/// QEMU is missing (a clear error, exit 2).
#[test]
fn sigkill_mid_boot_then_the_next_run_cleans_up() {
    let b = Boot::new();
    let mut child = b
        .command(&["--store", &s(shared_store()), &s(layout()), "--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_qemu(&b, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(2));
    let qemus = b.qemus();
    child.kill().unwrap();
    child.wait().unwrap();
    // Gone, or a zombie with no thread left (the files, the lock among them, are closed
    // with the last thread: a leader that is already a zombie, or whose command line is
    // already empty, may still have threads holding them for a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    let alive = |pid: &u32| {
        let zombie = fs::read_to_string(format!("/proc/{pid}/stat")).map(|st| {
            st.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        });
        match zombie {
            Err(_) => false,
            Ok(false) => true,
            Ok(true) => fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()) > 1,
        }
    };
    while qemus.iter().any(alive) {
        assert!(Instant::now() < deadline, "QEMU outlived a SIGKILLed diskkit");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(b.qemus().is_empty());
    let stale = b.leftovers();
    assert_eq!(stale.len(), 1, "the killed run's directory: {stale:?}");
    assert!(b.base().join(&stale[0]).join("overlay.qcow2").exists());
    let out = b.run(&[
        "--qemu",
        "/nonexistent/qemu-system-x86_64",
        "--store",
        &s(shared_store()),
        &s(layout()),
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("diskkit: error: QEMU not found at '/nonexistent/qemu-system-x86_64'"),
        "{err}"
    );
    b.assert_clean();
}

/// A guest that never comes up (booted into emergency.target, so the command never starts):
/// stopped after --timeout with the console's last lines, exit 2, nothing left. Uses
/// `--accel auto`: where KVM does not work, a one-line note says TCG is used instead.
#[test]
fn guest_that_never_comes_up_times_out() {
    let b = Boot::new();
    let mut c = b.command(&[
        "--store",
        &s(shared_store()),
        "--karg",
        "systemd.unit=emergency.target",
        "--accel",
        "auto",
        "--timeout",
        "25s",
        &s(layout()),
        "--",
        "true",
    ]);
    let out = c.output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert_eq!(
        last,
        "diskkit: error: the guest did not come up (COMMAND did not start) within 25s; the VM was stopped",
        "{err}"
    );
    assert!(err.contains("last console lines:"), "{err}");
    let notes: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("diskkit: note: using TCG"))
        .collect();
    assert!(notes.len() <= 1, "{err}");
    b.assert_clean();
}

/// Errors that need no boot: clear, one line, exit 2, nothing left behind.
#[test]
fn clear_errors() {
    let d = Dir::new();
    let b = Boot::new();
    let one_line = |out: &Output, want: &str| {
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(
            err.lines().filter(|l| l.starts_with("diskkit: error: ")).count(),
            1,
            "{err}"
        );
        assert!(err.contains(want), "expected '{want}' in: {err}");
    };
    // QEMU not in PATH.
    let empty = d.path("empty-path");
    fs::create_dir(&empty).unwrap();
    let out = b
        .command(&["--store", &s(shared_store()), &s(layout()), "--", "true"])
        .env("PATH", &empty)
        .output()
        .unwrap();
    one_line(&out, "qemu-system-x86_64 not found in PATH: install QEMU");
    // An image without a kernel: the places searched are named.
    let tree = d.path("tree");
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::write(tree.join("etc/hostname"), "nokernel\n").unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .arg("-cf")
        .arg(d.path("l.tar"))
        .arg("etc"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../diskkit-oci/tests/fixtures/mkoci-layout.sh");
    run(Command::new("bash")
        .arg(script)
        .arg(d.path("nokernel"))
        .arg("v1")
        .arg(d.path("l.tar")));
    // A root filesystem tarball is not an image: the error says to make a disk of it.
    one_line(
        &b.run(&["--store", &d.s("store"), &d.s("l.tar"), "--", "true"]),
        "is a root filesystem tarball, not a disk or an OCI image; make a disk of it first",
    );
    let out = b.run(&["--store", &d.s("store"), &d.s("nokernel"), "--", "true"]);
    one_line(&out, "no kernel found; searched: /boot/EFI/Linux/**/*.efi (UKI)");
    assert!(text(&out.stderr).contains("/boot/vmlinuz-<version>"));
    // A root that is not ext4: an XFS signature, and nothing at all.
    let xfs = d.path("xfs.raw");
    fs::File::create(&xfs).unwrap().set_len(64 << 20).unwrap();
    support::poke(&xfs, 0, b"XFSB");
    one_line(&b.run(&[&s(&xfs)]), "the disk holds XFS, not ext2/3/4");
    let zeros = d.path("zeros.raw");
    fs::File::create(&zeros).unwrap().set_len(64 << 20).unwrap();
    one_line(&b.run(&[&s(&zeros)]), "no ext2/3/4 filesystem on the whole disk");
    // A damaged store entry: its snapshot lost its superblock.
    let store = d.path("damaged");
    run(Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(shared_store())
        .arg(&store));
    let snapshot = snapshot_of(&store);
    support::zero(&snapshot, 1024, 1024);
    let out = b.run(&["--store", &s(&store), &s(layout()), "--", "true"]);
    one_line(
        &out,
        "is damaged (the snapshot holds no ext4 filesystem): remove that directory",
    );
    // A damaged kernel cache entry is derived data: it is extracted again.
    let recache = d.path("recache");
    run(Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(shared_store())
        .arg(&recache));
    let kdir = fs::read_dir(recache.join("diskkit/kernels"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let good = sha256(&kdir.join("vmlinuz"));
    support::poke(&kdir.join("vmlinuz"), 4096, b"damage");
    assert_ne!(sha256(&kdir.join("vmlinuz")), good);
    let out = b.run(&["--dry-run", "--store", &s(&recache), &s(layout())]);
    assert!(out.status.success());
    assert_eq!(
        sha256(&kdir.join("vmlinuz")),
        good,
        "the kernel was not extracted again"
    );
    // COMMAND needs systemd: an image whose init is not systemd is refused before booting.
    let sysv = d.path("sysv");
    fs::create_dir_all(sysv.join("boot")).unwrap();
    fs::create_dir_all(sysv.join("sbin")).unwrap();
    let kernel = fs::read_dir("/boot")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("vmlinuz-"))
        .expect("a kernel in /boot");
    fs::copy(&kernel, sysv.join("boot/vmlinuz-6.1.0-test")).unwrap();
    fs::write(sysv.join("boot/initrd.img-6.1.0-test"), b"initrd").unwrap();
    std::os::unix::fs::symlink("/bin/busybox", sysv.join("sbin/init")).unwrap();
    let sysv_img = d.path("sysv.raw");
    fs::File::create(&sysv_img).unwrap().set_len(64 << 20).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&sysv)
        .arg(&sysv_img));
    let out = b.run(&[&s(&sysv_img), "--", "true"]);
    one_line(&out, "cannot run COMMAND in");
    assert!(text(&out.stderr).contains("is not systemd") || text(&out.stderr).contains("has no /sbin/init"));
    // Arguments.
    one_line(
        &b.run(&["--ssh", "--net", "none", &s(&sysv_img)]),
        "--ssh needs the network",
    );
    one_line(
        &b.run(&["--disk", "x,bogus", &s(&sysv_img)]),
        "unknown option 'bogus'",
    );
    b.assert_clean();
}

/// --dry-run prints the QEMU command line and starts nothing; for an arm64 image it is
/// qemu-system-aarch64's (the only aarch64 check possible on an x86 host without that QEMU).
#[test]
fn dry_run_shows_the_command_line_for_x86_64_and_aarch64() {
    let b = Boot::new();
    let out = b.run(&[
        "--dry-run",
        "--output",
        "json",
        "--store",
        &s(shared_store()),
        &s(layout()),
        "--",
        "true",
    ]);
    assert!(out.status.success());
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["arch"], "x86_64");
    assert_eq!(j["accel"], "tcg");
    assert_eq!(j["root_via"], "files");
    let cmdline = j["cmdline"].as_str().unwrap();
    assert!(cmdline.starts_with("root=UUID="), "{cmdline}");
    assert!(cmdline.contains(" rw console=ttyS0 systemd.run="), "{cmdline}");
    assert!(b.leftovers().is_empty());
    assert!(b.qemus().is_empty());
    // An arm64 image: a kernel with the arm64 Image header.
    let d = Dir::new();
    let tree = d.path("tree");
    fs::create_dir_all(tree.join("boot")).unwrap();
    let mut image = vec![0u8; 8192];
    image[0x38..0x3C].copy_from_slice(b"ARM\x64");
    fs::write(tree.join("boot/vmlinuz-6.1.0-test-arm64"), &image).unwrap();
    fs::write(tree.join("boot/initrd.img-6.1.0-test-arm64"), b"initrd").unwrap();
    let img = d.path("arm.raw");
    fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img));
    // A stand-in qemu-system-aarch64 on PATH (never run by --dry-run).
    let bin = d.path("bin");
    fs::create_dir(&bin).unwrap();
    fs::write(bin.join("qemu-system-aarch64"), "#!/bin/sh\nexit 1\n").unwrap();
    run(Command::new("chmod")
        .arg("+x")
        .arg(bin.join("qemu-system-aarch64")));
    let out = b
        .command(&["--dry-run", "--output", "json", &s(&img)])
        .env("PATH", format!("{}:/usr/bin:/bin", s(&bin)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["arch"], "aarch64");
    assert_eq!(j["qemu"], s(&bin.join("qemu-system-aarch64")));
    let args: Vec<&str> = j["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let after = |flag: &str| args[args.iter().position(|a| *a == flag).unwrap() + 1];
    assert_eq!(after("-machine"), "virt,gic-version=max");
    assert_eq!(after("-cpu"), "max");
    assert!(
        after("-append").ends_with(" rw console=ttyAMA0"),
        "{}",
        after("-append")
    );
    assert!(args.iter().any(|a| a.starts_with("chardev:console")) || args.contains(&"chardev:console"));
    b.assert_clean();
}
