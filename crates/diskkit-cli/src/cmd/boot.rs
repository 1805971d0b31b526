//! `diskkit boot`: the command-line arguments; the work is in [`crate::boot`].

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};

use crate::args::{Format, Output, ParentArgs};
use crate::boot::{self, Accel, BootRequest, DiskSpec, Machine, Net, SourceSpec, Transport};
use crate::size::parse_size;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum AccelArg {
    /// KVM when /dev/kvm opens and a probe guest starts on it, else TCG (with a notice).
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

const EXIT_HELP: &str = "\
Exit status: with COMMAND, the command's own exit status (128+N when a signal N ended it).
Without COMMAND, 0 once the guest powers off, reboots, or the console is left with Ctrl-A x.
130 / 143 when diskkit is interrupted by SIGINT / SIGTERM (the VM is stopped). 2 when diskkit
fails, with one line on stderr saying why: bad arguments or image, no kernel, QEMU missing or
failing to start, QEMU crashing (its error output is shown), the guest not coming up within
--timeout, the guest powering off before reporting the command's status. (A COMMAND that
itself exits 2 is told apart by that line.)

Console: without COMMAND the serial console is the terminal. Ctrl-A x leaves (QEMU quits),
Ctrl-A c switches to the QEMU monitor and back, Ctrl-A h lists the keys. Ctrl-C goes to the
guest.

Examples:
  diskkit boot debian-layout -- cat /etc/os-release
  diskkit boot --memory 4G --cpus 4 disk.qcow2
  diskkit boot --ssh --persist state.qcow2 image.tar:latest -- uname -a
  diskkit boot --apple-store ~/Library/Application\\ Support/com.apple.container fedora:42";

/// Arguments of `diskkit boot`.
#[derive(Debug, Clone, Args)]
#[command(after_help = EXIT_HELP)]
pub(crate) struct BootArgs {
    /// What to boot: a disk image or stack (RAW, ASIF, qcow2; whole-disk ext4 or a
    /// partitioned disk), an OCI image as `unpack` takes it (layout directory, OCI archive,
    /// docker-archive, with an optional :REF), or with --apple-store an image reference.
    pub(crate) source: String,
    /// The command to run in the guest as root once the system is up; its stdout and stderr
    /// become diskkit's and its exit status diskkit's. Without it: the serial console.
    #[arg(last = true, value_name = "COMMAND")]
    pub(crate) command: Vec<String>,
    /// The disk image's format (skips detection).
    #[arg(short = 'f', long = "image-format", value_enum)]
    pub(crate) format: Option<Format>,
    #[command(flatten)]
    pub(crate) parents: ParentArgs,
    /// Root partition: a number, a GPT partition name or UUID, an ext label or UUID, or
    /// `disk` (default: chosen as `kernel` and `ls` choose it).
    #[arg(long)]
    pub(crate) partition: Option<String>,
    /// SOURCE is an image reference in the Apple `container` store at ROOT.
    #[arg(long, value_name = "ROOT")]
    pub(crate) apple_store: Option<PathBuf>,
    /// Platform of an OCI or Apple store image, OS/ARCH[/VARIANT] (default: the host's).
    #[arg(long)]
    pub(crate) platform: Option<String>,
    /// Guest memory.
    #[arg(long, default_value = "2G")]
    pub(crate) memory: String,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub(crate) cpus: u32,
    /// MAC address of the network card (default: QEMU's, 52:54:00:12:34:56).
    #[arg(long)]
    pub(crate) mac: Option<String>,
    /// Accelerator.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) accel: AccelArg,
    /// Append ARG to the kernel command line (repeatable).
    #[arg(long = "karg", value_name = "ARG", allow_hyphen_values = true)]
    pub(crate) kargs: Vec<String>,
    /// Another virtio disk, as /dev/vdb, /dev/vdc... in order: any image or stack diskkit
    /// opens; written to unless `ro` (repeatable). PATH[,ro][,format=raw|asif|qcow2].
    #[arg(long = "disk", value_name = "PATH[,ro][,format=F]")]
    pub(crate) disks: Vec<String>,
    /// Keep the guest's writes in the qcow2 overlay PATH (created on first use, reused after)
    /// instead of a throwaway one.
    #[arg(long, value_name = "PATH")]
    pub(crate) persist: Option<PathBuf>,
    /// Give the guest a fresh SSH key as the ssh.authorized_keys.root credential, forward a
    /// localhost port to its port 22, wait for an SSH handshake, then run COMMAND (or a shell)
    /// over SSH.
    #[arg(long)]
    pub(crate) ssh: bool,
    /// Guest networking.
    #[arg(long, value_enum, default_value = "user")]
    pub(crate) net: NetArg,
    /// Root filesystem size when an OCI image is unpacked into the store (sparse; default
    /// 64G). An image already in the store is used as it is.
    #[arg(long)]
    pub(crate) size: Option<String>,
    /// Where unpacked roots and kernels are kept (default: $XDG_CACHE_HOME/diskkit).
    #[arg(long, value_name = "DIR")]
    pub(crate) store: Option<PathBuf>,
    /// Give up when the guest has not come up within DURATION (COMMAND started, or SSH
    /// answering); without COMMAND or --ssh, stop the VM after DURATION. Units s, m, h.
    #[arg(long, value_name = "DURATION")]
    pub(crate) timeout: Option<String>,
    /// The QEMU system emulator (default: qemu-system-<arch> from PATH).
    #[arg(long, value_name = "PATH")]
    pub(crate) qemu: Option<PathBuf>,
    /// Choose this kernel version instead of the highest.
    #[arg(long, value_name = "V")]
    pub(crate) kernel_version: Option<String>,
    /// Also write the serial console to FILE (it is shown when the guest fails to come up).
    #[arg(long, value_name = "FILE")]
    pub(crate) console_log: Option<PathBuf>,
    /// Print the QEMU command line and the files it would use, and start nothing. OCI images
    /// are still unpacked into the store and kernels cached.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Output of --dry-run.
    #[arg(long, value_enum, default_value = "human", requires = "dry_run")]
    pub(crate) output: Output,
    /// Print what diskkit does and how long each step takes on stderr.
    #[arg(short = 'v', long)]
    pub(crate) verbose: bool,
    /// How disks reach QEMU (for measurements).
    #[arg(long, value_enum, default_value = "auto", hide = true)]
    pub(crate) via: ViaArg,
}

pub(crate) fn run(args: &BootArgs) -> Result<u8> {
    if args.ssh && args.net == NetArg::None {
        bail!("--ssh needs the network: drop --net none");
    }
    if args.apple_store.is_some() && args.format.is_some() {
        bail!("--image-format does not apply to --apple-store references");
    }
    let memory = parse_size(&args.memory)?;
    if memory < (64 << 20) {
        bail!("--memory {} is too small (at least 64M)", args.memory);
    }
    let mac = args.mac.as_deref().map(boot::parse_mac).transpose()?;
    let disks = args
        .disks
        .iter()
        .map(|d| DiskSpec::parse(d))
        .collect::<Result<Vec<_>>>()?;
    let source = match &args.apple_store {
        Some(root) => SourceSpec::AppleStore {
            root: root.clone(),
            reference: args.source.clone(),
        },
        None => SourceSpec::Path(args.source.clone()),
    };
    let request = BootRequest {
        source,
        format: args.format.map(Into::into),
        parents: args.parents.clone(),
        partition: args.partition.clone(),
        platform: args.platform.clone(),
        machine: Machine {
            memory,
            cpus: args.cpus,
            mac,
        },
        accel: match args.accel {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Tcg => Accel::Tcg,
        },
        kargs: args.kargs.clone(),
        disks,
        persist: args.persist.clone(),
        ssh: args.ssh,
        net: match args.net {
            NetArg::User => Net::User,
            NetArg::None => Net::None,
        },
        size: args.size.as_deref().map(parse_size).transpose()?,
        store: args.store.clone(),
        timeout: args.timeout.as_deref().map(boot::parse_duration).transpose()?,
        qemu: args.qemu.clone(),
        kernel_version: args.kernel_version.clone(),
        console_log: args.console_log.clone(),
        command: args.command.clone(),
        dry_run: args.dry_run.then_some(args.output),
        verbose: args.verbose,
        transport: match args.via {
            ViaArg::Auto => Transport::Auto,
            ViaArg::Nbd => Transport::Nbd,
        },
    };
    boot::run(&request)
}
