//! Option groups shared by several commands, each a `#[command(flatten)]` struct that only
//! the commands using it include (so every command's help lists only options it honours).
//!
//! Naming, the same in every command:
//! - `-f/--image-format FORMAT`: the format of an image being *opened* (skips detection);
//! - `-O/--format FORMAT`: the format of an image being *written* (else its extension);
//! - `--output human|json`: the style of a report on stdout;
//! - `-q/--quiet`: no line saying what was done.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use diskkit::{OpenOptions, ParentPolicy};

use crate::format::Format;

/// How to open an existing image (and the stack beneath it).
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct OpenArgs {
    /// The format of the image being opened (raw, asif, qcow2); detected from its magic
    /// number when omitted. Give it for images a guest writes to: a guest could write a header
    /// that detection would believe.
    #[arg(short = 'f', long = "image-format", value_enum, value_name = "FORMAT")]
    pub(crate) format: Option<Format>,
    /// Read the image even while another process (QEMU, diskkit serve) has it open for
    /// writing, like `qemu-img -U`; what is read may change meanwhile. Without it, images in
    /// use are refused (diskkit takes and honours QEMU's image locks). Only for reading: a
    /// command that writes the image refuses it.
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    #[command(flatten)]
    pub(crate) parents: ParentArgs,
}

impl OpenArgs {
    /// Open options for this command line: the format, locking (`-U`) and the parent policy.
    pub(crate) fn options(&self, writable: bool) -> OpenOptions {
        let mut options = OpenOptions::new()
            .writable(writable)
            .force_share(self.force_share)
            .parents(self.parents.policy());
        if let Some(f) = self.format {
            options = options.format(f.into());
        }
        options
    }
}

/// Which parent (backing) files a layer may name. By default only parents in the same
/// directory as the layer naming them are followed.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct ParentArgs {
    /// Also follow parents that resolve to a file under DIR (repeatable). Without it, only
    /// parents in the same directory as the layer that names them are opened.
    #[arg(long = "allow-parent-dir", value_name = "DIR", help_heading = "Parent files")]
    pub(crate) allow_parent_dir: Vec<PathBuf>,
    /// Follow any parent path a layer names, absolute or with `..`, wherever it leads (only
    /// for images you trust).
    #[arg(long = "allow-any-parent", help_heading = "Parent files")]
    pub(crate) allow_any_parent: bool,
}

impl ParentArgs {
    /// The policy: the same directory, plus `--allow-parent-dir`, or anything.
    pub(crate) fn policy(&self) -> ParentPolicy {
        let mut policy = if self.allow_any_parent {
            ParentPolicy::any()
        } else {
            ParentPolicy::same_directory()
        };
        for dir in &self.allow_parent_dir {
            policy = policy.allow_directory(dir);
        }
        policy
    }
}

/// `--detached`, for commands that only read.
#[derive(Debug, Clone, Copy, Default, Args)]
pub(crate) struct DetachedArg {
    /// Open only the named layer, without its parent (a qcow2 backing file): ranges it does
    /// not hold show as absent and read as zeroes.
    #[arg(long)]
    pub(crate) detached: bool,
}

/// `--repair`, for commands that open an image for writing.
#[derive(Debug, Clone, Copy, Default, Args)]
pub(crate) struct RepairArg {
    /// Repair a qcow2 image left with the dirty or corrupt bit (a crash with lazy refcounts)
    /// before writing to it, as `diskkit check --repair all` does; without it such images are
    /// refused.
    #[arg(long)]
    pub(crate) repair: bool,
}

/// The style of a report on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub(crate) enum Output {
    /// Lines for people.
    #[default]
    Human,
    /// One JSON document, for programs.
    Json,
}

/// `--output human|json`, for commands that print a report.
#[derive(Debug, Clone, Copy, Default, Args)]
pub(crate) struct OutputArg {
    /// Report style: `human` lines or one `json` document.
    #[arg(long, value_enum, default_value_t, value_name = "STYLE")]
    pub(crate) output: Output,
}

/// `-q/--quiet`, for commands that create or change something.
#[derive(Debug, Clone, Copy, Default, Args)]
pub(crate) struct QuietArg {
    /// Do not print the line saying what was done (errors and warnings still go to stderr).
    #[arg(short, long)]
    pub(crate) quiet: bool,
}

/// The format and allocation unit of a new image.
#[derive(Debug, Clone, Copy, Default, Args)]
pub(crate) struct NewImageArgs {
    /// Format of the new image: raw, asif or qcow2. Default: from the file name's extension
    /// (.qcow2, .asif, .raw; .img and anything else: raw).
    #[arg(
        short = 'O',
        long = "format",
        id = "new_format",
        value_enum,
        value_name = "FORMAT"
    )]
    pub(crate) format: Option<Format>,
    /// ASIF: chunk size, the unit of allocation (default 1M).
    #[arg(long, value_name = "SIZE", value_parser = crate::size::unit_size)]
    pub(crate) chunk_size: Option<u32>,
    /// qcow2: cluster size (default 64K).
    #[arg(long, value_name = "SIZE", value_parser = crate::size::unit_size)]
    pub(crate) cluster_size: Option<u32>,
}

/// Parse a block size: 512 or 4096.
pub(crate) fn block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" | "4k" | "4K" => Ok(4096),
        _ => Err("the block size is 512 or 4096".into()),
    }
}
