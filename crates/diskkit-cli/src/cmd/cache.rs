//! `diskkit cache fetch|instance|release|ls|rm|gc`: the download-once image cache.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use diskkit_deliver::bundle;
use diskkit_deliver::cache::{Cache, FetchEvent, FetchOptions, GcOptions, Holder, Source};
use diskkit_deliver::http::ClientOptions;
use serde_json::json;

use crate::args::Output;
use crate::progress::bytes_bar;
use crate::size::{self, human, Bytes};

/// A download-once cache of VM images, and writable instances of them
///
/// Each image is downloaded once, however many processes ask for it at the same time;
/// instances are writable qcow2 overlays on the shared base, referenced until released or
/// until their holder process exits. See docs/bundles.md.
#[derive(Debug, Clone, Args)]
#[command(after_help = "\
Examples:
  # Download once, then one writable instance per VM
  diskkit cache fetch debian-12 https://example.com/debian-12.tar.zst
  disk=$(diskkit cache instance debian-12 --name vm1)
  diskkit cache release vm1")]
pub(crate) struct CacheArgs {
    /// The cache directory (default: $XDG_CACHE_HOME/diskkit/images, or
    /// ~/.cache/diskkit/images).
    #[arg(long, value_name = "DIR", global = true)]
    dir: Option<PathBuf>,
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(Debug, Clone, Subcommand)]
enum CacheCommand {
    /// Download (or copy) an image into the cache under ID, unless it is there
    ///
    /// A bundle (image.tar.zst) is checked and extracted while it downloads; a plain image
    /// (RAW, qcow2, ASIF) becomes a sparse disk.img. Resumes interrupted downloads; retries
    /// with backoff.
    #[command(
        after_help = "Examples:\n  # Download a bundle once, checked and extracted while it downloads\n  diskkit cache fetch debian-12 https://example.com/debian-12.tar.zst --sha256 9f86d08...\n  # A local qcow2 image\n  diskkit cache fetch alpine ./alpine.qcow2"
    )]
    Fetch {
        /// The entry's name in the cache.
        id: String,
        /// An http(s):// URL or a local path.
        source: String,
        /// The SHA-256 the source file must have (64 hex digits).
        #[arg(long, value_name = "HEX")]
        sha256: Option<String>,
        /// The largest disk accepted (e.g. 80G).
        #[arg(long, value_name = "SIZE", default_value = "50G", value_parser = size::bytes)]
        max_disk_size: Bytes,
        /// Trust the CA certificates in this PEM file too (repeatable).
        #[arg(long = "ca-file", value_name = "FILE")]
        ca_files: Vec<PathBuf>,
        /// Seconds without data before a transfer counts as stalled.
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        timeout: u64,
        /// Attempts in a row without progress before giving up.
        #[arg(long, value_name = "N", default_value_t = 7)]
        retries: u32,
        /// Do not fsync the entry before adding it (faster; a power failure soon after
        /// may leave it damaged). For machines whose disks do not outlive a crash anyway.
        #[arg(long)]
        no_sync: bool,
        /// Print nothing on success.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Make a writable instance of a cached image for one VM; prints its overlay's path
    ///
    /// An instance is a qcow2 overlay on the shared base and a copy of the machine
    /// definition. The entry stays referenced until `release NAME`, or until the holding
    /// process exits.
    #[command(
        after_help = "Examples:\n  # A writable overlay on the cached image, for one VM\n  disk=$(diskkit cache instance debian-12 --name vm1)\n  # Kept until released; booted with its machine.json, its writes kept in it\n  diskkit cache instance debian-12 --name vm2 --persistent\n  diskkit boot --instance vm2 -- uname -a"
    )]
    Instance {
        /// The cached image.
        id: String,
        /// The instance's name (default: ID-<random>).
        #[arg(long)]
        name: Option<String>,
        /// The process holding the reference (default: the one that ran this command); the
        /// reference is dropped once it has exited.
        #[arg(long, value_name = "PID", conflicts_with = "persistent")]
        pid: Option<u32>,
        /// Hold the reference until `release`, whatever happens to processes.
        #[arg(long)]
        persistent: bool,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Release an instance: its overlay, machine copy and reference are removed
    #[command(after_help = "Examples:\n  # Drop the instance vm1\n  diskkit cache release vm1")]
    Release {
        /// The instance's name.
        name: String,
        /// Print nothing on success.
        #[arg(short, long)]
        quiet: bool,
    },
    /// List the cached images: size, references (live instances), last use.
    #[command(after_help = "Examples:\n  # The cached images, as JSON\n  diskkit cache ls --output json")]
    Ls {
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
    },
    /// Remove a cached image (refused while an instance references it).
    #[command(after_help = "Examples:\n  # Remove an unreferenced image\n  diskkit cache rm debian-12")]
    Rm {
        /// The cached image.
        id: String,
        /// Print nothing on success.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Repair the cache and remove unreferenced images, least recently used first, until the limits hold
    ///
    /// Never removes an image in use or being fetched.
    #[command(
        after_help = "Examples:\n  # Keep the cache under 100 GiB and drop what is unused for 30 days\n  diskkit cache gc --max-size 100G --older-than 30d"
    )]
    Gc {
        /// Keep the cache at most this large (e.g. 100G).
        #[arg(long, value_name = "SIZE", value_parser = size::bytes)]
        max_size: Option<Bytes>,
        /// Keep at least this much free space on its file system.
        #[arg(long, value_name = "SIZE", value_parser = size::bytes)]
        min_free: Option<Bytes>,
        /// Remove images unused for longer than this (e.g. 30d, 12h, 90m, 3600s).
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "human")]
        output: Output,
        /// Print nothing on success.
        #[arg(short, long)]
        quiet: bool,
    },
}

/// Parse `30d`, `12h`, `90m`, `45s`, `2w` or plain seconds.
fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().with_context(|| {
        format!("invalid duration '{text}': expected a number and a unit (s, m, h, d, w)")
    })?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        other => bail!("invalid duration '{text}': unknown unit '{other}' (s, m, h, d, w)"),
    };
    Ok(Duration::from_secs(n.saturating_mul(scale)))
}

fn ago(secs: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let d = now.saturating_sub(secs);
    match d {
        0..=119 => format!("{d} s ago"),
        120..=7199 => format!("{} min ago", d / 60),
        7200..=172_799 => format!("{} h ago", d / 3600),
        _ => format!("{} days ago", d / 86400),
    }
}

pub(crate) fn run(args: CacheArgs) -> Result<u8> {
    let root = match args.dir {
        Some(d) => d,
        None => Cache::default_dir()?,
    };
    let cache = Cache::open(&root).with_context(|| format!("cannot open the cache '{}'", root.display()))?;
    match args.command {
        CacheCommand::Fetch {
            id,
            source,
            sha256,
            max_disk_size,
            ca_files,
            timeout,
            retries,
            no_sync,
            quiet,
        } => {
            let options = FetchOptions {
                sha256: sha256.as_deref().map(bundle::parse_sha256).transpose()?,
                max_disk_size: max_disk_size.value,
                http: ClientOptions {
                    read_timeout: Duration::from_secs(timeout.max(1)),
                    extra_ca_files: ca_files,
                    retry: diskkit_deliver::http::RetryPolicy {
                        attempts: retries.max(1),
                        ..Default::default()
                    },
                    ..ClientOptions::default()
                },
                sync: !no_sync,
            };
            let bar = bytes_bar(0, &format!("fetching {id}"));
            let terminal = std::io::stderr().is_terminal();
            let mut downloaded = None;
            let fetched = cache
                .fetch(&id, &Source::parse(&source), &options, &mut |ev| match ev {
                    FetchEvent::Waiting => bar.set_message(format!("waiting for another fetch of {id}")),
                    FetchEvent::Transfer { done, total } => {
                        if let Some(t) = total {
                            bar.set_length(t);
                        }
                        bar.set_position(done);
                    }
                    FetchEvent::Resumed { from } => {
                        if !quiet {
                            bar.suspend(|| {
                                eprintln!("diskkit: resuming the download of {id} at {}", human(from))
                            });
                        }
                    }
                    FetchEvent::Retry { error, wait } => {
                        if !quiet {
                            bar.suspend(|| {
                                eprintln!(
                                    "diskkit: warning: {error}; retrying in {:.1} s",
                                    wait.as_secs_f64()
                                )
                            });
                        }
                    }
                    FetchEvent::Downloaded {
                        transferred, seconds, ..
                    } => downloaded = Some((transferred, seconds)),
                    FetchEvent::Converting => {
                        if terminal {
                            bar.set_message(format!("converting {id}"));
                        }
                    }
                })
                .with_context(|| format!("cannot fetch '{id}'"))?;
            bar.finish_and_clear();
            if !quiet {
                let e = &fetched.entry;
                let how = if fetched.made { "fetched" } else { "cached" };
                let speed = downloaded.map_or_else(String::new, |(bytes, secs): (u64, f64)| {
                    format!(
                        ", downloaded {} in {secs:.2} s ({:.1} MB/s)",
                        human(bytes),
                        bytes as f64 / secs.max(1e-9) / 1e6
                    )
                });
                println!(
                    "{how} {id}: {} ({} disk, {}, sha256 {}{speed})",
                    e.dir.display(),
                    human(e.record.disk_size),
                    e.record.kind,
                    e.record.sha256
                );
            }
            Ok(0)
        }
        CacheCommand::Instance {
            id,
            name,
            pid,
            persistent,
            output,
        } => {
            let holder = if persistent {
                Holder::persistent()
            } else if let Some(pid) = pid {
                Holder::process(pid).with_context(|| format!("no process {pid}"))?
            } else {
                Holder::parent()
            };
            let inst = cache
                .instance(&id, name.as_deref(), holder)
                .with_context(|| format!("cannot make an instance of '{id}'"))?;
            match output {
                Output::Human => println!("{}", inst.disk.display()),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "name": inst.name,
                        "id": inst.id,
                        "disk": inst.disk,
                        "machine_path": inst.machine_path,
                        "machine": inst.machine,
                        "holder": inst.holder,
                    }))?
                ),
            }
            Ok(0)
        }
        CacheCommand::Release { name, quiet } => {
            let r = cache
                .release(&name)
                .with_context(|| format!("cannot release '{name}'"))?;
            if !quiet {
                println!("released {name} (an instance of {})", r.id);
            }
            Ok(0)
        }
        CacheCommand::Ls { output } => {
            let entries = cache.list().context("cannot list the cache")?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&entries)?),
                Output::Human => {
                    if entries.is_empty() {
                        println!("(empty cache: {})", cache.root().display());
                    }
                    for e in &entries {
                        let refs = if e.references.is_empty() {
                            "0 references".to_string()
                        } else {
                            let names: Vec<String> = e
                                .references
                                .iter()
                                .map(|n| {
                                    if e.in_use.contains(n) {
                                        format!("{n} (booted)")
                                    } else {
                                        n.clone()
                                    }
                                })
                                .collect();
                            format!("{} reference(s): {}", e.references.len(), names.join(", "))
                        };
                        println!(
                            "{}  {}  {}  last used {}{}  {}",
                            e.record.id,
                            human(e.size),
                            refs,
                            ago(e.last_use),
                            if e.busy { "  (busy)" } else { "" },
                            e.record.source
                        );
                    }
                }
            }
            Ok(0)
        }
        CacheCommand::Rm { id, quiet } => {
            let freed = cache
                .remove(&id)
                .with_context(|| format!("cannot remove '{id}'"))?;
            if !quiet {
                println!("removed {id} ({} freed)", human(freed));
            }
            Ok(0)
        }
        CacheCommand::Gc {
            max_size,
            min_free,
            older_than,
            output,
            quiet,
        } => {
            let options = GcOptions {
                max_size: max_size.map(|b| b.value),
                min_free: min_free.map(|b| b.value),
                older_than: older_than.as_deref().map(parse_duration).transpose()?,
            };
            let report = cache.gc(&options).context("cannot collect the cache's garbage")?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                Output::Human if !quiet => {
                    println!(
                        "removed {} entr{} and {} partial download(s), {} freed; cache now {}, {} free{}",
                        report.removed.len(),
                        if report.removed.len() == 1 { "y" } else { "ies" },
                        report.partials_removed.len(),
                        human(report.freed),
                        human(report.size),
                        human(report.free),
                        if report.satisfied {
                            String::new()
                        } else {
                            format!(
                                " (limits not met: {} referenced, {} busy)",
                                report.referenced.len(),
                                report.busy.len()
                            )
                        }
                    );
                }
                Output::Human => {}
            }
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86400));
        assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
    }
}
