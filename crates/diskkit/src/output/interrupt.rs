//! SIGINT and SIGTERM: remove this process's temporaries, then exit.

use std::sync::Once;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::error::{Error, Result};

static INSTALLED: Once = Once::new();

/// From now on, SIGINT and SIGTERM remove every temporary output of this process (files and
/// trees being written, extra names made during a snapshot) and exit with status 128 + the
/// signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process killed by it.
///
/// For command-line tools: the handler ends the process. A thread waits for the signals
/// (nothing runs in signal context); it removes the temporaries while holding the registry
/// that creating one needs, so none can appear after the cleanup. Calling this again does
/// nothing.
pub fn remove_temporaries_on_signals() -> Result<()> {
    let mut result = Ok(());
    INSTALLED.call_once(|| {
        result = Signals::new([SIGINT, SIGTERM])
            .map_err(|e| Error::io(e).with_operation("installing signal handlers"))
            .and_then(|mut signals| {
                std::thread::Builder::new()
                    .name("diskkit-signals".into())
                    .spawn(move || {
                        if let Some(signal) = signals.forever().next() {
                            let reg = super::registry();
                            super::remove_all(&reg);
                            std::process::exit(128 + signal);
                        }
                    })
                    .map(drop)
                    .map_err(|e| Error::io(e).with_operation("starting the signal thread"))
            });
    });
    result
}
