//! `diskkit boot --instance`: an image cache instance (`diskkit cache instance`) booted with
//! its machine definition, its writes kept in its own overlay, its entry kept by the cache
//! while the VM runs. One real boot (the Debian fixture, bundled and fetched into a cache)
//! and `--dry-run` checks on a small disk with the host's kernel.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::boot_fixture::{layout, run, sha256};
use super::support::{diskkit_bin, Dir};
use super::{s, text, wait_for_qemu, Boot};

/// The machine definition of the tests' bundles: 1536 MiB, 3 CPUs (1 thread × 3 cores × 1
/// socket), a locally administered MAC; all different from `boot`'s defaults (2G, 2, QEMU's).
const MACHINE: &str = r#"{"version":1,"memory":1536,"threads":1,"cores":3,"sockets":1,"mac":"aa:54:1a:30:5c:de","network":"e1000","chipset":"pc-i440fx-2.8"}"#;
const MAC: &str = "aa:54:1a:30:5c:de";

fn cache(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(diskkit_bin())
        .arg("cache")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    eprintln!("diskkit cache {args:?}: {}\n{}", out.status, text(&out.stderr));
    out
}

fn cache_ok(dir: &Path, args: &[&str]) -> String {
    let out = cache(dir, args);
    assert!(
        out.status.success(),
        "diskkit cache {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn cache_ls(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&cache_ok(dir, &["ls", "--output", "json"])).unwrap()
}

/// Bundle the RAW disk `raw` with [`MACHINE`] and fetch it into a new cache under `id`;
/// returns the cache directory (canonical, as the cache hands out paths).
fn cache_with(d: &Dir, raw: &Path, id: &str) -> PathBuf {
    fs::write(d.path("machine.json"), MACHINE).unwrap();
    let bundle = d.path("image.tar.zst");
    run(Command::new(diskkit_bin())
        .args(["bundle", "create", "-q", "--level", "1", "--machine"])
        .arg(d.path("machine.json"))
        .arg(raw)
        .arg(&bundle));
    let dir = d.path("cache");
    cache_ok(&dir, &["fetch", "-q", id, &s(&bundle)]);
    fs::canonicalize(&dir).unwrap()
}

/// The value after `flag` in a QEMU argument list.
fn after<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} in {args:?}"));
    &args[i + 1]
}

fn dry_json(b: &Boot, args: &[&str]) -> (serde_json::Value, Vec<String>) {
    let mut all = vec!["--dry-run", "--output", "json"];
    all.extend_from_slice(args);
    let out = b.run(&all);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let qemu_args = j["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    (j, qemu_args)
}

/// A small bootable-looking disk: ext4 with the host's kernel and a stand-in initramfs
/// (enough for --dry-run, which starts nothing).
fn small_disk(d: &Dir) -> PathBuf {
    let tree = d.path("tree");
    fs::create_dir_all(tree.join("boot")).unwrap();
    let kernel = fs::read_dir("/boot")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("vmlinuz-"))
        .expect("a kernel in /boot");
    fs::copy(&kernel, tree.join("boot/vmlinuz-6.1.0-test")).unwrap();
    fs::write(tree.join("boot/initrd.img-6.1.0-test"), b"initrd").unwrap();
    let img = d.path("small.raw");
    fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&img));
    img
}

/// `--instance` with `--dry-run`: memory, CPUs and MAC from the instance's machine.json
/// (its own copy, which may be edited), each explicit flag winning over it; the instance's
/// overlay is the writable layer (kept, flushes passed on) over the entry's layer.qcow2 and
/// disk.img, read-only; the cache is not marked. Unknown, released and conflicting
/// instances are one-line errors.
#[test]
fn instance_dry_run_takes_its_machine_definition_and_flags_win() {
    let d = Dir::new();
    let raw = small_disk(&d);
    let c = cache_with(&d, &raw, "tiny");
    let overlay = PathBuf::from(cache_ok(&c, &["instance", "tiny", "--name", "vm1", "--persistent"]).trim());
    let entry = c.join("entries/tiny");
    assert_eq!(overlay, entry.join("instance-vm1.qcow2"));
    let b = Boot::new();
    let cdir = s(&c);
    let base = ["--instance", "vm1", "--cache-dir", cdir.as_str()];

    let (j, args) = dry_json(&b, &base);
    assert_eq!(after(&args, "-m"), "1536");
    assert_eq!(after(&args, "-smp"), "3");
    assert!(
        args.iter()
            .any(|a| a.starts_with("virtio-net-pci,") && a.ends_with(&format!(",mac={MAC}"))),
        "{args:?}"
    );
    assert_eq!(j["memory_mib"], 1536);
    assert_eq!(j["cpus"], 3);
    assert_eq!(j["mac"], MAC);
    assert_eq!(
        j["machine_from_definition"],
        serde_json::json!(["memory", "cpus", "mac"])
    );
    assert_eq!(j["instance"]["name"], "vm1");
    assert_eq!(j["instance"]["id"], "tiny");
    assert_eq!(j["instance"]["machine_path"], s(&entry.join("instance-vm1.json")));
    assert_eq!(j["overlay"], s(&overlay));
    assert_eq!(j["persist"], true);
    assert_eq!(
        j["root_layers"],
        serde_json::json!([
            [s(&entry.join("disk.img")), "raw"],
            [s(&entry.join("layer.qcow2")), "qcow2"]
        ])
    );
    // QEMU's graph: the entry's files read-only, the instance's overlay on top, writable,
    // with the guest's flushes passed on.
    let blockdevs: Vec<serde_json::Value> = args
        .iter()
        .enumerate()
        .filter(|(i, _)| *i > 0 && args[i - 1] == "-blockdev")
        .map(|(_, a)| serde_json::from_str(a).unwrap())
        .collect();
    let file_node = |path: &Path| {
        blockdevs
            .iter()
            .find(|b| b["driver"] == "file" && b["filename"] == s(path))
            .unwrap_or_else(|| panic!("{} in {blockdevs:?}", path.display()))
            .clone()
    };
    assert_eq!(file_node(&entry.join("disk.img"))["read-only"], true);
    assert_eq!(file_node(&entry.join("layer.qcow2"))["read-only"], true);
    let top = file_node(&overlay);
    assert_eq!(top["cache"]["no-flush"], false);
    assert!(top.get("read-only").is_none_or(|r| r == false), "{top}");
    let root = blockdevs.iter().find(|b| b["node-name"] == "root").unwrap();
    assert_eq!(
        (root["driver"].as_str(), root["file"].as_str()),
        (Some("qcow2"), top["node-name"].as_str())
    );
    // A dry run does not mark the instance in use.
    assert_eq!(cache_ls(&c)[0]["in_use"], serde_json::json!([]));

    // Explicit flags win, each on its own.
    let (j, args) = dry_json(
        &b,
        &[
            &base[..],
            &["--memory", "3G", "--cpus", "4", "--mac", "52:54:00:ab:cd:ef"],
        ]
        .concat(),
    );
    assert_eq!((after(&args, "-m"), after(&args, "-smp")), ("3072", "4"));
    assert!(
        args.iter().any(|a| a.ends_with(",mac=52:54:00:ab:cd:ef")),
        "{args:?}"
    );
    assert_eq!(j["machine_from_definition"], serde_json::json!([]));
    let (j, args) = dry_json(&b, &[&base[..], &["--cpus", "1"]].concat());
    assert_eq!((after(&args, "-m"), after(&args, "-smp")), ("1536", "1"));
    assert_eq!(j["machine_from_definition"], serde_json::json!(["memory", "mac"]));
    // The instance's own copy of the definition counts (the entry's is not read).
    fs::write(
        entry.join("instance-vm1.json"),
        r#"{"version":1,"memory":2560,"mac":"02:00:00:00:00:07"}"#,
    )
    .unwrap();
    let out = b.run(&[&base[..], &["--dry-run"]].concat());
    let human = text(&out.stdout);
    assert!(
        human.contains(&format!(
            "# machine: 2560 MiB, 2 CPUs, MAC 02:00:00:00:00:07 (memory, mac from '{}')",
            s(&entry.join("instance-vm1.json"))
        )),
        "{human}"
    );
    assert!(
        human.contains(&format!("# overlay: {} (the instance's, kept)", s(&overlay))),
        "{human}"
    );

    // Errors: one line, exit 2, nothing booted.
    let one_line = |out: &Output, want: &str| {
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(want), "expected '{want}' in: {err}");
    };
    fs::write(entry.join("instance-vm1.json"), r#"{"version":1,"memory":32}"#).unwrap();
    one_line(
        &b.run(&[&base[..], &["--dry-run"]].concat()),
        "asks for 32 MiB of memory; a guest needs at least 64 MiB: give --memory",
    );
    assert!(b
        .run(&[&base[..], &["--dry-run", "--memory", "1G"]].concat())
        .status
        .success());
    one_line(
        &b.run(&["--dry-run", "--instance", "nope", "--cache-dir", &cdir]),
        &format!("no instance named 'nope' in the cache '{cdir}'"),
    );
    one_line(
        &b.run(&["--dry-run", "--instance", "vm1", "--cache-dir", &d.s("no-cache")]),
        "is not an image cache",
    );
    one_line(
        &b.run(&["--dry-run", "--instance", "../x", "--cache-dir", &cdir]),
        "invalid instance name '../x'",
    );
    // A released instance (its holder exited) is not booted: the next gc removes it.
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    cache_ok(
        &c,
        &[
            "instance",
            "tiny",
            "--name",
            "gone",
            "--pid",
            &sleeper.id().to_string(),
        ],
    );
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    one_line(
        &b.run(&["--dry-run", "--instance", "gone", "--cache-dir", &cdir]),
        "instance 'gone' is released: its holder (process",
    );
    // Arguments that do not go with --instance.
    let raw_s = s(&raw);
    for (extra, want) in [
        (vec!["--persist", "x.qcow2"], "--persist"),
        (vec![raw_s.as_str()], "[SOURCE]"),
        (vec!["-f", "raw"], "--image-format does not apply to --instance"),
    ] {
        let out = b.run(&[&base[..], &["--dry-run"], &extra[..]].concat());
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "expected '{want}' in: {err}");
    }
    let out = b.run(&["--dry-run", "--cache-dir", &cdir, &s(&raw)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--instance"), "{}", text(&out.stderr));
    b.assert_clean();
}

/// A cache instance booted for real: the guest sees the memory, CPU count and MAC address
/// of the instance's machine.json; while the VM runs, a second boot of the instance and
/// `release` are refused, and once the instance's holder has exited, gc still keeps the
/// entry and rm refuses it (the boot holds it); the guest's file is in the instance's
/// overlay afterwards and not in the entry's shared files, which are unchanged; after the VM
/// has stopped the dead holder's instance goes at the next gc.
#[test]
fn cache_instance_boots_with_its_machine_and_keeps_its_writes() {
    let d = Dir::new();
    let raw = d.path("root.raw");
    run(Command::new(diskkit_bin())
        .args(["unpack", "--size", "2G"])
        .arg(layout())
        .arg(&raw));
    let c = cache_with(&d, &raw, "deb");
    fs::remove_file(&raw).unwrap();
    let entry = c.join("entries/deb");
    let shared = [entry.join("disk.img"), entry.join("layer.qcow2")];
    let before: Vec<String> = shared.iter().map(|p| sha256(p)).collect();
    let mut holder = Command::new("sleep").arg("3600").spawn().unwrap();
    let overlay = PathBuf::from(
        cache_ok(
            &c,
            &[
                "instance",
                "deb",
                "--name",
                "vm1",
                "--pid",
                &holder.id().to_string(),
            ],
        )
        .trim(),
    );
    let script = "awk '/^MemTotal:/ {print \"mem\", $2}' /proc/meminfo; \
        echo cpus $(nproc); \
        for n in /sys/class/net/*; do [ \"${n##*/}\" = lo ] || echo mac $(cat $n/address); done; \
        echo written by the guest > /root/from-the-guest; sync";
    let b = Boot::new();
    let cdir = s(&c);
    let vm = b
        .command(&[
            "--instance",
            "vm1",
            "--cache-dir",
            &cdir,
            "--",
            "sh",
            "-c",
            script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // QEMU is started after the instance is marked in use.
    wait_for_qemu(&b, Duration::from_secs(300));
    let ls = cache_ls(&c);
    assert_eq!(ls[0]["references"], serde_json::json!(["vm1"]));
    assert_eq!(ls[0]["in_use"], serde_json::json!(["vm1"]));
    let second = b.run(&["--dry-run", "--instance", "vm1", "--cache-dir", &cdir]);
    assert_eq!(second.status.code(), Some(2));
    assert!(
        text(&second.stderr).contains("is in use by a running VM"),
        "{}",
        text(&second.stderr)
    );
    let release = cache(&c, &["release", "vm1"]);
    assert_eq!(release.status.code(), Some(2));
    assert!(
        text(&release.stderr).contains("in use by a running VM"),
        "{}",
        text(&release.stderr)
    );
    // The instance's holder exits: the running VM keeps the entry.
    holder.kill().unwrap();
    holder.wait().unwrap();
    let gc: serde_json::Value =
        serde_json::from_str(&cache_ok(&c, &["gc", "--max-size", "0", "--output", "json"])).unwrap();
    assert_eq!(gc["removed"], serde_json::json!([]), "{gc}");
    assert_eq!(gc["referenced"], serde_json::json!(["deb"]), "{gc}");
    let rm = cache(&c, &["rm", "deb"]);
    assert_eq!(rm.status.code(), Some(2));
    assert!(
        text(&rm.stderr).contains("referenced by instance(s) vm1"),
        "{}",
        text(&rm.stderr)
    );
    assert!(overlay.is_file());

    let out = vm.wait_with_output().unwrap();
    eprintln!("--- boot stderr:\n{}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    eprintln!("--- boot stdout:\n{stdout}");
    let field = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k} ")))
            .unwrap_or_else(|| panic!("no '{k}' in {stdout}"))
            .to_owned()
    };
    // 1536 MiB less what the firmware and kernel keep; the defaults would be 2 GiB.
    let mem_kib: u64 = field("mem").parse().unwrap();
    assert!(
        (1300 << 10..=1536 << 10).contains(&mem_kib),
        "MemTotal {mem_kib} kB"
    );
    assert_eq!(field("cpus"), "3");
    assert_eq!(field("mac"), MAC);
    b.assert_clean();
    // The guest's write is in the instance's overlay (QEMU's check passes), not in the shared
    // files, which are unchanged.
    run(Command::new("qemu-img")
        .args(["check", "-q", "-f", "qcow2"])
        .arg(&overlay));
    let cat = |img: &Path| {
        Command::new(diskkit_bin())
            .arg("cat")
            .arg(format!("{}:/root/from-the-guest", s(img)))
            .output()
            .unwrap()
    };
    let from_instance = cat(&overlay);
    assert!(from_instance.status.success(), "{}", text(&from_instance.stderr));
    assert_eq!(text(&from_instance.stdout), "written by the guest\n");
    let from_layer = cat(&entry.join("layer.qcow2"));
    assert!(
        !from_layer.status.success(),
        "the shared layer has the guest's file"
    );
    let after: Vec<String> = shared.iter().map(|p| sha256(p)).collect();
    assert_eq!(after, before, "the entry's shared files changed");
    // The VM has stopped and the holder is dead: nothing keeps the entry now.
    assert_eq!(cache_ls(&c)[0]["references"], serde_json::json!([]));
    let gc: serde_json::Value =
        serde_json::from_str(&cache_ok(&c, &["gc", "--max-size", "0", "--output", "json"])).unwrap();
    assert_eq!(gc["removed"], serde_json::json!(["deb"]), "{gc}");
    assert!(!overlay.exists());
}
