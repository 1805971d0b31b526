//! The qcow2 consistency check and repair against QEMU's own tools.
//!
//! Images are made and damaged by QEMU (a `qemu-io` killed with lazy refcounts on) or by hand
//! (refcount entries, refcount table entries, leaked clusters, the corrupt bit); diskkit's
//! counts must agree with `qemu-img check --output=json`, and after diskkit's repair
//! `qemu-img check` must find nothing and `qemu-img compare` must find the data unchanged.
//! A missing tool fails the test.

mod qcow2_support;

use std::path::Path;

use diskkit::formats::qcow2::{self, Repair};
use diskkit::{DiskImage, ErrorKind, OpenOptions};
use qcow2_support::*;

#[test]
fn qemu_dirty_images_are_refused_then_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let raw = writes_raw(&dir.path().join("ref.raw"));
    for cluster in ["65536", "4096", "512"] {
        let img = dir.path().join(format!("dirty-{cluster}.qcow2"));
        qemu_dirty(&img, &format!("cluster_size={cluster}"), "8M", WRITES);
        // QEMU itself sees stale refcounts (qemu-img check does not repair in memory).
        let (corruptions, _) = assert_counts_agree(&img);
        assert!(corruptions > 0, "{cluster}: the killed image should need repair");
        let r = qcow2::check_file(&img, Repair::None).unwrap();
        assert!(r.dirty);
        // Refused by default, naming diskkit's command.
        let e = DiskImage::open(&img, &OpenOptions::new()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("diskkit check --repair all"), "{e}");
        // Repair needs write access.
        let e = DiskImage::open(&img, &OpenOptions::new().repair(true)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e}");
        // Opening with the repair option repairs, then takes writes.
        let auto = copy(&img, &dir.path().join(format!("auto-{cluster}.qcow2")));
        let image = DiskImage::open(&auto, &OpenOptions::new().writable(true).repair(true)).unwrap();
        image.write_at(&[0x5a; 70_000], 6 << 20).unwrap();
        image.flush().unwrap();
        drop(image);
        assert_qemu_clean(&auto);
        let auto_ref = copy(&raw, &dir.path().join(format!("auto-{cluster}.raw")));
        pwrite(&auto_ref, 6 << 20, &[0x5a; 70_000]);
        assert_identical(&auto_ref, "raw", &auto, "qcow2");
        // The explicit check --repair all.
        let before = std::fs::metadata(&img).unwrap().len();
        let r = qcow2::check_file(&img, Repair::All).unwrap();
        assert!(r.corruptions_fixed >= corruptions / 2, "{r:#?}");
        assert!(
            r.changes.iter().any(|c| c.contains("dirty bit")),
            "{:?}",
            r.changes
        );
        assert!(std::fs::metadata(&img).unwrap().len() >= before);
        repair_and_verify(&img, &raw, "raw");
    }
}

/// Power lost at every write of a repair (unsynced writes all dropped, all kept, or half
/// kept): the image is never worse than before (qemu-img check counts no more corruptions),
/// and running the repair again leaves it clean with the data QEMU wrote.
#[test]
fn interrupted_repair_loses_nothing_and_finishes_when_run_again() {
    use diskkit::storage::{Fault, MemStorage};
    let dir = tempfile::tempdir().unwrap();
    let raw = writes_raw(&dir.path().join("ref.raw"));
    let img = dir.path().join("dirty.qcow2");
    qemu_dirty(&img, "cluster_size=4096", "8M", WRITES);
    // Also a leak with a wrong copied flag, and leaked clusters at the end.
    let data = data_clusters(&img);
    set_refcount(&img, data[2], 2);
    let cs = geo(&img).cs;
    let len = std::fs::metadata(&img).unwrap().len().next_multiple_of(cs);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(len + 2 * cs)
        .unwrap();
    set_refcount(&img, len / cs, 1);
    set_refcount(&img, len / cs + 1, 1);
    let (before, leaks, _) = qemu_check(&img);
    assert!(before > 0 && leaks > 0);
    let bytes = std::fs::read(&img).unwrap();
    let crashed_path = dir.path().join("crashed.qcow2");
    let mut seed = 0x1234_5678_9abc_def1u64;
    for k in 0.. {
        let storage = MemStorage::from_bytes(bytes.clone());
        storage.track_crashes();
        storage.inject(Fault::WritesAfter(k));
        let result = qcow2::check(&storage, Repair::All);
        for mode in 0..3 {
            let crashed = storage.crash(|_| match mode {
                0 => false,
                1 => true,
                _ => {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed % 2 == 0
                }
            });
            std::fs::write(&crashed_path, crashed.to_bytes()).unwrap();
            let (c, _, _) = qemu_check(&crashed_path);
            assert!(
                c <= before,
                "write {k}, mode {mode}: {c} corruptions, {before} before"
            );
            let r = qcow2::check_file(&crashed_path, Repair::All).unwrap();
            assert!(r.is_clean() && !r.dirty, "write {k}, mode {mode}: {r:#?}");
            assert_qemu_clean(&crashed_path);
            assert_identical(&raw, "raw", &crashed_path, "qcow2");
        }
        if result.is_ok() {
            assert!(k > 5, "a repair writes more than {k} times");
            break;
        }
    }
}

/// Dirty images with 1-, 2-, 8-, 32- and 64-bit refcounts are rebuilt at their own width.
#[test]
fn every_refcount_width_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let raw = writes_raw(&dir.path().join("ref.raw"));
    for bits in [1u32, 2, 8, 32, 64] {
        let img = dir.path().join(format!("w{bits}.qcow2"));
        let opts = format!("refcount_bits={bits},cluster_size=4096");
        qemu_dirty(&img, &opts, "8M", WRITES);
        let (c, _) = assert_counts_agree(&img);
        assert!(c > 0, "{bits} bits");
        repair_and_verify(&img, &raw, "raw");
        assert_eq!(geo(&img).order, bits.trailing_zeros(), "{bits} bits");
    }
}

/// 512-byte clusters and 14 MiB of data: the rebuilt refcount table spans several clusters
/// (one 512-byte table cluster covers 16384 clusters).
#[test]
fn rebuilt_refcount_table_spans_several_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("ref.raw");
    let img = dir.path().join("small-clusters.qcow2");
    let writes = ["write -P 0x5e 0 14M", "write -P 0x6f 15M 512k"];
    run_ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "16M"]);
    assert!(qemu_io(&raw, "raw", &writes).status.success());
    qemu_dirty(&img, "cluster_size=512", "16M", &writes);
    let (c, _) = assert_counts_agree(&img);
    assert!(c > 0, "{c}");
    repair_and_verify(&img, &raw, "raw");
    let head = pread(&img, 0, 64);
    assert!(
        be(&head, 56, 4) >= 2,
        "refcount table clusters: {}",
        be(&head, 56, 4)
    );
}

#[test]
fn hand_damaged_refcounts_agree_with_qemu_and_are_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = clean_pair(dir.path(), "clean", "65536");
    assert_eq!(assert_counts_agree(&img), (0, 0));
    let data = data_clusters(&img);
    assert!(data.len() > 10);
    let cs = geo(&img).cs;
    let (d0, d1, d2, d3) = (data.clone(), data.clone(), data.clone(), data.clone());
    type Damage = Box<dyn Fn(&Path)>;
    let damages: Vec<(&str, Damage, (u64, u64))> = vec![
        // Refcount 0 on a used cluster: the refcount and the copied flag are wrong.
        (
            "refcount-0",
            Box::new(move |p: &Path| set_refcount(p, d0[3], 0)),
            (2, 0),
        ),
        // Refcount 2 on a cluster used once: a leak, and the copied flag is wrong.
        (
            "refcount-2",
            Box::new(move |p: &Path| set_refcount(p, d1[5], 2)),
            (1, 1),
        ),
        // Both, on several clusters.
        (
            "mixed",
            Box::new(move |p: &Path| {
                for (i, &c) in d2.iter().enumerate().take(12) {
                    set_refcount(p, c, [0u16, 2, 3][i % 3]);
                }
            }),
            (16, 8),
        ),
        // The refcount block's pointer dropped: every cluster looks free.
        (
            "no-refcount-block",
            Box::new(|p: &Path| pwrite(p, geo(p).reftable, &0u64.to_be_bytes())),
            (0, 0),
        ),
        // Three clusters appended at the end and counted: leaks.
        (
            "leaked-at-eof",
            Box::new(move |p: &Path| {
                let len = std::fs::metadata(p).unwrap().len().next_multiple_of(cs);
                let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
                f.set_len(len + 3 * cs).unwrap();
                for i in 0..3 {
                    set_refcount(p, len / cs + i, 1);
                }
            }),
            (0, 3),
        ),
        // The corrupt bit, on top of a leak.
        (
            "corrupt-bit",
            Box::new(move |p: &Path| {
                set_refcount(p, d3[7], 2);
                set_incompatible(p, 2);
            }),
            (1, 1),
        ),
    ];
    for (name, damage, expected) in &damages {
        let p = copy(&img, &dir.path().join(format!("{name}.qcow2")));
        damage(&p);
        let got = assert_counts_agree(&p);
        if *name != "no-refcount-block" {
            assert_eq!(got, *expected, "{name}");
        } else {
            assert!(got.0 > 10, "{name}: {got:?}");
        }
        if *name == "corrupt-bit" {
            let e = DiskImage::open(&p, &OpenOptions::new()).unwrap_err();
            assert!(e.to_string().contains("marked corrupt"), "{e}");
        }
        // Leaks-only repair: the leaks go, corruptions stay.
        let leaks_only = copy(&p, &dir.path().join(format!("{name}-leaks.qcow2")));
        let r = qcow2::check_file(&leaks_only, Repair::Leaks).unwrap();
        assert_eq!(r.leaks, 0, "{name}: {r:#?}");
        assert_eq!(r.leaks_fixed, got.1, "{name}");
        let (qc, ql, _) = qemu_check(&leaks_only);
        assert_eq!((qc, ql), (r.corruptions, 0), "{name} after -r leaks");
        repair_and_verify(&p, &raw, "raw");
    }
    let _ = refcount;
}

/// L2 entries that point past the end of the file, are unaligned, or point at the L1 table:
/// counted like qemu-img check counts them (an overlap is one more corruption in diskkit), and
/// after repair those guest clusters read as zeroes, everything else unchanged.
#[test]
fn bad_l2_entries_are_reported_and_made_to_read_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let (img, raw) = clean_pair(dir.path(), "clean", "65536");
    let cs = 65536u64;
    let head = pread(&img, 0, 112);
    let l1 = be(&head, 40, 8);
    let l2 = be(&pread(&img, l1, 8), 0, 8) & 0x00ff_ffff_ffff_fe00;
    let entry = |p: &Path, gc: u64| be(&pread(p, l2 + 8 * gc, 8), 0, 8);
    let set = |p: &Path, gc: u64, v: u64| pwrite(p, l2 + 8 * gc, &v.to_be_bytes());
    let copied = 1u64 << 63;
    // (name, guest cluster, qemu-img check's (corruptions, leaks), diskkit's)
    type Case = (&'static str, u64, (u64, u64), (u64, u64));
    let cases: [Case; 3] = [
        ("beyond-eof", 112, (2, 1), (2, 1)),
        ("unaligned", 80, (2, 0), (2, 0)),
        ("overlap", 64, (1, 1), (2, 1)),
    ];
    for (name, gc, qemu_counts, ours) in cases {
        let p = copy(&img, &dir.path().join(format!("{name}.qcow2")));
        let value = match name {
            "beyond-eof" => copied | ((std::fs::metadata(&p).unwrap().len().div_ceil(cs) + 10) * cs),
            "unaligned" => entry(&p, gc) + 0x200,
            _ => copied | l1,
        };
        set(&p, gc, value);
        let (qc, ql, _) = qemu_check(&p);
        assert_eq!((qc, ql), qemu_counts, "{name}");
        let r = qcow2::check_file(&p, Repair::None).unwrap();
        assert_eq!((r.corruptions, r.leaks), ours, "{name}: {:#?}", r.problems);
        let expect = copy(&raw, &dir.path().join(format!("{name}.raw")));
        pwrite(&expect, gc * cs, &vec![0u8; cs as usize]);
        let r = qcow2::check_file(&p, Repair::All).unwrap();
        assert!(
            r.changes.iter().any(|c| c.contains("L1/L2 entries")),
            "{name}: {:?}",
            r.changes
        );
        assert_eq!(entry(&p, gc), 1, "{name}: the entry reads as zeroes (zero flag)");
        repair_and_verify(&p, &expect, "raw");
    }
}

#[test]
fn compressed_bitmap_backing_and_snapshot_images_survive_repair() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = writes_raw(&d.join("src.raw"));
    // Compressed clusters, zlib and zstd; a leaked cluster appended to each.
    for ty in ["zlib", "zstd"] {
        let img = d.join(format!("c-{ty}.qcow2"));
        let o = format!("compression_type={ty}");
        run_ok(
            "qemu-img",
            &["convert", "-q", "-c", "-O", "qcow2", "-o", &o, s(&raw), s(&img)],
        );
        let r = qcow2::check_file(&img, Repair::None).unwrap();
        assert!(r.compressed_clusters > 0 && r.is_clean(), "{r:#?}");
        let cs = geo(&img).cs;
        let len = std::fs::metadata(&img).unwrap().len().next_multiple_of(cs);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(len + cs)
            .unwrap();
        set_refcount(&img, len / cs, 1);
        assert_eq!(assert_counts_agree(&img), (0, 1));
        repair_and_verify(&img, &raw, "raw");
    }
    // Persistent bitmaps: their clusters are in use, and they survive a repair.
    let bm = d.join("bitmaps.qcow2");
    run_ok("qemu-img", &["convert", "-q", "-O", "qcow2", s(&raw), s(&bm)]);
    run_ok("qemu-img", &["bitmap", "--add", s(&bm), "b0"]);
    run_ok("qemu-img", &["bitmap", "--add", "-g", "512k", s(&bm), "b1"]);
    assert!(qemu_io(&bm, "qcow2", &["write -P 0x42 1M 3M"]).status.success());
    let bm_expect = d.join("bitmaps-expect.raw");
    copy(&raw, &bm_expect);
    pwrite(&bm_expect, 1 << 20, &[0x42; 3 << 20]);
    assert_eq!(assert_counts_agree(&bm), (0, 0));
    let data = data_clusters(&bm);
    set_refcount(&bm, data[1], 0);
    set_refcount(&bm, data[2], 2);
    assert_eq!(assert_counts_agree(&bm), (3, 1));
    repair_and_verify(&bm, &bm_expect, "raw");
    let info = run_ok("qemu-img", &["info", "--output=json", s(&bm)]);
    assert!(info.contains("\"b0\"") && info.contains("\"b1\""), "{info}");
    // A backing file: unallocated clusters still fall through after repair.
    let base = d.join("base.raw");
    copy(&raw, &base);
    let top = d.join("top.qcow2");
    qemu_create_qcow2(&top, &["-b", "base.raw", "-F", "raw"], None);
    assert!(qemu_io(&top, "qcow2", &["write -P 0x77 64k 128k"])
        .status
        .success());
    let expect = d.join("top-expect.raw");
    copy(&raw, &expect);
    pwrite(&expect, 64 << 10, &[0x77; 128 << 10]);
    let data = data_clusters(&top);
    set_refcount(&top, data[0], 0);
    assert_eq!(assert_counts_agree(&top), (2, 0));
    repair_and_verify(&top, &expect, "raw");
    // Internal snapshots: shared clusters have refcount 2; damage one to 1 and leak another.
    let snap = d.join("snap.qcow2");
    run_ok("qemu-img", &["convert", "-q", "-O", "qcow2", s(&raw), s(&snap)]);
    run_ok("qemu-img", &["snapshot", "-c", "first", s(&snap)]);
    assert!(qemu_io(&snap, "qcow2", &["write -P 0x99 0 256k"])
        .status
        .success());
    run_ok("qemu-img", &["snapshot", "-c", "second", s(&snap)]);
    assert!(qemu_io(&snap, "qcow2", &["write -P 0x98 2M 64k"])
        .status
        .success());
    let now = d.join("snap-now.raw");
    copy(&raw, &now);
    pwrite(&now, 0, &[0x99; 256 << 10]);
    pwrite(&now, 2 << 20, &[0x98; 64 << 10]);
    assert_eq!(assert_counts_agree(&snap), (0, 0));
    let shared: Vec<u64> = data_clusters(&snap)
        .into_iter()
        .filter(|&c| refcount(&snap, c) == 3)
        .collect();
    assert!(
        !shared.is_empty(),
        "clusters shared by both snapshots and the active table"
    );
    set_refcount(&snap, shared[0], 1);
    set_refcount(&snap, shared[1], 5);
    let (c, l) = assert_counts_agree(&snap);
    assert!(c >= 1 && l >= 1, "{c} {l}");
    let r = qcow2::check_file(&snap, Repair::All).unwrap();
    assert!(r.is_clean(), "{r:#?}");
    assert_qemu_clean(&snap);
    assert_identical(&now, "raw", &snap, "qcow2");
    let list = run_ok("qemu-img", &["snapshot", "-l", s(&snap)]);
    assert!(list.contains("first") && list.contains("second"), "{list}");
    let first = d.join("first.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-l",
            "snapshot.name=first",
            "-O",
            "raw",
            s(&snap),
            s(&first),
        ],
    );
    assert_identical(&raw, "raw", &first, "raw");
    let second = d.join("second.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-l",
            "snapshot.name=second",
            "-O",
            "raw",
            s(&snap),
            s(&second),
        ],
    );
    let second_expect = d.join("second-expect.raw");
    copy(&raw, &second_expect);
    pwrite(&second_expect, 0, &[0x99; 256 << 10]);
    assert_identical(&second_expect, "raw", &second, "raw");
}

/// Files with more clusters than the check can count are refused with a clear error.
#[test]
fn oversized_files_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    qemu_create_qcow2(&img, &["-o", "cluster_size=512"], Some("1M"));
    let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
    f.set_len((qcow2::MAX_CHECK_CLUSTERS + 1) * 512).unwrap();
    let e = qcow2::check_file(&img, Repair::None).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("clusters"), "{e}");
}

/// A data cluster two L2 entries map, in an image with 1-bit refcounts: its true refcount (2)
/// does not fit, so a repair must refuse (and change nothing) rather than write 1.
#[test]
fn refcounts_too_narrow_for_the_references_are_not_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("narrow.qcow2");
    qemu_create_qcow2(&img, &["-o", "refcount_bits=1,cluster_size=4096"], Some("1M"));
    let writes = ["write -P 0x01 0 4k", "write -P 0x02 4k 4k"];
    assert!(qemu_io(&img, "qcow2", &writes).status.success());
    // Point the second L2 entry at the first one's cluster (the second cluster leaks).
    let l1 = be(&pread(&img, 40, 8), 0, 8);
    let l2 = be(&pread(&img, l1, 8), 0, 8) & 0x00ff_ffff_ffff_fe00;
    let first = pread(&img, l2, 8);
    pwrite(&img, l2 + 8, &first);
    let r = qcow2::check_file(&img, Repair::None).unwrap();
    assert!(
        r.problems.iter().any(|p| p.kind == qcow2::ProblemKind::Overflow),
        "{r:#?}"
    );
    let before = std::fs::read(&img).unwrap();
    let e = qcow2::check_file(&img, Repair::All).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("more references"), "{e}");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "a refused repair changed the image"
    );
}
