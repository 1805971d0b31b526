//! `diskkit cache` as separate processes: eight concurrent fetches download once, a failed
//! fetch hands its error to the ones waiting, SIGKILL at random moments of fetch, instance,
//! release and gc leaves a cache the next command repairs, and gc racing instance never
//! removes a referenced entry.

#[path = "../../diskkit-deliver/tests/support/mod.rs"]
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{Fault, FaultProxy, Nginx, Rng};

fn diskkit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_diskkit"))
}

fn cache_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut c = diskkit();
    c.arg("cache").arg("--dir").arg(dir).args(args);
    c
}

fn run(dir: &Path, args: &[&str]) -> Output {
    cache_cmd(dir, args).output().unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = run(dir, args);
    assert!(
        out.status.success(),
        "diskkit cache {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bundle of a 128 MiB disk with `data_mib` MiB of random data, in `www`; returns its
/// path and the source disk's path.
fn make_bundle(www: &Path, name: &str, data_mib: u64, seed: u64) -> (PathBuf, PathBuf) {
    let raw = www.join(format!("{name}.raw"));
    let data: Vec<(u64, u64)> = (0..data_mib).map(|i| (i * (2 << 20), 1 << 20)).collect();
    support::sparse_disk(&raw, 128 << 20, &data, seed);
    let out = www.join(name);
    let st = diskkit()
        .args(["bundle", "create", "-q", "--level", "1"])
        .arg(&raw)
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    (out, raw)
}

fn same_disk(a: &Path, b: &Path) {
    support::sh(
        Path::new("/"),
        &format!(
            "qemu-img compare -q -f raw -F raw '{}' '{}'",
            a.display(),
            b.display()
        ),
    );
}

#[test]
fn eight_concurrent_fetches_download_once() {
    let www = tempfile::tempdir().unwrap();
    let (bundle, raw) = make_bundle(www.path(), "img.tar.zst", 40, 1);
    let size = fs::metadata(&bundle).unwrap().len();
    let nginx = Nginx::start(www.path());
    // Throttled so that all eight are running while the one download is under way.
    let proxy = FaultProxy::start(nginx.port, &[]);
    proxy.set_default(Fault::Throttle(size / 2));
    let c = tempfile::tempdir().unwrap();
    let url = proxy.url("img.tar.zst");
    let start = Instant::now();
    let children: Vec<Child> = (0..8)
        .map(|_| {
            cache_cmd(c.path(), &["fetch", "img", &url])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let spawned = start.elapsed();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|ch| ch.wait_with_output().unwrap())
        .collect();
    assert!(
        spawned < Duration::from_secs(1),
        "the fetches did not overlap ({spawned:?})"
    );
    for o in &outs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let lines: Vec<String> = outs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect();
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("fetched img")).count(),
        1,
        "{lines:?}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("cached img")).count(),
        7,
        "{lines:?}"
    );
    // Everyone saw the same entry (the same digest and path).
    let tails: std::collections::HashSet<&str> = lines
        .iter()
        .map(|l| {
            l.split_once(':')
                .unwrap()
                .1
                .split(", downloaded")
                .next()
                .unwrap()
                .trim_end_matches([')', '\n'])
        })
        .collect();
    assert_eq!(tails.len(), 1, "{lines:?}");
    let reqs = nginx.requests_for("img.tar.zst");
    assert_eq!(reqs, vec![(200, size)], "exactly one download");
    let entry = c.path().join("entries/img");
    same_disk(&raw, &entry.join("disk.img"));
    let ls: serde_json::Value = serde_json::from_str(&ok(c.path(), &["ls", "--output", "json"])).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["id"], "img");
    assert_eq!(
        ls[0]["sha256"].as_str().unwrap(),
        support::sh(www.path(), "sha256sum img.tar.zst")
            .split_whitespace()
            .next()
            .unwrap()
    );
}

#[test]
fn a_failed_fetch_hands_its_error_to_the_waiting_ones() {
    let www = tempfile::tempdir().unwrap();
    // A bundle with an extra member: downloaded once (slowly), refused by everyone.
    let d = www.path().join("bad");
    fs::create_dir(&d).unwrap();
    support::sparse_disk(&d.join("disk.img"), 32 << 20, &[(0, 8 << 20)], 3);
    support::sh(&d, "qemu-img create -q -f qcow2 -F raw -b disk.img layer.qcow2 && echo '{\"version\":1}' > machine.json && head -c 4096 /dev/urandom > extra");
    let b = www.path().join("bad.tar.zst");
    support::gnu_bundle(&d, &["disk.img", "layer.qcow2", "machine.json", "extra"], &b);
    let size = fs::metadata(&b).unwrap().len();
    let nginx = Nginx::start(www.path());
    let proxy = FaultProxy::start(nginx.port, &[]);
    proxy.set_default(Fault::Throttle(size));
    let c = tempfile::tempdir().unwrap();
    let url = proxy.url("bad.tar.zst");
    let children: Vec<Child> = (0..4)
        .map(|_| {
            cache_cmd(c.path(), &["fetch", "bad", &url])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|ch| ch.wait_with_output().unwrap())
        .collect();
    for o in &outs {
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.starts_with("diskkit: error: ") && err.contains("extra"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    let waited = outs
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stderr).contains("concurrent fetch"))
        .count();
    assert!(waited >= 1, "some fetches waited for the first one's result");
    assert_eq!(nginx.requests_for("bad.tar.zst").len(), 1);
    // Nothing half-made.
    assert!(support::tree(&c.path().join("entries")).is_empty());
    assert!(support::tree(&c.path().join("tmp")).is_empty());
    assert!(support::tree(&c.path().join("partial")).is_empty());
    // A later fetch tries again by itself (and fails again, on its own).
    assert_eq!(
        run(c.path(), &["fetch", "bad", &nginx.url("bad.tar.zst")])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(nginx.requests_for("bad.tar.zst").len(), 2);
}

/// Check the cache's invariants after a repair (`gc` without limits).
fn check_consistent(c: &Path) {
    ok(c, &["gc"]);
    assert!(
        support::tree(&c.join("tmp")).is_empty(),
        "tmp: {:?}",
        support::tree(&c.join("tmp"))
    );
    assert!(support::tree(&c.join("trash")).is_empty());
    let ls: serde_json::Value = serde_json::from_str(&ok(c, &["ls", "--output", "json"])).unwrap();
    let listed: Vec<String> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    let mut dirs: Vec<String> = fs::read_dir(c.join("entries"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert_eq!(listed, dirs, "every entry directory is listed");
    for e in ls.as_array().unwrap() {
        let dir = PathBuf::from(e["path"].as_str().unwrap());
        let disk = fs::metadata(dir.join("disk.img")).unwrap();
        assert_eq!(disk.len(), e["disk_size"].as_u64().unwrap());
        fs::metadata(dir.join("machine.json")).unwrap();
        support::tool_ok(
            "qemu-img",
            &["check", "-q", dir.join("layer.qcow2").to_str().unwrap()],
        );
        for f in fs::read_dir(&dir).unwrap() {
            let name = f.unwrap().file_name().to_string_lossy().into_owned();
            if let Some(inst) = name
                .strip_prefix("instance-")
                .and_then(|n| n.strip_suffix(".qcow2"))
            {
                let r: serde_json::Value =
                    serde_json::from_slice(&fs::read(c.join("refs").join(format!("{inst}.json"))).unwrap())
                        .unwrap();
                assert_eq!(r["id"], e["id"]);
                assert_eq!(r["complete"], true);
                support::tool_ok("qemu-img", &["check", "-q", dir.join(&name).to_str().unwrap()]);
            }
        }
    }
    for r in fs::read_dir(c.join("refs")).unwrap() {
        let p = r.unwrap().path();
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        let id = v["id"].as_str().unwrap();
        let name = v["name"].as_str().unwrap();
        assert!(
            c.join("entries")
                .join(id)
                .join(format!("instance-{name}.qcow2"))
                .exists(),
            "{p:?}"
        );
    }
    for p in fs::read_dir(c.join("partial")).unwrap() {
        let name = p.unwrap().file_name().to_string_lossy().into_owned();
        let id = name.trim_end_matches(".json").trim_end_matches(".part");
        assert!(
            !c.join("entries").join(id).exists(),
            "partial {name} of a complete entry"
        );
    }
}

#[test]
fn sigkill_at_random_moments_leaves_a_consistent_cache() {
    let www = tempfile::tempdir().unwrap();
    let (bundle, raw) = make_bundle(www.path(), "k.tar.zst", 24, 5);
    let size = fs::metadata(&bundle).unwrap().len();
    let nginx = Nginx::start(www.path());
    let proxy = FaultProxy::start(nginx.port, &[]);
    proxy.set_default(Fault::Throttle(size));
    let url = proxy.url("k.tar.zst");
    let c = tempfile::tempdir().unwrap();
    let c = c.path();
    let local = bundle.to_str().unwrap().to_string();
    let mut rng = Rng(0x5eed);
    let mut names: Vec<String> = Vec::new();
    let mut kills = std::collections::BTreeMap::<&str, u32>::new();
    let mut round = 0;
    // At least 30 processes killed mid-way (most rounds kill one; a few finish first).
    while kills.values().sum::<u32>() < 30 && round < 200 {
        round += 1;
        // Keep a local entry for instances and gc to work on.
        if !c.join("entries/base").exists() {
            ok(c, &["fetch", "base", &local]);
        }
        let name = format!("vm{round}");
        let (args, what): (Vec<String>, &str) = match rng.below(5) {
            0 | 1 => {
                if c.join("entries/k").exists() {
                    ok(c, &["rm", "k"]);
                }
                (vec!["fetch".into(), "k".into(), url.clone()], "fetch")
            }
            2 => (
                vec!["instance".into(), "base".into(), "--name".into(), name.clone()],
                "instance",
            ),
            3 if !names.is_empty() => {
                let n = names.remove(rng.below(names.len() as u64) as usize);
                (vec!["release".into(), n], "release")
            }
            _ => (vec!["gc".into(), "--max-size".into(), "0".into()], "gc"),
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut child = cache_cmd(c, &args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = match what {
            "fetch" => rng.below(900),
            _ => rng.below(60),
        };
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let status = child.wait().unwrap();
        if status.code().is_none() {
            *kills.entry(what).or_default() += 1;
        }
        if what == "instance" {
            names.push(name);
        }
        check_consistent(c);
        // Names of instances that were never completed are free again.
        names.retain(|n| c.join("refs").join(format!("{n}.json")).exists());
    }
    eprintln!("{round} rounds, processes killed mid-way: {kills:?}");
    assert!(kills.values().sum::<u32>() >= 30, "{kills:?}");
    assert!(kills.get("fetch").copied().unwrap_or(0) >= 10, "{kills:?}");
    // The next fetch completes, resuming what the killed ones downloaded.
    proxy.set_default(Fault::None);
    ok(c, &["fetch", "k", &url]);
    same_disk(&raw, &c.join("entries/k/disk.img"));
    check_consistent(c);
    let reqs = nginx.requests_for("k.tar.zst");
    assert!(
        reqs.iter().any(|r| r.0 == 206),
        "a download was resumed: {reqs:?}"
    );
}

#[test]
fn gc_racing_instance_never_removes_a_referenced_entry() {
    let www = tempfile::tempdir().unwrap();
    let (bundle, _) = make_bundle(www.path(), "g.tar.zst", 4, 9);
    let c = tempfile::tempdir().unwrap();
    let c = c.path();
    let src = bundle.to_str().unwrap();
    let mut made = 0;
    let mut refused = 0;
    for i in 0..24 {
        if !c.join("entries/g").exists() {
            ok(c, &["fetch", "-q", "g", src]);
        }
        let name = format!("vm{i}");
        let inst = cache_cmd(c, &["instance", "g", "--name", &name])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let gc = cache_cmd(c, &["gc", "--max-size", "0", "--output", "json"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let inst = inst.wait_with_output().unwrap();
        let gc = gc.wait_with_output().unwrap();
        assert!(gc.status.success());
        if inst.status.success() {
            made += 1;
            let disk = PathBuf::from(String::from_utf8_lossy(&inst.stdout).trim());
            assert!(
                disk.exists(),
                "round {i}: gc removed an entry with a live instance"
            );
            support::tool_ok("qemu-img", &["check", "-q", disk.to_str().unwrap()]);
            // Still referenced: another gc leaves it, rm refuses.
            ok(c, &["gc", "--max-size", "0"]);
            assert!(disk.exists());
            let rm = run(c, &["rm", "g"]);
            assert_eq!(rm.status.code(), Some(2));
            assert!(String::from_utf8_lossy(&rm.stderr).contains(&name));
            ok(c, &["release", &name]);
            assert!(!disk.exists());
        } else {
            refused += 1;
            let err = String::from_utf8_lossy(&inst.stderr);
            assert!(err.contains("not in the cache"), "round {i}: {err}");
        }
        check_consistent(c);
    }
    assert!(made > 0, "no instance was made in 24 rounds");
    eprintln!("{made} instances made, {refused} refused (gc won the race)");
}

#[test]
fn dead_holders_release_their_references() {
    let www = tempfile::tempdir().unwrap();
    let (bundle, _) = make_bundle(www.path(), "h.tar.zst", 2, 11);
    let c = tempfile::tempdir().unwrap();
    let c = c.path();
    ok(c, &["fetch", "-q", "h", bundle.to_str().unwrap()]);
    // A holder that exits: its reference no longer counts, and gc removes the instance.
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let pid = sleeper.id().to_string();
    let disk = PathBuf::from(ok(c, &["instance", "h", "--name", "short", "--pid", &pid]).trim());
    let persistent = PathBuf::from(ok(c, &["instance", "h", "--name", "long", "--persistent"]).trim());
    let ls: serde_json::Value = serde_json::from_str(&ok(c, &["ls", "--output", "json"])).unwrap();
    assert_eq!(ls[0]["references"], serde_json::json!(["long", "short"]));
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let ls: serde_json::Value = serde_json::from_str(&ok(c, &["ls", "--output", "json"])).unwrap();
    assert_eq!(ls[0]["references"], serde_json::json!(["long"]));
    ok(c, &["gc"]);
    assert!(!disk.exists() && persistent.exists());
    assert!(!c.join("refs/short.json").exists());
    // A name in use is refused; the persistent one keeps the entry until released.
    let again = run(c, &["instance", "h", "--name", "long"]);
    assert_eq!(again.status.code(), Some(2));
    assert_eq!(run(c, &["rm", "h"]).status.code(), Some(2));
    ok(c, &["release", "long"]);
    let rm = ok(c, &["rm", "h"]);
    assert!(rm.starts_with("removed h"), "{rm}");
    assert!(support::tree(&c.join("entries")).is_empty());
    // Unknown names and IDs: clear errors.
    let e = run(c, &["release", "nope"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("no instance named 'nope'"));
    let e = run(c, &["instance", "missing"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("fetch it first"));
    let e = run(c, &["fetch", "../x", "y"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("invalid cache ID"));
}
