//! diskkit's images checked by tools nobody here wrote: qemu-img and dissect.hypervisor.

mod support;

use std::path::Path;

use support::{diskkit_ok, dissect_dump, poke, sparse_file, tool_ok, zero, Dir, Rng};

/// Apply the same random writes and discards to a diskkit image (through the CLI) and to a
/// plain reference file.
fn scribble(d: &Dir, img: &str, reference: &Path, size: u64, seed: u64, ops: usize) {
    let mut rng = Rng(seed);
    for i in 0..ops {
        let len = match rng.below(4) {
            0 => rng.below(4096) + 1,
            1 => (rng.below(64) + 1) * 512,
            2 => rng.below(3 << 20) + 1,
            _ => (rng.below(2) + 1) << 20,
        };
        let off = rng.below(size - len);
        if i % 5 == 4 {
            diskkit_ok(&[
                "discard",
                img,
                "--offset",
                &off.to_string(),
                "--length",
                &len.to_string(),
            ]);
            zero(reference, off, len);
        } else {
            let data = rng.bytes(len as usize);
            let f = d.path("chunk.bin");
            std::fs::write(&f, &data).unwrap();
            diskkit_ok(&[
                "write",
                img,
                "--offset",
                &off.to_string(),
                "--from",
                f.to_str().unwrap(),
            ]);
            poke(reference, off, &data);
        }
    }
}

#[test]
fn raw_images_match_qemu_img() {
    let d = Dir::new();
    let size = 64u64 << 20;
    let img = d.s("d.raw");
    let reference = d.path("ref.raw");
    diskkit_ok(&["create", "--format", "raw", "--size", "64M", &img]);
    tool_ok(
        "qemu-img",
        &["create", "-f", "raw", reference.to_str().unwrap(), "64M"],
    );
    scribble(&d, &img, &reference, size, 11, 30);
    let out = tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &img,
            reference.to_str().unwrap(),
        ],
    );
    assert!(out.contains("Images are identical"), "{out}");
    let info: serde_json::Value = serde_json::from_str(&tool_ok(
        "qemu-img",
        &["info", "--output=json", "-f", "raw", &img],
    ))
    .unwrap();
    assert_eq!(info["virtual-size"], size);
}

#[test]
fn asif_images_read_back_through_dissect() {
    for (block, chunk) in [("512", "1M"), ("4096", "1M"), ("512", "64K")] {
        let d = Dir::new();
        let size = 96u64 << 20;
        let img = d.s("d.asif");
        let reference = d.path("ref.raw");
        diskkit_ok(&[
            "create",
            "--format",
            "asif",
            "--size",
            "96M",
            "--block-size",
            block,
            "--chunk-size",
            chunk,
            &img,
        ]);
        sparse_file(&reference, size);
        scribble(&d, &img, &reference, size, 5 + block.len() as u64, 40);
        // A whole written chunk discarded (state 10) next to a partly written one (state 11).
        let data = Rng(3).bytes(3 << 20);
        let f = d.path("three.bin");
        std::fs::write(&f, &data).unwrap();
        diskkit_ok(&["write", &img, "--offset", "80M", "--from", f.to_str().unwrap()]);
        poke(&reference, 80 << 20, &data);
        diskkit_ok(&["discard", &img, "--offset", "81M", "--length", "1M"]);
        zero(&reference, 81 << 20, 1 << 20);
        diskkit_ok(&[
            "write",
            &img,
            "--offset",
            "85M",
            "--from",
            d.path("chunk.bin").to_str().unwrap(),
        ]);
        poke(&reference, 85 << 20, &std::fs::read(d.path("chunk.bin")).unwrap());
        // The image must contain partially written chunks (bitmaps) and discarded chunks.
        let runs: serde_json::Value =
            serde_json::from_str(&diskkit_ok(&["map", "--output", "json", &img])).unwrap();
        let runs = runs.as_array().unwrap();
        assert!(
            runs.iter().any(|r| r["zero"] == true && r["present"] == true),
            "no discarded chunk"
        );
        assert!(
            runs.iter()
                .any(|r| r["data"] == true && r["length"].as_u64().unwrap() % (1 << 16) != 0),
            "no partially written chunk"
        );
        let dumped = d.path("dissect.raw");
        let meta = dissect_dump(&img, &dumped);
        assert_eq!(meta["size"], size);
        assert_eq!(meta["block_size"].to_string(), block);
        let ours: serde_json::Value =
            serde_json::from_str(&diskkit_ok(&["info", "--output", "json", &img])).unwrap();
        assert_eq!(meta["guid"], ours["layer_uuid"], "header UUID");
        let stable = meta["metadata"]["internal metadata"]["stable uuid"]
            .as_str()
            .unwrap()
            .to_lowercase();
        assert_eq!(stable, ours["stable_uuid"].as_str().unwrap());
        assert!(
            std::fs::read(&dumped).unwrap() == std::fs::read(&reference).unwrap(),
            "dissect disagrees ({block}/{chunk})"
        );
        let out = tool_ok(
            "qemu-img",
            &[
                "compare",
                "-f",
                "raw",
                "-F",
                "raw",
                dumped.to_str().unwrap(),
                reference.to_str().unwrap(),
            ],
        );
        assert!(out.contains("identical"));
    }
}

#[test]
fn convert_round_trips_compare_identical_in_qemu_img() {
    let d = Dir::new();
    let size = 128u64 << 20;
    let src = d.path("src.raw");
    sparse_file(&src, size);
    let mut rng = Rng(99);
    // Half the 1 MiB chunks hold data, some of it with zero holes inside.
    for c in (0..128u64).filter(|c| c % 2 == 0) {
        let mut data = rng.bytes(1 << 20);
        if c % 6 == 0 {
            data[100_000..300_000].fill(0);
        }
        poke(&src, c << 20, &data);
    }
    let s = src.to_str().unwrap();
    for (block, fmt) in [("512", "asif"), ("4096", "asif"), ("512", "raw")] {
        let mid = d.s(&format!("mid-{block}.{fmt}"));
        let back = d.s(&format!("back-{block}-{fmt}.raw"));
        diskkit_ok(&["convert", "-O", fmt, "--block-size", block, s, &mid]);
        diskkit_ok(&["convert", "-O", "raw", &mid, &back]);
        let out = tool_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", s, &back]);
        assert!(out.contains("identical"), "{fmt}/{block}: {out}");
        // Sparse: the converted images do not store the zero half.
        let used = std::fs::metadata(&mid)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap();
        assert!(used < size * 6 / 10, "{mid} uses {used} bytes");
    }
    // And an ASIF that dissect reads the same as the source.
    let mid = d.s("mid-512.asif");
    let dumped = d.path("dissect.raw");
    dissect_dump(&mid, &dumped);
    let out = tool_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s, dumped.to_str().unwrap()],
    );
    assert!(out.contains("identical"));
}
