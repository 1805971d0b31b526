//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use diskkit::ImageFormat;

/// Create, inspect, convert and access virtual-machine disk images (RAW, ASIF).
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

/// How to open an existing image.
#[derive(Debug, Clone, Args)]
pub(crate) struct OpenArgs {
    /// The image's format; detected from its magic number when omitted. Give it for images a
    /// guest has written to: detection could be fooled by what the guest wrote.
    #[arg(short = 'f', long = "image-format", value_enum)]
    pub(crate) format: Option<Format>,
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
        /// Replace the destination if it exists.
        #[arg(long)]
        force: bool,
        /// Source image.
        src: PathBuf,
        /// Destination path.
        dst: PathBuf,
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
    /// Build a merged ext4 root filesystem from an OCI image (layout directory, OCI archive or
    /// docker-archive), rootless, with diskkit's own ext4 writer.
    Unpack {
        /// Output container format (raw or asif).
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
        /// The image: PATH or PATH:REF (REF: tag, ref.name annotation or sha256:digest).
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
