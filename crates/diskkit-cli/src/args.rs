//! Option groups shared by several commands, each a `#[command(flatten)]` struct that only
//! the commands using it include (so every command's help lists only options it honours).
//!
//! Naming, the same in every command:
//! - `-f/--image-format FORMAT`: the format of an image being *opened* (skips detection);
//! - `-O/--format FORMAT`: the format of an image being *written* (else its extension);
//! - `--output human|json`: the style of a report on stdout;
//! - `-q/--quiet`: no line saying what was done.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use diskkit::{OpenOptions, ParentPolicy};
use diskkit_deliver::remote::{AllowRemote, RemoteOptions, RemoteResolver};

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
    /// Keep the cache layer of the stack under SIZE, evicting the least recently used blocks
    /// (they are fetched again when read). ASIF cache layers only; at least 64M.
    #[arg(long, value_name = "SIZE", value_parser = cache_size, help_heading = "Remote bases")]
    pub(crate) max_cache_size: Option<u64>,
}

/// Parse `--max-cache-size`: a size, at least 64 MiB (a smaller bound would evict a remote
/// base's read-ahead window, up to 32 MiB, before it is read).
fn cache_size(text: &str) -> Result<u64, String> {
    let bytes = crate::size::bytes(text)?.value;
    if bytes < 64 << 20 {
        return Err(format!("'{text}' is too small for a cache: give at least 64M"));
    }
    Ok(bytes)
}

impl OpenArgs {
    /// Open options for this command line: the format, locking (`-U`) and the parent policy.
    pub(crate) fn options(&self, writable: bool) -> OpenOptions {
        let mut options = OpenOptions::new()
            .writable(writable)
            .force_share(self.force_share)
            .parents(self.parents.policy())
            .max_cache_size(self.max_cache_size);
        if let Some(f) = self.format {
            options = options.format(f.into());
        }
        options
    }
}

/// Which parent (backing) files a layer may name. By default only parents in the same
/// directory as the layer naming them are followed.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct FileParentArgs {
    /// Also follow parents that resolve to a file under DIR (repeatable). Without it, only
    /// parents in the same directory as the layer that names them are opened.
    #[arg(long = "allow-parent-dir", value_name = "DIR", help_heading = "Parent files")]
    pub(crate) allow_parent_dir: Vec<PathBuf>,
    /// Follow any parent path a layer names, absolute or with `..`, wherever it leads (only
    /// for images you trust).
    #[arg(long = "allow-any-parent", help_heading = "Parent files")]
    pub(crate) allow_any_parent: bool,
}

/// Which parents a layer may name: files ([`FileParentArgs`]) and remote bases under cache
/// layers (`--allow-remote`), and how remote bases are read.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct ParentArgs {
    #[command(flatten)]
    pub(crate) files: FileParentArgs,
    /// Open remote parents (http://, https://, s3:// URLs that cache layers name) on HOST
    /// (repeatable): a host name, HOST:PORT, or an S3 bucket. --allow-any-parent allows any.
    #[arg(long = "allow-remote", value_name = "HOST", help_heading = "Remote bases")]
    pub(crate) allow_remote: Vec<String>,
    /// Also trust the CA certificates in this PEM file for https:// parents (repeatable).
    #[arg(long = "ca-cert", value_name = "FILE", help_heading = "Remote bases")]
    pub(crate) ca_cert: Vec<PathBuf>,
    /// The endpoint of an S3-compatible store for s3:// parents (default: AWS, or
    /// AWS_ENDPOINT_URL).
    #[arg(long = "s3-endpoint", value_name = "URL", help_heading = "Remote bases")]
    pub(crate) s3_endpoint: Option<String>,
}

impl ParentArgs {
    /// The policy: the same directory, plus `--allow-parent-dir`, or anything; remote parents
    /// on the hosts `--allow-remote` names (any with `--allow-any-parent`).
    pub(crate) fn policy(&self) -> ParentPolicy {
        let mut policy = if self.files.allow_any_parent {
            ParentPolicy::any()
        } else {
            ParentPolicy::same_directory()
        };
        for dir in &self.files.allow_parent_dir {
            policy = policy.allow_directory(dir);
        }
        // Always a resolver: with no host allowed, a remote parent is refused by it, naming
        // the exact `--allow-remote HOST:PORT` that would open it.
        let resolver = RemoteResolver::new(self.remote_options(), self.allow_remote());
        policy.with_resolver(Arc::new(resolver))
    }

    /// The remote hosts allowed: those `--allow-remote` names, or any with
    /// `--allow-any-parent`.
    pub(crate) fn allow_remote(&self) -> AllowRemote {
        if self.files.allow_any_parent {
            AllowRemote::Any
        } else {
            AllowRemote::Hosts(self.allow_remote.clone())
        }
    }

    /// How remote bases are read: `--ca-cert`, `--s3-endpoint`.
    pub(crate) fn remote_options(&self) -> RemoteOptions {
        let mut options = RemoteOptions::default();
        options.client.extra_ca_files.clone_from(&self.ca_cert);
        options.s3.endpoint.clone_from(&self.s3_endpoint);
        options
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
