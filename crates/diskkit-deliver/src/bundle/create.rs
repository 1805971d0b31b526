//! Making a bundle from an image or a stack.
//!
//! `disk.img` is the base (the stack without its top overlay, flattened) and `layer.qcow2`
//! the top overlay converted to qcow2 over `disk.img`; an image that is not an overlay over
//! a base becomes `disk.img` whole, with an empty `layer.qcow2`. Only the ranges the image
//! maps as data are read: zero and absent ranges become holes in the sparse member, and are
//! never read or compressed.

use std::fs::OpenOptions as FsOpenOptions;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use diskkit::storage::FileStorage;
use diskkit::{
    CreateOptions as ImageCreateOptions, DiskImage, ExtentKind, ImageFormat, LayerInfo, LayerOptions,
    LayerType, OpenOptions, ParentPolicy,
};
use serde::Serialize;

use crate::bundle::machine::Machine;
use crate::bundle::tar::{Region, TarWriter, BLOCK, MAX_SPARSE_ENTRIES};
use crate::bundle::{DISK, LAYER, MACHINE};
use crate::error::{Error, PathContext, Result};
use crate::fsutil::{self, Cleanup};

/// Bytes read from the image per request.
const READ_BUFFER: usize = 4 << 20;

/// How to make a bundle.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The machine definition; a default one (random MAC and UUID) when `None`.
    pub machine: Option<Machine>,
    /// Which parents of the image may be followed.
    pub parents: ParentPolicy,
    /// zstd compression level (taskcluster used 3).
    pub level: i32,
    /// zstd worker threads; 0 uses every available core.
    pub threads: u32,
    /// Replace an existing output file.
    pub overwrite: bool,
    /// Make the bundle durable (fsync) before it is renamed into place; without it, as with
    /// `tar | zstd`, a power failure soon after may lose data.
    pub sync: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            machine: None,
            parents: ParentPolicy::same_directory(),
            level: 3,
            threads: 0,
            overwrite: false,
            sync: false,
        }
    }
}

/// What [`create`] made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreateReport {
    /// The bundle's path.
    pub path: PathBuf,
    /// Whether the image was split into a base and its top overlay.
    pub split: bool,
    /// Size of `disk.img`.
    pub disk_size: u64,
    /// Bytes of `disk.img` stored (read from the image); the rest are holes.
    pub disk_stored: u64,
    /// Bytes of `layer.qcow2` stored.
    pub layer_stored: u64,
    /// The bundle's size.
    pub compressed_size: u64,
    /// The machine definition written.
    pub machine: Machine,
}

/// Make the bundle `out` from the image at `image` (see the module docs). The bundle is
/// written under a temporary name next to `out` and renamed when complete. `progress` gets
/// (bytes done, bytes to do) of the data that is read.
pub fn create(
    image: &Path,
    out: &Path,
    options: &CreateOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CreateReport> {
    if !options.overwrite && out.exists() {
        return Err(Error::new(
            crate::ErrorKind::AlreadyExists,
            format!("'{}' already exists (use --force to replace it)", out.display()),
        ));
    }
    let machine = match &options.machine {
        Some(m) => {
            m.validate()?;
            m.clone()
        }
        None => Machine::default_random(),
    };
    let open = OpenOptions::new().parents(options.parents.clone());
    let source = DiskImage::open(image, &open)
        .map_err(|e| Error::image(e, "opening the image"))
        .at_path(image)?;
    let paths = source.layer_paths();
    let split = source.layer_count() >= 2 && source.layer_type() != Some(LayerType::Cache);
    let base = if split {
        let parent = paths[paths.len() - 2]
            .clone()
            .ok_or_else(|| Error::invalid_argument("the image's parent has no file path"))?;
        let image = DiskImage::open(&parent, &open)
            .map_err(|e| Error::image(e, "opening the base"))
            .at_path(&parent)?;
        Some((image, parent))
    } else {
        None
    };
    let staging = Cleanup::new(fsutil::temp_sibling(out)?);
    std::fs::create_dir(staging.path())
        .map_err(|e| Error::io_while(e, format!("creating {}", staging.path().display())))?;
    let layer_path = staging.path().join(LAYER);
    let disk: &DiskImage = base.as_ref().map_or(&source, |(b, _)| b);
    match &base {
        Some((_, parent)) => build_layer_from_top(&source, parent, &open, &layer_path)?,
        None => {
            let size = disk.size().div_ceil(512) * 512;
            let opts =
                ImageCreateOptions::new(ImageFormat::Qcow2, size).backing_file(DISK, Some(ImageFormat::Raw));
            DiskImage::create_file(&layer_path, &opts)
                .map_err(|e| Error::image(e, format!("creating {LAYER}")))?;
        }
    }
    let layer = DiskImage::open(&layer_path, &OpenOptions::new().format(ImageFormat::Raw))
        .map_err(|e| Error::image(e, format!("reading {LAYER}")))?;
    let layer_regions = data_regions(&layer)?;
    let disk_regions = data_regions(disk)?;
    let layer_stored: u64 = layer_regions.iter().map(|r| r.len).sum();
    let disk_stored: u64 = disk_regions.iter().map(|r| r.len).sum();
    let total = layer_stored + disk_stored;

    let tmp_out = fsutil::temp_sibling(out)?;
    let tmp_guard = Cleanup::new(&tmp_out);
    let file = FsOpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp_out)
        .map_err(|e| Error::io_while(e, format!("creating {}", tmp_out.display())))?;
    let mut encoder =
        zstd::stream::write::Encoder::new(BufWriter::with_capacity(1 << 20, &file), options.level)
            .map_err(|e| Error::io_while(e, "starting the zstd encoder"))?;
    let threads = if options.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
    } else {
        options.threads
    };
    encoder
        .multithread(threads)
        .and_then(|()| encoder.include_checksum(true))
        .map_err(|e| Error::io_while(e, "configuring the zstd encoder"))?;
    let mtime = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut tar = TarWriter::new(encoder, mtime);
    let machine_json = machine.to_json();
    tar.begin_member(
        MACHINE,
        machine_json.len() as u64,
        &[Region {
            offset: 0,
            len: machine_json.len() as u64,
        }],
    )?;
    tar.write_data(&machine_json)?;
    tar.end_member()?;
    let mut done = 0u64;
    progress(0, total);
    for (name, image, size, regions) in [
        (LAYER, &layer, layer.size(), &layer_regions),
        (DISK, disk, disk.size(), &disk_regions),
    ] {
        tar.begin_member(name, size, regions)?;
        read_ahead(image, regions, name, &mut |data| {
            tar.write_data(data)?;
            done += data.len() as u64;
            progress(done, total);
            Ok(())
        })?;
        tar.end_member()?;
    }
    let encoder = tar.finish()?;
    let mut writer = encoder
        .finish()
        .map_err(|e| Error::io_while(e, "finishing the zstd stream"))?;
    writer
        .flush()
        .and_then(|()| if options.sync { file.sync_all() } else { Ok(()) })
        .map_err(|e| Error::io_while(e, format!("writing {}", tmp_out.display())))?;
    drop(writer);
    let compressed_size = file.metadata().map(|m| m.len()).unwrap_or(0);
    drop(file);
    drop(layer);
    persist(&tmp_out, out, options.overwrite, options.sync)?;
    tmp_guard.keep();
    drop(staging);
    Ok(CreateReport {
        path: out.to_path_buf(),
        split,
        disk_size: disk.size(),
        disk_stored,
        layer_stored,
        compressed_size,
        machine,
    })
}

/// Buffers read ahead by [`read_ahead`]'s reading thread.
const READ_AHEAD: usize = 4;

/// Read `regions` of `image` in order on a separate thread (so reading overlaps what `f`
/// does with the data, here compression) and hand each buffer to `f`.
fn read_ahead(
    image: &DiskImage,
    regions: &[Region],
    name: &str,
    f: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let (to_main, from_reader) = std::sync::mpsc::sync_channel::<Result<Vec<u8>>>(READ_AHEAD);
    let (to_reader, from_main) = std::sync::mpsc::sync_channel::<Vec<u8>>(READ_AHEAD + 1);
    // `move`: the channels are dropped when this closure returns (also early, on an error),
    // before the scope waits for the reader, which then stops instead of waiting forever.
    std::thread::scope(move |scope| {
        scope.spawn(move || {
            let mut spare = 0;
            for r in regions {
                let mut pos = r.offset;
                while pos < r.end() {
                    let n = (r.end() - pos).min(READ_BUFFER as u64) as usize;
                    let mut buf = match from_main.try_recv() {
                        Ok(b) => b,
                        Err(_) if spare <= READ_AHEAD => {
                            spare += 1;
                            vec![0u8; READ_BUFFER]
                        }
                        Err(_) => match from_main.recv() {
                            Ok(b) => b,
                            Err(_) => return,
                        },
                    };
                    buf.resize(n, 0);
                    let read = image
                        .read_at(&mut buf, pos)
                        .map(|()| buf)
                        .map_err(|e| Error::image(e, format!("reading the data of {name}")));
                    let failed = read.is_err();
                    if to_main.send(read).is_err() || failed {
                        return;
                    }
                    pos += n as u64;
                }
            }
        });
        for buf in from_reader {
            let buf = buf?;
            f(&buf)?;
            // The reader may have finished; then the buffer is dropped.
            let _ = to_reader.send(buf);
        }
        Ok(())
    })
}

/// Rename `tmp` to `out` (without replacing an existing file unless `overwrite`), and sync
/// the directory when `durable`.
pub(crate) fn persist(tmp: &Path, out: &Path, overwrite: bool, durable: bool) -> Result<()> {
    if overwrite {
        std::fs::rename(tmp, out)
    } else {
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            tmp,
            rustix::fs::CWD,
            out,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(std::io::Error::from)
    }
    .map_err(|e| Error::io_while(e, format!("renaming the bundle to {}", out.display())))?;
    if durable {
        fsutil::sync_dir(&fsutil::parent_dir(out))?;
    }
    Ok(())
}

/// Make `layer_path` a qcow2 overlay holding what `source`'s top layer holds, backed by
/// `disk.img` in RAW. It is built on top of the source's base (`base_path`), so that parts of
/// clusters the top does not cover are filled from the same content `disk.img` will have.
fn build_layer_from_top(
    source: &DiskImage,
    base_path: &Path,
    open: &OpenOptions,
    layer_path: &Path,
) -> Result<()> {
    let mut stack = DiskImage::open(base_path, open)
        .map_err(|e| Error::image(e, "opening the base"))
        .at_path(base_path)?;
    let storage = Arc::new(
        FileStorage::create_new(layer_path).map_err(|e| Error::image(e, format!("creating {LAYER}")))?,
    );
    let fail = |e: diskkit::Error| Error::image(e, format!("writing {LAYER}"));
    stack
        .append_new_on(storage, &LayerOptions::overlay().format(ImageFormat::Qcow2))
        .map_err(fail)?;
    if stack.size() != source.size() {
        stack.resize(source.size()).map_err(fail)?;
    }
    stack
        .top_layer()
        .set_layer_info(&LayerInfo {
            layer_type: Some(LayerType::Overlay),
            parent_path: Some(DISK.into()),
            parent_format: Some(ImageFormat::Raw),
            parent_uuid: None,
            ..stack.top_layer().layer_info()
        })
        .map_err(fail)?;
    let mut buf = vec![0u8; READ_BUFFER];
    source
        .for_each_extent(0, source.size(), |e| {
            if e.depth != 1 {
                return Ok(());
            }
            match e.kind {
                ExtentKind::Data => {
                    let mut pos = e.offset;
                    while pos < e.end() {
                        let n = (e.end() - pos).min(READ_BUFFER as u64) as usize;
                        source.read_at(&mut buf[..n], pos)?;
                        stack.write_at(&buf[..n], pos)?;
                        pos += n as u64;
                    }
                }
                ExtentKind::Zero => stack.write_zeroes(e.offset, e.length, true)?,
                ExtentKind::Absent => {}
            }
            Ok(())
        })
        .map_err(|e| Error::image(e, format!("copying the top layer into {LAYER}")))?;
    stack.flush().map_err(fail)
}

/// The runs of `image` that hold data, widened to whole 512-byte blocks (within the size) and
/// merged, with small holes merged away if there would be more than the sparse map allows.
fn data_regions(image: &DiskImage) -> Result<Vec<Region>> {
    let size = image.size();
    let block = BLOCK as u64;
    let mut regions: Vec<Region> = Vec::new();
    image
        .for_each_extent(0, size, |e| {
            if e.kind == ExtentKind::Data {
                let start = e.offset / block * block;
                let end = e.end().div_ceil(block).saturating_mul(block).min(size);
                match regions.last_mut() {
                    Some(last) if last.end() >= start => {
                        last.len = end.max(last.end()) - last.offset;
                    }
                    _ => regions.push(Region {
                        offset: start,
                        len: end - start,
                    }),
                }
            }
            Ok(())
        })
        .map_err(|e| Error::image(e, "mapping the image"))?;
    let mut gap = 64 << 10;
    while regions.len() > MAX_SPARSE_ENTRIES {
        let mut merged: Vec<Region> = Vec::with_capacity(regions.len());
        for r in regions {
            match merged.last_mut() {
                Some(last) if r.offset - last.end() < gap => last.len = r.end() - last.offset,
                _ => merged.push(r),
            }
        }
        regions = merged;
        gap *= 2;
    }
    Ok(regions)
}
