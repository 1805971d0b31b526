//! The command line: the list of subcommands, parsing (with clap's full error messages,
//! pointed at the subcommand's help) and dispatch.
//!
//! Adding a subcommand: write `cmd/NAME.rs` with a `#[derive(clap::Args)] pub(crate) struct
//! Args` (its doc comment is the one-line summary, `long_about` the details, `after_help`
//! two or three examples; flatten only the shared groups from [`crate::args`] it honours) and
//! `pub(crate) fn run(args: &Args) -> anyhow::Result<u8>` returning an exit status from
//! [`crate::exit`]; then add one variant to [`Command`] and one arm to [`run`]. Help, man
//! pages, completions and the help snapshot tests pick it up from there.

use std::ffi::OsString;
use std::io::{self, IsTerminal, Write};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

use crate::cmd;
use crate::exit;

/// Create, inspect, stack, convert and serve virtual-machine disk images (RAW, ASIF, qcow2),
/// and read or build the ext4 filesystems inside them.
#[derive(Debug, Parser)]
#[command(
    name = "diskkit",
    version,
    max_term_width = 100,
    after_help = TOP_AFTER_HELP,
    after_long_help = TOP_AFTER_LONG_HELP,
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

const TOP_AFTER_HELP: &str = "\
Examples:
  # A blank 20 GiB qcow2 disk
  diskkit create --size 20G disk.qcow2
  # An overlay to run a VM on
  diskkit layer create --parent disk.qcow2 vm.qcow2
  # A root filesystem tarball as an ext4 disk
  diskkit unpack rootfs.tar.zst root.qcow2

'diskkit COMMAND --help' explains a command; '--help' here also explains formats, sizes and
exit statuses.";

const TOP_AFTER_LONG_HELP: &str = "\
Examples:
  # A blank 20 GiB qcow2 disk
  diskkit create --size 20G disk.qcow2
  # An overlay to run a VM on
  diskkit layer create --parent disk.qcow2 vm.qcow2
  # A root filesystem tarball as an ext4 disk
  diskkit unpack rootfs.tar.zst root.qcow2

Formats:
  -f/--image-format is the format of an image being opened (detected when omitted);
  -O/--format is the format of an image being written. Without -O, the extension decides:
  .qcow2 is qcow2, .asif is ASIF, .raw and .img are RAW, and any other name is RAW. -O that
  contradicts .qcow2, .asif or .raw is an error.

Sizes and offsets:
  Bytes in decimal (4096) or hex (0x1000), or a number with a binary unit: 512K, 40M, 40G,
  40GiB, 1.5T (K = 1024). A disk size without a unit below 1 MiB is refused (write 40G, or 40B
  for bytes); sizes that are not whole blocks are rounded up, with a warning.

Parent files:
  A layer names its parent (a qcow2 backing file) by a path that is only followed when it
  stays in the layer's own directory; --allow-parent-dir DIR also follows parents under DIR,
  --allow-any-parent follows any (only for images you trust).

Reports and messages:
  --output human|json chooses a report's style. Commands that create or change something
  print one line saying what they did (path, format, size); -q silences it. Errors are one
  line on stderr: 'diskkit: error: ...'.

Exit status:
  0  success
  1  a negative answer: 'compare' found a difference
  2  an error (bad arguments, a missing or damaged file, ...), explained on stderr
  'check' follows 'qemu-img check' instead: 0 consistent, 1 the check could not complete,
  2 corruptions left (or an error before the check began), 3 leaked clusters left.
  'boot' with a COMMAND exits with the command's own status (2 when diskkit or the VM fails).";

/// The subcommands, in the order `--help` lists them.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    Create(cmd::create::Args),
    Info(cmd::info::Args),
    Convert(cmd::convert::Args),
    Check(cmd::check::Args),
    Compare(cmd::compare::Args),
    Map(cmd::map::Args),
    Resize(cmd::access::ResizeArgs),
    Read(cmd::access::ReadArgs),
    Write(cmd::access::WriteArgs),
    Discard(cmd::access::DiscardArgs),
    #[command(subcommand)]
    Layer(LayerCommand),
    Snapshot(cmd::stack::SnapshotArgs),
    Restore(cmd::stack::RestoreArgs),
    Commit(cmd::stack::CommitArgs),
    Rebase(cmd::stack::RebaseArgs),
    Flatten(cmd::convert::FlattenArgs),
    Serve(cmd::serve::Args),
    Partitions(cmd::partitions::Args),
    Ls(cmd::fs::LsArgs),
    Cat(cmd::fs::CatArgs),
    Stat(cmd::fs::StatArgs),
    Cp(cmd::fs::CpArgs),
    Kernel(cmd::kernel::Args),
    Unpack(cmd::unpack::Args),
    Boot(Box<cmd::boot::Args>),
    Pull(cmd::pull::Args),
    Push(cmd::push::Args),
    #[command(subcommand, after_help = cmd::bundle::EXAMPLES)]
    Bundle(cmd::bundle::BundleCommand),
    Cache(cmd::cache::CacheArgs),
    Prefetch(cmd::prefetch::Args),
    Completions(cmd::completions::Args),
    Manpages(cmd::manpages::Args),
}

/// Stacked-image layers.
#[derive(Debug, Subcommand)]
pub(crate) enum LayerCommand {
    Create(cmd::stack::LayerCreateArgs),
}

/// Run a parsed command line; returns the exit status.
pub(crate) fn run(cli: &Cli) -> anyhow::Result<u8> {
    // SIGINT/SIGTERM remove the temporary outputs and exit 130/143. serve and boot handle
    // them themselves: serve shuts down cleanly, boot stops QEMU in order.
    if !matches!(cli.command, Command::Serve(_) | Command::Boot(_)) {
        diskkit::output::remove_temporaries_on_signals()?;
    }
    match &cli.command {
        Command::Create(a) => cmd::create::run(a),
        Command::Info(a) => cmd::info::run(a),
        Command::Convert(a) => cmd::convert::run(a),
        Command::Check(a) => cmd::check::run(a),
        Command::Compare(a) => cmd::compare::run(a),
        Command::Map(a) => cmd::map::run(a),
        Command::Resize(a) => cmd::access::resize(a),
        Command::Read(a) => cmd::access::read(a),
        Command::Write(a) => cmd::access::write(a),
        Command::Discard(a) => cmd::access::discard(a),
        Command::Layer(LayerCommand::Create(a)) => cmd::stack::layer_create(a),
        Command::Snapshot(a) => cmd::stack::snapshot(a),
        Command::Restore(a) => cmd::stack::restore(a),
        Command::Commit(a) => cmd::stack::commit(a),
        Command::Rebase(a) => cmd::stack::rebase(a),
        Command::Flatten(a) => cmd::convert::flatten(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Partitions(a) => cmd::partitions::run(a),
        Command::Ls(a) => cmd::fs::ls(a),
        Command::Cat(a) => cmd::fs::cat(a),
        Command::Stat(a) => cmd::fs::stat(a),
        Command::Cp(a) => cmd::fs::cp(a),
        Command::Kernel(a) => cmd::kernel::run(a),
        Command::Unpack(a) => cmd::unpack::run(a),
        Command::Boot(a) => cmd::boot::run(a),
        Command::Pull(a) => cmd::pull::run(a),
        Command::Push(a) => cmd::push::run(a),
        Command::Bundle(c) => cmd::bundle::run(c.clone()),
        Command::Cache(a) => cmd::cache::run(a.clone()),
        Command::Prefetch(a) => cmd::prefetch::run(a),
        Command::Completions(a) => cmd::completions::run(a),
        Command::Manpages(a) => cmd::manpages::run(a),
    }
}

/// The clap command tree (for help, completions and man pages).
pub(crate) fn command() -> clap::Command {
    Cli::command()
}

/// Parse the process's arguments. On `--help`/`--version` the text is printed and the exit
/// status returned; on a usage error clap's whole message is printed (with its suggestions),
/// as `diskkit: error: ...`, pointing at the subcommand's own help.
pub(crate) fn parse() -> Result<Cli, ExitCode> {
    let args: Vec<OsString> = std::env::args_os().collect();
    match Cli::try_parse_from(&args) {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            Err(ExitCode::SUCCESS)
        }
        Err(e) => {
            let styled = e.render();
            let text = if io::stderr().is_terminal() {
                styled.ansi().to_string()
            } else {
                styled.to_string()
            };
            let path = subcommand_path(&args);
            let _ = write!(io::stderr(), "{}", usage_error_text(&text, &path));
            Err(ExitCode::from(exit::ERROR))
        }
    }
}

/// clap's rendered error with the `diskkit: ` prefix and its help pointer naming the
/// subcommand (`try 'diskkit layer create --help'`, not `try '--help'`).
fn usage_error_text(text: &str, path: &[String]) -> String {
    let mut out = String::with_capacity(text.len() + 32);
    if strip_ansi(text).starts_with("error:") {
        out.push_str("diskkit: ");
    }
    let mut command = String::from("diskkit");
    for p in path {
        command.push(' ');
        command.push_str(p);
    }
    for line in text.split_inclusive('\n') {
        if line.starts_with("For more information, try '") {
            out.push_str(&line.replacen("--help", &format!("{command} --help"), 1));
        } else {
            out.push_str(line);
        }
    }
    out
}

/// `text` without ANSI colour sequences.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The subcommands named on a command line (`["layer", "create"]`), as far as they exist.
fn subcommand_path(args: &[OsString]) -> Vec<String> {
    let mut cmd = command();
    let mut path = Vec::new();
    for arg in args.iter().skip(1) {
        let Some(arg) = arg.to_str() else { break };
        if arg.starts_with('-') {
            continue;
        }
        let Some(sub) = cmd.find_subcommand(arg).cloned() else {
            break;
        };
        path.push(sub.get_name().to_owned());
        if !sub.has_subcommands() {
            break;
        }
        cmd = sub;
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn help_pointer_names_the_subcommand() {
        let args: Vec<OsString> = ["diskkit", "layer", "create", "x"]
            .iter()
            .map(Into::into)
            .collect();
        assert_eq!(subcommand_path(&args), ["layer", "create"]);
        let text = "error: boom\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_error_text(text, &subcommand_path(&args)),
            "diskkit: error: boom\n\nFor more information, try 'diskkit layer create --help'.\n"
        );
        let args: Vec<OsString> = ["diskkit", "creat"].iter().map(Into::into).collect();
        assert!(subcommand_path(&args).is_empty());
    }
}
