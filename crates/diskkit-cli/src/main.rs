//! `diskkit`: the command-line tool. Glue only: parse arguments, call the library, print.

mod args;
mod boot;
mod cmd;
mod progress;
mod size;

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;

/// Exit status for a negative answer (images differ).
pub(crate) const EXIT_DIFFERENT: u8 = 1;
/// Exit status for errors.
pub(crate) const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`diskkit map x | head`) instead of failing on every later print.
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match args::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, like every other error.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            let _ = writeln!(io::stderr(), "diskkit: error: {first} (see 'diskkit --help')");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match cmd::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(io::stderr(), "diskkit: error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}
