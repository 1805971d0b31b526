//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use diskkit::ImageFormat;

/// Create, inspect, stack, convert and access virtual-machine disk images (RAW, ASIF, qcow2).
#[derive(Debug, Parser)]
#[command(name = "diskkit", version, about, max_term_width = 100)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Raw,
    Asif,
    Qcow2,
}

impl From<Format> for ImageFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Raw => ImageFormat::Raw,
            Format::Asif => ImageFormat::Asif,
            Format::Qcow2 => ImageFormat::Qcow2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub(crate) enum Output {
    #[default]
    Human,
    Json,
}

/// What `check --repair` may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum RepairMode {
    /// Free leaked clusters only.
    Leaks,
    /// Also fix refcounts that are too low, copied flags and bad table entries.
    All,
}

/// How to open an existing image.
#[derive(Debug, Clone, Args)]
pub(crate) struct OpenArgs {
    /// The image's format; detected from its magic number when omitted. Give it for images a
    /// guest has written to: detection could be fooled by what the guest wrote.
    #[arg(short = 'f', long = "image-format", value_enum)]
    pub(crate) format: Option<Format>,
    /// Open only the named layer, without its parent (a qcow2 backing file): ranges it does
    /// not hold show as absent and read as zeroes. Read-only.
    #[arg(long)]
    pub(crate) detached: bool,
    /// Repair a qcow2 image left with the dirty or corrupt bit (a crash with lazy refcounts)
    /// before using it, as `diskkit check --repair all` does; only for commands that open the
    /// image for writing. Without it such images are refused.
    #[arg(long)]
    pub(crate) repair: bool,
    /// Read the image even while another process (QEMU, diskkit serve) has it open for writing,
    /// like `qemu-img -U`: read-only, and what is read may change meanwhile. Without it, images
    /// in use are refused (QEMU's locks are taken and honoured).
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    #[command(flatten)]
    pub(crate) parents: ParentArgs,
}

/// Which parent (backing) files a layer may name. By default only parents in the same
/// directory as the layer naming them are followed.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct ParentArgs {
    /// Also follow parents that resolve to a file under DIR (repeatable).
    #[arg(long = "allow-parent-dir", value_name = "DIR")]
    pub(crate) allow_parent_dir: Vec<PathBuf>,
    /// Follow any parent path a layer names, absolute or with `..`, wherever it leads.
    #[arg(long = "allow-any-parent")]
    pub(crate) allow_any_parent: bool,
}

/// The role of a new layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LayerKind {
    /// Copy-on-write: stores modifications.
    Overlay,
    /// Keeps blocks read from beneath it (for slow or remote bases).
    Cache,
}

#[derive(Debug, Subcommand)]
pub(crate) enum LayerCommand {
    /// Create a new empty layer on top of PARENT (an image or the top of a stack).
    Create {
        #[command(flatten)]
        open: OpenArgs,
        /// The layer's role.
        #[arg(long = "type", value_enum, default_value = "overlay")]
        kind: LayerKind,
        /// The new layer's format.
        #[arg(long = "format", id = "layer_format", value_enum, default_value = "asif")]
        format: Format,
        /// ASIF chunk size (default 1 MiB).
        #[arg(long)]
        chunk_size: Option<String>,
        /// The parent: an image or the top layer of a stack.
        #[arg(long)]
        parent: PathBuf,
        /// Replace the file if it exists.
        #[arg(long)]
        force: bool,
        /// Where to create the layer.
        path: PathBuf,
    },
}

/// Where to find a filesystem: an image (with its partition) or an Apple `container` store.
#[derive(Debug, Clone, Args)]
pub(crate) struct FsArgs {
    #[command(flatten)]
    pub(crate) open: OpenArgs,
    /// Partition to read: a number, a GPT partition name or UUID, an ext label or UUID, or
    /// `disk` for the whole disk (default: the whole disk if it holds ext, else the only ext
    /// partition). Same as IMAGE@N.
    #[arg(long)]
    pub(crate) partition: Option<String>,
    /// Read from the Apple `container` image store at ROOT: the image argument is then an
    /// image reference (e.g. `alpine:latest`), resolved to its unpacked ext4 snapshot.
    #[arg(long, value_name = "ROOT")]
    pub(crate) apple_store: Option<PathBuf>,
    /// Platform for --apple-store as OS/ARCH[/VARIANT] (default: linux and the host's CPU).
    #[arg(long, requires = "apple_store")]
    pub(crate) platform: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create a blank image (like `diskutil image create blank --fs none`).
    Create {
        /// Image format.
        #[arg(long, value_enum, default_value = "asif")]
        format: Format,
        /// Virtual size: bytes or a number with a unit (40G, 40GB, 40GiB, 512M).
        #[arg(long)]
        size: String,
        /// Block (sector) size.
        #[arg(long, default_value_t = 512, value_parser = block_size)]
        block_size: u32,
        /// ASIF chunk size (default 1 MiB).
        #[arg(long)]
        chunk_size: Option<String>,
        /// qcow2 cluster size (default 64 KiB).
        #[arg(long)]
        cluster_size: Option<String>,
        /// qcow2: record a backing file (as the new image will find it; not opened).
        #[arg(long, short = 'b')]
        backing: Option<String>,
        /// qcow2: the backing file's format to record.
        #[arg(long, short = 'F', value_enum, requires = "backing")]
        backing_format: Option<Format>,
        /// Replace the file if it exists.
        #[arg(long)]
        force: bool,
        /// Where to create the image.
        path: PathBuf,
    },
    /// Show an image's format, size, layer properties and space use.
    Info {
        #[command(flatten)]
        open: OpenArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// The image.
        path: PathBuf,
    },
    /// Convert an image to another format; ranges that read as zeroes are not written.
    Convert {
        #[command(flatten)]
        open: OpenArgs,
        /// Output format (default: the source's format).
        #[arg(short = 'O', long = "output-format", value_enum)]
        output_format: Option<Format>,
        /// Output block size (default: the source's).
        #[arg(long, value_parser = block_size)]
        block_size: Option<u32>,
        /// ASIF chunk size of the output (default 1 MiB).
        #[arg(long)]
        chunk_size: Option<String>,
        /// qcow2 cluster size of the output (default 64 KiB).
        #[arg(long)]
        cluster_size: Option<String>,
        /// Replace the destination if it exists.
        #[arg(long)]
        force: bool,
        /// Source image.
        src: PathBuf,
        /// Destination path.
        dst: PathBuf,
    },
    /// Check an image's consistency and optionally repair it (like `qemu-img check`). Exit
    /// status: 0 consistent, 1 the check failed, 2 corruptions left, 3 leaked clusters left.
    Check {
        /// The image's format; detected from its magic number when omitted.
        #[arg(short = 'f', long = "image-format", value_enum)]
        format: Option<Format>,
        /// Repair: `leaks` frees leaked clusters, `all` also fixes corruptions (qcow2).
        #[arg(short = 'r', long, value_enum)]
        repair: Option<RepairMode>,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// The image file (its parents are not opened).
        path: PathBuf,
    },
    /// Show which ranges hold data, read as zeroes, or are absent (like `qemu-img map`).
    Map {
        #[command(flatten)]
        open: OpenArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// The image.
        path: PathBuf,
    },
    /// Compare two images' contents; exit 0 when identical, 1 when different.
    Compare {
        /// Format of the first image.
        #[arg(short = 'f', long = "image-format", value_enum)]
        format_a: Option<Format>,
        /// Format of the second image.
        #[arg(short = 'F', long = "second-format", value_enum)]
        format_b: Option<Format>,
        #[command(flatten)]
        parents: ParentArgs,
        /// Fail when the sizes differ (otherwise the excess must read as zeroes).
        #[arg(short = 's', long)]
        strict: bool,
        /// First image.
        a: PathBuf,
        /// Second image.
        b: PathBuf,
    },
    /// Change an image's virtual size (absolute, or +SIZE / -SIZE).
    Resize {
        #[command(flatten)]
        open: OpenArgs,
        /// The image.
        path: PathBuf,
        /// New size, or +SIZE / -SIZE.
        #[arg(allow_hyphen_values = true)]
        size: String,
    },
    /// Write bytes from a file (default: stdin) into the virtual disk at an offset.
    Write {
        #[command(flatten)]
        open: OpenArgs,
        /// The image.
        path: PathBuf,
        /// Guest offset (bytes or with a unit).
        #[arg(long, default_value = "0")]
        offset: String,
        /// Input file; stdin when omitted.
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Read bytes from the virtual disk to a file (default: stdout).
    Read {
        #[command(flatten)]
        open: OpenArgs,
        /// The image.
        path: PathBuf,
        /// Guest offset.
        #[arg(long, default_value = "0")]
        offset: String,
        /// Number of bytes (default: to the end of the disk).
        #[arg(long)]
        length: Option<String>,
        /// Output file; stdout when omitted.
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// Stacked-image layers.
    #[command(subcommand)]
    Layer(LayerCommand),
    /// Freeze the top layer under a new name (printed) and put a new empty overlay on it, at
    /// the same path.
    Snapshot {
        #[command(flatten)]
        open: OpenArgs,
        /// The top layer of the stack.
        top: PathBuf,
    },
    /// Throw away everything written since the last snapshot: the top layer becomes empty.
    Restore {
        #[command(flatten)]
        open: OpenArgs,
        /// The top layer of the stack.
        top: PathBuf,
    },
    /// Merge the top layer into the layer beneath it, then empty the top.
    Commit {
        #[command(flatten)]
        open: OpenArgs,
        /// The top layer of the stack.
        top: PathBuf,
    },
    /// Write a whole stack out as one standalone image (sparse).
    Flatten {
        #[command(flatten)]
        open: OpenArgs,
        /// Output format (default: the top layer's; RAW stays RAW).
        #[arg(short = 'O', long = "output-format", value_enum)]
        output_format: Option<Format>,
        /// ASIF chunk size of the output (default 1 MiB).
        #[arg(long)]
        chunk_size: Option<String>,
        /// Replace the destination if it exists.
        #[arg(long)]
        force: bool,
        /// The top layer of the stack.
        top: PathBuf,
        /// Destination path.
        dst: PathBuf,
    },
    /// Move the top layer onto another parent without changing what the stack reads.
    Rebase {
        #[command(flatten)]
        open: OpenArgs,
        /// The new parent image.
        #[arg(short = 'b', long = "backing")]
        new_parent: PathBuf,
        /// Unsafe: only record the new parent, copying nothing (like `qemu-img rebase -u`); the
        /// old parents are not opened. What the stack reads changes wherever the new parent
        /// differs from the old one: use it when the new parent is a copy of the old (moved,
        /// renamed, converted) or the old one is gone.
        #[arg(short = 'u', long = "unsafe")]
        unsafe_rebase: bool,
        /// The top layer of the stack.
        top: PathBuf,
    },
    /// Discard a range of the virtual disk (it reads as zeroes afterwards).
    Discard {
        #[command(flatten)]
        open: OpenArgs,
        /// The image.
        path: PathBuf,
        /// Guest offset.
        #[arg(long)]
        offset: String,
        /// Number of bytes.
        #[arg(long)]
        length: String,
    },
    /// Serve images over NBD (to QEMU, libnbd tools, the Linux kernel, macOS VZ).
    Serve(crate::cmd::serve::ServeArgs),
    /// VM image bundles (taskcluster-worker's image.tar.zst): create, extract, verify, info.
    #[command(subcommand)]
    Bundle(crate::cmd::bundle::BundleCommand),
    /// The download-once image cache: fetch, instance, release, ls, rm, gc.
    Cache(crate::cmd::cache::CacheArgs),
    /// Pull a container image or a VM disk (tart's layout) from an OCI registry.
    Pull(crate::cmd::pull::Args),
    /// Push a disk image (tart's layout) or an OCI layout's image to an OCI registry.
    Push(crate::cmd::push::Args),
    /// List the partitions of a disk image (GPT or MBR).
    Partitions {
        #[command(flatten)]
        open: OpenArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// The image.
        path: PathBuf,
    },
    /// List a directory inside an image's ext2/3/4 filesystem: IMAGE[@PART]:/path.
    Ls {
        #[command(flatten)]
        fs: FsArgs,
        /// Long listing: type, mode, owner, size, modification time, symlink target.
        #[arg(short = 'l', long)]
        long: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// IMAGE[@PART][:/path] (the root when no path is given).
        target: String,
    },
    /// Write a file inside an image to stdout: IMAGE[@PART]:/path.
    Cat {
        #[command(flatten)]
        fs: FsArgs,
        /// IMAGE[@PART]:/path.
        target: String,
    },
    /// Show the metadata of a file inside an image: IMAGE[@PART]:/path.
    Stat {
        #[command(flatten)]
        fs: FsArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// IMAGE[@PART]:/path.
        target: String,
    },
    /// Copy a file or directory tree out of an image (modes, symlinks and times kept).
    Cp {
        #[command(flatten)]
        fs: FsArgs,
        /// Output format of the summary.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// IMAGE[@PART]:/path.
        src: String,
        /// Destination on the host (an existing directory receives the copy under its name).
        dest: PathBuf,
    },
    /// Find the bootable kernel in an image (UKI, or kernel + initramfs) and extract it.
    Kernel {
        #[command(flatten)]
        fs: FsArgs,
        /// Write the kernel, initramfs (or UKI) and cmdline into this directory; without it,
        /// only show what would be extracted.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// List every kernel found instead of choosing one.
        #[arg(long)]
        list: bool,
        /// Choose this kernel version instead of the highest.
        #[arg(long, value_name = "V")]
        kernel_version: Option<String>,
        /// For a UKI, also write its .linux, .initrd and .cmdline sections as vmlinuz,
        /// initramfs and cmdline.
        #[arg(long)]
        split_uki: bool,
        /// Replace existing files in the output directory.
        #[arg(long)]
        force: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// IMAGE[@PART] (or an image reference with --apple-store).
        image: String,
    },
    /// Build a merged ext4 root filesystem from an OCI image (layout directory, OCI archive or
    /// docker-archive), rootless, with diskkit's own ext4 writer.
    Unpack {
        /// Output container format (raw, asif or qcow2).
        #[arg(long, value_enum, default_value = "raw")]
        format: Format,
        /// Platform OS/ARCH[/VARIANT] (default: the host's).
        #[arg(long)]
        platform: Option<String>,
        /// Filesystem size (sparse); default: compact (content plus ~10%).
        #[arg(long)]
        size: Option<String>,
        /// Fixed UUID, hash seed and times derived from the manifest digest.
        #[arg(long)]
        reproducible: bool,
        /// Write ext4 metadata checksums (metadata_csum; needs Linux 3.18 or later).
        #[arg(long)]
        metadata_csum: bool,
        /// Replace the output if it exists.
        #[arg(long)]
        force: bool,
        /// Write an Apple `container` snapshot store entry in DIR
        /// (snapshots/<manifest-hex>/snapshot + snapshot-info) instead of DST; reused if present.
        #[arg(long, value_name = "DIR", conflicts_with = "dst")]
        store: Option<PathBuf>,
        #[command(flatten)]
        registry: crate::cmd::pull::RegistryArgs,
        /// The image: PATH or PATH:REF (REF: tag, ref.name annotation or sha256:digest), or
        /// a registry reference (HOST/REPO[:TAG], docker://NAME), pulled into the shared
        /// layout in $XDG_CACHE_HOME/diskkit/oci first.
        src: String,
        /// The ext4 image to create.
        #[arg(required_unless_present = "store")]
        dst: Option<PathBuf>,
    },
}

fn block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" | "4k" | "4K" => Ok(4096),
        _ => Err(format!("block size must be 512 or 4096, not '{s}'")),
    }
}
