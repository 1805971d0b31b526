//! Apple `container` image stores, read-only: resolve an image reference to the ext4 snapshot
//! the container tool unpacked for one platform.
//!
//! Layout (under the store root, e.g. `~/Library/Application Support/com.apple.container`):
//! `state.json` maps references to an index descriptor; `content/blobs/sha256/<hex>` holds
//! the index and manifests; `snapshots/<manifest-hex>/snapshot` is the sparse ext4 image and
//! `snapshot-info` its JSON description. Nothing here ever writes into the store.

use std::fs;
use std::path::{Path, PathBuf};

use diskkit::{Error, ErrorKind, Result};
use serde_json::Value;

/// Largest `state.json` read.
const MAX_STATE: u64 = 64 << 20;
/// Largest index or manifest blob read.
const MAX_BLOB: u64 = 16 << 20;
/// Largest `snapshot-info` read.
const MAX_INFO: u64 = 1 << 20;

/// An OCI platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// Operating system (`linux`).
    pub os: String,
    /// Architecture, normalised (`amd64`, `arm64`, `arm`, ...).
    pub architecture: String,
    /// Variant (`v8`, `v7`), if any.
    pub variant: Option<String>,
}

/// Normalise an architecture name the way the container tool does.
pub fn normalize_arch(arch: &str) -> String {
    match arch {
        "aarch64" => "arm64",
        "x86_64" | "x86-64" => "amd64",
        "armhf" | "armel" => "arm",
        other => other,
    }
    .to_owned()
}

impl Platform {
    /// Parse `OS/ARCH[/VARIANT]`.
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(Error::invalid_argument(format!(
                "platform must be OS/ARCH[/VARIANT], not '{s}'"
            )));
        }
        Ok(Platform {
            os: parts[0].to_owned(),
            architecture: normalize_arch(parts[1]),
            variant: parts.get(2).map(|v| (*v).to_owned()),
        })
    }

    /// Linux on the host's CPU architecture.
    pub fn host() -> Platform {
        let architecture = normalize_arch(std::env::consts::ARCH);
        let variant = (architecture == "arm64").then(|| "v8".to_owned());
        Platform {
            os: "linux".to_owned(),
            architecture,
            variant,
        }
    }

    fn from_json(v: &Value) -> Option<Platform> {
        let os = v.get("os")?.as_str()?;
        let arch = v.get("architecture")?.as_str()?;
        Some(Platform {
            os: os.to_owned(),
            architecture: normalize_arch(arch),
            variant: v.get("variant").and_then(Value::as_str).map(str::to_owned),
        })
    }

    /// The container tool's equality: same OS, same normalised architecture; for arm64 a
    /// missing variant equals `v8`; otherwise variants must match exactly.
    pub fn matches(&self, other: &Platform) -> bool {
        if self.os != other.os || self.architecture != other.architecture {
            return false;
        }
        if self.architecture == "arm64" {
            let v = |p: &Platform| p.variant.clone().unwrap_or_else(|| "v8".to_owned());
            return v(self) == v(other);
        }
        self.variant == other.variant
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

/// Normalise a reference the way the container CLI does: add `docker.io` when there is no
/// registry domain, `library/` for single-component Docker Hub names, and `:latest` when
/// there is neither tag nor digest.
pub fn normalize_reference(reference: &str) -> String {
    let (name, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (reference, None),
    };
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (repo, tag) = match name[last_slash..].find(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, None),
    };
    let first = repo.split('/').next().unwrap_or("");
    let has_domain =
        repo.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let mut full = if has_domain {
        repo.to_owned()
    } else {
        format!("docker.io/{repo}")
    };
    if let Some(rest) = full.strip_prefix("docker.io/") {
        if !rest.contains('/') {
            full = format!("docker.io/library/{rest}");
        }
    }
    if let Some(t) = tag {
        full.push(':');
        full.push_str(t);
    }
    match digest {
        Some(d) => {
            full.push('@');
            full.push_str(d);
        }
        None if tag.is_none() => full.push_str(":latest"),
        None => {}
    }
    full
}

/// The parts of `snapshot-info` diskkit reads, decoded tolerantly.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotInfo {
    /// Filesystem type case (`block`, `volume`, `virtiofs`, `tmpfs`).
    pub kind: Option<String>,
    /// Filesystem format (`ext4`).
    pub format: Option<String>,
    /// Cache mode case (`on`, `off`, `auto`).
    pub cache: Option<String>,
    /// Sync mode case (`full`, `fsync`, `nosync`).
    pub sync: Option<String>,
    /// The host path the tool recorded (informational; not trusted).
    pub source: Option<String>,
}

/// A Swift enum case: `{"case":{...}}` (payload-free cases are empty objects) or, leniently,
/// a plain string.
fn enum_case(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) if m.len() == 1 => m.keys().next().cloned(),
        _ => None,
    }
}

/// Decode `snapshot-info` bytes; unknown shapes give empty fields, never an error.
pub fn parse_snapshot_info(bytes: &[u8]) -> Option<SnapshotInfo> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    let mut info = SnapshotInfo {
        source: v.get("source").and_then(Value::as_str).map(str::to_owned),
        ..SnapshotInfo::default()
    };
    if let Some(t) = v.get("type") {
        info.kind = enum_case(t);
        if let Some(payload) = t.as_object().and_then(|m| m.values().next()) {
            info.format = payload.get("format").and_then(Value::as_str).map(str::to_owned);
            info.cache = payload.get("cache").and_then(enum_case);
            info.sync = payload.get("sync").and_then(enum_case);
        }
    }
    Some(info)
}

/// A reference resolved to its snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ResolvedSnapshot {
    /// The `state.json` key that matched.
    pub reference: String,
    /// Digest of the descriptor `state.json` stores (normally an index).
    pub index_digest: String,
    /// Digest of the platform manifest (names the snapshot directory).
    pub manifest_digest: String,
    /// The platform of the chosen manifest.
    pub platform: String,
    /// Path of the ext4 snapshot file.
    pub snapshot: PathBuf,
    /// Decoded `snapshot-info`, when present and readable.
    pub info: Option<SnapshotInfo>,
    /// Things that looked wrong but did not stop resolution.
    pub warnings: Vec<String>,
}

/// A container store opened read-only.
#[derive(Debug)]
pub struct AppleStore {
    root: PathBuf,
    state: serde_json::Map<String, Value>,
}

fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let md = fs::metadata(path).map_err(|e| Error::io(e).with_path(path))?;
    if !md.is_file() {
        return Err(Error::invalid_format("not a regular file").with_path(path));
    }
    if md.len() > limit {
        return Err(
            Error::invalid_format(format!("{} bytes, more than the {limit} accepted", md.len()))
                .with_path(path),
        );
    }
    fs::read(path).map_err(|e| Error::io(e).with_path(path))
}

/// The hex part of a `sha256:<64 hex>` digest, validated (it becomes a path component).
fn digest_hex(digest: &str) -> Result<&str> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| Error::unsupported(format!("digest '{digest}' is not sha256")))?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(Error::invalid_format(format!("malformed digest '{digest}'")));
    }
    Ok(hex)
}

impl AppleStore {
    /// Open the store at `root` (reads `state.json`).
    pub fn open(root: impl AsRef<Path>) -> Result<AppleStore> {
        let root = root.as_ref().to_path_buf();
        let path = root.join("state.json");
        let bytes = read_limited(&path, MAX_STATE)?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| {
            Error::invalid_format("state.json is not JSON")
                .with_path(&path)
                .with_source(e)
        })?;
        let Value::Object(state) = v else {
            return Err(Error::invalid_format("state.json is not a JSON object").with_path(&path));
        };
        Ok(AppleStore { root, state })
    }

    /// References recorded in the store, sorted.
    pub fn references(&self) -> Vec<String> {
        let mut v: Vec<String> = self.state.keys().cloned().collect();
        v.sort();
        v
    }

    fn blob(&self, digest: &str) -> Result<Value> {
        let hex = digest_hex(digest)?;
        let path = self.root.join("content/blobs/sha256").join(hex);
        let bytes = read_limited(&path, MAX_BLOB)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::invalid_format("blob is not JSON")
                .with_path(&path)
                .with_source(e)
        })
    }

    /// Resolve `reference` (raw, then normalised) for `platform`.
    pub fn resolve(&self, reference: &str, platform: &Platform) -> Result<ResolvedSnapshot> {
        let normalized = normalize_reference(reference);
        let (key, desc) = [reference, normalized.as_str()]
            .iter()
            .find_map(|k| self.state.get(*k).map(|d| ((*k).to_owned(), d)))
            .ok_or_else(|| {
                let known = self.references();
                let shown: Vec<_> = known.iter().take(20).map(String::as_str).collect();
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "no image '{reference}' (also tried '{normalized}'); the store has: {}",
                        if shown.is_empty() {
                            "no images".to_owned()
                        } else {
                            shown.join(", ")
                        }
                    ),
                )
            })?;
        let index_digest = desc
            .get("digest")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::invalid_format(format!("state.json entry '{key}' has no digest")))?
            .to_owned();
        let root_blob = self.blob(&index_digest)?;
        let mut warnings = Vec::new();
        let (manifest_digest, found_platform) =
            if let Some(manifests) = root_blob.get("manifests").and_then(Value::as_array) {
                let mut available = Vec::new();
                let mut chosen = None;
                for m in manifests {
                    let Some(p) = m.get("platform").and_then(Platform::from_json) else {
                        continue;
                    };
                    if p.matches(platform) {
                        let d = m.get("digest").and_then(Value::as_str).ok_or_else(|| {
                            Error::invalid_format(format!("index {index_digest}: manifest without digest"))
                        })?;
                        chosen = Some((d.to_owned(), p));
                        break;
                    }
                    let attestation = m
                        .pointer("/annotations/vnd.docker.reference.type")
                        .and_then(Value::as_str)
                        == Some("attestation-manifest");
                    if !attestation {
                        available.push(p.to_string());
                    }
                }
                chosen.ok_or_else(|| {
                    Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "image '{key}' has no manifest for {platform} (it has: {})",
                            if available.is_empty() {
                                "none".to_owned()
                            } else {
                                available.join(", ")
                            }
                        ),
                    )
                })?
            } else if root_blob.get("layers").is_some() {
                warnings.push(format!(
                    "'{key}' points at a manifest, not an index; platform not checked"
                ));
                let p = desc
                    .get("platform")
                    .and_then(Platform::from_json)
                    .unwrap_or_else(|| platform.clone());
                (index_digest.clone(), p)
            } else {
                return Err(Error::invalid_format(format!(
                    "blob {index_digest} is neither an index nor a manifest"
                )));
            };
        let hex = digest_hex(&manifest_digest)?;
        let dir = self.root.join("snapshots").join(hex);
        let snapshot = dir.join("snapshot");
        match fs::metadata(&snapshot) {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Err(Error::invalid_format("snapshot is not a regular file").with_path(&snapshot)),
            Err(e) => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "image '{key}' ({found_platform}) has not been unpacked: no snapshot for {manifest_digest}"
                    ),
                )
                .with_path(&snapshot)
                .with_source(e))
            }
        }
        let info_path = dir.join("snapshot-info");
        let info = match read_limited(&info_path, MAX_INFO) {
            Ok(bytes) => {
                let info = parse_snapshot_info(&bytes);
                match &info {
                    None => warnings.push(format!("{} is not valid JSON; ignored", info_path.display())),
                    Some(i) if i.format.as_deref().is_some_and(|f| f != "ext4") => warnings.push(format!(
                        "snapshot-info says format {:?}; reading it as ext4 anyway",
                        i.format
                    )),
                    Some(_) => {}
                }
                info
            }
            Err(_) => {
                warnings.push(format!("{} is missing or unreadable", info_path.display()));
                None
            }
        };
        Ok(ResolvedSnapshot {
            reference: key,
            index_digest,
            manifest_digest,
            platform: found_platform.to_string(),
            snapshot,
            info,
            warnings,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise() {
        assert_eq!(normalize_reference("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(
            normalize_reference("alpine:3.20"),
            "docker.io/library/alpine:3.20"
        );
        assert_eq!(normalize_reference("user/app"), "docker.io/user/app:latest");
        assert_eq!(
            normalize_reference("quay.io/fedora/fedora-bootc:42"),
            "quay.io/fedora/fedora-bootc:42"
        );
        assert_eq!(normalize_reference("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(normalize_reference("localhost/x"), "localhost/x:latest");
        assert_eq!(
            normalize_reference("alpine@sha256:abc"),
            "docker.io/library/alpine@sha256:abc"
        );
    }

    #[test]
    fn platforms_match_like_the_container_tool() {
        let p = |s: &str| Platform::parse(s).unwrap();
        assert!(p("linux/aarch64").matches(&p("linux/arm64/v8")));
        assert!(p("linux/x86_64").matches(&p("linux/amd64")));
        assert!(!p("linux/arm/v7").matches(&p("linux/arm/v6")));
        assert!(!p("linux/amd64").matches(&p("linux/amd64/v2")));
        assert!(!p("linux/amd64").matches(&p("windows/amd64")));
    }

    #[test]
    fn snapshot_info_is_read_tolerantly() {
        let new = br#"{"type":{"block":{"format":"ext4","cache":{"on":{}},"sync":{"fsync":{}}}},"source":"\/Users\/u\/snapshot","destination":"\/","options":[]}"#;
        let i = parse_snapshot_info(new).unwrap();
        assert_eq!(i.kind.as_deref(), Some("block"));
        assert_eq!(i.format.as_deref(), Some("ext4"));
        assert_eq!(i.cache.as_deref(), Some("on"));
        assert_eq!(i.sync.as_deref(), Some("fsync"));
        assert_eq!(i.source.as_deref(), Some("/Users/u/snapshot"));
        let legacy = br#"{"options":[],"source":"/s","type":{"block":{"sync":"full","cache":"auto","format":"ext4"}}}"#;
        let i = parse_snapshot_info(legacy).unwrap();
        assert_eq!(i.cache.as_deref(), Some("auto"));
        assert_eq!(i.sync.as_deref(), Some("full"));
        assert!(parse_snapshot_info(b"{not json").is_none());
        assert_eq!(parse_snapshot_info(b"[]").unwrap(), SnapshotInfo::default());
    }

    #[test]
    fn digests_are_validated() {
        assert!(digest_hex("sha256:../../etc").is_err());
        assert!(digest_hex(&format!("sha256:{}", "a".repeat(64))).is_ok());
        assert!(digest_hex(&format!("sha512:{}", "a".repeat(64))).is_err());
    }
}
