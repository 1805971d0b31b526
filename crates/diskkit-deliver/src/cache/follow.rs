//! Reading a file while another thread downloads into it: the download's progress shared
//! between the two threads, and a reader that waits for bytes that have not arrived yet and
//! notices when the download starts over.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::fetch::FetchEvent;
use crate::error::{Error, ErrorKind};

/// The download's progress, shared between the downloading and the extracting thread.
pub(super) struct Shared {
    state: Mutex<FollowState>,
    changed: Condvar,
}

#[derive(Default)]
struct FollowState {
    /// Bytes in the file that belong to the current version.
    len: u64,
    total: Option<u64>,
    /// Incremented each time the file starts over.
    generation: u64,
    /// Set when the download ends: `Ok` complete, `Err` failed.
    done: Option<std::result::Result<(), String>>,
    /// The last retry, for display.
    retry: Option<(String, Duration)>,
    resumed_from: Option<u64>,
}

impl Shared {
    pub(super) fn new() -> Shared {
        Shared {
            state: Mutex::new(FollowState::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FollowState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn discarding(&self) {
        let mut st = self.lock();
        st.generation += 1;
        st.len = 0;
        self.changed.notify_all();
    }

    pub(super) fn started(&self, from: u64, total: Option<u64>) {
        let mut st = self.lock();
        if from > 0 {
            st.resumed_from = Some(from);
        }
        st.len = from;
        st.total = total;
        self.changed.notify_all();
    }

    pub(super) fn progress(&self, len: u64, total: Option<u64>) {
        let mut st = self.lock();
        st.len = len;
        st.total = total;
        self.changed.notify_all();
    }

    pub(super) fn retry(&self, error: &Error, wait: Duration) {
        // With its causes: the event's reader gets only this text.
        self.lock().retry = Some((error.full_message(), wait));
    }

    pub(super) fn finish(&self, r: std::result::Result<(), String>) {
        let mut st = self.lock();
        st.done = Some(r);
        self.changed.notify_all();
    }

    pub(super) fn generation(&self) -> u64 {
        self.lock().generation
    }

    pub(super) fn done(&self) -> Option<std::result::Result<(), String>> {
        self.lock().done.clone()
    }

    pub(super) fn result(&self) -> std::result::Result<(), String> {
        self.lock().done.clone().unwrap_or(Ok(()))
    }

    /// Report what happened since the last report.
    pub(super) fn report_now(&self, events: &mut dyn FnMut(FetchEvent<'_>)) {
        let mut st = self.lock();
        self.report(events, &mut st);
    }

    /// Report what happened since the last call (progress, retries, resume).
    fn report(&self, events: &mut dyn FnMut(FetchEvent<'_>), st: &mut FollowState) {
        if let Some(from) = st.resumed_from.take() {
            events(FetchEvent::Resumed { from });
        }
        if let Some((msg, wait)) = st.retry.take() {
            let e = Error::new(ErrorKind::Network, msg);
            events(FetchEvent::Retry { error: &e, wait });
        }
        events(FetchEvent::Transfer {
            done: st.len,
            total: st.total,
        });
    }

    /// Wait until the file holds `n` bytes of `generation` (true) or the download ended or
    /// started over (false), reporting progress meanwhile.
    pub(super) fn wait_for(&self, n: u64, generation: u64, events: &mut dyn FnMut(FetchEvent<'_>)) -> bool {
        let mut st = self.lock();
        loop {
            if st.generation != generation {
                return false;
            }
            if st.len >= n {
                return true;
            }
            if st.done.is_some() {
                return false;
            }
            self.report(events, &mut st);
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Wait until the download ends, reporting progress meanwhile.
    pub(super) fn wait_done(&self, events: &mut dyn FnMut(FetchEvent<'_>)) {
        let mut st = self.lock();
        while st.done.is_none() {
            self.report(events, &mut st);
            st = self
                .changed
                .wait_timeout(st, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        self.report(events, &mut st);
    }
}

/// Marks the download ended (failed, unless it was marked already) when dropped.
pub(super) struct FinishOnDrop<'a>(pub(super) &'a Shared);

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        if st.done.is_none() {
            st.done = Some(Err("the download stopped unexpectedly".into()));
            self.0.changed.notify_all();
        }
    }
}

/// Reads the file being downloaded, waiting for bytes that have not arrived yet.
pub(super) struct Follow<'a> {
    pub(super) file: &'a File,
    pub(super) shared: &'a Shared,
    pub(super) pos: u64,
    pub(super) generation: u64,
}

impl Read for Follow<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let avail = {
            let mut st = self.shared.lock();
            loop {
                if st.generation != self.generation {
                    return Err(io::Error::other("the download started over"));
                }
                if st.len > self.pos {
                    break st.len - self.pos;
                }
                match &st.done {
                    Some(Ok(())) => return Ok(0),
                    Some(Err(m)) => return Err(io::Error::new(io::ErrorKind::ConnectionAborted, m.clone())),
                    None => {}
                }
                st = self.shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };
        let n = buf.len().min(avail.min(usize::MAX as u64) as usize);
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        if got == 0 {
            // The file shrank under us: the download is starting over.
            return Err(io::Error::other("the download started over"));
        }
        self.pos += got as u64;
        Ok(got)
    }
}
