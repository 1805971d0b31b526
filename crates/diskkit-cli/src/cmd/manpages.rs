//! `diskkit manpages`: man pages generated from the same definitions as `--help`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use clap_mangen::roff::{roman, Roff};
use clap_mangen::Man;

use crate::args::QuietArg;
use crate::messages::done;

/// Write diskkit's man pages into a directory.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Write the man pages, one per command (diskkit.1, diskkit-create.1, \
                  diskkit-layer-create.1, ...), into DIR, generated from the same definitions as \
                  --help. Put them in a man1 directory on your MANPATH.",
    after_help = "\
Examples:
  diskkit manpages ~/.local/share/man/man1 && man diskkit-unpack
  diskkit manpages /tmp/m && man -l /tmp/m/diskkit.1"
)]
pub(crate) struct Args {
    /// The directory to write the pages into (created if missing).
    dir: PathBuf,
    #[command(flatten)]
    quiet: QuietArg,
}

pub(crate) fn run(a: &Args) -> Result<u8> {
    fs::create_dir_all(&a.dir).with_context(|| format!("cannot create '{}'", a.dir.display()))?;
    let mut cmd = crate::cli::command();
    cmd.build();
    let mut count = 0;
    write_tree(&cmd, "diskkit", &a.dir, &mut count)?;
    done(
        a.quiet.quiet,
        format_args!("wrote {count} man pages into '{}'", a.dir.display()),
    );
    Ok(crate::exit::SUCCESS)
}

/// Write the page of `cmd` (named `name`) and those of its subcommands.
fn write_tree(cmd: &clap::Command, name: &str, dir: &Path, count: &mut usize) -> Result<()> {
    if cmd.is_hide_set() {
        return Ok(());
    }
    let page = cmd
        .clone()
        .name(name.to_owned())
        .display_name(name.replace('-', " "))
        .version(env!("CARGO_PKG_VERSION"));
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    render(&page, &mut buf).with_context(|| format!("cannot render '{}'", path.display()))?;
    fs::write(&path, buf).with_context(|| format!("cannot write '{}'", path.display()))?;
    *count += 1;
    for sub in cmd.get_subcommands() {
        if sub.get_name() == "help" {
            continue;
        }
        write_tree(sub, &format!("{name}-{}", sub.get_name()), dir, count)?;
    }
    Ok(())
}

/// One page: clap_mangen's sections, with the examples and exit statuses (clap's
/// `after_help`) under their own headings instead of clap_mangen's generic one.
fn render(cmd: &clap::Command, w: &mut dyn Write) -> std::io::Result<()> {
    let man = Man::new(cmd.clone()).source(format!("diskkit {}", env!("CARGO_PKG_VERSION")));
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(w)?;
    }
    let after = cmd
        .get_after_long_help()
        .or_else(|| cmd.get_after_help())
        .map(|t| t.to_string());
    if let Some(text) = after {
        render_after_help(&text, w)?;
    }
    render_see_also(cmd, w)?;
    man.render_version_section(w)
}

/// SEE ALSO: the main page lists every command's page; the others point back to it.
fn render_see_also(cmd: &clap::Command, w: &mut dyn Write) -> std::io::Result<()> {
    let name = cmd.get_name();
    let mut pages = Vec::new();
    if name == "diskkit" {
        collect_pages(cmd, "diskkit", &mut pages);
    } else {
        pages.push("diskkit".to_owned());
    }
    let list: Vec<String> = pages.iter().map(|p| format!("{p}(1)")).collect();
    let mut roff = Roff::default();
    roff.control("SH", ["SEE ALSO"]);
    // Names are not hyphenated or stretched across the line.
    roff.control("nh", []).control("ad", ["l"]);
    roff.text([roman(list.join(", "))]);
    roff.to_writer(w)
}

fn collect_pages(cmd: &clap::Command, prefix: &str, out: &mut Vec<String>) {
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let name = format!("{prefix}-{}", sub.get_name());
        out.push(name.clone());
        collect_pages(sub, &name, out);
    }
}

/// `after_help` text is blocks headed `Title:` with indented lines beneath; each becomes a
/// section whose lines are kept as they are (examples line up in columns).
fn render_after_help(text: &str, w: &mut dyn Write) -> std::io::Result<()> {
    let mut roff = Roff::default();
    for block in text.split("\n\n") {
        let mut lines = block.lines();
        let Some(first) = lines.next() else { continue };
        match first.strip_suffix(':') {
            Some(title) if !title.starts_with(' ') => {
                roff.control("SH", [title.to_uppercase().as_str()]);
                roff.control("nf", []);
                for line in lines {
                    roff.text([roman(line.trim_start())]);
                }
                roff.control("fi", []);
            }
            _ => {
                roff.control("PP", []);
                roff.text([roman(block.replace('\n', " "))]);
            }
        }
    }
    roff.to_writer(w)
}
