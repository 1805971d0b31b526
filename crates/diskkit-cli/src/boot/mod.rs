//! `diskkit boot`: boot a disk image, an OCI image or an Apple `container` store entry as a
//! QEMU virtual machine with the image's own kernel, and optionally run one command in it.
//!
//! The steps (one module each):
//! 1. [`source`]: SOURCE becomes a root disk. OCI images are unpacked once into the store
//!    ([`store`]; the `unpack --store` layout, RAW, 64 GiB sparse, journaled) and only read
//!    afterwards. [`instance`]: a cache instance (`--instance NAME`) is its own stack, whose
//!    overlay takes the guest's writes, and brings its machine definition.
//! 2. [`root`], [`kernel`]: the root filesystem (UUID, partition), the kernel and initramfs
//!    found as `diskkit kernel` finds them (cached per store entry), the command line.
//! 3. [`rundir`]: a private runtime directory with the throwaway qcow2 overlay, sockets and
//!    credentials; removed on every way out, stale ones removed by the next run.
//! 4. [`qemu`], [`accel`]: the QEMU command line; disks as files when QEMU can open every
//!    layer (RAW, qcow2), else through diskkit's NBD server on a Unix socket.
//! 5. [`guest`], [`ssh`], [`supervise`]: COMMAND through systemd credentials and
//!    `systemd.run=`, its output and status over virtio-serial ports; or SSH; or the console.
//!
//! [`BootRequest`] is everything a boot needs; the CLI fills it from its arguments. The
//! machine's values it leaves unset come from a cache instance's `machine.json`, else from
//! the defaults ([`MachineRequest::resolve`]).

pub(crate) mod accel;
pub(crate) mod guest;
pub(crate) mod instance;
pub(crate) mod kernel;
pub(crate) mod qemu;
mod request;
pub(crate) mod root;
pub(crate) mod rundir;
pub(crate) mod source;
pub(crate) mod ssh;
pub(crate) mod store;
mod supervise;

use request::MAX_SCRIPT;
pub(crate) use request::{
    format_mac, parse_duration, parse_mac, Accel, BootRequest, DiskSpec, Machine, MachineRequest, Net,
    SourceSpec, Transport,
};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use diskkit::{CreateOptions, DiskImage, ImageFormat};
use diskkit_ext4::read::PartitionSelector;
use diskkit_nbd::{Address, Export, Server, ServerConfig};
use serde::Serialize;

use self::kernel::{Arch, BootFiles};
use self::qemu::{Console, Drive, Engine, Node, Overlay, VmSpec};
use self::root::{RootFs, System};
use crate::args::Output;
use crate::messages::{note, warn};

/// Phase timings for `-v`.
struct Clock {
    verbose: bool,
    start: Instant,
    last: Instant,
}

impl Clock {
    fn new(verbose: bool) -> Clock {
        let now = Instant::now();
        Clock {
            verbose,
            start: now,
            last: now,
        }
    }

    fn step(&mut self, what: &str) {
        let now = Instant::now();
        if self.verbose {
            eprintln!(
                "diskkit: {what} ({:.2}s, {:.2}s in all)",
                (now - self.last).as_secs_f64(),
                (now - self.start).as_secs_f64()
            );
        }
        self.last = now;
    }
}

/// A disk as it will be given to QEMU.
struct PlannedDisk {
    id: String,
    root: source::Root,
    /// Served by diskkit's NBD server (else QEMU opens the files).
    nbd: bool,
    writable: bool,
}

impl PlannedDisk {
    fn new(id: &str, root: source::Root, writable: bool, transport: Transport) -> PlannedDisk {
        let files_ok = root
            .layers
            .iter()
            .all(|(p, f)| p.is_some() && matches!(f, ImageFormat::Raw | ImageFormat::Qcow2));
        PlannedDisk {
            id: id.to_owned(),
            root,
            nbd: transport == Transport::Nbd || !files_ok,
            writable,
        }
    }

    fn chain(&self, nbd_socket: &Path) -> Vec<Node> {
        if self.nbd {
            vec![Node::Nbd {
                socket: nbd_socket.to_path_buf(),
                export: self.id.clone(),
            }]
        } else {
            self.root
                .layers
                .iter()
                .filter_map(|(p, f)| p.clone().map(|path| Node::File { path, format: *f }))
                .collect()
        }
    }

    fn via(&self) -> &'static str {
        if self.nbd {
            "diskkit's NBD server"
        } else {
            "files"
        }
    }
}

/// What `--dry-run --output json` prints.
#[derive(Serialize)]
struct DryRun<'a> {
    qemu: &'a Path,
    args: Vec<String>,
    accel: &'a str,
    arch: Arch,
    kernel: &'a Path,
    initramfs: Option<&'a Path>,
    cmdline: &'a str,
    root: String,
    root_layers: Vec<(Option<&'a Path>, &'static str)>,
    root_via: &'static str,
    store_entry: Option<&'a Path>,
    /// The cache instance booted, if any.
    instance: Option<DryInstance<'a>>,
    /// The machine: memory in MiB, CPUs, MAC address (`None`: QEMU's).
    memory_mib: u64,
    cpus: u32,
    mac: Option<String>,
    /// The values that came from the instance's machine definition (`memory`, `cpus`,
    /// `mac`); the others are flags or defaults.
    machine_from_definition: &'a [&'static str],
    runtime_dir: &'a Path,
    overlay: &'a Path,
    persist: bool,
    /// Credentials QEMU passes over fw_cfg: name, file, and the contents diskkit writes
    /// there at boot (`None` for the SSH key, made at boot).
    credentials: Vec<(&'a str, &'a Path, Option<String>)>,
    notes: &'a [String],
}

/// What `--dry-run --output json` says of a cache instance.
#[derive(Serialize)]
struct DryInstance<'a> {
    name: &'a str,
    id: &'a str,
    cache: &'a Path,
    machine_path: &'a Path,
}

/// Boot as `req` says; the exit status.
pub(crate) fn run(req: &BootRequest) -> Result<u8> {
    let mut clock = Clock::new(req.verbose);
    let dry = req.dry_run.is_some();
    if req.ssh && req.net == Net::None {
        bail!("--ssh needs the network: drop --net none");
    }
    if dry && req.console_log.is_some() {
        bail!("--console-log does not apply to --dry-run");
    }
    // Stale runtime directories are removed first, whatever happens next.
    let run_base = if dry { None } else { Some(rundir::base()?) };
    if let Some(b) = &run_base {
        rundir::remove_stale(b);
    }
    let store_dir = match &req.store {
        Some(d) => d.clone(),
        None => store::default_dir()?,
    };
    // A cache instance: checked, and (for a real boot) marked in use until the VM stops, so
    // that the cache keeps it and no second VM takes it.
    let picked = match &req.source {
        SourceSpec::Instance { cache, name } => {
            if req.persist.is_some() {
                bail!("--persist does not apply to --instance: the guest's writes go into the instance");
            }
            Some(instance::Picked::open(cache.as_deref(), name, !dry)?)
        }
        _ => None,
    };
    let (machine, machine_from) = req
        .machine
        .resolve(picked.as_ref().map(|p| &p.instance.machine))
        .with_context(|| match &picked {
            Some(p) => format!(
                "instance '{}' ('{}')",
                p.instance.name,
                p.instance.machine_path.display()
            ),
            None => "the machine".to_owned(),
        })?;
    let root = match &picked {
        Some(p) => p.root()?,
        None => source::resolve(req, &store_dir)?,
    };
    clock.step(&format!("root {} ready", root.name));
    let selector = req
        .partition
        .as_deref()
        .map_or(PartitionSelector::Auto, PartitionSelector::parse);
    let rootfs = RootFs::open(root.disk.clone(), &selector).with_context(|| root.name.clone())?;
    let found = kernel::find(&rootfs, req.kernel_version.as_deref()).with_context(|| root.name.clone())?;
    let mut notes = found.notes.clone();
    for w in &found.discovery.warnings {
        warn(format_args!("{w}"));
    }
    let image_cmdline_text = found.discovery.cmdline.as_ref().map(|c| c.text.clone());
    let init_arg = image_cmdline_text
        .as_deref()
        .into_iter()
        .chain(req.kargs.iter().map(String::as_str))
        .flat_map(kernel::split_cmdline)
        .filter_map(|a| a.strip_prefix("init=").map(str::to_owned))
        .next_back();
    let needs_systemd = req.ssh || !req.command.is_empty();
    if needs_systemd {
        let fs = rootfs.filesystem()?;
        let system = System::inspect(&fs, init_arg.as_deref());
        if let Some(why) = system.command_blocker(init_arg.as_deref()) {
            let what = if req.ssh { "--ssh" } else { "COMMAND" };
            bail!("cannot run {what} in {}: {why}", root.name);
        }
    }
    let arch = found.arch;
    let qemu_path = qemu::find(arch, req.qemu.as_deref())?;
    // The runtime directory (a placeholder for --dry-run).
    let run = match &run_base {
        Some(b) => Some(rundir::RunDir::create(b)?),
        None => None,
    };
    let run_path = match &run {
        Some(r) => r.path().to_path_buf(),
        None => rundir_placeholder(),
    };
    // Kernel files: cached per store entry, else written into the runtime directory.
    let cache = match (&root.digest, &req.kernel_version) {
        (Some(hex), None) => Some(store::KernelCache::new(&store_dir, hex)?),
        _ => None,
    };
    let files: BootFiles = match (&cache, &run) {
        (Some(c), _) => match c.get() {
            Some(f) => f,
            None => c.put(&found)?,
        },
        (None, Some(r)) => kernel::write_out(&found, r.path())?,
        (None, None) => BootFiles {
            kernel: run_path.join("vmlinuz"),
            initramfs: found
                .selection
                .chosen
                .initramfs
                .as_ref()
                .map(|_| run_path.join("initramfs")),
            image_cmdline: None,
            arch,
            version: found.selection.chosen.version.clone(),
            source: found.describe(),
        },
    };
    clock.step(&format!("kernel {}", files.source));
    let image_cmdline = files
        .image_cmdline
        .as_ref()
        .map(|(t, _)| t.clone())
        .or(image_cmdline_text);
    let mut extra = Vec::new();
    let command_mode = !req.command.is_empty() && !req.ssh;
    if command_mode {
        extra.extend(guest::kernel_args());
    }
    extra.extend(req.kargs.iter().cloned());
    let append = kernel::compose_cmdline(
        image_cmdline.as_deref(),
        &rootfs.root_arg(files.initramfs.is_some()),
        arch,
        &extra,
    );
    if files.initramfs.is_none() {
        notes.push(format!(
            "the image has no initramfs: the kernel must have virtio-blk and ext4 built in; root is {}",
            rootfs.root_arg(false)
        ));
    }
    // Disks.
    let transport = req.transport;
    let mut planned = vec![PlannedDisk::new("root", root, false, transport)];
    for (i, d) in req.disks.iter().enumerate() {
        let policy = req.parents.policy();
        // Read-only to look at it; writable only when diskkit serves it (QEMU opens RAW and
        // qcow2 files itself, and must be the only writer).
        let id = format!("disk{}", i + 1);
        let disk = source::open_disk(&d.path, d.format, policy.clone(), false, None)?;
        let mut p = PlannedDisk::new(&id, disk, !d.read_only, transport);
        if p.nbd && p.writable && !dry {
            // Let go of the read-only look first: its reader's lock refuses writers, this
            // process's own writable open included.
            drop(p);
            let disk = source::open_disk(&d.path, d.format, policy, true, None)?;
            p = PlannedDisk::new(&id, disk, true, transport);
        }
        planned.push(p);
    }
    let nbd_socket = run_path.join("nbd.sock");
    // The root's writable layer: a cache instance's own, --persist, or a throwaway one.
    let instance_overlay = planned[0].root.overlay.clone();
    let kept = instance_overlay.is_some() || req.persist.is_some();
    let overlay_path = match (&instance_overlay, &req.persist) {
        (Some(o), _) => o.clone(),
        (None, Some(p)) => absolute(p)?,
        (None, None) => run_path.join("overlay.qcow2"),
    };
    // Accelerator.
    let engine = match req.accel {
        Accel::Tcg => Engine::Tcg,
        Accel::Kvm => {
            if Arch::host() != Some(arch) {
                bail!("--accel kvm: the image is {}, the host is not", arch.name());
            }
            accel::kvm_opens().map_err(anyhow::Error::msg)?;
            Engine::Kvm
        }
        Accel::Auto if dry => {
            if Arch::host() == Some(arch) && accel::kvm_opens().is_ok() {
                notes.push("--accel auto: KVM would be probed first; shown here with TCG".to_owned());
            }
            Engine::Tcg
        }
        Accel::Auto => {
            let (e, why) = accel::choose_auto(
                arch,
                &qemu_path,
                &files.kernel,
                run_base.as_deref().unwrap_or(Path::new("/nonexistent")),
                &run_path,
            );
            if let (Some(why), false) = (why, req.quiet) {
                note(format_args!("using TCG, which is slow: {why}"));
            }
            clock.step(&format!("accelerator {}", e.name()));
            e
        }
    };
    let ssh = match (&run, req.ssh) {
        (Some(r), true) => Some(ssh::Ssh::create(r.path())?),
        (None, true) => Some(ssh::Ssh {
            key: run_path.join("id_ed25519"),
            public: run_path.join("id_ed25519.pub"),
            known_hosts: run_path.join("known_hosts"),
            port: 2222,
        }),
        _ => None,
    };
    let mut credentials = Vec::new();
    if command_mode {
        credentials.push((guest::RUN_CREDENTIAL.to_owned(), run_path.join("diskkit.run")));
    }
    if let Some(s) = &ssh {
        credentials.push(("ssh.authorized_keys.root".to_owned(), s.public.clone()));
    }
    let ports: Vec<(String, PathBuf)> = if command_mode {
        [
            (guest::PORT_STDOUT, "stdout.sock"),
            (guest::PORT_STDERR, "stderr.sock"),
            (guest::PORT_STATUS, "status.sock"),
        ]
        .iter()
        .map(|(n, f)| ((*n).to_owned(), run_path.join(f)))
        .collect()
    } else {
        Vec::new()
    };
    let console_mode = req.command.is_empty() && !req.ssh;
    let console = if console_mode {
        Console::Stdio(req.console_log.as_deref().map(absolute).transpose()?)
    } else {
        Console::Socket(run_path.join("console.sock"))
    };
    let drives: Vec<Drive> = planned
        .iter()
        .enumerate()
        .map(|(i, d)| Drive {
            id: d.id.clone(),
            chain: d.chain(&nbd_socket),
            overlay: (i == 0).then(|| Overlay {
                path: overlay_path.clone(),
                throwaway: !kept,
            }),
            writable: d.writable,
        })
        .collect();
    let spec = VmSpec {
        arch,
        engine,
        machine,
        kernel: files.kernel.clone(),
        initramfs: files.initramfs.clone(),
        append: append.clone(),
        drives,
        net: match req.net {
            Net::User => Some(ssh.as_ref().map(|s| s.port)),
            Net::None => None,
        },
        console,
        ports,
        credentials,
    };
    let args = qemu::args(&spec)?;
    if let Some(output) = req.dry_run {
        let root_disk = &planned[0];
        let args_text: Vec<String> = args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
        match output {
            Output::Json => {
                let d = DryRun {
                    qemu: &qemu_path,
                    args: args_text,
                    accel: engine.name(),
                    arch,
                    kernel: &files.kernel,
                    initramfs: files.initramfs.as_deref(),
                    cmdline: &append,
                    root: format!(
                        "{} ({})",
                        rootfs.root_arg(files.initramfs.is_some()),
                        rootfs.describe()
                    ),
                    root_layers: root_disk
                        .root
                        .layers
                        .iter()
                        .map(|(p, f)| (p.as_deref(), f.name()))
                        .collect(),
                    root_via: root_disk.via(),
                    store_entry: root_disk.root.entry.as_deref(),
                    instance: picked.as_ref().map(|p| DryInstance {
                        name: &p.instance.name,
                        id: &p.instance.id,
                        cache: &p.cache,
                        machine_path: &p.instance.machine_path,
                    }),
                    memory_mib: machine.memory >> 20,
                    cpus: machine.cpus,
                    mac: machine.mac.map(format_mac),
                    machine_from_definition: &machine_from,
                    runtime_dir: &run_path,
                    overlay: &overlay_path,
                    persist: kept,
                    credentials: spec
                        .credentials
                        .iter()
                        .map(|(n, f)| {
                            let contents = (n == guest::RUN_CREDENTIAL).then(|| guest::script(&req.command));
                            (n.as_str(), f.as_path(), contents)
                        })
                        .collect(),
                    notes: &notes,
                };
                crate::cmd::fs::print_json(&d)?;
            }
            Output::Human => {
                let mut out = std::io::stdout().lock();
                for n in &notes {
                    writeln!(out, "# note: {n}")?;
                }
                writeln!(
                    out,
                    "# root: {} {} of {}, via {}",
                    rootfs.root_arg(files.initramfs.is_some()),
                    rootfs.describe(),
                    root_disk.root.name,
                    root_disk.via()
                )?;
                for (p, f) in &root_disk.root.layers {
                    if let Some(p) = p {
                        writeln!(out, "#   layer: {} ({})", p.display(), f.name())?;
                    }
                }
                writeln!(out, "# kernel: {}", files.source)?;
                writeln!(
                    out,
                    "# machine: {} MiB, {} CPU{}, MAC {}{}",
                    machine.memory >> 20,
                    machine.cpus,
                    if machine.cpus == 1 { "" } else { "s" },
                    machine
                        .mac
                        .map_or_else(|| "QEMU's default".to_owned(), format_mac),
                    match &picked {
                        Some(p) if !machine_from.is_empty() => format!(
                            " ({} from '{}')",
                            machine_from.join(", "),
                            p.instance.machine_path.display()
                        ),
                        _ => String::new(),
                    }
                )?;
                writeln!(
                    out,
                    "# overlay: {} ({})",
                    overlay_path.display(),
                    if instance_overlay.is_some() {
                        "the instance's, kept"
                    } else if req.persist.is_some() {
                        "kept"
                    } else {
                        "throwaway, made at boot"
                    }
                )?;
                writeln!(out, "# runtime directory: {} (made at boot)", run_path.display())?;
                // One option and its value per line.
                let mut line = qemu::shell_quote(&qemu_path.to_string_lossy());
                let mut i = 0;
                while i < args_text.len() {
                    line.push_str(" \\\n    ");
                    line.push_str(&qemu::shell_quote(&args_text[i]));
                    if args_text[i].starts_with('-')
                        && args_text.get(i + 1).is_some_and(|v| !v.starts_with('-'))
                    {
                        line.push(' ');
                        line.push_str(&qemu::shell_quote(&args_text[i + 1]));
                        i += 1;
                    }
                    i += 1;
                }
                writeln!(out, "{line}")?;
            }
        }
        return Ok(crate::exit::SUCCESS);
    }
    if !req.quiet {
        for n in &notes {
            note(format_args!("{n}"));
        }
    }
    let run = run.context("runtime directory")?;
    // The root's overlay: made fresh, or reused from --persist.
    if instance_overlay.is_none() {
        let root_size = planned[0].root.disk.size();
        prepare_overlay(&overlay_path, req.persist.is_some(), &planned[0].root, root_size)?;
    }
    if command_mode {
        let script = run.join("diskkit.run");
        // systemd imports credentials of up to 1 MiB.
        let text = guest::script(&req.command);
        if text.len() > MAX_SCRIPT {
            bail!(
                "COMMAND is {} bytes long; at most {MAX_SCRIPT} fit in a credential",
                text.len()
            );
        }
        std::fs::write(&script, text).with_context(|| format!("writing '{}'", script.display()))?;
    }
    // diskkit's NBD server for the disks QEMU cannot open itself.
    let mut exports: Vec<Export> = Vec::new();
    for d in planned.iter().filter(|d| d.nbd) {
        let disk = match (&d.root.overlay, d.root.layers.last()) {
            // A cache instance: its overlay is QEMU's; the server exports the layers below.
            (Some(_), Some((Some(below), format))) => {
                source::open_disk(
                    below,
                    Some(*format),
                    diskkit::ParentPolicy::same_directory(),
                    false,
                    None,
                )?
                .disk
            }
            _ => d.root.disk.clone(),
        };
        let mut e = Export::new(d.id.clone(), disk);
        e.read_only = !d.writable;
        exports.push(e);
    }
    let nbd = if exports.is_empty() {
        None
    } else {
        let mut config = ServerConfig::new(exports);
        config.max_connections = 4;
        let server = Server::bind(&Address::Unix(nbd_socket.clone()), config)
            .with_context(|| format!("serving the disks on '{}'", nbd_socket.display()))?;
        let handle = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());
        Some((handle, thread))
    };
    for d in &planned {
        if req.verbose {
            eprintln!("diskkit: {} is {} via {}", d.id, d.root.name, d.via());
        }
    }
    clock.step("runtime directory ready");
    // QEMU opens the file-backed disks itself: diskkit lets go of them first (the NBD server
    // keeps what it serves).
    drop(planned);
    drop(found);
    drop(rootfs);
    let outcome = supervise::run(&supervise::Launch {
        qemu: &qemu_path,
        args,
        run: &run,
        spec: &spec,
        command: &req.command,
        ssh: ssh.as_ref(),
        persist: kept,
        timeout: req.timeout,
        console_log: req.console_log.as_deref(),
        verbose: req.verbose,
        start: clock.start,
    });
    if let Some((handle, thread)) = nbd {
        handle.shutdown();
        let _ = thread.join();
    }
    drop(run);
    if let Some(p) = picked {
        if let Err(e) = p.release() {
            warn(format_args!(
                "the cache still marks the instance in use (until this process exits): {e:#}"
            ));
        }
    }
    outcome
}

/// Where the runtime directory would be, for `--dry-run`.
fn rundir_placeholder() -> PathBuf {
    let uid = rustix::process::getuid().as_raw();
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("diskkit/boot-XXXXXX"),
        None => std::env::temp_dir().join(format!("diskkit-{uid}/boot-XXXXXX")),
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir().context("the current directory")?.join(p))
    }
}

/// Create the root's qcow2 overlay at `path` over `root` (recording the bottom layer as its
/// backing file, for tools that open it later), or check a `--persist` overlay made before:
/// it must be qcow2, of the root's size, over the same base.
fn prepare_overlay(path: &Path, persist: bool, root: &source::Root, size: u64) -> Result<()> {
    let base = root.layers.last().and_then(|(p, f)| p.clone().map(|p| (p, *f)));
    if persist && path.exists() {
        let md = std::fs::metadata(path).with_context(|| format!("'{}'", path.display()))?;
        if !md.is_file() {
            bail!("--persist '{}' is not a file", path.display());
        }
        let layer = diskkit::open_layer(
            Arc::new(
                // A reader's lock: an overlay a running VM writes is refused here, by name.
                diskkit::storage::FileStorage::open_locked(
                    path,
                    false,
                    Some(diskkit::storage::Permissions::reader()),
                )
                .with_context(|| format!("opening '{}'", path.display()))?,
            ),
            &diskkit::OpenOptions::new().format(ImageFormat::Qcow2),
        )
        .with_context(|| format!("--persist '{}' is not a qcow2 image diskkit made", path.display()))?;
        if layer.size() != size {
            bail!(
                "--persist '{}' is {} bytes, the root is {}: it belongs to another root",
                path.display(),
                layer.size(),
                size
            );
        }
        let recorded = layer.layer_info().parent_path.clone();
        if let (Some((base, _)), Some(rec)) = (&base, recorded) {
            // A relative parent name is relative to the overlay's directory (as
            // `diskkit layer create` records it), not to the current directory.
            let rec = match path.parent() {
                Some(dir) if Path::new(&rec).is_relative() => dir.join(rec),
                _ => PathBuf::from(rec),
            };
            let same = std::fs::canonicalize(&rec).ok() == std::fs::canonicalize(base).ok();
            if !same {
                bail!(
                    "--persist '{}' was made over '{}', not '{}': give another --persist path",
                    path.display(),
                    rec.display(),
                    base.display()
                );
            }
        }
        return Ok(());
    }
    let mut options = CreateOptions::new(ImageFormat::Qcow2, size);
    if let Some((base, format)) = &base {
        let canonical = std::fs::canonicalize(base).unwrap_or_else(|_| base.clone());
        options = options.backing_file(canonical.to_string_lossy().into_owned(), Some(*format));
    }
    DiskImage::create_file(path, &options)
        .with_context(|| format!("creating the overlay '{}'", path.display()))?;
    Ok(())
}
