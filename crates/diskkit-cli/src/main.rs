//! `diskkit`: the command-line tool. Glue only: parse arguments, call the libraries, print.

mod args;
mod boot;
mod cli;
mod cmd;
mod format;
mod messages;
mod progress;
mod size;

use std::io;
use std::process::ExitCode;

/// Exit statuses, the same for every command (`check` documents its qemu-img-compatible
/// exception in its help).
pub(crate) mod exit {
    /// Success (and a positive answer).
    pub(crate) const SUCCESS: u8 = 0;
    /// A negative answer: `compare` found a difference.
    pub(crate) const NEGATIVE: u8 = 1;
    /// An error, explained on stderr.
    pub(crate) const ERROR: u8 = 2;
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`diskkit map x | head`) instead of failing on every later print.
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli::run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            messages::error(&e);
            ExitCode::from(exit::ERROR)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}
