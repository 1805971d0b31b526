//! The QEMU command line: machine, accelerator, direct kernel boot, disks as `-blockdev`
//! graphs (JSON, so no path needs QEMU's comma escaping), virtio devices, the serial
//! console, the guest command channel and the credentials.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use diskkit::ImageFormat;
use serde_json::{json, Value};

use super::kernel::Arch;
use super::Machine;

/// The accelerator QEMU is started with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Engine {
    /// Hardware virtualisation (`-cpu host`).
    Kvm,
    /// The emulator (`-cpu max`).
    Tcg,
}

impl Engine {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Engine::Kvm => "kvm",
            Engine::Tcg => "tcg",
        }
    }
}

/// One layer of a disk as QEMU opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    /// A RAW or qcow2 file (QEMU follows no backing file name: the chain is explicit).
    File { path: PathBuf, format: ImageFormat },
    /// The whole stack served by diskkit's NBD server.
    Nbd { socket: PathBuf, export: String },
}

/// A virtio disk.
#[derive(Debug, Clone)]
pub(crate) struct Drive {
    /// Node name and device serial (`root`, `disk1`, ...).
    pub(crate) id: String,
    /// The image's layers, bottom first (one node for NBD).
    pub(crate) chain: Vec<Node>,
    /// A qcow2 file on top that receives the writes; the chain is then read-only.
    pub(crate) overlay: Option<Overlay>,
    /// Without an overlay: whether the guest may write the chain's top layer.
    pub(crate) writable: bool,
}

/// The writable qcow2 layer of a drive.
#[derive(Debug, Clone)]
pub(crate) struct Overlay {
    pub(crate) path: PathBuf,
    /// Throwaway: guest flushes are not passed to the host (nothing is kept anyway).
    pub(crate) throwaway: bool,
}

/// The serial console's end.
#[derive(Debug, Clone)]
pub(crate) enum Console {
    /// The terminal, multiplexed with the QEMU monitor (Ctrl-A c) and the Ctrl-A x escape;
    /// QEMU also copies the output to the log file, if any.
    Stdio(Option<PathBuf>),
    /// A Unix socket diskkit listens on.
    Socket(PathBuf),
}

/// Everything the command line is built from.
#[derive(Debug, Clone)]
pub(crate) struct VmSpec {
    pub(crate) arch: Arch,
    pub(crate) engine: Engine,
    pub(crate) machine: Machine,
    pub(crate) kernel: PathBuf,
    pub(crate) initramfs: Option<PathBuf>,
    pub(crate) append: String,
    /// Root first: the guest sees them as vda, vdb, ... in this order.
    pub(crate) drives: Vec<Drive>,
    /// User-mode network, with the host port forwarded to the guest's port 22.
    pub(crate) net: Option<Option<u16>>,
    pub(crate) console: Console,
    /// virtio-serial ports: (name in the guest, Unix socket diskkit listens on).
    pub(crate) ports: Vec<(String, PathBuf)>,
    /// System credentials over fw_cfg: (name, file).
    pub(crate) credentials: Vec<(String, PathBuf)>,
}

/// A path as QEMU takes it in JSON and in its option syntax: UTF-8 only (serde_json cannot
/// represent other paths, and a lossy conversion would name another file).
fn utf8(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("'{}' cannot be given to QEMU: the path is not UTF-8", p.display()))
}

/// A path in QEMU's `key=value,...` option syntax: UTF-8, commas doubled.
fn esc(p: &Path) -> Result<String> {
    Ok(utf8(p)?.replace(',', ",,"))
}

fn format_name(f: ImageFormat) -> Result<&'static str> {
    match f {
        ImageFormat::Raw => Ok("raw"),
        ImageFormat::Qcow2 => Ok("qcow2"),
        other => bail!("QEMU cannot open {} images itself", other.name()),
    }
}

/// The `-blockdev` objects of a drive, bottom first; the last one is named `drive.id`.
pub(crate) fn blockdevs(drive: &Drive) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut below: Option<String> = None;
    let n = drive.chain.len();
    for (i, node) in drive.chain.iter().enumerate() {
        let top = i + 1 == n && drive.overlay.is_none();
        let name = if top {
            drive.id.clone()
        } else {
            format!("{}-l{i}", drive.id)
        };
        let read_only = !(top && drive.writable);
        match node {
            Node::File { path, format } => {
                let file = format!("{}-f{i}", drive.id);
                out.push(json!({
                    "driver": "file",
                    "node-name": file,
                    "filename": utf8(path)?,
                    "read-only": read_only,
                }));
                let mut fmt = json!({
                    "driver": format_name(*format)?,
                    "node-name": name,
                    "file": file,
                    "read-only": read_only,
                });
                if *format == ImageFormat::Qcow2 {
                    // Never the backing file the image names: the layer below, or none.
                    fmt["backing"] = below.clone().map_or(Value::Null, Value::String);
                } else if below.is_some() {
                    bail!("a RAW layer cannot sit on another layer");
                }
                out.push(fmt);
            }
            Node::Nbd { socket, export } => {
                if below.is_some() {
                    bail!("an NBD export is a whole stack and sits at the bottom");
                }
                out.push(json!({
                    "driver": "nbd",
                    "node-name": name,
                    "server": {"type": "unix", "path": utf8(socket)?},
                    "export": export,
                    "read-only": read_only,
                }));
            }
        }
        below = Some(name);
    }
    if let Some(o) = &drive.overlay {
        let file = format!("{}-of", drive.id);
        let cache = json!({"direct": false, "no-flush": o.throwaway});
        out.push(json!({
            "driver": "file",
            "node-name": file,
            "filename": utf8(&o.path)?,
            "discard": "unmap",
            "cache": cache,
        }));
        out.push(json!({
            "driver": "qcow2",
            "node-name": drive.id,
            "file": file,
            "backing": below.map_or(Value::Null, Value::String),
            "discard": "unmap",
            "cache": cache,
        }));
    }
    Ok(out)
}

/// The QEMU arguments (without the program).
pub(crate) fn args(spec: &VmSpec) -> Result<Vec<OsString>> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    match spec.arch {
        Arch::X86_64 => push(&["-machine", "q35"]),
        Arch::Aarch64 => push(&["-machine", "virt,gic-version=max"]),
    }
    push(&["-accel", spec.engine.name()]);
    push(&[
        "-cpu",
        match spec.engine {
            Engine::Kvm => "host",
            Engine::Tcg => "max",
        },
    ]);
    let mib = (spec.machine.memory >> 20).to_string();
    let cpus = spec.machine.cpus.to_string();
    push(&["-m", &mib, "-smp", &cpus]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
    a.push("-kernel".into());
    a.push(spec.kernel.clone().into());
    if let Some(i) = &spec.initramfs {
        a.push("-initrd".into());
        a.push(i.clone().into());
    }
    a.push("-append".into());
    a.push(spec.append.clone().into());
    a.extend(["-device", "virtio-rng-pci"].map(OsString::from));
    if let Some(fwd) = spec.net {
        let mut netdev = "user,id=net0".to_owned();
        if let Some(port) = fwd {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{port}-:22"));
        }
        let mut dev = "virtio-net-pci,netdev=net0".to_owned();
        if let Some(mac) = spec.machine.mac {
            dev.push_str(&format!(",mac={}", super::format_mac(mac)));
        }
        a.extend(["-netdev".into(), netdev.into(), "-device".into(), dev.into()]);
    }
    for d in &spec.drives {
        for b in blockdevs(d)? {
            a.push("-blockdev".into());
            a.push(b.to_string().into());
        }
        a.push("-device".into());
        a.push(format!("virtio-blk-pci,drive={0},serial={0}", d.id).into());
    }
    match &spec.console {
        Console::Stdio(log) => {
            let mut chardev = "stdio,id=console,mux=on,signal=off".to_owned();
            if let Some(l) = log {
                chardev.push_str(&format!(",logfile={}", esc(l)?));
            }
            a.push("-chardev".into());
            a.push(chardev.into());
            a.extend(
                [
                    "-serial",
                    "chardev:console",
                    "-mon",
                    "chardev=console,mode=readline",
                ]
                .map(OsString::from),
            );
        }
        Console::Socket(p) => {
            a.push("-chardev".into());
            a.push(format!("socket,id=console,path={}", esc(p)?).into());
            a.extend(["-serial", "chardev:console"].map(OsString::from));
        }
    }
    if !spec.ports.is_empty() {
        a.extend(["-device", "virtio-serial-pci,id=vser"].map(OsString::from));
        for (i, (name, path)) in spec.ports.iter().enumerate() {
            a.push("-chardev".into());
            a.push(format!("socket,id=port{i},path={}", esc(path)?).into());
            a.push("-device".into());
            a.push(format!("virtserialport,bus=vser.0,chardev=port{i},name={name}").into());
        }
    }
    for (name, file) in &spec.credentials {
        a.push("-fw_cfg".into());
        a.push(format!("name=opt/io.systemd.credentials/{name},file={}", esc(file)?).into());
    }
    Ok(a)
}

/// Find the QEMU for `arch`: `--qemu`, else `qemu-system-<arch>` in PATH.
pub(crate) fn find(arch: Arch, given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("QEMU not found at '{}' (--qemu)", p.display());
    }
    let name = format!("qemu-system-{}", arch.name());
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(&name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    let package = match arch {
        Arch::X86_64 => "qemu-system-x86",
        Arch::Aarch64 => "qemu-system-arm",
    };
    bail!("{name} not found in PATH: install QEMU (Debian: apt install {package}) or give --qemu PATH")
}

/// Quote a word for a POSIX shell (for printing command lines).
pub(crate) fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_@%+=:,./-".contains(&b))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &str, f: ImageFormat) -> Node {
        Node::File {
            path: p.into(),
            format: f,
        }
    }

    #[test]
    fn chain_with_overlay() {
        let d = Drive {
            id: "root".into(),
            chain: vec![
                file("/b,ase.raw", ImageFormat::Raw),
                file("/mid.qcow2", ImageFormat::Qcow2),
            ],
            overlay: Some(Overlay {
                path: "/run/o.qcow2".into(),
                throwaway: true,
            }),
            writable: false,
        };
        let b = blockdevs(&d).unwrap();
        assert_eq!(b.len(), 6);
        assert_eq!(b[0]["filename"], "/b,ase.raw");
        assert_eq!(b[1]["driver"], "raw");
        assert_eq!(b[3]["backing"], "root-l0");
        assert_eq!(b[3]["read-only"], true);
        assert_eq!(b[5]["node-name"], "root");
        assert_eq!(b[5]["backing"], "root-l1");
        assert_eq!(b[5]["cache"]["no-flush"], true);
    }

    #[test]
    fn lone_qcow2_has_no_backing_and_nbd_is_one_node() {
        let d = Drive {
            id: "disk1".into(),
            chain: vec![file("/x.qcow2", ImageFormat::Qcow2)],
            overlay: None,
            writable: true,
        };
        let b = blockdevs(&d).unwrap();
        assert_eq!(b[1]["backing"], Value::Null);
        assert_eq!(b[1]["node-name"], "disk1");
        assert_eq!(b[1]["read-only"], false);
        let n = Drive {
            id: "disk2".into(),
            chain: vec![Node::Nbd {
                socket: "/r/n.sock".into(),
                export: "disk2".into(),
            }],
            overlay: None,
            writable: false,
        };
        let b = blockdevs(&n).unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0]["server"]["path"], "/r/n.sock");
        assert_eq!(b[0]["read-only"], true);
        let asif = Drive {
            chain: vec![file("/a.asif", ImageFormat::Asif)],
            ..n
        };
        assert!(blockdevs(&asif).is_err());
    }

    /// A path that is not UTF-8 (a --persist or --console-log name, a runtime directory) is an
    /// error, not a panic in serde_json or a lossily converted name.
    #[test]
    fn paths_that_are_not_utf8_are_refused() {
        use std::os::unix::ffi::OsStrExt;
        let bad = PathBuf::from(std::ffi::OsStr::from_bytes(b"/run/st\xff.qcow2"));
        let d = Drive {
            id: "root".into(),
            chain: vec![file("/base.raw", ImageFormat::Raw)],
            overlay: Some(Overlay {
                path: bad.clone(),
                throwaway: false,
            }),
            writable: false,
        };
        let e = blockdevs(&d).unwrap_err().to_string();
        assert!(e.contains("the path is not UTF-8"), "{e}");
        let d = Drive {
            chain: vec![Node::Nbd {
                socket: bad.clone(),
                export: "root".into(),
            }],
            overlay: None,
            ..d
        };
        assert!(blockdevs(&d).is_err());
        assert!(esc(&bad).is_err());
        assert_eq!(esc(Path::new("/a,b")).unwrap(), "/a,,b");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("a-b/c.d"), "a-b/c.d");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
