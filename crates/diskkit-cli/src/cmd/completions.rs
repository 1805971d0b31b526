//! `diskkit completions`: shell completion scripts.

use std::io;

use anyhow::Result;
use clap::Args as ClapArgs;
use clap_complete::Shell;

/// Print a shell completion script for diskkit.
#[derive(Debug, ClapArgs)]
#[command(
    long_about = "Print the completion script for SHELL on stdout: subcommands, options and \
                  their values complete on TAB. Install it where your shell looks for \
                  completions (see the examples).",
    after_help = "\
Examples:
  # bash (bash-completion loads it on first use)
  diskkit completions bash > ~/.local/share/bash-completion/completions/diskkit
  # zsh (with fpath+=~/.zfunc before compinit in ~/.zshrc)
  diskkit completions zsh > ~/.zfunc/_diskkit
  # fish
  diskkit completions fish > ~/.config/fish/completions/diskkit.fish"
)]
pub(crate) struct Args {
    /// The shell.
    #[arg(value_enum)]
    shell: Shell,
}

pub(crate) fn run(a: &Args) -> Result<u8> {
    let mut cmd = crate::cli::command();
    clap_complete::generate(a.shell, &mut cmd, "diskkit", &mut io::stdout().lock());
    Ok(crate::exit::SUCCESS)
}
