//! Interrupts: SIGINT and SIGTERM at random moments of `convert`, `flatten` and `unpack`
//! leave no temporary file behind and exit 130 / 143; the temporaries of a SIGKILLed run are
//! removed by the next run that writes in the same directory, and nothing else is.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{diskkit_bin, diskkit_ok, tool_ok, Dir, Rng};

const ROUNDS: u64 = 20;

fn spawn(args: &[&str]) -> Child {
    Command::new(diskkit_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start diskkit")
}

fn kill(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

/// Names in `dir` that look like a temporary (any diskkit temporary or `.init` name).
fn leftovers(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".diskkit-") || n.ends_with(".init"))
        .collect();
    out.sort();
    out
}

/// A file of `len` bytes that is not all zeroes anywhere (so nothing is skipped as sparse).
fn data_file(path: &Path, len: usize, seed: u64) {
    let mut rng = Rng(seed);
    std::fs::write(path, rng.bytes(len)).unwrap();
}

/// How long the command takes without interruption (it must succeed): the shorter of two
/// runs (the first one warms the page cache).
fn duration(args: &[&str], out: &Path) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        diskkit_ok(args);
        best = best.min(t.elapsed());
        std::fs::remove_file(out).unwrap();
    }
    best
}

/// Run `args` (which write `out`, in `dir`) `ROUNDS` times, interrupting each at a random
/// moment with SIGINT or SIGTERM in turn. An output may only exist when complete (`verify`
/// checks it): after a run that finished, or one interrupted after its output was renamed into
/// place. Returns (interrupted runs, finished runs).
fn interrupt_rounds(
    what: &str,
    dir: &Path,
    out: &Path,
    args: &[&str],
    seed: u64,
    verify: &dyn Fn(&Path),
) -> (u32, u32) {
    let full = duration(args, out);
    let mut rng = Rng(seed);
    let (mut interrupted, mut finished) = (0, 0);
    for round in 0..ROUNDS {
        let _ = std::fs::remove_file(out);
        let (sig, code) = if round % 2 == 0 {
            ("INT", 130)
        } else {
            ("TERM", 143)
        };
        let mut child = spawn(args);
        // Anywhere from the start to the usual end.
        let wait = full.mul_f64(rng.below(1000) as f64 / 1000.0);
        std::thread::sleep(wait);
        kill(&child, sig);
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut stderr);
        }
        match status.code() {
            Some(0) => {
                finished += 1;
                assert!(out.exists(), "{what} round {round}: exit 0 without an output");
                verify(out);
            }
            Some(c) => {
                assert_eq!(
                    c, code,
                    "{what} round {round} (SIG{sig} after {wait:?}): {stderr}"
                );
                interrupted += 1;
                if out.exists() {
                    // Interrupted after the complete output was renamed into place.
                    verify(out);
                }
            }
            // Killed by the signal itself: it arrived before the handler was installed, which
            // happens before any output is made.
            None => {
                let signo = if sig == "INT" { 2 } else { 15 };
                assert_eq!(status.signal(), Some(signo), "{what} round {round}: {status}");
                interrupted += 1;
                assert!(!out.exists());
            }
        }
        assert_eq!(
            leftovers(dir),
            Vec::<String>::new(),
            "{what} round {round}: SIG{sig} after {wait:?} left temporaries ({status})"
        );
    }
    eprintln!("{what}: {interrupted} interrupted, {finished} finished (a full run takes {full:?})");
    (interrupted, finished)
}

#[test]
fn convert_interrupted_leaves_nothing() {
    let d = Dir::new();
    let src = d.path("src.raw");
    data_file(&src, 96 << 20, 1);
    let out = d.path("out.dir");
    std::fs::create_dir(&out).unwrap();
    let dst = out.join("dst.qcow2");
    let (interrupted, _) = interrupt_rounds(
        "convert",
        &out,
        &dst,
        &["convert", "-O", "qcow2", &d.s("src.raw"), dst.to_str().unwrap()],
        11,
        &|out| {
            tool_ok(
                "qemu-img",
                &["compare", "-f", "raw", &d.s("src.raw"), out.to_str().unwrap()],
            );
        },
    );
    assert!(interrupted >= ROUNDS as u32 / 4, "too few runs were interrupted");
}

#[test]
fn flatten_interrupted_leaves_nothing() {
    let d = Dir::new();
    data_file(&d.path("base.raw"), 64 << 20, 2);
    diskkit_ok(&["layer", "create", "--parent", &d.s("base.raw"), &d.s("top.asif")]);
    data_file(&d.path("chunk"), 16 << 20, 3);
    diskkit_ok(&[
        "write",
        &d.s("top.asif"),
        "--offset",
        "8M",
        "--from",
        &d.s("chunk"),
    ]);
    let out = d.path("out.dir");
    std::fs::create_dir(&out).unwrap();
    let dst = out.join("flat.asif");
    let (interrupted, _) = interrupt_rounds(
        "flatten",
        &out,
        &dst,
        &["flatten", "-O", "asif", &d.s("top.asif"), dst.to_str().unwrap()],
        12,
        &|out| {
            diskkit_ok(&["compare", &d.s("top.asif"), out.to_str().unwrap()]);
        },
    );
    assert!(interrupted >= ROUNDS as u32 / 4, "too few runs were interrupted");
}

#[test]
fn unpack_interrupted_leaves_nothing() {
    let d = Dir::new();
    let tree = d.path("tree");
    std::fs::create_dir_all(tree.join("data")).unwrap();
    for i in 0..8u64 {
        data_file(&tree.join(format!("data/f{i}")), 10 << 20, 20 + i);
    }
    tool_ok("tar", &["-C", &d.s("tree"), "-cf", &d.s("layer.tar"), "."]);
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../diskkit-oci/tests/fixtures");
    tool_ok(
        "bash",
        &[
            &format!("{fixtures}/mkoci-layout.sh"),
            &d.s("lay"),
            "v1",
            &d.s("layer.tar"),
        ],
    );
    let out = d.path("out.dir");
    std::fs::create_dir(&out).unwrap();
    let dst = out.join("root.img");
    let (interrupted, _) = interrupt_rounds(
        "unpack",
        &out,
        &dst,
        &["unpack", &format!("{}:v1", d.s("lay")), dst.to_str().unwrap()],
        13,
        &|out| {
            tool_ok("e2fsck", &["-fn", out.to_str().unwrap()]);
        },
    );
    assert!(interrupted >= ROUNDS as u32 / 4, "too few runs were interrupted");
}

/// After a SIGKILL the temporary stays (nothing can run in the killed process); the next run
/// writing in that directory removes it, and leaves alone every file that is not a diskkit
/// temporary, and the temporaries of a diskkit that is still running.
#[test]
fn temporaries_of_a_killed_run_are_removed_by_the_next_one() {
    let d = Dir::new();
    data_file(&d.path("src.raw"), 96 << 20, 4);
    let out = d.path("out.dir");
    std::fs::create_dir(&out).unwrap();
    let dst = out.join("a.qcow2");
    let mut child = spawn(&["convert", "-O", "qcow2", &d.s("src.raw"), dst.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !leftovers(&out).iter().any(|n| n.ends_with(".tmp")) {
        assert!(Instant::now() < deadline, "no temporary appeared");
        assert!(
            child.try_wait().unwrap().is_none(),
            "convert ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(&child, "KILL");
    child.wait().unwrap();
    let debris = leftovers(&out);
    assert_eq!(debris.len(), 1, "{debris:?}");
    assert!(!dst.exists());

    // Things that must survive: other names, a symlink with a temporary's name, and the
    // temporary of a run that is alive (a process holding its lock).
    let hex = "0123456789abcdef0123456789abcdef";
    let keep = [
        format!("a.qcow2.diskkit-{hex}.tmp"),
        format!(".a.qcow2.diskkit-{hex}.tmp.bak"),
        ".a.qcow2.something.tmp".to_string(),
        "notes.txt".to_string(),
    ];
    for k in &keep {
        std::fs::write(out.join(k), b"not diskkit's").unwrap();
    }
    let link = out.join(format!(".b.qcow2.diskkit-{}.tmp", "1".repeat(32)));
    std::os::unix::fs::symlink("notes.txt", &link).unwrap();
    let alive = out.join(format!(".c.qcow2.diskkit-{}.tmp", "2".repeat(32)));
    std::fs::write(&alive, b"being written").unwrap();
    let mut holder = Command::new("flock")
        .args(["-s", alive.to_str().unwrap(), "sleep", "60"])
        .spawn()
        .expect("flock (util-linux)");
    std::thread::sleep(Duration::from_millis(300));

    // The next run in the directory.
    diskkit_ok(&[
        "convert",
        "-O",
        "qcow2",
        &d.s("src.raw"),
        out.join("b.qcow2").to_str().unwrap(),
    ]);
    let mut left = leftovers(&out);
    left.retain(|n| !keep.contains(n));
    let alive_name = alive.file_name().unwrap().to_string_lossy().into_owned();
    let link_name = link.file_name().unwrap().to_string_lossy().into_owned();
    let mut expect = vec![alive_name, link_name];
    expect.sort();
    assert_eq!(
        left, expect,
        "the killed run's temporary was not removed, or others were"
    );
    for k in &keep {
        assert_eq!(std::fs::read(out.join(k)).unwrap(), b"not diskkit's");
    }
    assert!(out.join("b.qcow2").exists());
    let _ = holder.kill();
    let _ = holder.wait();
}
