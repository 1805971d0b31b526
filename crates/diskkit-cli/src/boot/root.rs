//! The root filesystem of the disk being booted: where it is, how the kernel command line
//! names it, and what the system on it can do (systemd, a shell).

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use diskkit::DiskImage;
use diskkit_ext4::read::volume::locate;
use diskkit_ext4::read::{Filesystem, FsLocation, PartitionSelector};

/// The oldest systemd whose credentials (fw_cfg `opt/io.systemd.credentials/`) and
/// `systemd.run=` diskkit relies on for COMMAND: Debian 12's 252.
pub(crate) const MIN_SYSTEMD: u32 = 252;

/// The root filesystem of a disk.
#[derive(Debug, Clone)]
pub(crate) struct RootFs {
    /// The whole disk (the stack, read-only).
    pub(crate) disk: Arc<DiskImage>,
    /// Where the root filesystem is.
    pub(crate) location: FsLocation,
    /// Whether the user named the partition (then the kernel is looked for there only).
    pub(crate) named_partition: bool,
    /// The filesystem UUID, from its superblock.
    pub(crate) uuid: uuid::Uuid,
    /// The filesystem label.
    pub(crate) label: String,
}

/// Signatures of filesystems people try to boot that are not ext: (offset, magic, name).
const OTHER_FILESYSTEMS: [(u64, &[u8], &str); 6] = [
    (0, b"XFSB", "XFS"),
    (0x10040, b"_BHRfS_M", "Btrfs"),
    (0, b"hsqs", "SquashFS"),
    (1024, &[0xE2, 0xE1, 0xF5, 0xE0], "EROFS"),
    (0x52, b"FAT32   ", "FAT32"),
    (0x36, b"FAT1", "FAT"),
];

/// Name the non-ext filesystem at `offset`, if it is a known one.
fn identify(disk: &DiskImage, offset: u64, size: u64) -> Option<&'static str> {
    for (at, magic, name) in OTHER_FILESYSTEMS {
        let end = offset.checked_add(at)?.checked_add(magic.len() as u64)?;
        if end > offset.saturating_add(size) || end > disk.size() {
            continue;
        }
        let mut buf = vec![0u8; magic.len()];
        if disk.read_at(&mut buf, offset + at).is_ok() && buf == magic {
            return Some(name);
        }
    }
    None
}

impl RootFs {
    /// Find the root filesystem of `disk` (`selector` as `kernel` and `ls` take it) and read
    /// its superblock. A disk whose root is not ext2/3/4 is refused, naming what it holds
    /// when diskkit recognises it.
    pub(crate) fn open(disk: Arc<DiskImage>, selector: &PartitionSelector) -> Result<RootFs> {
        let location = match locate(&disk, selector) {
            Ok(l) => l,
            Err(e) => {
                if let Some(name) = identify(&disk, 0, disk.size()) {
                    bail!("the disk holds {name}, not ext2/3/4: diskkit boots ext4 roots only");
                }
                return Err(anyhow!(e)).context("no ext2/3/4 root filesystem");
            }
        };
        let mut sb = [0u8; 256];
        disk.read_at(&mut sb, location.offset + 1024)
            .context("reading the root filesystem's superblock")?;
        if sb[0x38..0x3A] != [0x53, 0xEF] {
            if let Some(name) = identify(&disk, location.offset, location.size) {
                bail!("the root partition holds {name}, not ext2/3/4: diskkit boots ext4 roots only");
            }
            bail!("the root partition holds no ext2/3/4 filesystem (no superblock magic at byte 1080)");
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&sb[0x68..0x78]);
        let label = &sb[0x78..0x88];
        let end = label.iter().position(|&b| b == 0).unwrap_or(16);
        Ok(RootFs {
            disk,
            location,
            named_partition: *selector != PartitionSelector::Auto,
            uuid: uuid::Uuid::from_bytes(id),
            label: String::from_utf8_lossy(&label[..end]).into_owned(),
        })
    }

    /// Open the root filesystem for reading files.
    pub(crate) fn filesystem(&self) -> Result<Filesystem> {
        Filesystem::open_at(self.disk.clone(), self.location.clone()).context("opening the root filesystem")
    }

    /// The kernel's `root=`: the GPT partition's unique GUID (`PARTUUID=`, which the kernel
    /// resolves itself), else the filesystem UUID (`UUID=`, resolved by the initramfs). A
    /// kernel booted without an initramfs gets the device name instead (`/dev/vda`,
    /// `/dev/vdaN`): without an initramfs nothing resolves `UUID=`.
    pub(crate) fn root_arg(&self, have_initramfs: bool) -> String {
        match (&self.location.partition, have_initramfs) {
            (Some(p), _) if p.uuid.is_some() => {
                format!("root=PARTUUID={}", p.uuid.unwrap_or_default())
            }
            (Some(p), false) => format!("root=/dev/vda{}", p.number),
            (None, false) => "root=/dev/vda".to_owned(),
            (_, true) => format!("root=UUID={}", self.uuid),
        }
    }

    /// Describe where the root is: `partition 2` or `the whole disk`, and its label.
    pub(crate) fn describe(&self) -> String {
        let place = match &self.location.partition {
            Some(p) => format!("partition {}", p.number),
            None => "the whole disk".to_owned(),
        };
        if self.label.is_empty() {
            place
        } else {
            format!("{place}, label '{}'", self.label)
        }
    }
}

/// What the system in the root filesystem can run.
#[derive(Debug, Clone, Default)]
pub(crate) struct System {
    /// The init the kernel starts (`init=` from the command line, or `/sbin/init`) resolved
    /// inside the image, if it exists.
    pub(crate) init: Option<String>,
    /// Whether that init is systemd.
    pub(crate) systemd: bool,
    /// systemd's version, from its `libsystemd-shared-NNN.so`.
    pub(crate) systemd_version: Option<u32>,
    /// Whether `/bin/sh` exists.
    pub(crate) shell: bool,
}

/// Resolve `path` inside `fs`, following symlinks (at most 40), like the kernel resolving
/// `init`. `None` when it does not exist.
fn resolve(fs: &Filesystem, path: &str) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    let mut pending: Vec<String> = path.split('/').rev().map(str::to_owned).collect();
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        match c.as_str() {
            "" | "." => continue,
            ".." => {
                parts.pop();
                continue;
            }
            _ => {}
        }
        let here = format!(
            "/{}",
            parts
                .iter()
                .chain(std::iter::once(&c))
                .cloned()
                .collect::<Vec<_>>()
                .join("/")
        );
        let entry = fs.stat(&here).ok()?;
        match entry.target {
            Some(target) if entry.file_type == "symlink" => {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                if target.starts_with('/') {
                    parts.clear();
                }
                pending.extend(target.split('/').rev().map(str::to_owned));
            }
            _ => parts.push(c),
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// The systemd version from the name of its shared library, looked for where
/// distributions put it.
fn systemd_version(fs: &Filesystem) -> Option<u32> {
    let mut dirs = vec![
        "/usr/lib/systemd".to_owned(),
        "/lib/systemd".to_owned(),
        "/usr/lib64/systemd".to_owned(),
    ];
    if let Ok(names) = fs.read_dir_names("/usr/lib") {
        for n in names {
            let n = String::from_utf8_lossy(&n);
            if n.ends_with("-linux-gnu") || n.ends_with("-linux-musl") {
                dirs.push(format!("/usr/lib/{n}/systemd"));
            }
        }
    }
    for d in dirs {
        let Ok(names) = fs.read_dir_names(&d) else {
            continue;
        };
        for n in names {
            let n = String::from_utf8_lossy(&n);
            if let Some(v) = n
                .strip_prefix("libsystemd-shared-")
                .and_then(|r| r.strip_suffix(".so"))
                .and_then(|v| v.split(['.', '-', '~']).next())
                .and_then(|v| v.parse().ok())
            {
                return Some(v);
            }
        }
    }
    None
}

impl System {
    /// Look at the root filesystem: which init the kernel will start (`init_arg` from the
    /// command line, else `/sbin/init`), whether it is systemd and which version.
    pub(crate) fn inspect(fs: &Filesystem, init_arg: Option<&str>) -> System {
        let init = resolve(fs, init_arg.unwrap_or("/sbin/init"));
        let systemd = init
            .as_deref()
            .is_some_and(|p| p.rsplit('/').next() == Some("systemd"));
        System {
            systemd_version: if systemd { systemd_version(fs) } else { None },
            init,
            systemd,
            shell: resolve(fs, "/bin/sh").is_some(),
        }
    }

    /// Why COMMAND cannot be run through systemd in this system, if it cannot.
    pub(crate) fn command_blocker(&self, init_arg: Option<&str>) -> Option<String> {
        let init = init_arg.unwrap_or("/sbin/init");
        if !self.systemd {
            return Some(match &self.init {
                Some(p) => format!(
                    "the image's init ({init} -> {p}) is not systemd: COMMAND is run through systemd \
                     (credentials and systemd.run=); boot without COMMAND for the console, or use --ssh"
                ),
                None => format!(
                    "the image has no {init}: COMMAND is run through systemd; boot without COMMAND \
                     for the console"
                ),
            });
        }
        if let Some(v) = self.systemd_version.filter(|&v| v < MIN_SYSTEMD) {
            return Some(format!(
                "the image's systemd is version {v}; COMMAND needs {MIN_SYSTEMD} or later \
                 (system credentials over fw_cfg); use --ssh or the console"
            ));
        }
        if !self.shell {
            return Some("the image has no /bin/sh, which runs COMMAND in the guest".to_owned());
        }
        None
    }
}
