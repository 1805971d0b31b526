//! Entry point for fuzzing (used by `fuzz/` and by the corpus replay test).

use std::io::Cursor;
use std::sync::Arc;

use diskkit::storage::MemStorage;
use diskkit::{CreateOptions, DiskImage};
use diskkit_ext4::writer::{Options, Plan};

use crate::layer::{apply_layer, start_layer, LayerInfo};
use crate::merge::MergedTree;
use crate::placement::Placer;

/// Largest filesystem the fuzz entry point writes.
const MAX_FS: u64 = 64 << 20;

/// Apply `data` as a layer (tar, gzip or zstd), twice (so whiteouts and replacements meet a
/// lower layer), and write the merged tree as ext4 into memory. Returns the filesystem bytes
/// when the input was accepted. Must never panic, whatever `data` holds.
pub fn layer_unpack(data: &[u8]) -> Option<Vec<u8>> {
    let limit = MAX_FS / 4096;
    let storage = Arc::new(MemStorage::new());
    let image = DiskImage::create_on(storage, &CreateOptions::raw(1 << 20)).ok()?;
    let mut placer = Placer::new(&image, limit, false);
    let mut tree = MergedTree::new();
    for i in 0..2 {
        let info = LayerInfo {
            digest: None,
            size: None,
            diff_id: None,
            media_type: None,
            name: format!("fuzz{i}"),
            index: i,
        };
        let decoded = start_layer(Box::new(Cursor::new(data.to_vec())), &info).ok()?;
        apply_layer(decoded, &info, &mut tree, &mut placer, None).ok()?;
    }
    placer.finish().ok()?;
    let fs = tree.to_tree().ok()?;
    let plan = Plan::new_sparse(&fs, Options::default(), &mut placer).ok()?;
    if plan.size_bytes() > MAX_FS {
        return None;
    }
    image.resize(plan.size_bytes()).ok()?;
    plan.write(&image, &mut placer).ok()?;
    let mut out = vec![0u8; plan.size_bytes() as usize];
    image.read_at(&mut out, 0).ok()?;
    Some(out)
}
