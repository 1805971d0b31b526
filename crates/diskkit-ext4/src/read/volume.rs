//! Opening an ext2/3/4 filesystem inside a [`DiskImage`]: choosing the partition (or the whole
//! disk) and reading it through [`super::fs::Fs`].

use std::sync::Arc;

use diskkit::{DiskImage, Error, ErrorKind, Result};

use super::fs::Fs;
use super::partition::{read_partition_table, Partition, PartitionTable, PartitionType, SectorSource};

/// Which filesystem of a disk to open.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PartitionSelector {
    /// The whole disk if it holds a filesystem, else the only ext partition (or the only
    /// Linux root partition among several).
    #[default]
    Auto,
    /// The whole disk, ignoring any partition table.
    WholeDisk,
    /// Partition number (1-based, as Linux numbers them).
    Number(u32),
    /// A GPT partition name or unique GUID, or an ext filesystem label or UUID.
    Name(String),
}

impl PartitionSelector {
    /// Parse `N`, `0`/`disk` (whole disk), or a label/UUID.
    pub fn parse(s: &str) -> PartitionSelector {
        if s == "disk" || s == "0" {
            PartitionSelector::WholeDisk
        } else if let Ok(n) = s.parse::<u32>() {
            PartitionSelector::Number(n)
        } else {
            PartitionSelector::Name(s.to_owned())
        }
    }
}

/// Where a filesystem was found.
#[derive(Debug, Clone)]
pub struct FsLocation {
    /// The partition, or `None` for a whole-disk filesystem.
    pub partition: Option<Partition>,
    /// Byte offset of the filesystem in the disk.
    pub offset: u64,
    /// Bytes available to the filesystem.
    pub size: u64,
}

/// The bytes of one filesystem: a range of a [`DiskImage`].
struct ImageSlice {
    image: Arc<DiskImage>,
    offset: u64,
    size: u64,
}

impl SectorSource for ImageSlice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.size => self.image.read_at(buf, self.offset + offset),
            _ => Err(Error::out_of_bounds(format!(
                "read of {len} bytes at {offset} is past the end of the filesystem's {} bytes",
                self.size
            ))),
        }
    }
}

const EXT_MAGIC_OFFSET: u64 = 1024 + 0x38;

/// Whether an ext2/3/4 superblock sits at `offset`.
pub fn has_ext_superblock(image: &DiskImage, offset: u64, size: u64) -> Result<bool> {
    if size < 2048 {
        return Ok(false);
    }
    let mut magic = [0u8; 2];
    image.read_at(&mut magic, offset + EXT_MAGIC_OFFSET)?;
    Ok(magic == [0x53, 0xef])
}

/// The ext label and UUID at `offset` (assumes a superblock is there).
fn ext_label_uuid(image: &DiskImage, offset: u64) -> Result<(String, uuid::Uuid)> {
    let mut sb = [0u8; 256];
    image.read_at(&mut sb, offset + 1024)?;
    let mut id = [0u8; 16];
    id.copy_from_slice(&sb[0x68..0x78]);
    let label = &sb[0x78..0x88];
    let end = label.iter().position(|&b| b == 0).unwrap_or(16);
    Ok((
        String::from_utf8_lossy(&label[..end]).into_owned(),
        uuid::Uuid::from_bytes(id),
    ))
}

const ROOT_TYPES: [&str; 2] = [
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
    "b921b045-1df0-41c3-af44-4c6f280d3fae",
];

fn is_root_type(p: &Partition) -> bool {
    matches!(p.kind, PartitionType::Guid(g) if ROOT_TYPES.contains(&g.to_string().as_str()))
}

fn describe(p: &Partition) -> String {
    let mut s = format!("{} ({}", p.number, p.kind.name());
    if !p.name.is_empty() {
        s.push_str(&format!(", \"{}\"", p.name));
    }
    s.push(')');
    s
}

/// Find the filesystem `selector` names on `image`.
pub fn locate(image: &DiskImage, selector: &PartitionSelector) -> Result<FsLocation> {
    let whole = FsLocation {
        partition: None,
        offset: 0,
        size: image.size(),
    };
    if *selector == PartitionSelector::WholeDisk {
        return Ok(whole);
    }
    if *selector == PartitionSelector::Auto && has_ext_superblock(image, 0, image.size())? {
        return Ok(whole);
    }
    let table: Option<PartitionTable> = read_partition_table(image, image.block_size())
        .map_err(|e| e.with_operation("reading the partition table"))?;
    let Some(table) = table else {
        if has_ext_superblock(image, 0, image.size())? {
            return Ok(whole);
        }
        return Err(Error::new(
            ErrorKind::NotFound,
            "no partition table and no ext2/3/4 filesystem on the whole disk",
        ));
    };
    let at = |p: &Partition| FsLocation {
        partition: Some(p.clone()),
        offset: p.offset,
        size: p.size,
    };
    match selector {
        PartitionSelector::Number(n) => table
            .partitions
            .iter()
            .find(|p| p.number == *n)
            .map(at)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "no partition {n} (the {} table has: {})",
                        table.kind,
                        list(&table)
                    ),
                )
            }),
        PartitionSelector::Name(name) => {
            let lower = name.to_ascii_lowercase();
            for p in &table.partitions {
                if p.name == *name || p.uuid.is_some_and(|u| u.to_string() == lower) {
                    return Ok(at(p));
                }
            }
            for p in &table.partitions {
                if has_ext_superblock(image, p.offset, p.size)? {
                    let (label, id) = ext_label_uuid(image, p.offset)?;
                    if label == *name || id.to_string() == lower {
                        return Ok(at(p));
                    }
                }
            }
            Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "no partition named or with UUID '{name}' (partitions: {})",
                    list(&table)
                ),
            ))
        }
        PartitionSelector::Auto | PartitionSelector::WholeDisk => {
            let mut ext = Vec::new();
            for p in &table.partitions {
                if has_ext_superblock(image, p.offset, p.size)? {
                    ext.push(p);
                }
            }
            match ext.len() {
                0 => Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "no ext2/3/4 filesystem in any partition (the {} table has: {})",
                        table.kind,
                        list(&table)
                    ),
                )),
                1 => Ok(at(ext[0])),
                _ => {
                    let roots: Vec<_> = ext.iter().filter(|p| is_root_type(p)).collect();
                    if roots.len() == 1 {
                        return Ok(at(roots[0]));
                    }
                    Err(Error::new(
                        ErrorKind::InvalidArgument,
                        format!(
                            "several partitions hold ext filesystems: {}; choose one with IMAGE@N or --partition",
                            ext.iter().map(|p| describe(p)).collect::<Vec<_>>().join(", ")
                        ),
                    ))
                }
            }
        }
    }
}

/// Every ext2/3/4 filesystem on `image`: the whole disk, or each partition that holds one,
/// XBOOTLDR (`/boot`) partitions and partitions named `boot` first.
pub fn ext_locations(image: &DiskImage) -> Result<Vec<FsLocation>> {
    if has_ext_superblock(image, 0, image.size())? {
        return Ok(vec![FsLocation {
            partition: None,
            offset: 0,
            size: image.size(),
        }]);
    }
    let Some(table) = read_partition_table(image, image.block_size())? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for p in &table.partitions {
        if has_ext_superblock(image, p.offset, p.size)? {
            out.push(FsLocation {
                partition: Some(p.clone()),
                offset: p.offset,
                size: p.size,
            });
        }
    }
    let is_boot = |l: &FsLocation| {
        l.partition.as_ref().is_some_and(|p| {
            p.name.eq_ignore_ascii_case("boot")
                || matches!(p.kind, PartitionType::Guid(g) if g.to_string() == "bc13c2ff-59e6-4262-a352-b275fd6f7172")
                || p.kind == PartitionType::Mbr(0xea)
        })
    };
    out.sort_by_key(|l| !is_boot(l));
    Ok(out)
}

fn list(table: &PartitionTable) -> String {
    if table.partitions.is_empty() {
        return "no partitions".to_owned();
    }
    table
        .partitions
        .iter()
        .map(describe)
        .collect::<Vec<_>>()
        .join(", ")
}

/// An open ext2/3/4 filesystem and where it lives.
#[derive(Clone, Debug)]
pub struct Filesystem {
    fs: Fs,
    location: FsLocation,
}

impl Filesystem {
    /// Open the filesystem `selector` names on `image`.
    pub fn open(image: Arc<DiskImage>, selector: &PartitionSelector) -> Result<Filesystem> {
        let location = locate(&image, selector)?;
        Filesystem::open_at(image, location)
    }

    /// Open the filesystem at a known location. A journal that needs recovery is replayed in
    /// memory; the image is not written.
    pub fn open_at(image: Arc<DiskImage>, location: FsLocation) -> Result<Filesystem> {
        let end = location.offset.checked_add(location.size);
        if end.is_none_or(|e| e > image.size()) {
            return Err(Error::out_of_bounds(
                "filesystem extends past the end of the disk",
            ));
        }
        let src = ImageSlice {
            image,
            offset: location.offset,
            size: location.size,
        };
        let fs = Fs::open(Arc::new(src)).map_err(|e| {
            let where_ = match &location.partition {
                Some(p) => format!("partition {}", p.number),
                None => "the whole disk".to_owned(),
            };
            Error::new(e.kind(), format!("cannot open the ext filesystem on {where_}"))
                .with_offset(location.offset)
                .with_source(e)
        })?;
        Ok(Filesystem { fs, location })
    }

    /// The filesystem reader.
    pub fn fs(&self) -> &Fs {
        &self.fs
    }

    /// Where the filesystem lives.
    pub fn location(&self) -> &FsLocation {
        &self.location
    }
}
