//! `--ssh`: a fresh key pair in the runtime directory, its public half given to the guest as
//! the `ssh.authorized_keys.root` credential (systemd's tmpfiles `provision.conf` writes it to
//! `/root/.ssh/authorized_keys`; verified on Debian 12's systemd 252), and OpenSSH's client
//! against a forwarded localhost port.
//!
//! Readiness is a completed SSH session (`ssh ... true` exiting 0: key exchange,
//! authentication and a command run), not a port that accepts connections: QEMU's user-mode
//! network accepts on the forwarded port long before sshd runs (bcvk #309).

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The key pair and the port of one boot.
#[derive(Debug, Clone)]
pub(crate) struct Ssh {
    pub(crate) key: PathBuf,
    pub(crate) public: PathBuf,
    pub(crate) known_hosts: PathBuf,
    pub(crate) port: u16,
}

/// A localhost port nothing listens on now (QEMU binds it a moment later).
pub(crate) fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free localhost port")?;
    Ok(l.local_addr()?.port())
}

impl Ssh {
    /// Make an ed25519 key pair in `dir` (the runtime directory).
    pub(crate) fn create(dir: &Path) -> Result<Ssh> {
        let key = dir.join("id_ed25519");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "diskkit-boot", "-f"])
            .arg(&key)
            .stdin(Stdio::null())
            .output()
            .context("running ssh-keygen (install openssh-client)")?;
        if !out.status.success() {
            bail!(
                "ssh-keygen failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(Ssh {
            public: key.with_extension("pub"),
            key,
            known_hosts: dir.join("known_hosts"),
            port: free_port()?,
        })
    }

    /// An `ssh` invocation for the guest; `args` follow the destination.
    pub(crate) fn command(&self, tty: bool) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-F", "/dev/null", "-i"])
            .arg(&self.key)
            .args(["-p", &self.port.to_string()])
            .args(["-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none"])
            .args(["-o", "StrictHostKeyChecking=accept-new"])
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args(["-o", "BatchMode=yes", "-o", "LogLevel=ERROR"])
            .args(["-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=6"]);
        if tty {
            c.arg("-t");
        }
        c.arg("root@127.0.0.1");
        // SAFETY: prctl is async-signal-safe; it sets this process's parent-death signal so
        // ssh does not outlive a killed diskkit.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        c
    }

    /// One readiness attempt: a full session running `true`.
    pub(crate) fn ready(&self) -> bool {
        let mut c = self.command(false);
        c.args(["-o", "ConnectTimeout=10", "--", "true"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c.status().is_ok_and(|s| s.success())
    }
}
