//! OCI registries (the distribution API): pull container images into OCI layouts or Apple
//! `container`-style stores, push OCI layouts, and carry VM disks in tart's layout (see
//! [`crate::tart`]).
//!
//! - [`Reference`]: references as users write them, Docker Hub short names resolved as
//!   docker resolves them.
//! - [`Registry`]: one repository: the `/v2/` ping, anonymous access, the bearer-token
//!   challenge flow and basic auth (credentials from `--creds`, containers' `auth.json`
//!   or docker's `config.json`), plain HTTP only for registries on this machine or with
//!   `insecure`, retries with backoff, manifests checked against their digests, blob
//!   uploads (monolithic, or chunked with per-chunk retries) skipped when the registry has
//!   the blob.
//! - [`pull`]: an image into a layout or store: blobs in parallel, resumed after a break,
//!   verified before they become visible.
//! - [`push_layout`]: an image of an OCI layout into a registry.
//! - [`pull_to_layout`]: what `unpack` and `boot` call with a registry reference: the
//!   image lands in the shared layout of the cache directory, and the layout path and
//!   manifest digest come back for `diskkit_oci`.

pub mod auth;
mod blob;
mod client;
pub mod manifest;
mod pull;
mod push;
pub mod reference;

use std::path::PathBuf;

pub use self::auth::Credentials;
pub use self::blob::BlobEvent;
pub(crate) use self::client::Payload;
pub use self::client::{Registry, RegistryOptions};
pub use self::pull::{add_to_index, add_to_state, pull, resolve, Destination, PullOptions, PullReport};
pub use self::push::{push_layout, PushReport};
pub use self::reference::Reference;
use crate::error::Result;

/// The default directory of the shared OCI layout that registry references are pulled
/// into for `unpack` and `boot`: `$XDG_CACHE_HOME/diskkit/oci` (or `~/.cache/diskkit/oci`).
pub fn default_layout_cache() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| std::env::temp_dir().join("diskkit-cache"));
    base.join("diskkit/oci")
}

/// Whether `text` looks like a registry reference rather than a local path: it names a
/// registry host (`host.tld/…`, `host:port/…`, `localhost/…`) or starts with `docker://`,
/// and no file of that name exists.
pub fn looks_like_reference(text: &str) -> bool {
    if std::path::Path::new(text).exists() {
        return false;
    }
    if text.starts_with("docker://") {
        return true;
    }
    let Ok(r) = Reference::parse(text) else {
        return false;
    };
    // A bare name (`alpine`) could be a path the user mistyped; ask for docker:// there.
    r.registry != reference::DOCKER_HUB || text.starts_with("docker.io/")
}

/// Pull `reference` into the layout at `layout` (default: [`default_layout_cache`]) and
/// return the layout path and the manifest digest, for `diskkit_oci::unpack` with
/// `UnpackOptions::reference` set to the digest. Blobs the layout already holds are not
/// downloaded again; the tag is always asked of the registry (tags move).
pub fn pull_to_layout(
    reference: &Reference,
    layout: Option<PathBuf>,
    registry_options: &RegistryOptions,
    platform: Option<diskkit_oci::Platform>,
    events: &(dyn Fn(BlobEvent<'_>) + Sync),
) -> Result<(PathBuf, String)> {
    let layout = layout.unwrap_or_else(default_layout_cache);
    let registry = Registry::connect(reference, registry_options, false)?;
    let report = pull(
        &registry,
        &Destination::Layout(layout.clone()),
        &PullOptions {
            platform,
            ref_name: Some(reference.to_string()),
        },
        events,
    )?;
    Ok((layout, report.manifest_digest))
}
