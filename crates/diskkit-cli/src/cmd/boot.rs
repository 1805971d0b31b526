//! `diskkit boot`: the command-line arguments; the work is in [`crate::boot`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, ValueEnum};

use crate::args::{OpenArgs, Output};
use crate::boot::{self, Accel, BootRequest, DiskSpec, MachineRequest, Net, SourceSpec, Transport};
use crate::size::{self, Bytes};

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum AccelArg {
    /// KVM when /dev/kvm opens and a probe guest starts on it, else TCG (with a note).
    Auto,
    /// KVM, or fail.
    Kvm,
    /// QEMU's emulator (slow, works everywhere).
    Tcg,
}

/// Guest networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum NetArg {
    /// QEMU user-mode networking (outbound connections; --ssh forwards a port to it).
    User,
    /// No network card.
    None,
}

/// How disks reach QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ViaArg {
    /// Files where QEMU can open every layer (RAW, qcow2), diskkit's NBD server otherwise.
    Auto,
    /// Always diskkit's NBD server on a private Unix socket.
    Nbd,
}

/// Boot an image as a QEMU VM with its own kernel, and run a command in it.
#[derive(Debug, Clone, ClapArgs)]
#[command(
    override_usage = "diskkit boot [OPTIONS] <SOURCE> [-- <COMMAND>...]\n       diskkit boot [OPTIONS] --instance <NAME> [-- <COMMAND>...]",
    long_about = "Boot a disk image or stack (RAW, ASIF, qcow2; whole-disk ext4 or a partitioned \
                  disk), an OCI image as `unpack` takes it (layout directory, OCI archive, \
                  docker-archive, with an optional :REF; or a registry reference, pulled first as \
                  `diskkit pull` does), an Apple `container` store entry or an instance of the \
                  image cache (--instance, see `diskkit cache`) as a \
                  QEMU virtual machine, with the image's own kernel and initramfs (no firmware, no \
                  root, no boot loader). The image is never written: the guest's writes go to a \
                  throwaway qcow2 overlay, or to --persist, or into the cache instance's own \
                  overlay, whose machine.json gives the memory, CPUs and MAC address that no \
                  flag gives (the cache keeps the instance while the VM runs). OCI images are unpacked once into the \
                  store (a 64 GiB sparse, journaled ext4 root, the `unpack --store` layout) and \
                  only read afterwards. With COMMAND, it runs as root once the system (systemd) \
                  is up, and its stdout, stderr and exit status become diskkit's; without it, the \
                  serial console is the terminal. KVM is used when a probe guest runs on it, \
                  else TCG.",
    after_help = "\
Examples:
  # A command in an OCI layout (unpacked into the store on first use)
  diskkit boot debian:bookworm -- cat /etc/os-release
  # Straight from a registry (pulled into $XDG_CACHE_HOME/diskkit/oci first)
  diskkit boot docker://debian:bookworm -- uname -r
  # The serial console of a disk image, with 4 GiB and 4 CPUs
  diskkit boot --memory 4G --cpus 4 disk.qcow2
  # Keep the guest's writes; run the command over SSH
  diskkit boot --ssh --persist state.qcow2 root.raw -- uname -a
  # A remote base through its cache layer (docs/remote.md), the writes in vm.qcow2
  diskkit boot --allow-remote images.example.com --persist vm.qcow2 cache.asif
  # A cache instance: its memory, CPUs and MAC from its machine.json, its writes kept in it
  diskkit cache fetch debian-12 https://example.com/debian-12.tar.zst
  diskkit cache instance debian-12 --name vm1 --persistent
  diskkit boot --instance vm1 -- uname -a
  # The same instance with 8 GiB instead of its machine.json's memory
  diskkit boot --instance vm1 --memory 8G

Console:
  Without COMMAND or --ssh the serial console is the terminal.
  Ctrl-A x quits (QEMU stops), Ctrl-A c switches to the QEMU monitor and back,
  Ctrl-A h lists the keys; Ctrl-C goes to the guest.

Exit status:
  N    with COMMAND: the command's own status (128+N when signal N ended it)
  0    without COMMAND: the guest powered off or rebooted, or Ctrl-A x was typed
  130  SIGINT (143 SIGTERM, 129 SIGHUP) stopped the VM
  2    diskkit failed, and says why in one line on stderr: bad arguments or image,
       no kernel, QEMU missing, failing or crashing, the guest not up within
       --timeout, the guest powering off before COMMAND's status came back
       (a COMMAND that exits 2 itself is told apart by that line)"
)]
pub(crate) struct Args {
    /// What to boot: a disk image or stack (RAW, ASIF, qcow2), an OCI image as PATH or
    /// PATH:REF (layout directory, OCI archive, docker-archive) or as a registry reference
    /// (HOST[:PORT]/REPO[:TAG], docker://NAME; pulled into the shared layout in
    /// $XDG_CACHE_HOME/diskkit/oci first), or with --apple-store an image reference. Not
    /// with --instance.
    #[arg(value_name = "SOURCE", required_unless_present = "instance")]
    source: Option<String>,
    /// The command to run in the guest as root once the system is up; its stdout, stderr and
    /// exit status become diskkit's. Without it: the serial console.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    registry: crate::cmd::pull::RegistryAccessArgs,
    /// Root partition: a number, a GPT partition name or UUID, an ext label or UUID, or `disk`
    /// (default: the whole disk if it holds ext, else the only ext partition, as `kernel` and
    /// `ls` choose it).
    #[arg(long, value_name = "PART")]
    partition: Option<String>,
    /// Boot the image cache's instance NAME (made by `diskkit cache instance ID --name NAME`)
    /// instead of SOURCE: the guest writes into the instance's overlay, and the instance's
    /// machine.json gives --memory, --cpus and --mac unless they are given. The cache keeps
    /// the instance (gc, rm and release refuse it) while the VM runs.
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with_all = ["source", "persist", "apple_store", "platform", "size"],
        help_heading = "Image cache"
    )]
    instance: Option<String>,
    /// The image cache holding --instance (default: $XDG_CACHE_HOME/diskkit/images, or
    /// ~/.cache/diskkit/images, as for `diskkit cache`).
    #[arg(long, value_name = "DIR", help_heading = "Image cache")]
    cache_dir: Option<PathBuf>,
    /// SOURCE is an image reference (e.g. `alpine:latest`) in the Apple `container` image store
    /// at ROOT; its snapshot is only read.
    #[arg(long, value_name = "ROOT")]
    apple_store: Option<PathBuf>,
    /// Platform of an OCI or Apple store image, OS/ARCH[/VARIANT] (default: linux and the
    /// host's CPU).
    #[arg(long, value_name = "OS/ARCH")]
    platform: Option<String>,
    /// Guest memory, whole MiB, at least 64M (default: an --instance's machine.json, else 2G).
    #[arg(long, value_name = "SIZE", value_parser = memory, help_heading = "Virtual machine")]
    memory: Option<Bytes>,
    /// Virtual CPUs (default: an --instance's machine.json, else 2).
    #[arg(
        long,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=1024),
        help_heading = "Virtual machine"
    )]
    cpus: Option<u32>,
    /// MAC address of the network card (default: an --instance's machine.json, else QEMU's,
    /// 52:54:00:12:34:56).
    #[arg(long, value_name = "MAC", value_parser = mac, help_heading = "Virtual machine")]
    mac: Option<[u8; 6]>,
    /// Accelerator.
    #[arg(long, value_enum, default_value = "auto", help_heading = "Virtual machine")]
    accel: AccelArg,
    /// Guest networking.
    #[arg(long, value_enum, default_value = "user", help_heading = "Virtual machine")]
    net: NetArg,
    /// Another virtio disk, /dev/vdb, /dev/vdc... in order: any image or stack diskkit opens,
    /// written to unless `ro`; a comma in PATH is written twice (repeatable).
    #[arg(
        long = "disk",
        value_name = "PATH[,ro][,format=F]",
        value_parser = disk,
        help_heading = "Virtual machine"
    )]
    disks: Vec<DiskSpec>,
    /// Append ARG to the kernel command line (repeatable).
    #[arg(
        long = "karg",
        value_name = "ARG",
        allow_hyphen_values = true,
        help_heading = "Virtual machine"
    )]
    kargs: Vec<String>,
    /// The QEMU system emulator (default: qemu-system-<arch> from PATH).
    #[arg(long, value_name = "PATH", help_heading = "Virtual machine")]
    qemu: Option<PathBuf>,
    /// Keep the guest's writes in the qcow2 overlay PATH (created on first use, reused after)
    /// instead of a throwaway one.
    #[arg(long, value_name = "PATH")]
    persist: Option<PathBuf>,
    /// Give the guest a fresh SSH key (the ssh.authorized_keys.root credential), forward a
    /// localhost port to its port 22, wait for an SSH handshake, then run COMMAND (or a shell)
    /// over SSH. The image must configure its network (DHCP) and run sshd.
    #[arg(long)]
    ssh: bool,
    /// Give up when the guest has not come up within DURATION (COMMAND started, or SSH
    /// answering; default 10m); without COMMAND or --ssh, stop the VM after DURATION. A
    /// number with s, m or h: 90s, 5m, 1h30m.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    timeout: Option<Duration>,
    /// Choose this kernel version instead of the highest.
    #[arg(long, value_name = "V")]
    kernel_version: Option<String>,
    /// Also write the serial console to FILE (the last lines are shown on stderr when the
    /// guest fails to come up).
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,
    /// Where unpacked OCI roots and their kernels are kept (default: $XDG_CACHE_HOME/diskkit,
    /// else ~/.cache/diskkit).
    #[arg(long, value_name = "DIR", help_heading = "Store")]
    store: Option<PathBuf>,
    /// Root filesystem size when an OCI image is unpacked into the store (sparse; default
    /// 64G). An image already in the store is used as it is.
    #[arg(
        long,
        value_name = "SIZE",
        value_parser = size::disk_size,
        allow_hyphen_values = true,
        help_heading = "Store"
    )]
    size: Option<Bytes>,
    /// Print the QEMU command line and the files it would use, and start nothing (OCI images
    /// are still unpacked into the store, and kernels cached).
    #[arg(long)]
    dry_run: bool,
    /// Report style of --dry-run: `human` lines or one `json` document.
    #[arg(long, value_enum, default_value_t, value_name = "STYLE", requires = "dry_run")]
    output: Output,
    /// Print what diskkit does and how long each step takes on stderr.
    #[arg(short, long)]
    verbose: bool,
    /// Do not print notes on stderr (the fallback to TCG, an image without initramfs...), so
    /// that stderr is COMMAND's; errors and warnings are still printed.
    #[arg(short, long, conflicts_with = "verbose")]
    quiet: bool,
    /// How disks reach QEMU (for measurements).
    #[arg(long, value_enum, default_value = "auto", hide = true)]
    via: ViaArg,
}

/// `--memory`: a size in whole MiB (QEMU's unit), at least 64 MiB.
fn memory(text: &str) -> Result<Bytes, String> {
    let b = size::disk_size(text)?;
    if b.value < 64 << 20 {
        return Err(format!("'{text}' is too small: a guest needs at least 64M"));
    }
    if b.value % (1 << 20) != 0 {
        return Err(format!(
            "'{text}' is not a whole number of MiB (write e.g. 1536M)"
        ));
    }
    Ok(b)
}

/// `--mac`.
fn mac(text: &str) -> Result<[u8; 6], String> {
    boot::parse_mac(text).map_err(|e| format!("{e:#}"))
}

/// `--disk`.
fn disk(text: &str) -> Result<DiskSpec, String> {
    DiskSpec::parse(text).map_err(|e| format!("{e:#}"))
}

/// `--timeout`.
fn duration(text: &str) -> Result<Duration, String> {
    boot::parse_duration(text).map_err(|e| format!("{e:#}"))
}

pub(crate) fn run(args: &Args) -> Result<u8> {
    if args.ssh && args.net == NetArg::None {
        bail!("--ssh needs the network: drop --net none");
    }
    if args.apple_store.is_some() && args.open.format.is_some() {
        bail!("--image-format does not apply to --apple-store references");
    }
    if args.cache_dir.is_some() && args.instance.is_none() {
        bail!("--cache-dir names the cache of --instance; give --instance NAME");
    }
    if args.instance.is_some() && args.open.format.is_some() {
        bail!("--image-format does not apply to --instance: the cache made its stack");
    }
    let source_text = args.source.clone().unwrap_or_default();
    let source = match (&args.instance, &args.apple_store) {
        (Some(name), _) => SourceSpec::Instance {
            cache: args.cache_dir.clone(),
            name: name.clone(),
        },
        (None, Some(root)) => SourceSpec::AppleStore {
            root: root.clone(),
            reference: source_text,
        },
        (None, None) if diskkit_deliver::registry::looks_like_reference(&source_text) => {
            // A registry reference: pull what the shared layout lacks, then boot the image
            // from it by its manifest digest (unpacked into the store as any OCI image).
            let r = diskkit_deliver::registry::Reference::parse(&source_text)?;
            let platform = args
                .platform
                .as_deref()
                .map(str::parse::<diskkit_oci::Platform>)
                .transpose()?;
            let bars = crate::cmd::pull::TransferBars::new("pulling", 0, args.quiet);
            let (layout, digest) = diskkit_deliver::registry::pull_to_layout(
                &r,
                None,
                &args.registry.default_options()?,
                platform,
                &|ev| bars.event(&ev),
            )
            .with_context(|| format!("cannot pull {r}"))?;
            bars.finish();
            SourceSpec::Path(format!("{}:{digest}", layout.display()))
        }
        (None, None) => SourceSpec::Path(source_text),
    };
    let request = BootRequest {
        source,
        format: args.open.format.map(Into::into),
        parents: args.open.parents.clone(),
        max_cache_size: args.open.max_cache_size,
        partition: args.partition.clone(),
        platform: args.platform.clone(),
        machine: MachineRequest {
            memory: args.memory.map(|m| m.value),
            cpus: args.cpus,
            mac: args.mac,
        },
        accel: match args.accel {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Tcg => Accel::Tcg,
        },
        kargs: args.kargs.clone(),
        disks: args.disks.clone(),
        persist: args.persist.clone(),
        ssh: args.ssh,
        net: match args.net {
            NetArg::User => Net::User,
            NetArg::None => Net::None,
        },
        size: args.size.map(|s| crate::cmd::unpack::fs_size(s.value)),
        store: args.store.clone(),
        timeout: args.timeout,
        qemu: args.qemu.clone(),
        kernel_version: args.kernel_version.clone(),
        console_log: args.console_log.clone(),
        command: args.command.clone(),
        dry_run: args.dry_run.then_some(args.output),
        verbose: args.verbose,
        quiet: args.quiet,
        transport: match args.via {
            ViaArg::Auto => Transport::Auto,
            ViaArg::Nbd => Transport::Nbd,
        },
    };
    boot::run(&request)
}
