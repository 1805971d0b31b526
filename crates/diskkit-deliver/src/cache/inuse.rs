//! Instances in use: a VM booted from an instance (`diskkit boot --instance`) records its
//! process in the instance's reference, so that the entry stays referenced while the VM runs
//! even if the instance's own holder exits meanwhile, and so that a second VM, `release`,
//! `rm` and `gc` are refused. The record is dropped when the VM stops; a process killed
//! before that leaves a record whose process is dead, which counts for nothing.

use super::instance::{instance_files, Instance, Reference};
use super::lock::{Holder, Mode};
use super::{check_name, read_machine, Cache};
use crate::error::{Error, ErrorKind, Result};
use crate::fsutil;

impl Reference {
    /// Whether the reference keeps its entry: complete, and its holder or the process using
    /// the instance (a running VM) alive.
    pub fn live(&self) -> bool {
        self.complete && (self.holder.alive() || self.in_use_by().is_some())
    }

    /// The live process using the instance now (a running VM), if any.
    pub fn in_use_by(&self) -> Option<Holder> {
        self.in_use.filter(|h| h.pid != 0 && h.alive())
    }
}

/// An instance marked in use by one process (see [`Cache::use_instance`]); the mark is
/// dropped by [`InstanceUse::finish`], or on drop.
#[derive(Debug)]
pub struct InstanceUse {
    cache: Cache,
    instance: Instance,
    nonce: String,
    user: Holder,
    done: bool,
}

impl InstanceUse {
    /// The instance: its overlay and machine definition.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// Drop the mark (the VM has stopped).
    pub fn finish(mut self) -> Result<()> {
        self.done = true;
        self.cache.unmark(&self.instance, &self.nonce, self.user)
    }
}

impl Drop for InstanceUse {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.cache.unmark(&self.instance, &self.nonce, self.user);
        }
    }
}

impl Cache {
    /// Instance `name`, checked for booting: complete, held by a live process (a released
    /// instance whose files are still there is refused: the next `gc` removes it), its
    /// overlay and machine definition present, and not in use by another VM.
    pub fn usable_instance(&self, name: &str) -> Result<Instance> {
        check_name("instance name", name)?;
        let r = self.read_reference(name)?;
        self.check_usable(&r, None)
    }

    /// Mark instance `name` as used by `user` (the process that runs its VM), after the checks
    /// of [`Cache::usable_instance`]. While the mark's process lives, the entry counts as
    /// referenced (even if the instance's holder exits), and `release`, `rm` and a second
    /// `use_instance` are refused.
    pub fn use_instance(&self, name: &str, user: Holder) -> Result<InstanceUse> {
        check_name("instance name", name)?;
        let seen = self.read_reference(name)?;
        // Exclusive, so that no gc, rm, release or other use runs between the checks and the
        // mark (each of them holds it only briefly).
        let _lock = self.lock(&seen.id, Mode::Exclusive, true)?;
        let mut r = self.read_reference(name)?;
        let instance = self.check_usable(&r, Some(user))?;
        r.in_use = Some(user);
        fsutil::write_atomic(
            &self.ref_path(name),
            &serde_json::to_vec_pretty(&r).unwrap_or_default(),
            true,
        )?;
        self.touch(&r.id);
        Ok(InstanceUse {
            cache: self.clone(),
            instance,
            nonce: r.nonce,
            user,
            done: false,
        })
    }

    fn check_usable(&self, r: &Reference, user: Option<Holder>) -> Result<Instance> {
        let name = &r.name;
        if !r.complete {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("instance '{name}' is being made (or its making was interrupted)"),
            ));
        }
        if !r.holder.alive() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "instance '{name}' is released: its holder (process {}) has exited and the next \
                     `cache gc` removes it; make a new instance (--persistent keeps one until `cache release`)",
                    r.holder.pid
                ),
            ));
        }
        if let Some(h) = r.in_use_by().filter(|h| Some(*h) != user) {
            return Err(Error::new(
                ErrorKind::InUse,
                format!("instance '{name}' is in use by a running VM (process {})", h.pid),
            ));
        }
        let (disk, machine_path) = instance_files(self, &r.id, name);
        if !disk.is_file() {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("instance '{name}' has lost its overlay; release it and make a new one"),
            )
            .with_path(&disk));
        }
        let machine = read_machine(&machine_path)?;
        Ok(Instance {
            name: r.name.clone(),
            id: r.id.clone(),
            disk,
            machine_path,
            machine,
            holder: r.holder,
        })
    }

    /// Drop `user`'s mark on `instance`, if the reference is still the one marked.
    fn unmark(&self, instance: &Instance, nonce: &str, user: Holder) -> Result<()> {
        let _lock = self.lock(&instance.id, Mode::Exclusive, true)?;
        let Ok(mut r) = self.read_reference(&instance.name) else {
            return Ok(());
        };
        if r.nonce != nonce || r.in_use != Some(user) {
            return Ok(());
        }
        r.in_use = None;
        fsutil::write_atomic(
            &self.ref_path(&instance.name),
            &serde_json::to_vec_pretty(&r).unwrap_or_default(),
            true,
        )?;
        self.touch(&instance.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(holder: Holder, in_use: Option<Holder>) -> Reference {
        Reference {
            name: "vm".into(),
            id: "e".into(),
            holder,
            created: 0,
            nonce: "n".into(),
            complete: true,
            in_use,
        }
    }

    #[test]
    fn a_live_user_keeps_a_reference_whose_holder_died() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = Holder::process(child.id()).unwrap_or(Holder {
            pid: child.id(),
            start_time: 1,
        });
        child.wait().unwrap();
        let me = Holder::current();
        assert!(!reference(dead, None).live());
        assert!(reference(dead, Some(me)).live());
        assert!(!reference(dead, Some(dead)).live());
        assert_eq!(reference(dead, Some(me)).in_use_by(), Some(me));
        // PID 0 is never a user.
        assert_eq!(reference(me, Some(Holder::persistent())).in_use_by(), None);
        let mut incomplete = reference(me, Some(me));
        incomplete.complete = false;
        assert!(!incomplete.live());
        // References written before the field existed read without it.
        let old = br#"{"name":"vm","id":"e","holder":{"pid":0,"start_time":0},"created":1,"nonce":"x","complete":true}"#;
        let r: Reference = serde_json::from_slice(old).unwrap();
        assert_eq!(r.in_use, None);
        assert!(r.live());
    }
}
