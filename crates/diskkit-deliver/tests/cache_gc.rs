//! gc's limits and order: least recently used first, never a referenced entry; --older-than,
//! --max-size and --min-free; partial downloads; repair of leftovers.

mod support;

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use diskkit_deliver::cache::{Cache, FetchOptions, GcOptions, Holder, Source};

fn fetch_local(cache: &Cache, id: &str, src: &Path) {
    cache
        .fetch(
            id,
            &Source::Path(src.to_path_buf()),
            &FetchOptions::default(),
            &mut |_| {},
        )
        .unwrap();
}

/// Make `id` look last used `age` ago.
fn age(cache: &Cache, id: &str, age: Duration) {
    let f = fs::File::options()
        .write(true)
        .open(cache.root().join("entries").join(id).join("last-use"))
        .unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

#[test]
fn gc_removes_least_recently_used_unreferenced_entries() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("disk.raw");
    support::sparse_disk(&src, 8 << 20, &[(0, 2 << 20)], 1);
    let cache = Cache::open(t.path().join("c")).unwrap();
    for id in ["a", "b", "c", "d"] {
        fetch_local(&cache, id, &src);
    }
    age(&cache, "a", Duration::from_secs(40 * 86400));
    age(&cache, "b", Duration::from_secs(20 * 86400));
    age(&cache, "c", Duration::from_secs(10 * 86400));
    // "a" (the oldest) is in use.
    let inst = cache.instance("a", Some("vm"), Holder::current()).unwrap();
    age(&cache, "a", Duration::from_secs(40 * 86400));
    let sizes: Vec<(String, u64)> = cache
        .list()
        .unwrap()
        .into_iter()
        .map(|e| (e.record.id, e.size))
        .collect();
    let total: u64 = sizes.iter().map(|s| s.1).sum();

    // Without limits: repair only.
    let r = cache.gc(&GcOptions::default()).unwrap();
    assert!(r.removed.is_empty() && r.satisfied);

    // Older than 15 days: b goes; a is referenced, so it stays.
    let r = cache
        .gc(&GcOptions {
            older_than: Some(Duration::from_secs(15 * 86400)),
            ..GcOptions::default()
        })
        .unwrap();
    assert_eq!(r.removed, vec!["b"]);
    assert_eq!(r.referenced, vec!["a"]);
    assert!(inst.disk.exists());

    // A size limit just under what is left: the least recently used unreferenced one (c)
    // goes, not d.
    let left = total - sizes.iter().find(|s| s.0 == "b").unwrap().1;
    let r = cache
        .gc(&GcOptions {
            max_size: Some(left - 1),
            ..GcOptions::default()
        })
        .unwrap();
    assert_eq!(r.removed, vec!["c"], "{r:?}");
    assert!(r.satisfied && r.size < left);

    // An impossible free-space goal: everything unreferenced goes, and it says so.
    let r = cache
        .gc(&GcOptions {
            min_free: Some(u64::MAX),
            ..GcOptions::default()
        })
        .unwrap();
    assert_eq!(r.removed, vec!["d"]);
    assert!(!r.satisfied);
    let ids: Vec<String> = cache.list().unwrap().into_iter().map(|e| e.record.id).collect();
    assert_eq!(ids, vec!["a"]);

    // Released: now it can go.
    cache.release("vm").unwrap();
    let r = cache
        .gc(&GcOptions {
            max_size: Some(0),
            ..GcOptions::default()
        })
        .unwrap();
    assert_eq!(r.removed, vec!["a"]);
    assert!(cache.list().unwrap().is_empty());
    assert!(support::tree(&cache.root().join("entries")).is_empty());
    // Lock files of removed entries are gone too.
    assert!(
        support::tree(&cache.root().join("locks")).is_empty(),
        "{:?}",
        support::tree(&cache.root().join("locks"))
    );
}

#[test]
fn repair_removes_leftovers_of_killed_commands() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("disk.raw");
    support::sparse_disk(&src, 4 << 20, &[(0, 4096)], 2);
    let root = t.path().join("c");
    let cache = Cache::open(&root).unwrap();
    fetch_local(&cache, "e", &src);
    // What a killed process can leave behind.
    fs::create_dir_all(root.join("tmp/e.123-abc/sub")).unwrap();
    fs::create_dir_all(root.join("trash/xyz")).unwrap();
    fs::write(root.join("trash/xyz/disk.img"), b"x").unwrap();
    fs::write(root.join("refs/.vm.json.tmp-999999999-abcdef"), b"{").unwrap();
    fs::write(root.join("entries/e/instance-ghost.qcow2"), b"x").unwrap();
    fs::write(root.join("entries/e/.instance-ghost.json.tmp-1-x"), b"x").unwrap();
    let incomplete = serde_json::json!({
        "name": "half", "id": "e", "holder": {"pid": std::process::id(), "start_time": 0},
        "created": 0, "nonce": "n", "complete": false
    });
    fs::write(
        root.join("refs/half.json"),
        serde_json::to_vec(&incomplete).unwrap(),
    )
    .unwrap();
    fs::write(root.join("entries/e/instance-half.qcow2"), b"x").unwrap();
    let dead = serde_json::json!({
        "name": "dead", "id": "e", "holder": {"pid": 999_999_999u32, "start_time": 1},
        "created": 0, "nonce": "m", "complete": true
    });
    fs::write(root.join("refs/dead.json"), serde_json::to_vec(&dead).unwrap()).unwrap();
    fs::write(root.join("entries/e/instance-dead.qcow2"), b"x").unwrap();

    let cache = Cache::open(&root).unwrap();
    cache.repair().unwrap();
    assert!(support::tree(&root.join("tmp")).is_empty());
    assert!(support::tree(&root.join("trash")).is_empty());
    assert!(
        support::tree(&root.join("refs")).is_empty(),
        "{:?}",
        support::tree(&root.join("refs"))
    );
    let files = support::tree(&root.join("entries/e"));
    assert_eq!(
        files,
        vec![
            "disk.img",
            "entry.json",
            "last-use",
            "layer.qcow2",
            "machine.json"
        ]
    );
    // Still a working entry.
    let i = cache.instance("e", None, Holder::current()).unwrap();
    support::tool_ok("qemu-img", &["check", "-q", i.disk.to_str().unwrap()]);
}

/// An instance in use by a running VM (`use_instance`, as `diskkit boot --instance` does)
/// keeps its entry referenced when its holder exits: gc and rm leave it, release and a
/// second use are refused; once the use ends, the dead holder's instance goes at the next gc.
/// A released instance (dead holder) is never handed out for booting.
#[test]
fn an_instance_in_use_keeps_its_entry_after_its_holder_exits() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("disk.raw");
    support::sparse_disk(&src, 4 << 20, &[(0, 1 << 20)], 3);
    let cache = Cache::open(t.path().join("c")).unwrap();
    fetch_local(&cache, "e", &src);
    let mut sleeper = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let holder = Holder::process(sleeper.id()).unwrap();
    let inst = cache.instance("e", Some("vm"), holder).unwrap();
    assert_eq!(cache.usable_instance("vm").unwrap(), inst);
    let using = cache.use_instance("vm", Holder::current()).unwrap();
    assert_eq!(using.instance(), &inst);
    let ls = cache.list().unwrap();
    assert_eq!(
        (ls[0].references.clone(), ls[0].in_use.clone()),
        (vec!["vm".to_owned()], vec!["vm".to_owned()])
    );
    // The holder exits while the VM runs: the entry stays referenced.
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let r = cache
        .gc(&GcOptions {
            max_size: Some(0),
            ..GcOptions::default()
        })
        .unwrap();
    assert!(r.removed.is_empty() && r.referenced == vec!["e"], "{r:?}");
    assert!(inst.disk.is_file());
    let e = cache.remove("e").unwrap_err();
    assert!(e.to_string().contains("referenced by instance(s) vm"), "{e}");
    let e = cache.release("vm").unwrap_err();
    assert!(e.to_string().contains("in use by a running VM"), "{e}");
    // A second VM is refused (its holder has exited too, which is said first).
    let e = cache.use_instance("vm", Holder::parent()).unwrap_err();
    assert!(e.to_string().contains("is released: its holder"), "{e}");
    // The VM stops: the mark is dropped, and the dead holder's instance goes at the next gc.
    using.finish().unwrap();
    assert!(cache.list().unwrap()[0].references.is_empty());
    let e = cache.usable_instance("vm").unwrap_err();
    assert!(e.to_string().contains("next `cache gc` removes it"), "{e}");
    let r = cache
        .gc(&GcOptions {
            max_size: Some(0),
            ..GcOptions::default()
        })
        .unwrap();
    assert_eq!(r.removed, vec!["e"]);
    assert!(!inst.disk.exists());

    // With a live holder: a second use is refused while the first lasts; a use that is
    // dropped without finish (an early return) drops its mark too.
    fetch_local(&cache, "f", &src);
    cache.instance("f", Some("vm2"), Holder::persistent()).unwrap();
    let first = cache.use_instance("vm2", Holder::current()).unwrap();
    let mut other = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let e = cache
        .use_instance("vm2", Holder::process(other.id()).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("in use by a running VM (process"), "{e}");
    other.kill().unwrap();
    other.wait().unwrap();
    drop(first);
    assert!(cache.list().unwrap()[0].in_use.is_empty());
    cache.release("vm2").unwrap();
    let e = cache.usable_instance("nope").unwrap_err();
    assert!(e.to_string().contains("no instance named 'nope'"), "{e}");
}
