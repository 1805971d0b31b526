//! Entry points for fuzzing (used by `fuzz/` and by the corpus replay tests).

use std::io::{self, Read, Write};
use std::sync::Arc;

use diskkit::storage::{MemStorage, Storage};
use diskkit::{CreateOptions, DiskImage};

use crate::export::{Export, ServerConfig};
use crate::handshake::{greet, negotiate, Contexts, Outcome, Session, TlsState};
use crate::transmission;

/// A client that sends `input` and records what the server answers.
struct Scripted<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
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
    let _ = session_output(data);
}

/// Like [`session`], returning everything the server sent (greeting, option replies, then
/// transmission replies, in order: requests are executed one at a time).
pub fn session_output(data: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let Ok(image) = DiskImage::create_on(storage, &CreateOptions::raw(1 << 20)) else {
        return Vec::new();
    };
    let mut export = Export::new("disk", Arc::new(image));
    export.description = Some("fuzz disk".into());
    let mut config = ServerConfig::new(vec![export]);
    config.workers = 0;
    let mut client = Scripted {
        input: rest,
        output: Vec::new(),
    };
    let session = if mode & 1 == 0 {
        let Ok(Some(mut haggle)) = greet(&mut client) else {
            return client.output;
        };
        match negotiate(&mut client, &config, &mut haggle, TlsState::NONE) {
            Ok(Outcome::Transmission(s)) => s,
            _ => return client.output,
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
    let Scripted { input, mut output } = client;
    let reader = Scripted {
        input,
        output: Vec::new(),
    };
    let mut replies = Vec::new();
    let _ = transmission::serve(reader, &mut replies, &config, session, 0, &|| {});
    output.extend_from_slice(&replies);
    output
}
