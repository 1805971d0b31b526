//! A remote object as read-only [`Storage`]: what the network behaviour of remote bases is.
//!
//! The object is read in units ([`RemoteOptions::fetch_unit`], 1 MiB by default) kept in a
//! small in-memory set (least recently used dropped first), so the many small reads a format
//! driver makes of its metadata cost one request, and the persistent cache layer above, which
//! fills in whole units (see [`Storage::fetch_unit`]), gets a useful amount per request.
//!
//! - **Merging**: the missing units of one read are fetched as one range request per run of
//!   adjacent units (at most [`RemoteOptions::max_request`] bytes each).
//! - **Parallel, bounded**: at most [`RemoteOptions::parallel`] requests are in flight for
//!   the object, from any number of reading threads and the read-ahead workers together; a
//!   read that needs a unit another thread is fetching waits for it instead of asking again.
//! - **Read-ahead**: reads that continue where an earlier one ended (up to 16 such streams are
//!   followed at once, so several NBD connections reading their own regions each count) start
//!   fetching the units after them in the background, the window doubling per read up to
//!   [`RemoteOptions::readahead`].
//! - **Keep-alive, retries**: the HTTP client's pool and retry policy (exponential backoff on
//!   5xx, resets and timeouts, resuming a cut transfer where it stopped); after the last retry
//!   the read fails with [`diskkit::ErrorKind::Io`] (an NBD client sees EIO), and nothing of a
//!   failed range is kept.
//! - **One version**: every request is conditional on the version opened (see [`super`]), so a
//!   replaced object fails reads instead of mixing old and new bytes.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use diskkit::storage::Storage;

use super::identity::Identity;
use super::object::RemoteObject;
use super::RemoteOptions;
use crate::error::Error;

/// How many sequential streams are followed for read-ahead.
const STREAMS: usize = 16;

/// Counters of a remote storage's traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RemoteStats {
    /// Requests sent (stat and retries included).
    pub requests: u64,
    /// Body bytes received.
    pub bytes: u64,
    /// Failed attempts that were retried.
    pub retries: u64,
}

enum Slot {
    /// Being fetched by some thread.
    Pending,
    /// Fetched: `len` bytes at `at` in `run` (the buffer of the request that fetched it,
    /// shared by its units, so nothing is copied); `used` is the tick of the last read.
    Ready {
        run: Arc<Vec<u8>>,
        at: usize,
        len: usize,
        used: u64,
    },
}

#[derive(Clone, Copy)]
struct Stream {
    /// Where the next read of this stream is expected to start.
    next: u64,
    /// Read-ahead window in units.
    window: u64,
    used: u64,
}

#[derive(Default)]
struct State {
    blocks: HashMap<u64, Slot>,
    ready: usize,
    tick: u64,
    streams: Vec<Stream>,
}

struct Shared {
    object: RemoteObject,
    identity: Identity,
    size: u64,
    unit: u64,
    max_request_units: u64,
    max_window: u64,
    max_ready: usize,
    state: Mutex<State>,
    changed: Condvar,
    permits: Mutex<usize>,
    permit_freed: Condvar,
}

/// A run of units to fetch in the background.
struct Job {
    first: u64,
    count: u64,
}

/// A remote object (HTTP(S) or S3) as read-only storage; see the module documentation.
pub struct RemoteStorage {
    shared: Arc<Shared>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    unchecked: Option<String>,
}

impl std::fmt::Debug for RemoteStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStorage")
            .field("url", &self.shared.object.name)
            .field("size", &self.shared.size)
            .finish_non_exhaustive()
    }
}

impl Drop for RemoteStorage {
    fn drop(&mut self) {
        // Dropping the sender ends the read-ahead workers once their current job is done.
        if let Ok(mut j) = self.jobs.lock() {
            j.take();
        }
    }
}

/// A core error for a failed remote read: I/O (EIO for NBD clients), the cause attached.
fn core_error(e: Error, what: &str) -> diskkit::Error {
    diskkit::Error::new(diskkit::ErrorKind::Io, what.to_string()).with_source(e)
}

impl RemoteStorage {
    /// Storage reading `object` at the version `identity` (already checked by the caller).
    pub(crate) fn new(object: RemoteObject, identity: Identity, options: &RemoteOptions) -> RemoteStorage {
        let unit = options.fetch_unit.clamp(4096, 64 << 20);
        let parallel = options.parallel.clamp(1, 64);
        let max_request_units = (options.max_request / unit).max(1);
        let max_window = (options.readahead / unit).max(1);
        // Room for a full read-ahead window plus one request per slot, so that units a reader
        // has just fetched are not dropped before it copies them.
        let floor = max_window + max_request_units * (parallel as u64 + 1);
        let shared = Arc::new(Shared {
            size: identity.size,
            identity,
            object,
            unit,
            max_request_units,
            max_window,
            max_ready: usize::try_from((options.memory / unit).max(floor)).unwrap_or(usize::MAX),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            permits: Mutex::new(parallel),
            permit_freed: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..parallel {
            let shared = shared.clone();
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name("diskkit-readahead".into())
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    // A failure is left to the reader that needs the units: it fetches them
                    // itself and reports its own error.
                    let _ = shared.fetch_run(job.first, job.count);
                });
            if spawned.is_err() {
                break;
            }
        }
        RemoteStorage {
            shared,
            jobs: Mutex::new(Some(tx)),
            unchecked: None,
        }
    }

    /// The same storage, marked as opened without checking the object's identity (`why`).
    pub(crate) fn unchecked_because(mut self, why: String) -> RemoteStorage {
        self.unchecked = Some(why);
        self
    }

    /// The URL this storage reads.
    pub fn url(&self) -> &str {
        &self.shared.object.name
    }

    /// The version being read.
    pub fn identity(&self) -> &Identity {
        &self.shared.identity
    }

    /// Why the object's identity was not checked when it was opened (the server could not be
    /// reached), if it was not; see [`super::open_remote`].
    pub fn unchecked(&self) -> Option<&str> {
        self.unchecked.as_deref()
    }

    /// Traffic so far.
    pub fn stats(&self) -> RemoteStats {
        self.shared.object.stats.snapshot()
    }

    /// The live counters (they outlive the storage).
    pub(crate) fn counters(&self) -> Arc<super::object::RequestStats> {
        self.shared.object.stats.clone()
    }

    /// Read `buf` at `offset` (inside the object), through the unit cache.
    fn read_piece(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let sh = &*self.shared;
        let end = offset + buf.len() as u64;
        let (b0, b1) = (offset / sh.unit, (end - 1) / sh.unit);
        let pieces = loop {
            let mut st = sh.lock_state();
            let mut missing = Vec::new();
            let mut waiting = false;
            let mut got = Vec::new();
            st.tick += 1;
            let tick = st.tick;
            for b in b0..=b1 {
                match st.blocks.get_mut(&b) {
                    Some(Slot::Ready { run, at, len, used }) => {
                        *used = tick;
                        got.push((run.clone(), *at, *len));
                    }
                    Some(Slot::Pending) => waiting = true,
                    None => missing.push(b),
                }
            }
            if !missing.is_empty() {
                for &b in &missing {
                    st.blocks.insert(b, Slot::Pending);
                }
                drop(st);
                sh.fetch_units(&missing)?;
                continue;
            }
            if waiting {
                drop(sh.changed.wait(st));
                continue;
            }
            break got;
        };
        let mut pos = 0usize;
        for (i, (run, at, len)) in pieces.iter().enumerate() {
            let block_start = (b0 + i as u64) * sh.unit;
            let from = (offset + pos as u64 - block_start) as usize;
            let n = (len - from).min(buf.len() - pos);
            buf[pos..pos + n].copy_from_slice(&run[at + from..at + from + n]);
            pos += n;
        }
        Ok(())
    }

    /// Follow sequential streams and start read-ahead after a read of `[offset, end)`.
    fn read_ahead(&self, offset: u64, end: u64) {
        let sh = &*self.shared;
        let last_unit = (sh.size - 1) / sh.unit;
        let mut runs = Vec::new();
        {
            let mut st = sh.lock_state();
            let tick = st.tick;
            let slack = sh.unit;
            let found = st
                .streams
                .iter_mut()
                .find(|s| offset + slack >= s.next && offset <= s.next + slack);
            let window = match found {
                Some(s) => {
                    s.window = (s.window * 2).clamp(2, sh.max_window);
                    s.next = end;
                    s.used = tick;
                    s.window
                }
                None => {
                    if st.streams.len() >= STREAMS {
                        if let Some(i) = (0..st.streams.len()).min_by_key(|&i| st.streams[i].used) {
                            st.streams.swap_remove(i);
                        }
                    }
                    st.streams.push(Stream {
                        next: end,
                        window: 0,
                        used: tick,
                    });
                    0
                }
            };
            if window == 0 {
                return;
            }
            let first = (end - 1) / sh.unit + 1;
            let last = (first + window - 1).min(last_unit);
            let mut run: Option<(u64, u64)> = None;
            for b in first..=last.max(first) {
                if b > last_unit {
                    break;
                }
                if st.blocks.contains_key(&b) {
                    runs.extend(run.take());
                    continue;
                }
                st.blocks.insert(b, Slot::Pending);
                run = match run {
                    Some((f, c)) if c < sh.max_request_units => Some((f, c + 1)),
                    Some(r) => {
                        runs.push(r);
                        Some((b, 1))
                    }
                    None => Some((b, 1)),
                };
            }
            runs.extend(run);
        }
        let jobs = self.jobs.lock().ok();
        for (first, count) in runs {
            let sent = jobs
                .as_ref()
                .and_then(|j| j.as_ref())
                .is_some_and(|tx| tx.send(Job { first, count }).is_ok());
            if !sent {
                sh.forget(first, count);
            }
        }
    }
}

impl Shared {
    fn lock_state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind: keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetch the units listed (sorted, all marked pending by the caller) as merged runs, in
    /// parallel when there are several.
    fn fetch_units(&self, units: &[u64]) -> Result<(), Error> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &b in units {
            match runs.last_mut() {
                Some((f, c)) if *f + *c == b && *c < self.max_request_units => *c += 1,
                _ => runs.push((b, 1)),
            }
        }
        if runs.len() == 1 {
            return self.fetch_run(runs[0].0, runs[0].1);
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = runs
                .iter()
                .map(|&(f, c)| s.spawn(move || self.fetch_run(f, c)))
                .collect();
            let mut first_error = None;
            for h in handles {
                if let Err(e) = h
                    .join()
                    .unwrap_or_else(|_| Err(Error::invalid_argument("a fetch thread panicked")))
                {
                    first_error.get_or_insert(e);
                }
            }
            first_error.map_or(Ok(()), Err)
        })
    }

    /// Fetch `count` units from `first` (marked pending) with one range request, and publish
    /// them; on failure they are forgotten (a later read asks again).
    fn fetch_run(&self, first: u64, count: u64) -> Result<(), Error> {
        let start = first * self.unit;
        let end = ((first + count) * self.unit).min(self.size);
        let mut data = vec![0u8; (end - start) as usize];
        let result = {
            let _permit = self.permit();
            self.object.read_range(&mut data, start, &self.identity)
        };
        if let Err(e) = result {
            self.forget(first, count);
            return Err(e);
        }
        let total = data.len();
        let run = Arc::new(data);
        let unit = self.unit as usize;
        let mut st = self.lock_state();
        st.tick += 1;
        let tick = st.tick;
        for (i, at) in (0..total).step_by(unit).enumerate() {
            let b = first + i as u64;
            let old = st.blocks.insert(
                b,
                Slot::Ready {
                    run: run.clone(),
                    at,
                    len: unit.min(total - at),
                    used: tick,
                },
            );
            if !matches!(old, Some(Slot::Ready { .. })) {
                st.ready += 1;
            }
        }
        self.trim(&mut st);
        drop(st);
        self.changed.notify_all();
        Ok(())
    }

    /// Drop the least recently used units beyond the memory bound.
    fn trim(&self, st: &mut State) {
        if st.ready <= self.max_ready {
            return;
        }
        let mut ready: Vec<(u64, u64)> = st
            .blocks
            .iter()
            .filter_map(|(&b, s)| match s {
                Slot::Ready { used, .. } => Some((*used, b)),
                Slot::Pending => None,
            })
            .collect();
        ready.sort_unstable();
        let excess = st.ready - self.max_ready;
        for &(_, b) in ready.iter().take(excess) {
            st.blocks.remove(&b);
        }
        st.ready -= excess.min(ready.len());
    }

    /// Forget pending units that will not arrive.
    fn forget(&self, first: u64, count: u64) {
        let mut st = self.lock_state();
        for b in first..first + count {
            if matches!(st.blocks.get(&b), Some(Slot::Pending)) {
                st.blocks.remove(&b);
            }
        }
        drop(st);
        self.changed.notify_all();
    }

    /// Wait for one of the request slots.
    fn permit(&self) -> Permit<'_> {
        let mut n = self.permits.lock().unwrap_or_else(|p| p.into_inner());
        while *n == 0 {
            n = self.permit_freed.wait(n).unwrap_or_else(|p| p.into_inner());
        }
        *n -= 1;
        Permit(self)
    }
}

struct Permit<'a>(&'a Shared);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.permits.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.permit_freed.notify_one();
    }
}

impl Storage for RemoteStorage {
    fn len(&self) -> diskkit::Result<u64> {
        Ok(self.shared.size)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> diskkit::Result<()> {
        let sh = &*self.shared;
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= sh.size)
            .ok_or_else(|| {
                diskkit::Error::corrupt(format!(
                    "read of {} bytes at {offset} is past the end of the remote object ({} bytes)",
                    buf.len(),
                    sh.size
                ))
            })?;
        if buf.is_empty() {
            return Ok(());
        }
        // Bounded pieces, so one huge read never needs more units in memory than allowed.
        let piece = (sh.max_request_units * sh.unit) as usize;
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let n = (buf.len() - pos).min(piece - (at % sh.unit) as usize);
            self.read_piece(&mut buf[pos..pos + n], at)
                .map_err(|e| core_error(e, "reading the remote base failed"))?;
            pos += n;
        }
        self.read_ahead(offset, end);
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> diskkit::Result<()> {
        Err(diskkit::Error::from_kind(diskkit::ErrorKind::ReadOnly))
    }

    fn set_len(&self, _len: u64) -> diskkit::Result<()> {
        Err(diskkit::Error::from_kind(diskkit::ErrorKind::ReadOnly))
    }

    fn punch_hole(&self, _offset: u64, _len: u64) -> diskkit::Result<()> {
        Err(diskkit::Error::from_kind(diskkit::ErrorKind::ReadOnly))
    }

    fn write_zeroes(&self, _offset: u64, _len: u64) -> diskkit::Result<()> {
        Err(diskkit::Error::from_kind(diskkit::ErrorKind::ReadOnly))
    }

    fn sync(&self) -> diskkit::Result<()> {
        Ok(())
    }

    fn fetch_unit(&self) -> Option<u64> {
        Some(self.shared.unit)
    }

    fn read_only(&self) -> bool {
        true
    }
}
