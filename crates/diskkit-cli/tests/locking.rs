//! Image locks against QEMU, both ways: QEMU (`qemu-nbd`, `qemu-io`, `qemu-img`) and diskkit
//! see each other's locks on every file of a stack; `-U` reads anyway.

mod nbd_support;
mod support;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nbd_support::{debian_path, Served};
use support::{diskkit, diskkit_ok, tool_ok, Dir};

/// `qemu-nbd` holding an image (read-write unless `read_only`); killed when dropped.
struct QemuNbd(Child);

impl QemuNbd {
    fn start(sock: &Path, image: &Path, format: &str, read_only: bool) -> QemuNbd {
        let mut cmd = Command::new("qemu-nbd");
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd
            .args(["-t", "-f", format, "-k"])
            .arg(sock)
            .arg(image)
            .env("PATH", debian_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("PATH", debian_path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// diskkit must refuse with exit 2 and a message like QEMU's.
fn refused(args: &[&str], lock: &str) {
    let out = diskkit(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "diskkit {args:?} was not refused: {err}"
    );
    assert!(
        err.contains("is in use") && err.contains(&format!("failed to get {lock} lock")),
        "diskkit {args:?}: {err}"
    );
}

/// A QEMU tool must refuse because of a lock.
fn qemu_refused(program: &str, args: &[&str], lock: &str) {
    let out = run(program, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("Failed to get {lock} lock")),
        "{program} {args:?} was not refused by a lock: {text}"
    );
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn qemu_nbd_holding_an_image_makes_diskkit_refuse() {
    let d = Dir::new();
    let img = d.s("vm.qcow2");
    diskkit_ok(&["create", "--format", "qcow2", "--size", "64M", &img]);
    std::fs::write(d.path("in"), b"hello").unwrap();
    diskkit_ok(&["write", &img, "--offset", "1M", "--from", &d.s("in")]);
    diskkit_ok(&[
        "create",
        "--format",
        "qcow2",
        "--size",
        "64M",
        &d.s("other.qcow2"),
    ]);
    let q = QemuNbd::start(&d.path("q.sock"), Path::new(&img), "qcow2", false);
    let before = files_in(&d.path(""));

    refused(&["write", &img, "--from", &d.s("in")], "\"write\"");
    refused(
        &["discard", &img, "--offset", "0", "--length", "64K"],
        "\"write\"",
    );
    refused(&["resize", &img, "128M"], "\"write\"");
    refused(&["snapshot", &img], "\"write\"");
    refused(
        &["serve", "--foreground", "--socket", &d.s("dk.sock"), &img],
        "\"write\"",
    );
    // Readers are refused too, as qemu-img info is: the content is changing under them.
    refused(&["info", &img], "shared \"write\"");
    refused(&["ls", &format!("{img}:/")], "shared \"write\"");
    // boot honours the lock before it starts anything (a VM on a disk another one writes).
    refused(&["boot", "--dry-run", &img], "shared \"write\"");
    let out = run("qemu-img", &["info", &img]);
    assert!(!out.status.success(), "qemu-img info was not refused either");
    // -U reads anyway, as qemu-img -U does.
    let info = diskkit_ok(&["info", "-U", &img]);
    assert!(info.contains("qcow2"), "{info}");
    let read = diskkit_ok(&["read", "-U", &img, "--offset", "1M", "--length", "5"]);
    assert_eq!(read, "hello");
    let out = diskkit(&["write", "-U", &img, "--from", &d.s("in")]);
    assert_eq!(out.status.code(), Some(2), "-U opened an image for writing");
    // Nothing was created or changed by the refused commands.
    assert_eq!(files_in(&d.path("")), before);

    // A stack whose top qemu-nbd holds: commit is refused by the lock.
    drop(q);
    diskkit_ok(&[
        "layer",
        "create",
        "--format",
        "qcow2",
        "--parent",
        &img,
        &d.s("top.qcow2"),
    ]);
    let _q = QemuNbd::start(&d.path("q2.sock"), &d.path("top.qcow2"), "qcow2", false);
    refused(&["commit", &d.s("top.qcow2")], "\"write\"");
    refused(&["restore", &d.s("top.qcow2")], "\"write\"");
    refused(
        &["rebase", "-b", &d.s("other.qcow2"), &d.s("top.qcow2")],
        "\"write\"",
    );
    // qemu-nbd holds the backing file as a reader: nobody writes it, readers are welcome.
    refused(&["write", &img, "--from", &d.s("in")], "\"write\"");
    diskkit_ok(&["info", &img]);
    diskkit_ok(&["read", &img, "--length", "4096"]);
}

#[test]
fn diskkit_serve_holding_an_image_makes_qemu_refuse() {
    let d = Dir::new();
    let img = d.s("vm.qcow2");
    diskkit_ok(&["create", "--format", "qcow2", "--size", "64M", &img]);
    let s = Served::start(&d.path("dk.sock"), &["-f", "qcow2", &img]);
    qemu_refused("qemu-img", &["info", &img], "shared \"write\"");
    qemu_refused("qemu-io", &["-c", "write 0 512", &img], "\"write\"");
    qemu_refused("qemu-io", &["-r", "-c", "read 0 512", &img], "shared \"write\"");
    // With -U QEMU reads it.
    tool_ok("qemu-img", &["info", "-U", &img]);
    tool_ok("qemu-io", &["-r", "-U", "-c", "read 0 512", &img]);
    // A second diskkit server of the same image is refused.
    refused(
        &["serve", "--foreground", "--socket", &d.s("second.sock"), &img],
        "\"write\"",
    );
    assert!(!d.path("second.sock").exists());
    drop(s);
    // Once the server is gone, QEMU opens it.
    tool_ok("qemu-img", &["info", &img]);
    tool_ok("qemu-io", &["-c", "write -P 7 0 512", &img]);

    // Served read-only, readers coexist with it and writers do not.
    let s = Served::start(&d.path("ro.sock"), &["--read-only", "-f", "qcow2", &img]);
    tool_ok("qemu-img", &["info", &img]);
    diskkit_ok(&["info", &img]);
    qemu_refused("qemu-io", &["-c", "write 0 512", &img], "\"write\"");
    let s2 = Served::start(&d.path("ro2.sock"), &["--read-only", "-f", "qcow2", &img]);
    drop((s, s2));
}

/// Every file of a stack is locked: the parents as readers (so several stacks can share a
/// base, and QEMU can read it), none of them writable by anyone meanwhile.
#[test]
fn parents_are_shared_by_readers_and_closed_to_writers() {
    let d = Dir::new();
    let base = d.s("base.qcow2");
    diskkit_ok(&["create", "--format", "qcow2", "--size", "64M", &base]);
    diskkit_ok(&["layer", "create", "--parent", &base, &d.s("a.asif")]);
    // Other users of the base live in another directory (next to the base they would count
    // as layers that depend on it, and commit would refuse for that reason alone).
    std::fs::create_dir(d.path("other")).unwrap();
    let b = d.path("other").join("b.asif");
    diskkit_ok(&["layer", "create", "--parent", &base, b.to_str().unwrap()]);
    let sa = Served::start(&d.path("a.sock"), &[&d.s("a.asif")]);
    let sb = Served::start(&d.path("b.sock"), &["--allow-any-parent", b.to_str().unwrap()]);
    // QEMU reads the shared base; nobody writes it.
    tool_ok("qemu-img", &["info", &base]);
    qemu_refused("qemu-io", &["-c", "write 0 512", &base], "\"write\"");
    refused(&["write", &base, "--from", &d.s("a.asif")], "\"write\"");
    // A QEMU overlay on the same base is fine too.
    let q = d.path("other").join("q.qcow2");
    tool_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            q.to_str().unwrap(),
        ],
    );
    let _q = QemuNbd::start(&d.path("q.sock"), &q, "qcow2", false);
    // Committing a stack into the shared base is refused by the others' locks on it.
    drop(sa);
    refused(&["commit", &d.s("a.asif")], "\"write\"");
    drop(sb);
    refused(&["commit", &d.s("a.asif")], "\"write\"");
}
