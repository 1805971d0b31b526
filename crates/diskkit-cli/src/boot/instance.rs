//! Booting a cache instance (`diskkit boot --instance NAME`): the instance's qcow2 overlay
//! (made by `diskkit cache instance`, over the entry's `layer.qcow2` over `disk.img`) is the
//! root's writable layer, so the guest's writes stay in the instance; its `machine.json`
//! gives the memory, CPUs and MAC address that no flag gives. While the VM runs, the
//! instance is marked in use by this process in the cache, which keeps the entry referenced
//! (gc and rm leave it even if the instance's holder exits) and refuses a second VM and
//! `release`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use diskkit::{ImageFormat, ParentPolicy};
use diskkit_deliver::cache::{Cache, Holder, Instance, InstanceUse};
use diskkit_deliver::ErrorKind;

use super::source::{self, Root};

/// A cache instance picked for booting.
pub(crate) struct Picked {
    /// Its overlay and machine definition.
    pub(crate) instance: Instance,
    /// The cache directory.
    pub(crate) cache: PathBuf,
    /// The mark that the instance is in use (none for `--dry-run`); dropped when the VM
    /// stops.
    held: Option<InstanceUse>,
}

impl Picked {
    /// Find instance `name` in the cache at `dir` (default: the cache's default directory);
    /// with `hold`, mark it in use by this process until [`Picked::release`] or drop.
    pub(crate) fn open(dir: Option<&Path>, name: &str, hold: bool) -> Result<Picked> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => Cache::default_dir()?,
        };
        // Opening creates a cache; a missing one holds no instance.
        if !dir.join("refs").is_dir() {
            bail!(
                "no instance named '{name}': '{}' is not an image cache (make one with diskkit cache fetch, or give --cache-dir)",
                dir.display()
            );
        }
        let cache = Cache::open(&dir)?;
        let not_found = |e: diskkit_deliver::Error| -> anyhow::Error {
            if e.kind() == ErrorKind::NotFound && e.to_string().starts_with("no instance named") {
                anyhow::anyhow!(
                    "no instance named '{name}' in the cache '{}' (diskkit cache ls lists its entries and instances)",
                    cache.root().display()
                )
            } else {
                anyhow::Error::new(e)
            }
        };
        let (instance, held) = if hold {
            let held = cache.use_instance(name, Holder::current()).map_err(not_found)?;
            (held.instance().clone(), Some(held))
        } else {
            (cache.usable_instance(name).map_err(not_found)?, None)
        };
        Ok(Picked {
            instance,
            cache: cache.root().to_path_buf(),
            held,
        })
    }

    /// The root disk: the instance's whole stack, read to find the kernel (the guest may
    /// have installed another one in the instance); QEMU gets the layers below the
    /// instance's overlay read-only and the overlay itself as the writable layer.
    pub(crate) fn root(&self) -> Result<Root> {
        let disk = &self.instance.disk;
        let mut root = source::open_disk(
            disk,
            Some(ImageFormat::Qcow2),
            ParentPolicy::same_directory(),
            false,
            None,
        )?;
        match root.layers.pop() {
            Some((Some(top), ImageFormat::Qcow2)) if root.layers.iter().all(|(p, _)| p.is_some()) => {
                root.overlay = Some(top);
            }
            _ => bail!(
                "instance '{}' is damaged: '{}' is not a qcow2 overlay over the cached image",
                self.instance.name,
                disk.display()
            ),
        }
        if root.layers.is_empty() {
            bail!(
                "instance '{}' is damaged: '{}' has no backing file",
                self.instance.name,
                disk.display()
            );
        }
        root.name = format!(
            "instance '{}' of '{}' in '{}'",
            self.instance.name,
            self.instance.id,
            self.cache.display()
        );
        Ok(root)
    }

    /// The VM has stopped: drop the in-use mark.
    pub(crate) fn release(mut self) -> Result<()> {
        if let Some(h) = self.held.take() {
            h.finish()?;
        }
        Ok(())
    }
}
