//! The transmission phase: each connection has a small pool of workers. A worker takes the
//! next request off the socket (one worker reads at a time), executes it on the shared image
//! and sends the reply under the connection's writer lock, so several requests are in flight
//! and replies can leave out of order (cookies are echoed). Each worker holds at most one
//! request (at most 32 MiB of data), which bounds a connection's memory.

use std::io::{self, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use diskkit::{DiskImage, ErrorKind, ExtentKind};

use crate::export::{CacheMode, ServerConfig, SyncMode};
use crate::handshake::{read_full, Session, ID_ALLOCATION_DEPTH, ID_BASE_ALLOCATION};
use crate::proto::*;
use crate::request::{validate, Header, Limits, HEADER_LEN};

/// Most extents sent in one block status chunk (the specification allows 2^20).
const MAX_EXTENTS: usize = 16 * 1024;
/// Most separate chunks in one structured read; the rest is sent as one data chunk.
const MAX_READ_SEGMENTS: usize = 64;
/// Structured reads shorter than this are sent as one data chunk without asking the image
/// where its holes are (not worth the mapping calls for small requests).
const MIN_SPARSE_READ: usize = 64 * 1024;
/// Replies up to this size are copied into one buffer and written with one call.
const SMALL_REPLY: usize = 64 * 1024;

/// Why the request loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection or sent something unrecoverable.
    Closed,
}

/// A worker's reusable buffers (no allocation, page faults or unmapping per request).
#[derive(Default)]
struct Buffers {
    /// WRITE payload.
    payload: Vec<u8>,
    /// READ data.
    read: Vec<u8>,
}

impl Buffers {
    /// Give back memory after an unusually large request.
    fn trim(&mut self) {
        for b in [&mut self.payload, &mut self.read] {
            if b.capacity() > KEEP_BUFFER {
                *b = Vec::new();
            }
        }
    }
}

/// Largest buffer a worker keeps between requests.
const KEEP_BUFFER: usize = 4 << 20;

/// The connection's reply side: one lock so chunks of different replies never interleave.
struct Replies<'a, W: Write> {
    w: Mutex<W>,
    broken: AtomicBool,
    kill: &'a (dyn Fn() + Sync),
}

impl<W: Write> Replies<'_, W> {
    fn send(&self, parts: &[&[u8]]) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        // Small replies go out in one system call; large ones without copying the data.
        let joined = (parts.len() > 1 && total <= SMALL_REPLY).then(|| parts.concat());
        let mut w = self.w.lock().unwrap_or_else(|e| e.into_inner());
        let r = match &joined {
            Some(j) => w.write_all(j),
            None => parts.iter().try_for_each(|p| w.write_all(p)),
        }
        .and_then(|()| w.flush());
        if r.is_err() {
            self.broken.store(true, Ordering::Relaxed);
            (self.kill)();
        }
    }
}

/// Serve requests for `session` until the client disconnects. `kill` shuts the connection
/// down (called when a reply cannot be written, so the reading side stops too).
pub fn serve<R: Read + Send, W: Write + Send>(
    reader: R,
    writer: W,
    config: &ServerConfig,
    session: Session,
    conn_id: u64,
    kill: &(dyn Fn() + Sync),
) -> io::Result<End> {
    let export = &config.exports[session.export];
    let limits = Limits {
        size: export.image.size(),
        writable: export.writable(),
        structured: session.structured,
        has_contexts: session.contexts.base_allocation || session.contexts.allocation_depth,
    };
    let exec = Exec {
        image: &export.image,
        config,
        session,
        limits,
        conn_id,
    };
    let replies = Replies {
        w: Mutex::new(writer),
        broken: AtomicBool::new(false),
        kill,
    };
    let mut reader = BufReader::with_capacity(128 * 1024, reader);
    if config.workers == 0 {
        let mut bufs = Buffers::default();
        loop {
            match next_job(&mut reader, &mut bufs.payload)? {
                Next::Job(header) => {
                    exec.run(&header, &mut bufs, &replies);
                    bufs.trim();
                }
                Next::End(end) => return Ok(end),
            }
        }
    }
    let intake = Mutex::new(Intake { reader, end: None });
    std::thread::scope(|scope| {
        for _ in 1..config.workers {
            scope.spawn(|| worker(&intake, &exec, &replies));
        }
        worker(&intake, &exec, &replies);
    });
    let end = intake.into_inner().unwrap_or_else(|e| e.into_inner()).end;
    end.unwrap_or(Ok(End::Closed))
}

/// The reading side of a connection, taken by one worker at a time.
struct Intake<R> {
    reader: R,
    /// Set by the worker that saw the end of the request stream.
    end: Option<io::Result<End>>,
}

/// Take the next request off the connection (holding the intake lock only while reading it),
/// execute it and reply; repeat until the stream ends. Several workers per connection keep
/// several requests in flight without handing requests between threads.
fn worker<R: Read, W: Write>(intake: &Mutex<Intake<R>>, exec: &Exec<'_>, replies: &Replies<'_, W>) {
    let mut bufs = Buffers::default();
    loop {
        let header = {
            let mut i = intake.lock().unwrap_or_else(|e| e.into_inner());
            if i.end.is_some() {
                return;
            }
            match next_job(&mut i.reader, &mut bufs.payload) {
                Ok(Next::Job(header)) => header,
                Ok(Next::End(end)) => {
                    i.end = Some(Ok(end));
                    return;
                }
                Err(e) => {
                    i.end = Some(Err(e));
                    return;
                }
            }
        };
        exec.run(&header, &mut bufs, replies);
        bufs.trim();
    }
}

enum Next {
    Job(Header),
    End(End),
}

/// Read the next request; a WRITE's payload goes to `payload_buf` (empty otherwise). Invalid
/// requests are returned too: their reply is an error. Only a wrong magic or a truncated
/// stream ends the loop.
fn next_job<R: Read>(r: &mut R, payload_buf: &mut Vec<u8>) -> io::Result<Next> {
    let mut hb = [0u8; HEADER_LEN];
    match read_full(r, &mut hb) {
        Ok(true) => {}
        Ok(false) => return Ok(Next::End(End::Closed)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Next::End(End::Closed)),
        Err(e) => return Err(e),
    }
    let Some(header) = Header::parse(&hb) else {
        return Ok(Next::End(End::Closed));
    };
    if header.typ == CMD_DISC {
        return Ok(Next::End(End::Disconnect));
    }
    let payload = header.payload_len();
    if payload == 0 || payload > MAX_PAYLOAD {
        payload_buf.clear();
    }
    if payload > 0 {
        if payload <= MAX_PAYLOAD {
            set_len(payload_buf, payload as usize);
            if !read_full(r, payload_buf)? {
                return Ok(Next::End(End::Closed));
            }
        } else {
            // Too large to accept: skip it so the stream stays in step, then reply EINVAL.
            let skipped = io::copy(&mut r.take(u64::from(payload)), &mut io::sink())?;
            if skipped < u64::from(payload) {
                return Ok(Next::End(End::Closed));
            }
        }
    }
    Ok(Next::Job(header))
}

struct Exec<'a> {
    image: &'a DiskImage,
    config: &'a ServerConfig,
    session: Session,
    limits: Limits,
    conn_id: u64,
}

/// One contiguous piece of a structured read.
struct Segment {
    start: usize,
    len: usize,
    hole: bool,
}

enum Outcome {
    Done,
    /// Data is in the worker's read buffer.
    Read {
        segments: Vec<Segment>,
    },
    Status(Vec<(u32, Vec<u8>)>),
}

fn nbd_error(e: &diskkit::Error, write: bool) -> u32 {
    match e.kind() {
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::OutOfBounds if write => ENOSPC,
        ErrorKind::OutOfBounds | ErrorKind::InvalidArgument => EINVAL,
        ErrorKind::Unsupported => ENOTSUP,
        // NBD's error values are Linux's errno values.
        _ => match e.raw_os_error().map(|n| n as u32) {
            Some(n) if n == ENOSPC || n == ENOMEM => n,
            _ => EIO,
        },
    }
}

impl Exec<'_> {
    fn run<W: Write>(&self, h: &Header, bufs: &mut Buffers, replies: &Replies<'_, W>) {
        let result = validate(h, &self.limits).and_then(|()| self.execute(h, bufs));
        let buf = &bufs.read;
        if self.config.trace {
            trace(self.conn_id, h, &result);
        }
        let cookie = h.cookie;
        let structured = self.session.structured;
        let sr_reply = structured && matches!(h.typ, CMD_READ | CMD_BLOCK_STATUS);
        match result {
            Err(code) if sr_reply => {
                let mut b = Buf::with_capacity(26);
                b.u32(STRUCTURED_REPLY_MAGIC)
                    .u16(REPLY_FLAG_DONE)
                    .u16(REPLY_TYPE_ERROR)
                    .u64(cookie)
                    .u32(6)
                    .u32(code)
                    .u16(0);
                replies.send(&[&b.0]);
            }
            Err(code) => replies.send(&[&simple(code, cookie)]),
            Ok(Outcome::Done) if sr_reply => {
                replies.send(&[&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)])
            }
            Ok(Outcome::Done) => replies.send(&[&simple(0, cookie)]),
            Ok(Outcome::Read { .. }) if !structured => {
                replies.send(&[&simple(0, cookie), buf]);
            }
            Ok(Outcome::Read { segments, .. }) if segments.is_empty() => {
                // A zero-length read: one empty final chunk.
                replies.send(&[&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)]);
            }
            Ok(Outcome::Read { segments }) => {
                let n = segments.len();
                let mut heads: Vec<Vec<u8>> = Vec::with_capacity(n);
                for (i, s) in segments.iter().enumerate() {
                    let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                    let offset = h.offset + s.start as u64;
                    let mut b = Buf::with_capacity(32);
                    if s.hole {
                        b.bytes(&chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12))
                            .u64(offset)
                            .u32(s.len as u32);
                    } else {
                        b.bytes(&chunk_header(
                            flags,
                            REPLY_TYPE_OFFSET_DATA,
                            cookie,
                            8 + s.len as u32,
                        ))
                        .u64(offset);
                    }
                    heads.push(b.0);
                }
                let mut parts: Vec<&[u8]> = Vec::with_capacity(2 * n);
                for (s, head) in segments.iter().zip(&heads) {
                    parts.push(head);
                    if !s.hole {
                        parts.push(&buf[s.start..s.start + s.len]);
                    }
                }
                replies.send(&parts);
            }
            Ok(Outcome::Status(chunks)) => {
                let n = chunks.len();
                let mut out = Buf::default();
                for (i, (id, descs)) in chunks.iter().enumerate() {
                    let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                    out.bytes(&chunk_header(
                        flags,
                        REPLY_TYPE_BLOCK_STATUS,
                        cookie,
                        4 + descs.len() as u32,
                    ))
                    .u32(*id)
                    .bytes(descs);
                }
                replies.send(&[&out.0]);
            }
        }
    }

    fn execute(&self, h: &Header, bufs: &mut Buffers) -> Result<Outcome, u32> {
        let data = &bufs.payload;
        let img = self.image;
        let fua = h.flags & CMD_FLAG_FUA != 0;
        match h.typ {
            CMD_READ => self.read(h, &mut bufs.read),
            CMD_WRITE => {
                img.write_at(data, h.offset).map_err(|e| nbd_error(&e, true))?;
                self.after_write(fua)
            }
            CMD_FLUSH => {
                self.sync()?;
                Ok(Outcome::Done)
            }
            CMD_TRIM => {
                img.discard(h.offset, u64::from(h.length))
                    .map_err(|e| nbd_error(&e, false))?;
                self.after_write(fua)
            }
            CMD_WRITE_ZEROES => {
                let unmap = h.flags & CMD_FLAG_NO_HOLE == 0;
                // Zeroing never writes data blocks here (holes, fallocate, chunk states), so it
                // is always cheaper than a write: FAST_ZERO requests are honoured the same way.
                img.write_zeroes(h.offset, u64::from(h.length), unmap)
                    .map_err(|e| nbd_error(&e, true))?;
                self.after_write(fua)
            }
            CMD_CACHE => Ok(Outcome::Done),
            CMD_BLOCK_STATUS => self.block_status(h),
            _ => Err(EINVAL),
        }
    }

    fn sync(&self) -> Result<(), u32> {
        if self.config.sync == SyncMode::None {
            return Ok(());
        }
        self.image.flush().map_err(|e| nbd_error(&e, true))
    }

    fn after_write(&self, fua: bool) -> Result<Outcome, u32> {
        if fua || self.config.cache == CacheMode::None {
            self.sync()?;
        }
        Ok(Outcome::Done)
    }

    fn read(&self, h: &Header, buf: &mut Vec<u8>) -> Result<Outcome, u32> {
        let len = h.length as usize;
        // Every byte sent is read first, and holes are sent as hole chunks, so old contents
        // of the buffer never leave: no need to zero it.
        set_len(buf, len);
        if !self.session.structured || h.flags & CMD_FLAG_DF != 0 || len < MIN_SPARSE_READ {
            self.image
                .read_at(buf, h.offset)
                .map_err(|e| nbd_error(&e, false))?;
            let segments = if len == 0 {
                Vec::new()
            } else {
                vec![Segment {
                    start: 0,
                    len,
                    hole: false,
                }]
            };
            return Ok(Outcome::Read { segments });
        }
        let mut segments: Vec<Segment> = Vec::new();
        let end = h.offset + len as u64;
        let mut pos = h.offset;
        while pos < end {
            let start = (pos - h.offset) as usize;
            if segments.len() >= MAX_READ_SEGMENTS {
                self.image
                    .read_at(&mut buf[start..], pos)
                    .map_err(|e| nbd_error(&e, false))?;
                push_segment(&mut segments, start, len - start, false);
                break;
            }
            let e = self
                .image
                .status(pos, end - pos)
                .map_err(|e| nbd_error(&e, false))?;
            let n = e.length.min(end - pos) as usize;
            let hole = e.reads_as_zero();
            if !hole {
                self.image
                    .read_at(&mut buf[start..start + n], pos)
                    .map_err(|e| nbd_error(&e, false))?;
            }
            push_segment(&mut segments, start, n, hole);
            pos += n as u64;
        }
        Ok(Outcome::Read { segments })
    }

    fn block_status(&self, h: &Header) -> Result<Outcome, u32> {
        let ctx = self.session.contexts;
        let one = h.flags & CMD_FLAG_REQ_ONE != 0;
        let end = h.offset + u64::from(h.length);
        // (length, flags) runs for each context, merged.
        let mut base: Vec<(u64, u32)> = Vec::new();
        let mut depth: Vec<(u64, u32)> = Vec::new();
        let mut pos = h.offset;
        let limit = if one { 1 } else { MAX_EXTENTS };
        // Stop once a context has more runs than it can send: every run before the last is
        // then complete, and the other context's runs cover a prefix exactly.
        let full = |v: &Vec<(u64, u32)>, on: bool| on && v.len() > limit;
        while pos < end {
            if full(&base, ctx.base_allocation) || full(&depth, ctx.allocation_depth) {
                break;
            }
            let e = self
                .image
                .status(pos, end - pos)
                .map_err(|e| nbd_error(&e, false))?;
            let n = e.length.min(end - pos);
            let flags = match e.kind {
                ExtentKind::Data => 0,
                ExtentKind::Zero | ExtentKind::Absent => STATE_HOLE | STATE_ZERO,
            };
            merge(&mut base, n, flags);
            merge(&mut depth, n, e.depth);
            pos += n;
        }
        let mut chunks = Vec::new();
        for (on, id, runs) in [
            (ctx.base_allocation, ID_BASE_ALLOCATION, &base),
            (ctx.allocation_depth, ID_ALLOCATION_DEPTH, &depth),
        ] {
            if !on {
                continue;
            }
            let mut b = Buf::default();
            for &(len, flags) in runs.iter().take(limit) {
                // Runs are at most the request length, which fits in 32 bits.
                b.u32(len.min(u64::from(u32::MAX)) as u32).u32(flags);
            }
            chunks.push((id, b.0));
        }
        Ok(Outcome::Status(chunks))
    }
}

/// `-vv`: one line per request, naming the command and its flags.
fn trace(conn_id: u64, h: &Header, result: &Result<Outcome, u32>) {
    let cmd = match h.typ {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "UNKNOWN",
    };
    let mut flags = String::new();
    for (bit, name) in [
        (CMD_FLAG_FUA, "FUA"),
        (CMD_FLAG_NO_HOLE, "NO_HOLE"),
        (CMD_FLAG_DF, "DF"),
        (CMD_FLAG_REQ_ONE, "REQ_ONE"),
        (CMD_FLAG_FAST_ZERO, "FAST_ZERO"),
    ] {
        if h.flags & bit != 0 {
            flags.push_str(if flags.is_empty() { "" } else { "|" });
            flags.push_str(name);
        }
    }
    let error = match result {
        Ok(_) => 0,
        Err(e) => *e,
    };
    let _ = writeln!(
        io::stderr(),
        "diskkit serve: connection {conn_id}: {cmd} offset={} length={} flags=[{flags}] cookie={:#x} error={error}",
        h.offset,
        h.length,
        h.cookie
    );
}

/// Make `buf` `len` bytes long, zeroing only bytes it never had (the caller overwrites them).
fn set_len(buf: &mut Vec<u8>, len: usize) {
    if buf.len() > len {
        buf.truncate(len);
    } else {
        buf.resize(len, 0);
    }
}

fn merge(runs: &mut Vec<(u64, u32)>, len: u64, flags: u32) {
    match runs.last_mut() {
        Some((l, f)) if *f == flags => *l += len,
        _ => runs.push((len, flags)),
    }
}

fn push_segment(segments: &mut Vec<Segment>, start: usize, len: usize, hole: bool) {
    match segments.last_mut() {
        Some(s) if s.hole == hole => s.len += len,
        _ => segments.push(Segment { start, len, hole }),
    }
}

fn simple(error: u32, cookie: u64) -> Vec<u8> {
    let mut b = Buf::with_capacity(16);
    b.u32(SIMPLE_REPLY_MAGIC).u32(error).u64(cookie);
    b.0
}

fn chunk_header(flags: u16, typ: u16, cookie: u64, len: u32) -> Vec<u8> {
    let mut b = Buf::with_capacity(20);
    b.u32(STRUCTURED_REPLY_MAGIC)
        .u16(flags)
        .u16(typ)
        .u64(cookie)
        .u32(len);
    b.0
}
