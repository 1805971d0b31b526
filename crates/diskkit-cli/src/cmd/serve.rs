//! `diskkit serve`: serve images over NBD.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use diskkit_nbd::{Address, CacheMode, Export, Server, ServerConfig, SyncMode, TlsSettings};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::args::{OpenArgs, QuietArg, RepairArg};
use crate::messages::{self, done};

/// Set in the environment of the background server started without `--foreground`: it prints
/// its lines (the URLs), then `ready`, on stdout once it listens.
const NOTIFY_ENV: &str = "DISKKIT_SERVE_NOTIFY";
/// The last line the background server prints to its starter.
const READY: &str = "ready";

/// Where FLUSH/FUA/disconnect make data durable (VZ's synchronization mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SyncArg {
    /// FLUSH and FUA are durable, and so is every client's disconnect.
    Full,
    /// FLUSH and FUA are durable.
    Fsync,
    /// FLUSH is acknowledged without a durable sync.
    None,
}

/// Host cache use (VZ's caching mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum CacheArg {
    /// Writes go through the page cache; FLUSH/FUA make them durable.
    Writeback,
    /// Write-through: each write is durable before it is acknowledged.
    None,
}

/// Whether clients must use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum TlsArg {
    /// Every option but STARTTLS and ABORT is refused until TLS is active.
    Require,
    /// Clients may use TLS or not.
    Allow,
}

/// Serve images over NBD (to QEMU, libnbd, the Linux kernel, macOS VZ).
#[derive(Debug, Clone, ClapArgs)]
#[command(
    long_about = "Serve images (whole stacks) over NBD, to QEMU, libnbd's tools (nbdinfo, \
                  nbdcopy, nbdsh), the Linux kernel's nbd-client and macOS \
                  Virtualization.framework. Listens on 127.0.0.1:10809 unless --socket or \
                  --listen says otherwise, prints each export's URL, and goes to the background \
                  once it listens (printing its pid) unless --foreground. SIGTERM or SIGINT \
                  stops it: in-flight requests finish and every image is flushed.",
    after_help = "\
Examples:
  # nbd+unix:///?socket=/tmp/vm.sock
  diskkit serve --socket /tmp/vm.sock vm.qcow2
  # nbd://127.0.0.1:10809/disk
  diskkit serve --listen 127.0.0.1:10809 --export disk --read-only disk.raw
  diskkit serve --foreground -v --socket /tmp/s.sock --export a=a.raw --export b=b.asif"
)]
pub(crate) struct Args {
    #[command(flatten)]
    open: OpenArgs,
    #[command(flatten)]
    repair: RepairArg,
    /// The image to serve (optional when every export is given as --export NAME=PATH).
    image: Option<PathBuf>,
    /// Listen on this Unix socket.
    #[arg(long, conflicts_with = "listen")]
    socket: Option<PathBuf>,
    /// Listen on this TCP address (default 127.0.0.1:10809 when no --socket is given).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Export name of IMAGE (default: empty), or NAME=PATH to serve another image; repeatable.
    #[arg(long = "export", value_name = "NAME|NAME=PATH")]
    exports: Vec<String>,
    /// Description of IMAGE's export, shown by `nbdinfo --list` and `qemu-nbd -L`.
    #[arg(long)]
    description: Option<String>,
    /// Serve every export read-only.
    #[arg(long)]
    read_only: bool,
    /// Most clients connected at once; above 1 the server advertises multi-conn.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    shared: u16,
    /// Host cache use (VZ caching mode: automatic/cached = writeback, uncached = none).
    #[arg(long, value_enum, default_value = "writeback")]
    cache: CacheArg,
    /// Durability of FLUSH, FUA and disconnect (VZ synchronization mode full/fsync/none).
    #[arg(long, value_enum, default_value = "full")]
    sync: SyncArg,
    /// Worker threads per connection.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// PEM certificate chain offered with STARTTLS (X.509).
    #[arg(long, requires = "tls_key", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// With a certificate: refuse plaintext (require, the default) or offer TLS (allow).
    #[arg(long, value_enum, requires = "tls_cert")]
    tls: Option<TlsArg>,
    /// Write the server's process id to this file (removed when the server stops).
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Stay in the foreground (by default the server goes to the background once it listens).
    #[arg(long)]
    foreground: bool,
    /// Log connections and errors on stderr; twice (-vv) also every request.
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(flatten)]
    quiet: QuietArg,
}

/// Run `diskkit serve`.
pub(crate) fn run(args: &Args) -> Result<u8> {
    if !args.foreground && std::env::var_os(NOTIFY_ENV).is_none() {
        return start_background(args.quiet.quiet);
    }
    let exports = open_exports(args)?;
    let announce: Vec<(String, String)> = exports
        .iter()
        .map(|(e, line)| (line.clone(), e.name.clone()))
        .collect();
    let exports: Vec<Export> = exports.into_iter().map(|(e, _)| e).collect();
    let mut config = ServerConfig::new(exports);
    config.sync = match args.sync {
        SyncArg::Full => SyncMode::Full,
        SyncArg::Fsync => SyncMode::Fsync,
        SyncArg::None => SyncMode::None,
    };
    config.cache = match args.cache {
        CacheArg::Writeback => CacheMode::Writeback,
        CacheArg::None => CacheMode::None,
    };
    config.max_connections = usize::from(args.shared);
    config.workers = usize::from(args.workers);
    config.verbose = args.verbose > 0;
    config.trace = args.verbose > 1;
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let required = args.tls != Some(TlsArg::Allow);
        config.tls = Some(TlsSettings::from_pem_files(cert, key, required).context("cannot set up TLS")?);
    }
    let address = match (&args.socket, args.listen) {
        (Some(p), _) => Address::Unix(p.clone()),
        (None, Some(a)) => Address::Tcp(a),
        (None, None) => Address::Tcp(SocketAddr::from(([127, 0, 0, 1], 10809))),
    };
    let tls_required = config.tls.as_ref().is_some_and(|t| t.required);
    let server = Server::bind(&address, config).context("cannot start the NBD server")?;
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("cannot install signal handlers")?;
    let handle = server.shutdown_handle();
    std::thread::spawn(move || {
        // Every signal repeats the (idempotent) request to stop.
        for _ in signals.forever() {
            handle.shutdown();
        }
    });
    if let Some(p) = &args.pid_file {
        write_pid_file(p)?;
    }
    for (line, name) in &announce {
        done(
            args.quiet.quiet,
            format_args!("serving {line} at {}", url(server.address(), name, tls_required)),
        );
    }
    if std::env::var_os(NOTIFY_ENV).is_some() {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{READY}");
        let _ = out.flush();
    }
    let result = server.run();
    if let Some(p) = &args.pid_file {
        let _ = std::fs::remove_file(p);
    }
    result.context("NBD server")?;
    Ok(0)
}

/// Each export, with how the line announcing it names its image.
fn open_exports(args: &Args) -> Result<Vec<(Export, String)>> {
    let mut main_name: Option<&str> = None;
    let mut extra: Vec<(&str, &str)> = Vec::new();
    for e in &args.exports {
        match e.split_once('=') {
            Some((name, path)) => extra.push((name, path)),
            None if main_name.is_none() => main_name = Some(e),
            None => bail!("--export NAME given twice for IMAGE ('{e}'); use NAME=PATH for more images"),
        }
    }
    let mut exports = Vec::new();
    match &args.image {
        Some(path) => {
            let (mut e, line) = open_export(main_name.unwrap_or(""), path, args)?;
            e.description = args.description.clone();
            exports.push((e, line));
        }
        None if main_name.is_some() || args.description.is_some() => {
            bail!("--export NAME and --description need IMAGE")
        }
        None => {}
    }
    for (name, path) in extra {
        exports.push(open_export(name, Path::new(path), args)?);
    }
    if exports.is_empty() {
        bail!("nothing to serve: give IMAGE or --export NAME=PATH");
    }
    for (i, (a, _)) in exports.iter().enumerate() {
        if exports[..i].iter().any(|(b, _)| b.name == a.name) {
            bail!("export name '{}' is used twice", a.name);
        }
        if a.name.len() > 4096 {
            bail!("export names are limited to 4096 bytes");
        }
    }
    Ok(exports)
}

fn open_export(name: &str, path: &Path, args: &Args) -> Result<(Export, String)> {
    // The same format and parent policy as every other command: stacks are served whole.
    // -f applies to IMAGE only; NAME=PATH exports are detected.
    let is_main = args.image.as_deref() == Some(path);
    let open = OpenArgs {
        format: if is_main { args.open.format } else { None },
        ..args.open.clone()
    };
    let options = open.options(!args.read_only).repair(args.repair.repair);
    let image = super::open_image(path, &options)?;
    let line = format!(
        "{} {}",
        messages::open_image(path, &image),
        if args.read_only { "read-only" } else { "read-write" }
    );
    Ok((Export::new(name, Arc::new(image)), line))
}

/// The NBD URL of export `name` at `address` (as libnbd and QEMU take it).
fn url(address: &Address, name: &str, tls: bool) -> String {
    let s = if tls { "s" } else { "" };
    let name = percent_encode(name);
    match address {
        Address::Unix(p) => {
            let p = std::path::absolute(p).unwrap_or_else(|_| p.clone());
            format!(
                "nbd{s}+unix:///{name}?socket={}",
                percent_encode(&p.to_string_lossy())
            )
        }
        Address::Tcp(a) => format!("nbd{s}://{a}/{name}"),
    }
}

/// Percent-encoding of everything but RFC 3986's unreserved characters and `/`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn write_pid_file(path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().context("--pid-file needs a file name")?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("cannot write pid file '{}'", path.display()))
}

/// Start this same command in the background (its own process group, so a terminal's ^C does
/// not reach it) and return once it listens, or with its error. Its lines (the URLs) are
/// passed on, then its pid.
fn start_background(quiet: bool) -> Result<u8> {
    let exe = std::env::current_exe().context("cannot find the diskkit executable")?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(NOTIFY_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("cannot start the background server")?;
    let mut ready = false;
    if let Some(out) = child.stdout.take() {
        let mut out = BufReader::new(out);
        let mut line = String::new();
        while out.read_line(&mut line).unwrap_or(0) > 0 {
            if line.trim_end() == READY {
                ready = true;
                break;
            }
            print!("{line}");
            line.clear();
        }
    }
    if ready {
        let pid = child.id();
        done(
            quiet,
            format_args!("running in the background as pid {pid} (stop it with: kill {pid})"),
        );
        return Ok(crate::exit::SUCCESS);
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let _ = child.wait();
    let err = err.trim();
    let err = err.strip_prefix("diskkit: error: ").unwrap_or(err);
    bail!(
        "{}",
        if err.is_empty() {
            "the background server exited"
        } else {
            err
        }
    )
}
