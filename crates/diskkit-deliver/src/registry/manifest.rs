//! Manifests and indexes (OCI and Docker media types), read defensively.
//!
//! What comes from a registry is hostile: a document is refused when it is larger than
//! [`MAX_MANIFEST`], is not JSON of the expected shape, carries a media type that is not a
//! manifest or index type (or one that contradicts the `Content-Type` it was served with),
//! names a blob by anything but a well-formed sha256 digest, gives a negative or absurd
//! size, or points outside the repository (`urls`: "foreign" layers fetched from elsewhere).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::reference::check_digest;
use crate::error::{Error, ErrorKind, Result};

/// The largest manifest or index accepted (the distribution server's own limit).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// The largest blob a descriptor may announce (1 TiB).
pub const MAX_BLOB: u64 = 1 << 40;
/// The most entries an index or layers a manifest may list.
const MAX_ENTRIES: usize = 4096;

/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker image manifest, schema 2.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The `Accept` header for manifest requests: every type this client reads.
pub const ACCEPT: &str =
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// What kind of document a manifest media type names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An image manifest (config + layers).
    Manifest,
    /// An index / manifest list.
    Index,
}

/// The kind of a manifest media type, if it is one this client reads.
pub fn kind_of(media_type: &str) -> Option<Kind> {
    match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => Some(Kind::Manifest),
        OCI_INDEX | DOCKER_LIST => Some(Kind::Index),
        _ => None,
    }
}

/// Whether `mt` is a syntactically valid media type (RFC 6838 `type/subtype`, restricted
/// names, optional parameters), short enough to be a file name or header.
pub fn valid_media_type(mt: &str) -> bool {
    let main = mt.split(';').next().unwrap_or("").trim();
    let name_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 127
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&c))
    };
    mt.len() <= 255
        && mt.bytes().all(|c| (0x20..0x7f).contains(&c))
        && main
            .split_once('/')
            .is_some_and(|(t, s)| name_ok(t) && name_ok(s))
}

/// A platform as descriptors carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformSpec {
    /// Architecture (`amd64`).
    pub architecture: String,
    /// Operating system (`linux`).
    pub os: String,
    /// Variant (`v8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// OS version (Windows).
    #[serde(rename = "os.version", default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    /// Media type of the content.
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:…`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Other places to fetch the content from ("foreign layers"): refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The platform of a manifest listed in an index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformSpec>,
    /// The artifact type of a manifest listed in an index.
    #[serde(rename = "artifactType", default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    /// A descriptor without annotations or platform.
    pub fn new(media_type: &str, digest: &str, size: u64) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
            size,
            urls: None,
            annotations: BTreeMap::new(),
            platform: None,
            artifact_type: None,
        }
    }

    /// Check the descriptor: media type, digest, size, no foreign URLs.
    pub fn validate(&self, what: &str) -> Result<()> {
        if !valid_media_type(&self.media_type) {
            return Err(invalid(format!(
                "{what} has an invalid media type '{}'",
                self.media_type
                    .chars()
                    .take(100)
                    .collect::<String>()
                    .escape_default()
            )));
        }
        check_digest(&self.digest).map_err(|e| invalid(format!("{what}: {}", e.message().unwrap_or(""))))?;
        if self.size > MAX_BLOB {
            return Err(invalid(format!(
                "{what} {} claims {} bytes",
                self.digest, self.size
            )));
        }
        if self.urls.as_ref().is_some_and(|u| !u.is_empty()) {
            return Err(invalid(format!(
                "{what} {} points outside the repository (urls: {}); such foreign blobs are not fetched",
                self.digest,
                self.urls
                    .iter()
                    .flatten()
                    .take(3)
                    .map(|u| u.chars().take(100).collect::<String>())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    }

    /// The hex part of the digest (valid after [`Descriptor::validate`]).
    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }
}

fn invalid(msg: String) -> Error {
    Error::new(ErrorKind::InvalidManifest, msg)
}

/// An image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The manifest's own media type.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The artifact type (OCI 1.1).
    #[serde(rename = "artifactType", default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layers, bottom first.
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An index (manifest list).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// Always 2.
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
    /// The index's own media type.
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The manifests it lists.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A manifest or index as fetched: the exact bytes, their digest and the parsed form.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The bytes as served (their digest is the manifest's digest).
    pub bytes: Vec<u8>,
    /// `sha256:…` of the bytes.
    pub digest: String,
    /// The media type.
    pub media_type: String,
    /// The parsed document.
    pub document: Document,
}

/// A parsed manifest or index.
// Few of these exist at a time, each briefly: boxing the manifest would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Document {
    /// An image manifest.
    Manifest(Box<Manifest>),
    /// An index.
    Index(Index),
}

impl Fetched {
    /// The descriptor of this document.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(&self.media_type, &self.digest, self.bytes.len() as u64)
    }
}

/// Parse and check a manifest or index. `content_type` is the `Content-Type` it was served
/// with (if any); `expected` a media type the caller expects (from a descriptor).
pub fn parse(bytes: &[u8], content_type: Option<&str>, expected: Option<&str>) -> Result<(String, Document)> {
    if bytes.len() as u64 > MAX_MANIFEST {
        return Err(invalid(format!(
            "the manifest is {} bytes, more than the {MAX_MANIFEST} accepted",
            bytes.len()
        )));
    }
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "schemaVersion", default)]
        schema_version: Option<u64>,
        #[serde(rename = "mediaType", default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        config: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes)
        .map_err(|e| invalid("the manifest is not a JSON object".to_string()).with_source(e))?;
    let header_type = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
        .filter(|c| {
            !c.is_empty() && c != "application/json" && c != "application/octet-stream" && c != "text/plain"
        });
    let shown = |t: &str| {
        t.chars()
            .take(100)
            .collect::<String>()
            .escape_default()
            .to_string()
    };
    if let Some(h) = &header_type {
        if !valid_media_type(h) || kind_of(h).is_none() {
            if h.starts_with("application/vnd.docker.distribution.manifest.v1") {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "the registry only offers a Docker schema 1 manifest, which is not supported",
                ));
            }
            return Err(invalid(format!(
                "the registry served the manifest as '{}', which is not a manifest media type",
                shown(h)
            )));
        }
    }
    if probe.schema_version != Some(2) {
        return Err(invalid(format!(
            "unsupported manifest schema version {}",
            probe
                .schema_version
                .map_or("(none)".to_string(), |v| v.to_string())
        )));
    }
    let body_type = probe.media_type.clone();
    if let (Some(b), Some(h)) = (&body_type, &header_type) {
        if b != h {
            return Err(invalid(format!(
                "the manifest says its media type is '{}' but was served as '{}'",
                shown(b),
                shown(h)
            )));
        }
    }
    let media_type = match (body_type, header_type, expected) {
        (Some(b), _, _) => b,
        (None, Some(h), _) => h,
        (None, None, Some(e)) => e.to_string(),
        (None, None, None) if probe.manifests.is_some() => OCI_INDEX.to_string(),
        (None, None, None) if probe.config.is_some() => OCI_MANIFEST.to_string(),
        (None, None, None) => return Err(invalid("the manifest has no media type".to_string())),
    };
    let Some(kind) = kind_of(&media_type) else {
        return Err(invalid(format!(
            "'{}' is not a manifest or index media type",
            shown(&media_type)
        )));
    };
    if let Some(e) = expected {
        if kind_of(e) != Some(kind) {
            return Err(invalid(format!(
                "the manifest is a '{}' where its descriptor said '{}'",
                shown(&media_type),
                shown(e)
            )));
        }
    }
    let document = match kind {
        Kind::Manifest => {
            let m: Manifest = serde_json::from_slice(bytes)
                .map_err(|e| invalid(format!("the manifest is malformed: {e}")))?;
            m.config.validate("its config")?;
            if m.layers.len() > MAX_ENTRIES {
                return Err(invalid(format!("the manifest lists {} layers", m.layers.len())));
            }
            for (i, l) in m.layers.iter().enumerate() {
                l.validate(&format!("layer {}", i + 1))?;
            }
            Document::Manifest(Box::new(m))
        }
        Kind::Index => {
            let idx: Index =
                serde_json::from_slice(bytes).map_err(|e| invalid(format!("the index is malformed: {e}")))?;
            if idx.manifests.len() > MAX_ENTRIES {
                return Err(invalid(format!(
                    "the index lists {} manifests",
                    idx.manifests.len()
                )));
            }
            for (i, d) in idx.manifests.iter().enumerate() {
                d.validate(&format!("index entry {}", i + 1))?;
            }
            Document::Index(idx)
        }
    };
    Ok((media_type, document))
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn manifest(layer_extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"{OCI_CONFIG}","digest":"{}","size":2}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":10{layer_extra}}}]}}"#,
            d(1),
            d(2)
        )
    }

    #[test]
    fn reads_manifests_and_indexes() {
        let (mt, doc) = parse(manifest("").as_bytes(), Some(OCI_MANIFEST), None).unwrap();
        assert_eq!(mt, OCI_MANIFEST);
        assert!(matches!(doc, Document::Manifest(m) if m.layers.len() == 1));
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_LIST}","manifests":[{{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":5,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
            d(3)
        );
        let (mt, doc) = parse(idx.as_bytes(), Some(DOCKER_LIST), None).unwrap();
        assert_eq!(mt, DOCKER_LIST);
        assert!(matches!(doc, Document::Index(i) if i.manifests[0].platform.as_ref().unwrap().os == "linux"));
        // No media type anywhere: the shape decides.
        let bare = manifest("").replace(&format!(r#""mediaType":"{OCI_MANIFEST}","#), "");
        assert_eq!(parse(bare.as_bytes(), None, None).unwrap().0, OCI_MANIFEST);
    }

    #[test]
    fn refuses_hostile_documents() {
        let kind = |r: Result<(String, Document)>| r.unwrap_err().kind();
        // Foreign layers point outside the repository.
        let m = manifest(r#","urls":["http://evil.example/x"]"#);
        let e = parse(m.as_bytes(), Some(OCI_MANIFEST), None).unwrap_err();
        assert!(e.to_string().contains("points outside the repository"), "{e}");
        // Oversized.
        let big = vec![b' '; (MAX_MANIFEST + 1) as usize];
        assert_eq!(kind(parse(&big, None, None)), ErrorKind::InvalidManifest);
        // Hostile media types.
        assert!(parse(manifest("").as_bytes(), Some("text/html"), None).is_err());
        assert!(parse(manifest("").as_bytes(), Some(OCI_INDEX), None).is_err());
        let evil = manifest("").replace("tar+gzip", "tar+gzip\\u0000\\n../../x");
        assert!(parse(evil.as_bytes(), None, None).is_err());
        let other = manifest("").replace(OCI_MANIFEST, "application/x-evil");
        assert!(parse(other.as_bytes(), None, None).is_err());
        // Bad digests and sizes.
        let m = manifest("").replace(&d(2), "sha256:../../../etc/passwd");
        assert!(parse(m.as_bytes(), None, None).is_err());
        let m = manifest("").replace("\"size\":10", "\"size\":-1");
        assert!(parse(m.as_bytes(), None, None).is_err());
        assert!(parse(b"[]", None, None).is_err());
        assert!(parse(b"{\"schemaVersion\":1}", None, None).is_err());
        assert_eq!(
            kind(parse(
                b"{}",
                Some("application/vnd.docker.distribution.manifest.v1+prettyjws"),
                None
            )),
            ErrorKind::Unsupported
        );
        // A descriptor said index, the document is a manifest.
        assert!(parse(manifest("").as_bytes(), None, Some(OCI_INDEX)).is_err());
    }

    #[test]
    fn media_type_syntax() {
        assert!(valid_media_type(OCI_MANIFEST));
        assert!(valid_media_type("application/vnd.cirruslabs.tart.disk.v2"));
        assert!(valid_media_type("text/plain; charset=utf-8"));
        for bad in [
            "",
            "x",
            "/x",
            "a/",
            "a/b/c",
            "a b/c",
            "a/b\n",
            "../x",
            &format!("a/{}", "b".repeat(300)),
        ] {
            assert!(!valid_media_type(bad), "{bad:?}");
        }
    }
}
