//! Image sources: OCI layout directories, OCI archives and docker-archives; choosing the
//! manifest by reference and platform.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use diskkit::{Error, ErrorKind, Result};
use serde::Deserialize;

/// Largest JSON document (index, manifest, config) read into memory.
const MAX_JSON: u64 = 16 << 20;

/// Where blobs are read from: a directory or an uncompressed tar archive.
#[derive(Debug)]
enum Store {
    Dir(PathBuf),
    /// Archive path and (member path → data offset, size).
    Tar(PathBuf, HashMap<String, (u64, u64)>),
}

fn normalize(path: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

impl Store {
    fn open(path: &Path) -> Result<Store> {
        if path.is_dir() {
            return Ok(Store::Dir(path.to_path_buf()));
        }
        let file = File::open(path).map_err(|e| {
            Error::io(e)
                .with_path(path)
                .with_operation("opening the image archive")
        })?;
        let mut archive = tar::Archive::new(file);
        let mut index = HashMap::new();
        let mut links = Vec::new();
        let entries = archive
            .entries_with_seek()
            .map_err(|e| Error::invalid_format(format!("not a tar archive: {e}")).with_path(path))?;
        for entry in entries {
            let entry =
                entry.map_err(|e| Error::corrupt(format!("reading the archive: {e}")).with_path(path))?;
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some(name) = normalize(&name) else { continue };
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    index.insert(name, (entry.raw_file_position(), entry.size()));
                }
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    if let Some(t) = entry.link_name_bytes() {
                        let t = String::from_utf8_lossy(&t).into_owned();
                        let base = if entry.header().entry_type() == tar::EntryType::Symlink {
                            name.rsplit_once('/')
                                .map(|(d, _)| format!("{d}/{t}"))
                                .unwrap_or(t)
                        } else {
                            t
                        };
                        links.push((name, base));
                    }
                }
                _ => {}
            }
        }
        for (name, target) in links {
            if let Some(v) = normalize(&target).and_then(|t| index.get(&t).copied()) {
                index.insert(name, v);
            }
        }
        Ok(Store::Tar(path.to_path_buf(), index))
    }

    fn describe(&self) -> &Path {
        match self {
            Store::Dir(p) | Store::Tar(p, _) => p,
        }
    }

    fn exists(&self, member: &str) -> bool {
        match self {
            Store::Dir(p) => p.join(member).is_file(),
            Store::Tar(_, idx) => idx.contains_key(member),
        }
    }

    /// Open `member` (a relative path inside the layout or archive).
    fn open_member(&self, member: &str) -> Result<(Box<dyn Read + Send>, u64)> {
        let name = normalize(member)
            .ok_or_else(|| Error::invalid_argument(format!("path escapes the image: {member}")))?;
        let not_found =
            || Error::new(ErrorKind::NotFound, format!("{name} is missing")).with_path(self.describe());
        match self {
            Store::Dir(dir) => {
                let p = dir.join(&name);
                let f = File::open(&p).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        not_found()
                    } else {
                        Error::io(e).with_path(&p)
                    }
                })?;
                let len = f.metadata().map_err(|e| Error::io(e).with_path(&p))?.len();
                Ok((Box::new(f), len))
            }
            Store::Tar(path, idx) => {
                let (off, len) = *idx.get(&name).ok_or_else(not_found)?;
                let mut f = File::open(path).map_err(|e| Error::io(e).with_path(path))?;
                f.seek(SeekFrom::Start(off))
                    .map_err(|e| Error::io(e).with_path(path))?;
                Ok((Box::new(f.take(len)), len))
            }
        }
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, member: &str) -> Result<T> {
        let (r, len) = self.open_member(member)?;
        if len > MAX_JSON {
            return Err(Error::unsupported(format!(
                "{member} is larger than {MAX_JSON} bytes"
            )));
        }
        let mut buf = Vec::new();
        r.take(MAX_JSON)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io(e).with_path(self.describe()))?;
        serde_json::from_slice(&buf)
            .map_err(|e| Error::invalid_format(format!("{member}: {e}")).with_path(self.describe()))
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<PlatformJson>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
struct PlatformJson {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Index {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
struct Config {
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// A platform: `os/architecture[/variant]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    /// Operating system (`linux`).
    pub os: String,
    /// Architecture in OCI spelling (`amd64`, `arm64`).
    pub architecture: String,
    /// Variant (`v8`), if any.
    pub variant: Option<String>,
}

impl Platform {
    /// The host's platform.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            a => a,
        };
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: None,
        }
    }

    /// Whether an image for `os`/`arch`/`variant` suits this platform: same OS and
    /// architecture, and the same variant when this platform names one (how `unpack` and
    /// `pull` choose from an index).
    pub fn matches(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        self.os == os
            && self.architecture == arch
            && (self.variant.is_none() || self.variant.as_deref() == variant)
    }
}

impl std::str::FromStr for Platform {
    type Err = Error;

    fn from_str(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: (*os).into(),
                architecture: (*arch).into(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => Ok(Platform {
                os: (*os).into(),
                architecture: (*arch).into(),
                variant: Some((*v).into()),
            }),
            _ => Err(Error::invalid_argument(format!(
                "platform must be OS/ARCH[/VARIANT], not {s}"
            ))),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// One layer to apply, bottom first.
#[derive(Debug, Clone)]
pub(crate) struct LayerRef {
    pub(crate) member: String,
    pub(crate) digest: Option<String>,
    pub(crate) size: Option<u64>,
    pub(crate) diff_id: Option<String>,
    pub(crate) media_type: Option<String>,
}

/// The image chosen from a source.
#[derive(Debug)]
pub struct SelectedImage {
    store: Store,
    /// Digest of the manifest (`sha256:…`), or of the config for docker-archives.
    pub manifest_digest: String,
    pub(crate) layers: Vec<LayerRef>,
}

impl SelectedImage {
    pub(crate) fn open_layer(&self, layer: &LayerRef) -> Result<Box<dyn Read + Send>> {
        Ok(self.store.open_member(&layer.member)?.0)
    }

    /// Number of layers.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }
}

fn blob_member(digest: &str) -> Result<String> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| Error::unsupported(format!("digest algorithm of {digest}")))?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    {
        return Err(Error::invalid_format(format!("malformed digest {digest}")));
    }
    Ok(format!("blobs/sha256/{hex}"))
}

fn is_index(mt: Option<&str>) -> bool {
    matches!(
        mt,
        Some("application/vnd.oci.image.index.v1+json")
            | Some("application/vnd.docker.distribution.manifest.list.v2+json")
    )
}

/// Open `src` and choose the image named by `reference` (a tag, a `ref.name` annotation or a
/// manifest digest) for `platform`.
pub fn select(
    src: &Path,
    reference: Option<&str>,
    platform: &Platform,
    platform_given: bool,
) -> Result<SelectedImage> {
    let store = Store::open(src)?;
    if matches!(store, Store::Dir(_)) && store.exists("state.json") && src.join("content/blobs").is_dir() {
        return select_apple(src, reference, platform, platform_given);
    }
    if store.exists("index.json") {
        select_oci(store, reference, platform, platform_given)
    } else if store.exists("manifest.json") {
        select_docker(store, reference)
    } else {
        Err(
            Error::invalid_format("neither an OCI layout (index.json) nor a docker-archive (manifest.json)")
                .with_path(src),
        )
    }
}

fn select_oci(
    store: Store,
    reference: Option<&str>,
    platform: &Platform,
    platform_given: bool,
) -> Result<SelectedImage> {
    let index: Index = store.read_json("index.json")?;
    let candidates: Vec<Descriptor> = match reference {
        None => index.manifests.clone(),
        Some(r) if r.starts_with("sha256:") => index
            .manifests
            .iter()
            .filter(|d| d.digest == r)
            .cloned()
            .collect(),
        Some(r) => index
            .manifests
            .iter()
            .filter(|d| {
                d.annotations
                    .get("org.opencontainers.image.ref.name")
                    .map(String::as_str)
                    == Some(r)
                    || d.annotations
                        .get("io.containerd.image.name")
                        .is_some_and(|n| n == r || n.ends_with(&format!(":{r}")))
            })
            .cloned()
            .collect(),
    };
    if candidates.is_empty() {
        let names: Vec<&str> = index
            .manifests
            .iter()
            .filter_map(|d| {
                d.annotations
                    .get("org.opencontainers.image.ref.name")
                    .map(String::as_str)
            })
            .collect();
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "no image {} in the layout (references: {})",
                reference.unwrap_or("(any)"),
                names.join(", ")
            ),
        )
        .with_path(store.describe()));
    }
    resolve(store, candidates, platform, platform_given)
}

/// Apple `container`'s image store: `state.json` maps references to descriptors; blobs live
/// in `content/blobs/sha256`.
fn select_apple(
    root: &Path,
    reference: Option<&str>,
    platform: &Platform,
    platform_given: bool,
) -> Result<SelectedImage> {
    let state: HashMap<String, Descriptor> = Store::Dir(root.to_path_buf()).read_json("state.json")?;
    let mut names: Vec<&String> = state.keys().collect();
    names.sort();
    let chosen: Vec<Descriptor> = match reference {
        Some(r) if r.starts_with("sha256:") => state
            .values()
            .filter(|d| d.digest == r)
            .take(1)
            .cloned()
            .collect(),
        Some(r) => state
            .iter()
            .filter(|(k, _)| *k == r || k.ends_with(&format!("/{r}")))
            .map(|(_, d)| d.clone())
            .take(1)
            .collect(),
        None if state.len() == 1 => state.values().cloned().collect(),
        None => {
            return Err(Error::invalid_argument(format!(
                "the store holds several images; name one of: {}",
                names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )))
        }
    };
    if chosen.is_empty() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "no image {} in the store (images: {})",
                reference.unwrap_or(""),
                names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )
        .with_path(root));
    }
    resolve(Store::Dir(root.join("content")), chosen, platform, platform_given)
}

/// Follow `candidates` through nested indexes to one manifest for `platform` and list its layers.
fn resolve(
    store: Store,
    mut candidates: Vec<Descriptor>,
    platform: &Platform,
    platform_given: bool,
) -> Result<SelectedImage> {
    // Follow nested indexes, keeping manifests for the platform.
    let mut depth = 0;
    loop {
        depth += 1;
        if depth > 8 {
            return Err(Error::unsupported("image indexes nested more than 8 deep"));
        }
        let mut next = Vec::new();
        let mut nested = false;
        for d in candidates {
            // Build attestations are manifests too, but carry no filesystem.
            if d.annotations.get("vnd.docker.reference.type").map(String::as_str)
                == Some("attestation-manifest")
            {
                continue;
            }
            if let Some(p) = &d.platform {
                if !platform.matches(&p.os, &p.architecture, p.variant.as_deref()) {
                    continue;
                }
            }
            let member = blob_member(&d.digest)?;
            if is_index(d.media_type.as_deref()) {
                let idx: Index = store.read_json(&member)?;
                next.extend(idx.manifests);
                nested = true;
            } else if d.media_type.is_none() {
                let m: Manifest = store.read_json(&member)?;
                if let Some(ms) = m.manifests {
                    next.extend(ms);
                    nested = true;
                } else {
                    next.push(d);
                }
            } else {
                next.push(d);
            }
        }
        candidates = next;
        if !nested {
            break;
        }
    }
    let chosen = match candidates.len() {
        0 => {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no manifest for platform {platform}"),
            )
            .with_path(store.describe()))
        }
        1 => candidates.remove(0),
        n => {
            // Prefer the one that names the platform explicitly.
            let explicit: Vec<Descriptor> = candidates
                .iter()
                .filter(|d| d.platform.is_some())
                .cloned()
                .collect();
            if explicit.len() == 1 {
                explicit
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::invalid_argument("no manifest"))?
            } else {
                return Err(Error::invalid_argument(format!(
                    "{n} images match; name one by reference or digest"
                )));
            }
        }
    };
    let member = blob_member(&chosen.digest)?;
    let manifest: Manifest = store.read_json(&member)?;
    let config_desc = manifest
        .config
        .as_ref()
        .ok_or_else(|| Error::invalid_format(format!("manifest {} has no config", chosen.digest)))?;
    let config: Config = store.read_json(&blob_member(&config_desc.digest)?)?;
    // The index's platform, when it names one, chose the manifest; otherwise the config says.
    if chosen.platform.is_none() {
        check_platform(&config, platform, platform_given)?;
    }
    let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != manifest.layers.len() {
        return Err(Error::invalid_format(format!(
            "config lists {} diff_ids for {} layers",
            diff_ids.len(),
            manifest.layers.len()
        )));
    }
    let mut layers = Vec::new();
    for (d, diff) in manifest.layers.iter().zip(diff_ids) {
        layers.push(LayerRef {
            member: blob_member(&d.digest)?,
            digest: Some(d.digest.clone()),
            size: d.size,
            diff_id: Some(diff),
            media_type: d.media_type.clone(),
        });
    }
    Ok(SelectedImage {
        store,
        manifest_digest: chosen.digest,
        layers,
    })
}

fn check_platform(config: &Config, platform: &Platform, given: bool) -> Result<()> {
    if let (true, Some(os), Some(arch)) = (given, &config.os, &config.architecture) {
        if !platform.matches(os, arch, platform.variant.as_deref()) {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("the image is for {os}/{arch}, not {platform}"),
            ));
        }
    }
    Ok(())
}

fn select_docker(store: Store, reference: Option<&str>) -> Result<SelectedImage> {
    let entries: Vec<DockerEntry> = store.read_json("manifest.json")?;
    let chosen = match reference {
        Some(r) => entries
            .iter()
            .find(|e| {
                e.repo_tags
                    .as_ref()
                    .is_some_and(|t| t.iter().any(|t| t == r || t.ends_with(&format!("/{r}"))))
            })
            .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("no image tagged {r} in the archive")))?,
        None if entries.len() == 1 => &entries[0],
        None => {
            return Err(Error::invalid_argument(
                "the archive holds several images; name one by tag",
            ))
        }
    };
    let config: Config = store.read_json(&chosen.config)?;
    let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != chosen.layers.len() {
        return Err(Error::invalid_format(
            "config diff_ids do not match the layer list",
        ));
    }
    let digest_of = |p: &str| {
        p.strip_prefix("blobs/sha256/")
            .filter(|h| h.len() == 64)
            .map(|h| format!("sha256:{h}"))
    };
    let layers = chosen
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(l, diff)| LayerRef {
            member: l.clone(),
            digest: digest_of(l),
            size: None,
            diff_id: Some(diff),
            media_type: None,
        })
        .collect();
    let config_digest = digest_of(&chosen.config).unwrap_or_else(|| {
        format!(
            "sha256:{}",
            chosen
                .config
                .trim_end_matches(".json")
                .rsplit('/')
                .next()
                .unwrap_or("")
        )
    });
    Ok(SelectedImage {
        store,
        manifest_digest: config_digest,
        layers,
    })
}
