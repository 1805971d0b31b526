//! Entry points for fuzzing (used by `fuzz/` and by the corpus replay tests).

use std::sync::Arc;

use crate::image::DiskImage;
use crate::layer::{ImageFormat, OpenMode};
use crate::stack::OpenOptions;
use crate::storage::{MemStorage, Storage};

/// Open `data` as an ASIF image (read-write, in memory) and exercise it: reads over the whole
/// disk and the allocation map, then writes, zeroing, a resize and a flush, then a reopen.
/// Must never panic, whatever `data` holds.
pub fn asif_open(data: &[u8]) {
    exercise(data, ImageFormat::Asif);
}

/// Open `data` as a qcow2 image and exercise it as [`asif_open`] does; an image that records
/// a backing file is opened detached (read-only) instead. Must never panic.
pub fn qcow2_open(data: &[u8]) {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(data.to_vec()));
    let detached = OpenOptions::new().format(ImageFormat::Qcow2);
    if let Ok(layer) = crate::stack::open::open_layer(storage, &detached) {
        if layer.layer_info().parent_path.is_some() {
            let size = layer.size();
            let span = size.min(8 << 20);
            let mut pos = 0;
            let mut buf = vec![0u8; 65536];
            while pos < span {
                let Ok((m, n)) = layer.map(pos, span - pos) else {
                    return;
                };
                let n = n.clamp(1, span - pos);
                let k = n.min(buf.len() as u64) as usize;
                if m == crate::mapping::Mapping::Special && layer.read_special(pos, &mut buf[..k]).is_err() {
                    return;
                }
                pos += n;
            }
            return;
        }
    }
    exercise(data, ImageFormat::Qcow2);
}

/// Open `data` as a qcow2 image with the repair option; then check it in memory and repair
/// it (leaks only, then everything).
/// A repair that ends with a clean report must leave a clean image: checking again finds
/// nothing and changes nothing, and the driver opens it. Must never panic.
pub fn qcow2_check(data: &[u8]) {
    use crate::formats::qcow2::{check, Qcow2Image, Repair};
    // Opening with the repair option (dirty or corrupt images are repaired first).
    let opened: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(data.to_vec()));
    if let Ok(image) = Qcow2Image::open_with(opened, &crate::layer::Access::ReadWrite, true) {
        use crate::layer::Layer;
        if image.size() > 0 {
            let _ = image.map(0, image.size().min(1 << 20));
        }
    }
    let storage = MemStorage::from_bytes(data.to_vec());
    let _ = check(&storage, Repair::None);
    let _ = check(&storage, Repair::Leaks);
    let Ok(report) = check(&storage, Repair::All) else {
        return;
    };
    if !report.is_clean() || report.dirty || report.corrupt {
        return;
    }
    let again = check(&storage, Repair::All).expect("an image repair left clean must check again");
    assert!(
        again.is_clean() && again.changes.is_empty(),
        "a second repair found or changed something: {again:?}"
    );
    let reopened: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(storage.to_bytes()));
    let options = OpenOptions::new().format(ImageFormat::Qcow2);
    if let Ok(layer) = crate::stack::open::open_layer(reopened, &options) {
        let span = layer.size().min(1 << 20);
        let mut pos = 0;
        while pos < span {
            let Ok((_, n)) = layer.map(pos, span - pos) else {
                break;
            };
            pos += n.max(1);
        }
    }
}

fn exercise(data: &[u8], format: ImageFormat) {
    let storage = Arc::new(MemStorage::from_bytes(data.to_vec()));
    let dyn_storage: Arc<dyn Storage> = storage.clone();
    let options = OpenOptions::new().mode(OpenMode::ReadWrite).format(format);
    let Ok(image) = DiskImage::open_storage(dyn_storage, &options) else {
        return;
    };
    let size = image.size();
    // Bound the work: touch at most the first 8 MiB and a few spots further out.
    let span = size.min(8 << 20);
    let mut buf = vec![0u8; 65536];
    let mut pos = 0;
    while pos < span {
        let n = (span - pos).min(buf.len() as u64) as usize;
        if image.read_at(&mut buf[..n], pos).is_err() {
            break;
        }
        pos += n as u64;
    }
    let _ = image.extents(0, span.max(1).min(size));
    let seed = data
        .iter()
        .fold(7u64, |a, &b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
    for i in 0..4u64 {
        let off = seed.wrapping_mul(i + 1) % size.max(1);
        let len = (seed >> (i * 8)) % 70_000 + 1;
        let len = len.min(size - off);
        let _ = image.write_at(&vec![0xa5; len as usize], off);
        let _ = image.write_zeroes(off / 2, len, i % 2 == 0);
    }
    let _ = image.resize(
        (size / 2)
            .max(u64::from(image.block_size()))
            .next_multiple_of(u64::from(image.block_size())),
    );
    let _ = image.flush();
    drop(image);
    let reopened: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(storage.to_bytes()));
    if let Ok(image) = DiskImage::open_storage(reopened, &OpenOptions::new().format(format)) {
        let n = image.size().min(65536) as usize;
        let _ = image.read_at(&mut buf[..n], 0);
    }
}

/// Parse `data` as an ASIF metadata block, where diskkit keeps a layer's stack information
/// (type, parent UUID, parent path and format). Whatever parses must survive being written
/// back and parsed again unchanged, and a parent path from it must go through the parent
/// policy without panicking. Must never panic otherwise.
pub fn stack_metadata(data: &[u8]) {
    use crate::formats::asif::metadata::Metadata;
    let Ok(meta) = Metadata::parse(data) else {
        return;
    };
    let Ok(info) = meta.layer_info() else {
        return;
    };
    let mut copy = meta.clone();
    copy.set_layer_info(&info);
    if let Ok(block) = copy.to_block(1 << 20) {
        let back = Metadata::parse(&block).expect("a metadata block diskkit wrote must parse");
        let again = back
            .layer_info()
            .expect("layer information diskkit wrote must parse");
        assert_eq!(again, info, "layer information changed in a round trip");
    }
    if let Some(hint) = &info.parent_path {
        let child = std::path::Path::new("/nonexistent-diskkit-fuzz/child.asif");
        let _ = crate::stack::ParentPolicy::same_directory().resolve(child, hint);
    }
}

/// Detect the format of `data` (registered formats, the foreign formats diskkit refuses by
/// name, RAW) and open it read-only through detection. The two ways of asking must agree, a
/// refusal must name the format, and nothing may panic.
pub fn probe(data: &[u8]) {
    use crate::formats::probe::{detect, identify, Detected};
    let storage = MemStorage::from_bytes(data.to_vec());
    match (identify(&storage), detect(&storage)) {
        (Ok(Detected::Format(a)), Ok(b)) => assert_eq!(a, b, "identify and detect disagree"),
        (Ok(Detected::Foreign(f)), Err(e)) => {
            assert_eq!(e.kind(), crate::ErrorKind::UnsupportedFormat);
            assert!(
                e.to_string().contains(f.name()),
                "the refusal does not name {f}: {e}"
            );
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!("identify {a:?} and detect {b:?} disagree"),
    }
    let storage: Arc<dyn Storage> = Arc::new(storage);
    if let Ok(image) = DiskImage::open_storage(storage, &OpenOptions::new()) {
        let mut buf = vec![0u8; image.size().min(4096) as usize];
        let _ = image.read_at(&mut buf, 0);
    }
}
