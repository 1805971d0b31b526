//! Instances: a writable qcow2 overlay over an entry's shared base for one VM, with its own
//! copy of the machine definition, and the reference that keeps the entry alive.

use std::fs;
use std::path::PathBuf;

use diskkit::{DiskImage, ImageFormat, LayerOptions, OpenOptions, ParentPolicy};
use serde::{Deserialize, Serialize};

use super::lock::{Holder, Mode};
use super::{check_name, now_secs, read_machine, Cache};
use crate::bundle::{Machine, LAYER, MACHINE};
use crate::error::{Error, ErrorKind, Result};
use crate::fsutil;

/// A reference file: instance `name` of entry `id`, held by `holder`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    /// The instance's name.
    pub name: String,
    /// The entry it uses.
    pub id: String,
    /// The process holding it.
    pub holder: Holder,
    /// When it was made (seconds since the epoch).
    pub created: u64,
    /// A random value telling this reference from a later one of the same name.
    pub nonce: String,
    /// Whether the instance's files were complete when the reference was last written. A
    /// reference is written incomplete first (claiming the name), then complete; an
    /// incomplete one found while holding the entry's lock exclusively was left by a killed
    /// process.
    pub complete: bool,
    /// The process using the instance now (a VM booted from it), if any; see
    /// [`Cache::use_instance`]. A dead one counts for nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use: Option<Holder>,
}

/// An instance of a cache entry, ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The instance's name.
    pub name: String,
    /// The entry it uses.
    pub id: String,
    /// The writable overlay (qcow2, backed by the entry's `layer.qcow2`, itself backed by
    /// `disk.img`; all in one directory).
    pub disk: PathBuf,
    /// The instance's copy of the machine definition.
    pub machine_path: PathBuf,
    /// The machine definition (memory, CPUs, MAC address, ...).
    pub machine: Machine,
    /// Who holds the reference.
    pub holder: Holder,
}

pub(crate) fn instance_files(cache: &Cache, id: &str, name: &str) -> (PathBuf, PathBuf) {
    let dir = cache.entry_dir(id);
    (
        dir.join(format!("instance-{name}.qcow2")),
        dir.join(format!("instance-{name}.json")),
    )
}

impl Cache {
    /// Every reference file (unreadable ones are skipped).
    pub fn references(&self) -> Result<Vec<Reference>> {
        let dir = self.root.join("refs");
        let rd = fs::read_dir(&dir).map_err(|e| Error::io_while(e, "listing references").with_path(&dir))?;
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            if let Some(r) = fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<Reference>(&b).ok())
            {
                out.push(r);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Make a new instance of entry `id` named `name` (a generated name when `None`), held by
    /// `holder`: a new qcow2 overlay over the entry's base and a copy of its machine
    /// definition. The entry stays referenced until [`Cache::release`] or the holder dies.
    pub fn instance(&self, id: &str, name: Option<&str>, holder: Holder) -> Result<Instance> {
        check_name("cache ID", id)?;
        let name = match name {
            Some(n) => n.to_string(),
            None => format!("{id}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        };
        check_name("instance name", &name)?;
        self.repair()?;
        let not_cached = || {
            Error::new(
                ErrorKind::NotFound,
                format!("'{id}' is not in the cache; fetch it first (diskkit cache fetch {id} SOURCE)"),
            )
        };
        if self.entry(id)?.is_none() {
            return Err(not_cached());
        }
        // Shared: other instances may be made at the same time; gc and rm wait or skip.
        let _lock = self.lock(id, Mode::Shared, true)?;
        let Some(entry) = self.entry(id)? else {
            return Err(not_cached());
        };
        let ref_path = self.ref_path(&name);
        let mut reference = Reference {
            name: name.clone(),
            id: id.to_string(),
            holder,
            created: now_secs(),
            nonce: fsutil::random_suffix(),
            complete: false,
            in_use: None,
        };
        // Claim the name first: a second instance of the same name fails here, before it
        // touches any file.
        write_new(
            &ref_path,
            &serde_json::to_vec_pretty(&reference).unwrap_or_default(),
        )
        .map_err(|e| {
            if e.kind() == ErrorKind::AlreadyExists {
                Error::new(
                    ErrorKind::AlreadyExists,
                    format!("an instance named '{name}' exists; release it or choose another name"),
                )
            } else {
                e
            }
        })?;
        let (disk, machine_path) = instance_files(self, id, &name);
        let made = (|| -> Result<Instance> {
            let layer = entry.dir.join(LAYER);
            let open = OpenOptions::new()
                .format(ImageFormat::Qcow2)
                .parents(ParentPolicy::same_directory());
            let mut stack =
                DiskImage::open(&layer, &open).map_err(|e| Error::image(e, "opening the cached image"))?;
            stack
                .append_new(
                    &disk,
                    &LayerOptions::overlay().format(ImageFormat::Qcow2).overwrite(true),
                )
                .map_err(|e| Error::image(e, "creating the instance's overlay").with_path(&disk))?;
            stack
                .flush()
                .map_err(|e| Error::image(e, "creating the instance's overlay"))?;
            drop(stack);
            let machine = read_machine(&entry.dir.join(MACHINE))?;
            fsutil::write_atomic(&machine_path, &machine.to_json(), true)?;
            reference.complete = true;
            fsutil::write_atomic(
                &ref_path,
                &serde_json::to_vec_pretty(&reference).unwrap_or_default(),
                true,
            )?;
            Ok(Instance {
                name: name.clone(),
                id: id.to_string(),
                disk: disk.clone(),
                machine_path: machine_path.clone(),
                machine,
                holder,
            })
        })();
        match made {
            Ok(i) => {
                self.touch(id);
                Ok(i)
            }
            Err(e) => {
                fsutil::remove_any(&disk);
                fsutil::remove_any(&machine_path);
                let _ = fs::remove_file(&ref_path);
                Err(e)
            }
        }
    }

    /// The instance named `name`: its overlay and machine definition (for booting it).
    pub fn instance_info(&self, name: &str) -> Result<Instance> {
        check_name("instance name", name)?;
        let r = self.read_reference(name)?;
        if !r.complete {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("instance '{name}' is being made (or its making was interrupted)"),
            ));
        }
        let (disk, machine_path) = instance_files(self, &r.id, name);
        let machine = read_machine(&machine_path)?;
        Ok(Instance {
            name: r.name,
            id: r.id,
            disk,
            machine_path,
            machine,
            holder: r.holder,
        })
    }

    pub(crate) fn read_reference(&self, name: &str) -> Result<Reference> {
        let path = self.ref_path(name);
        let bytes = fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::new(ErrorKind::NotFound, format!("no instance named '{name}'"))
            } else {
                Error::io_while(e, "reading a reference").with_path(&path)
            }
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::new(ErrorKind::Io, format!("damaged reference file: {e}")).with_path(&path))
    }

    /// Release instance `name`: its reference and its files are removed.
    pub fn release(&self, name: &str) -> Result<Reference> {
        check_name("instance name", name)?;
        let seen = self.read_reference(name)?;
        let _lock = self.lock(&seen.id, Mode::Exclusive, true)?;
        // Read again under the lock: another release may have run meanwhile.
        let r = self.read_reference(name)?;
        if r.nonce != seen.nonce {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("instance '{name}' was released and made again meanwhile; not released"),
            ));
        }
        if let Some(h) = r.in_use_by() {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "instance '{name}' is in use by a running VM (process {}); stop the VM first",
                    h.pid
                ),
            ));
        }
        let path = self.ref_path(name);
        fs::remove_file(&path).map_err(|e| Error::io_while(e, "removing a reference").with_path(&path))?;
        fsutil::sync_dir(&self.root.join("refs"))?;
        let (disk, machine) = instance_files(self, &r.id, name);
        fsutil::remove_any(&disk);
        fsutil::remove_any(&machine);
        self.touch(&r.id);
        Ok(r)
    }

    /// With `id`'s lock held exclusively: remove references to `id` whose holder died, with
    /// their files, and instance files no reference names. Returns the live references.
    pub(crate) fn release_dead_references(&self, id: &str) -> Result<Vec<String>> {
        let mut live = Vec::new();
        for r in self.references()?.into_iter().filter(|r| r.id == id) {
            // Nobody is making an instance of `id` now (its lock is held exclusively), so an
            // incomplete reference was left by a killed `instance`.
            if r.live() {
                live.push(r.name);
            } else {
                let _ = fs::remove_file(self.ref_path(&r.name));
                let (disk, machine) = instance_files(self, id, &r.name);
                fsutil::remove_any(&disk);
                fsutil::remove_any(&machine);
            }
        }
        // Instance files without a reference (made by an interrupted `instance`).
        if let Ok(rd) = fs::read_dir(self.entry_dir(id)) {
            for e in rd.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = file.strip_prefix("instance-") else {
                    // Temporary files of an interrupted `instance` (nobody is making one
                    // now: the lock is held exclusively).
                    if file.starts_with('.') {
                        fsutil::remove_any(&e.path());
                    }
                    continue;
                };
                let name = rest
                    .strip_suffix(".qcow2")
                    .or_else(|| rest.strip_suffix(".json"))
                    .unwrap_or(rest);
                let named = self.read_reference(name).is_ok_and(|r| r.id == id);
                if !named {
                    fsutil::remove_any(&e.path());
                }
            }
        }
        Ok(live)
    }
}

/// Write `bytes` to the new file `path` atomically: under a temporary name, synced, then
/// renamed without replacing (an existing `path` is an `AlreadyExists` error).
fn write_new(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = fsutil::temp_sibling(path)?;
    let written = (|| -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io_while(e, "writing a reference").with_path(path));
    }
    let renamed = rustix::fs::renameat_with(
        rustix::fs::CWD,
        &tmp,
        rustix::fs::CWD,
        path,
        rustix::fs::RenameFlags::NOREPLACE,
    );
    if let Err(e) = renamed {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io_while(e.into(), "writing a reference").with_path(path));
    }
    fsutil::sync_dir(&fsutil::parent_dir(path))
}
