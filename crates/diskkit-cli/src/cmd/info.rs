//! `diskkit info`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args as ClapArgs;
use serde::Serialize;

use super::open_image;
use crate::args::{DetachedArg, OpenArgs, Output, OutputArg};
use crate::size::human;

/// Show an image's format, size, layers and space use.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Show an image's format, virtual size, block size, layer type and UUIDs, file \
                  size and allocated bytes, and every layer of its stack (top first); for qcow2 \
                  also its version, cluster size, backing file, snapshots and dirty/corrupt bits.",
    after_help = "\
Examples:
  # A summary for people
  diskkit info disk.qcow2
  # The stack, for programs
  diskkit info --output json vm.asif | jq .layers
  # The top layer alone, without its backing file
  diskkit info --detached vm.qcow2"
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
struct Info {
    path: String,
    format: String,
    virtual_size: u64,
    block_size: u32,
    block_count: u64,
    open_mode: String,
    layer_type: Option<String>,
    layer_uuid: Option<String>,
    parent_uuid: Option<String>,
    stable_uuid: Option<String>,
    cluster_size: u64,
    file_size: u64,
    allocated_bytes: Option<u64>,
    /// Format-specific details (qcow2: version, cluster size, backing file, compression...).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    format_specific: std::collections::BTreeMap<String, String>,
    layers: Vec<LayerJson>,
}

#[derive(Serialize)]
struct LayerJson {
    depth: usize,
    path: Option<String>,
    format: String,
    virtual_size: u64,
    layer_type: Option<String>,
    layer_uuid: Option<String>,
    parent_uuid: Option<String>,
    parent_path: Option<String>,
    file_size: u64,
    allocated_bytes: Option<u64>,
}

pub(crate) fn run(a: &Args) -> Result<u8> {
    let path = &a.path;
    let image = open_image(path, &a.open.options(false).detached(a.detached.detached))?;
    let layers = image.describe_layers()?;
    let top = &layers[0];
    let info = Info {
        path: path.display().to_string(),
        format: image.format().to_string(),
        virtual_size: image.size(),
        block_size: image.block_size(),
        block_count: image.block_count(),
        open_mode: image.open_mode().to_string(),
        layer_type: image.layer_type().map(|t| t.to_string()),
        layer_uuid: image.layer_uuid().map(|u| u.to_string()),
        parent_uuid: image.parent_uuid().map(|u| u.to_string()),
        stable_uuid: top.info.stable_uuid.map(|u| u.to_string()),
        cluster_size: top.cluster_size,
        file_size: top.file_size,
        allocated_bytes: top.allocated_bytes,
        format_specific: top
            .details
            .iter()
            .map(|(k, v)| (k.replace(' ', "_"), v.clone()))
            .collect(),
        layers: layers
            .iter()
            .enumerate()
            .map(|(i, l)| LayerJson {
                depth: i + 1,
                path: l.path.as_ref().map(|p| p.display().to_string()),
                format: l.format.to_string(),
                virtual_size: l.size,
                layer_type: l.info.layer_type.map(|t| t.to_string()),
                layer_uuid: l.info.layer_uuid.map(|u| u.to_string()),
                parent_uuid: l.info.parent_uuid.map(|u| u.to_string()),
                parent_path: l.info.parent_path.clone(),
                file_size: l.file_size,
                allocated_bytes: l.allocated_bytes,
            })
            .collect(),
    };
    match a.output.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&info)?),
        Output::Human => print_human(&info),
    }
    Ok(0)
}

fn print_human(i: &Info) {
    let none = || "none".to_owned();
    println!("image: {}", i.path);
    println!("format: {}", i.format);
    println!(
        "virtual size: {} ({} bytes)",
        human(i.virtual_size),
        i.virtual_size
    );
    println!("block size: {}", i.block_size);
    println!("block count: {}", i.block_count);
    println!("open mode: {}", i.open_mode);
    println!("layer type: {}", i.layer_type.clone().unwrap_or_else(none));
    println!("layer uuid: {}", i.layer_uuid.clone().unwrap_or_else(none));
    println!("parent uuid: {}", i.parent_uuid.clone().unwrap_or_else(none));
    if let Some(s) = &i.stable_uuid {
        println!("stable uuid: {s}");
    }
    if i.format != "raw" && !i.format_specific.contains_key("cluster_size") {
        println!("cluster size: {}", i.cluster_size);
    }
    for (k, v) in &i.format_specific {
        println!("{}: {v}", k.replace('_', " "));
    }
    println!("file size: {} ({} bytes)", human(i.file_size), i.file_size);
    if let Some(a) = i.allocated_bytes {
        println!("disk size: {} ({a} bytes allocated)", human(a));
    }
    if i.layers.len() > 1 {
        println!("layers (top first):");
        for l in &i.layers {
            println!(
                "  {}: {} {} [{}] uuid {} parent {}",
                l.depth,
                l.format,
                l.path.as_deref().unwrap_or("-"),
                l.layer_type.as_deref().unwrap_or("base"),
                l.layer_uuid.as_deref().unwrap_or("none"),
                l.parent_uuid.as_deref().unwrap_or("none"),
            );
        }
    }
}
