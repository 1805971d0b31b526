//! `diskkit partitions`: list a disk's GPT or MBR partitions.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use diskkit_ext4::read::volume::has_ext_superblock;
use diskkit_ext4::read::{read_partition_table, PartitionTable};
use serde::Serialize;

use super::open_image;
use crate::args::{DetachedArg, OpenArgs, Output, OutputArg};
use crate::size::human;

/// List the partitions of a disk image (GPT or MBR).
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "List the partitions of a disk image (GPT, or MBR with its logical \
                  partitions): number, offset, size, type, name, UUID, and whether it holds an \
                  ext2/3/4 filesystem. Says so when the whole disk is a filesystem.",
    after_help = "\
Examples:
  # The table, for people
  diskkit partitions debian.qcow2
  # The same as JSON
  diskkit partitions --output json disk.raw"
)]
pub(crate) struct Args {
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    detached: DetachedArg,
    #[command(flatten)]
    output: OutputArg,
    /// The image.
    path: PathBuf,
}

#[derive(Serialize)]
struct TableJson {
    /// `gpt`, `mbr`, or `none`.
    table: String,
    sector_size: Option<u32>,
    disk_id: Option<String>,
    /// Whether the whole disk holds an ext filesystem (no partition table).
    whole_disk_ext: bool,
    partitions: Vec<PartJson>,
}

#[derive(Serialize)]
struct PartJson {
    number: u32,
    offset: u64,
    size: u64,
    #[serde(rename = "type")]
    kind: String,
    type_name: String,
    name: String,
    uuid: Option<String>,
    attributes: u64,
    ext: bool,
}

pub(crate) fn run(a: &Args) -> Result<u8> {
    let path = &a.path;
    let image = open_image(path, &a.open.options(false).detached(a.detached.detached))?;
    let table: Option<PartitionTable> = read_partition_table(&image, image.block_size())
        .with_context(|| format!("cannot read the partition table of '{}'", path.display()))?;
    let mut json = TableJson {
        table: "none".to_owned(),
        sector_size: None,
        disk_id: None,
        whole_disk_ext: false,
        partitions: Vec::new(),
    };
    match &table {
        Some(t) => {
            json.table = t.kind.to_string();
            json.sector_size = Some(t.sector_size);
            json.disk_id = Some(t.disk_id.clone());
            for p in &t.partitions {
                json.partitions.push(PartJson {
                    number: p.number,
                    offset: p.offset,
                    size: p.size,
                    kind: p.kind.to_string(),
                    type_name: p.kind.name().to_owned(),
                    name: p.name.clone(),
                    uuid: p.uuid.map(|u| u.to_string()),
                    attributes: p.attributes,
                    ext: has_ext_superblock(&image, p.offset, p.size)?,
                });
            }
        }
        None => json.whole_disk_ext = has_ext_superblock(&image, 0, image.size())?,
    }
    match a.output.output {
        Output::Json => super::fs::print_json(&json)?,
        Output::Human => {
            if table.is_none() {
                if json.whole_disk_ext {
                    println!("no partition table; the whole disk holds an ext2/3/4 filesystem");
                } else {
                    println!("no partition table");
                }
                return Ok(0);
            }
            println!(
                "table: {} (sector size {}, disk id {})",
                json.table,
                json.sector_size.unwrap_or(512),
                json.disk_id.as_deref().unwrap_or("-")
            );
            println!(
                "{:>3} {:>14} {:>14} {:>9}  {:<22} {:<4} {:<36} name",
                "#", "offset", "size", "", "type", "fs", "uuid"
            );
            for p in &json.partitions {
                println!(
                    "{:>3} {:>14} {:>14} {:>9}  {:<22} {:<4} {:<36} {}",
                    p.number,
                    p.offset,
                    p.size,
                    human(p.size),
                    p.type_name,
                    if p.ext { "ext" } else { "-" },
                    p.uuid.as_deref().unwrap_or("-"),
                    p.name
                );
            }
        }
    }
    Ok(0)
}
