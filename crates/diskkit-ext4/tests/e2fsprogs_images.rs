//! e2fsprogs' own regression images (`tests/*/image.gz` of e2fsprogs 1.47.0), read by
//! diskkit's reader and compared with debugfs.
//!
//! The images come from the e2fsprogs source release (`e2fsprogs_1.47.0.orig.tar.gz`, as
//! Debian ships it: `apt-get source --download-only e2fsprogs`), whose test images are
//! distributed under the GNU GPL v2 with the rest of e2fsprogs. They are not committed:
//! `scripts/fetch-e2fsprogs-source.sh` (run by `.ci/run`) caches the tarball in
//! `target/test-cache/`, and this test reads the images straight out of it. Without the
//! tarball the test fails (set `DISKKIT_E2FSPROGS_TARBALL` to use another copy).
//!
//! For every image whose journal needs replaying, a copy gets `e2fsck -E journal_only -y`;
//! then `e2fsck -fn` runs on that copy (or on the original). Images e2fsck then calls clean must read completely, every path equal to what
//! debugfs reads from the replayed copy, with the reader replaying the journal itself in
//! memory on the original. Every other image must give the same bytes as debugfs or a clear
//! error, path by path. No image may panic or take longer than [`TIME_LIMIT`].

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use support::oracle::{compare, debugfs_tree, reader_tree};

const TIME_LIMIT: Duration = Duration::from_secs(120);

/// Images e2fsck calls clean that the reader refuses, each with the words of its refusal:
/// what is not implemented, stated plainly.
const KNOWN_REFUSALS: &[(&str, &str)] = &[(
    "j_recover_fast_commit",
    "fast-commit records to replay, which this reader does not implement",
)];

fn tarball() -> PathBuf {
    if let Some(p) = std::env::var_os("DISKKIT_E2FSPROGS_TARBALL") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-cache/e2fsprogs_1.47.0.orig.tar.gz")
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Images whose names say what they are; the rest are found by listing the tarball.
fn extract(dir: &Path) -> Vec<(String, PathBuf)> {
    let tb = tarball();
    assert!(
        tb.exists(),
        "{} is missing: run scripts/fetch-e2fsprogs-source.sh (CI does, in .ci/run)",
        tb.display()
    );
    let out = run(Command::new("tar")
        .arg("-xzf")
        .arg(&tb)
        .arg("-C")
        .arg(dir)
        .args(["--wildcards", "e2fsprogs-1.47.0/tests/*/image.gz"]));
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tests = dir.join("e2fsprogs-1.47.0/tests");
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(&tests)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("image.gz").exists())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                p.join("image.gz"),
            )
        })
        .collect();
    v.sort();
    v
}

#[derive(Debug)]
enum Outcome {
    /// Clean and identical.
    Exact(#[allow(dead_code)] usize),
    /// Not clean: how many paths matched and how many the reader refused.
    #[allow(dead_code)]
    Damaged {
        matched: usize,
        refused: usize,
        whole: Option<String>,
    },
    Failed(String),
}

/// Whether e2fsck would replay the journal: `needs_recovery`, or a journal whose log is not
/// empty (e2fsck -y replays that too).
fn needs_replay(img: &Path) -> bool {
    let out = run(Command::new("dumpe2fs").arg("-h").arg(img));
    let text = String::from_utf8_lossy(&out.stdout);
    let recover = text
        .lines()
        .any(|l| l.starts_with("Filesystem features:") && l.contains("needs_recovery"));
    let start = text
        .lines()
        .find_map(|l| l.strip_prefix("Journal start:"))
        .is_some_and(|v| v.trim() != "0");
    recover || start
}

/// `e2fsck -fn` finds nothing: exit status 0 and no line but the passes and the summary
/// (with -n, e2fsck exits 0 after some problems it only reports, such as a bad descriptor
/// checksum it was not allowed to fix).
fn fsck_clean(img: &Path) -> bool {
    // Some damaged images keep e2fsck busy for minutes; those are not clean.
    let out = run(Command::new("timeout").args(["30", "e2fsck", "-fn"]).arg(img));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines().filter(|l| !l.trim().is_empty()).peekable();
    let mut clean = out.status.code() == Some(0);
    while let Some(l) = lines.next() {
        if (l.starts_with("Pass ") && l.as_bytes().get(5).is_some_and(u8::is_ascii_digit))
            || (l.contains(" files (") && l.ends_with(" blocks"))
        {
            continue;
        }
        // Offers to make an extent tree shallower or narrower are optimisations, not errors.
        if l.contains("extent tree") && l.contains("could be") {
            if !l.ends_with("? no") && lines.peek().is_some_and(|n| n.ends_with("? no")) {
                lines.next();
            }
            continue;
        }
        clean = false;
    }
    clean
}

/// The journal inode number `dumpe2fs -h` reports.
fn journal_inode(img: &Path) -> Option<u32> {
    let out = run(Command::new("dumpe2fs").arg("-h").arg(img));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Journal inode:"))
        .and_then(|v| v.trim().parse().ok())
}

fn check_image(name: &str, gz: &Path, work: &Path) -> Outcome {
    let a = work.join(format!("{name}.img"));
    let b = work.join(format!("{name}.replayed.img"));
    let out = run(Command::new("sh").arg("-c").arg(format!(
        "gzip -dc '{}' > '{}' && cp --sparse=always '{}' '{}'",
        gz.display(),
        a.display(),
        a.display(),
        b.display()
    )));
    assert!(out.status.success());
    // The oracle is the image after e2fsck's journal replay and nothing else: when the replay
    // changed nothing, the original itself (so that no other repair e2fsck -y might make
    // leaks into it).
    let replayed = needs_replay(&a);
    let jino = journal_inode(&a);
    if replayed {
        run(Command::new("timeout")
            .args(["30", "e2fsck", "-E", "journal_only", "-y"])
            .arg(&b));
    }
    let oracle = if replayed { &b } else { &a };
    let clean = fsck_clean(oracle);
    let theirs = debugfs_tree(oracle);
    let (tx, rx) = mpsc::channel();
    let a2 = a.clone();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(|| reader_tree(&a2));
        let _ = tx.send(r);
    });
    let ours = match rx.recv_timeout(TIME_LIMIT) {
        Ok(Ok(t)) => t,
        Ok(Err(_)) => return Outcome::Failed("the reader panicked".into()),
        Err(_) => return Outcome::Failed(format!("the reader took longer than {TIME_LIMIT:?}")),
    };
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    match ours {
        Err(e) => {
            if e.trim().is_empty() {
                return Outcome::Failed("refused with an empty message".into());
            }
            if clean {
                if KNOWN_REFUSALS
                    .iter()
                    .any(|(n, words)| *n == name && e.contains(words))
                {
                    return Outcome::Damaged {
                        matched: 0,
                        refused: theirs.len(),
                        whole: Some(e),
                    };
                }
                return Outcome::Failed(format!("clean, but the reader refused it: {e}"));
            }
            Outcome::Damaged {
                matched: 0,
                refused: theirs.len(),
                whole: Some(e),
            }
        }
        Ok(mut ours) => {
            if replayed {
                // e2fsck's journal_only pass also moves a visible old-style journal file
                // (`/journal`) into its hidden inode; the kernel and this reader show the
                // file as the replayed filesystem holds it.
                ours.retain(|p, n| theirs.contains_key(p) || !n.as_ref().is_ok_and(|n| Some(n.ino) == jino));
            }
            let c = compare(&ours, &theirs);
            if clean {
                if c.is_exact() {
                    Outcome::Exact(c.matched)
                } else {
                    Outcome::Failed(format!("clean, but: {}", c.summary()))
                }
            } else if !c.mismatches.is_empty() {
                Outcome::Failed(format!("damaged, and different bytes: {}", c.summary()))
            } else {
                Outcome::Damaged {
                    matched: c.matched,
                    refused: c.reader_errors.len() + c.missing.len(),
                    whole: None,
                }
            }
        }
    }
}

#[test]
fn e2fsprogs_regression_images() {
    let dir = tempfile::tempdir().unwrap();
    let images = extract(dir.path());
    assert!(images.len() > 150, "only {} images in the tarball", images.len());
    let filter = std::env::var("DISKKIT_E2FSPROGS_ONLY").ok();
    let todo: Vec<&(String, PathBuf)> = images
        .iter()
        .filter(|(name, _)| filter.as_ref().is_none_or(|f| name.contains(f.as_str())))
        .collect();
    // Two workers: most of the time goes to e2fsck and debugfs processes.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((name, gz)) = todo.get(i) else { break };
                let started = std::time::Instant::now();
                let outcome = check_image(name, gz, dir.path());
                eprintln!("{name} ({:.1}s): {outcome:?}", started.elapsed().as_secs_f64());
                results.lock().unwrap().push((name.clone(), outcome));
            });
        }
    });
    let mut failures = Vec::new();
    let (mut exact, mut damaged) = (0, 0);
    for (name, outcome) in results.into_inner().unwrap() {
        match outcome {
            Outcome::Exact(_) => exact += 1,
            Outcome::Damaged { .. } => damaged += 1,
            Outcome::Failed(why) => failures.push(format!("{name}: {why}")),
        }
    }
    eprintln!("{exact} clean images identical to debugfs, {damaged} damaged images read or refused cleanly");
    assert!(
        failures.is_empty(),
        "{} images failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    if filter.is_none() {
        assert!(exact >= 45, "only {exact} images compared as clean");
    }
}
