//! Entry points for fuzzing (used by `fuzz/` and by the corpus replay tests).

use std::io::{self, Read, Write};
use std::sync::Arc;

use diskkit::storage::{MemStorage, Storage};
use diskkit::{CreateOptions, DiskImage};

use crate::export::{Export, ServerConfig};
use crate::handshake::{greet, negotiate, Contexts, Outcome, Session, TlsState};
use crate::transmission;

/// A client that sends `input` and whose replies are thrown away.
struct Scripted<'a> {
    input: &'a [u8],
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Feed `data` to the server as everything a client sends. The first byte picks the mode:
/// bit 0 clear = handshake (greeting, option haggling, then requests); bit 0 set = requests
/// only, with structured replies (bit 1) and metadata contexts (bits 2, 3) as if negotiated.
/// Serves a 1 MiB in-memory RAW image, with requests executed in the reading thread. Must
/// never panic and always terminates, whatever `data` holds.
pub fn session(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let Ok(image) = DiskImage::create_on(storage, &CreateOptions::raw(1 << 20)) else {
        return;
    };
    let mut export = Export::new("disk", Arc::new(image));
    export.description = Some("fuzz disk".into());
    let mut config = ServerConfig::new(vec![export]);
    config.workers = 0;
    let mut client = Scripted { input: rest };
    let session = if mode & 1 == 0 {
        let Ok(Some(mut haggle)) = greet(&mut client) else {
            return;
        };
        match negotiate(&mut client, &config, &mut haggle, TlsState::NONE) {
            Ok(Outcome::Transmission(s)) => s,
            _ => return,
        }
    } else {
        Session {
            export: 0,
            structured: mode & 2 != 0,
            contexts: Contexts {
                base_allocation: mode & 4 != 0,
                allocation_depth: mode & 8 != 0,
            },
        }
    };
    let Scripted { input } = client;
    let _ = transmission::serve(Scripted { input }, io::sink(), &config, session, 0, &|| {});
}
