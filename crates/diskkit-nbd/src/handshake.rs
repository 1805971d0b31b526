//! The handshake: fixed newstyle greeting and option haggling.
//!
//! Every option is answered (unknown ones with `NBD_REP_ERR_UNSUP`) and haggling continues;
//! only a wrong magic, a non-fixed client sending anything but `EXPORT_NAME`, an unknown name
//! in `EXPORT_NAME` (no error reply exists for it), an oversized option or too many options
//! end the connection.

use std::io::{self, Read, Write};

use crate::export::ServerConfig;
use crate::proto::*;

/// Most options one client may send before the server gives up on it.
pub const MAX_OPTIONS: u32 = 256;
/// The largest option payload read; larger ones close the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// The longest export name or context query accepted.
pub const MAX_STRING: u32 = 4096;
/// The most context queries in one option.
pub const MAX_QUERIES: u32 = 128;

/// Metadata contexts selected for a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Contexts {
    /// `base:allocation` (context id 1).
    pub base_allocation: bool,
    /// `qemu:allocation-depth` (context id 2).
    pub allocation_depth: bool,
}

/// Context id of `base:allocation`.
pub const ID_BASE_ALLOCATION: u32 = 1;
/// Context id of `qemu:allocation-depth`.
pub const ID_ALLOCATION_DEPTH: u32 = 2;

/// What the client negotiated for the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    /// Index of the export in [`ServerConfig::exports`].
    pub export: usize,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// Selected metadata contexts.
    pub contexts: Contexts,
}

/// How haggling ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An export was selected: start transmission.
    Transmission(Session),
    /// The client asked for TLS and was answered ACK: wrap the stream and haggle again.
    StartTls,
    /// The client aborted or went away, or was dropped.
    Closed,
}

/// TLS policy for a haggling round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsState {
    /// The server can upgrade to TLS.
    pub offered: bool,
    /// Options other than STARTTLS/ABORT are refused until TLS is active.
    pub required: bool,
    /// TLS is already active.
    pub active: bool,
}

impl TlsState {
    /// No TLS at all.
    pub const NONE: TlsState = TlsState {
        offered: false,
        required: false,
        active: false,
    };
}

/// Per-connection haggling state that survives a STARTTLS restart (the option budget).
#[derive(Debug, Default)]
pub struct Haggle {
    /// Client handshake flags.
    pub client_flags: u32,
    /// Options received so far.
    pub options: u32,
}

/// Send the greeting and read the client flags. `Ok(None)`: the client closed or sent flags
/// the server does not know (the connection is to be dropped).
pub fn greet<S: Read + Write>(s: &mut S) -> io::Result<Option<Haggle>> {
    let mut b = Buf::with_capacity(18);
    b.u64(NBDMAGIC)
        .u64(IHAVEOPT)
        .u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&b.0)?;
    s.flush()?;
    let mut f = [0u8; 4];
    if !read_full(s, &mut f)? {
        return Ok(None);
    }
    let flags = u32::from_be_bytes(f);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Ok(None);
    }
    Ok(Some(Haggle {
        client_flags: flags,
        options: 0,
    }))
}

/// Read exactly `buf.len()` bytes; `Ok(false)` on a clean EOF before the first byte.
pub(crate) fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) if n == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn reply<S: Write>(s: &mut S, opt: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| io::Error::other("option reply too large"))?;
    let mut b = Buf::with_capacity(20 + data.len());
    b.u64(OPT_REPLY_MAGIC).u32(opt).u32(typ).u32(len).bytes(data);
    s.write_all(&b.0)
}

/// Haggle over options until an export is selected, the client leaves, or TLS starts.
pub fn negotiate<S: Read + Write>(
    s: &mut S,
    config: &ServerConfig,
    haggle: &mut Haggle,
    tls: TlsState,
) -> io::Result<Outcome> {
    let fixed = haggle.client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = haggle.client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // Contexts selected by SET_META_CONTEXT, and the export they were selected for.
    let mut selected: Option<(usize, Contexts)> = None;
    loop {
        s.flush()?;
        if haggle.options >= MAX_OPTIONS {
            return Ok(Outcome::Closed);
        }
        haggle.options += 1;
        let mut h = [0u8; 16];
        if !read_full(s, &mut h)? {
            return Ok(Outcome::Closed);
        }
        let mut c = Cursor::new(&h);
        let magic = u64::from(c.u32().unwrap_or(0)) << 32 | u64::from(c.u32().unwrap_or(0));
        let opt = c.u32().unwrap_or(0);
        let len = c.u32().unwrap_or(0);
        if magic != IHAVEOPT || len > MAX_OPTION_LEN {
            return Ok(Outcome::Closed);
        }
        let mut data = vec![0u8; len as usize];
        if !read_full(s, &mut data)? && len > 0 {
            return Ok(Outcome::Closed);
        }
        if !fixed && opt != OPT_EXPORT_NAME {
            // A non-fixed newstyle client cannot take error replies.
            return Ok(Outcome::Closed);
        }
        if tls.required && !tls.active && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Ok(Outcome::Closed);
            }
            reply(s, opt, REP_ERR_TLS_REQD, b"TLS is required")?;
            continue;
        }
        match opt {
            OPT_EXPORT_NAME => {
                let Some(i) = config.find(&data) else {
                    return Ok(Outcome::Closed);
                };
                let e = &config.exports[i];
                let mut b = Buf::with_capacity(134);
                b.u64(e.image.size())
                    .u16(e.transmission_flags(structured, config.multi_conn()));
                if !no_zeroes {
                    b.bytes(&[0u8; 124]);
                }
                s.write_all(&b.0)?;
                s.flush()?;
                let contexts = context_for(selected, i);
                return Ok(Outcome::Transmission(Session {
                    export: i,
                    structured,
                    contexts,
                }));
            }
            OPT_ABORT => {
                // The client may already be gone: the ACK is best effort.
                let _ = reply(s, opt, REP_ACK, &[]).and_then(|()| s.flush());
                return Ok(Outcome::Closed);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(s, opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for e in &config.exports {
                    let mut b = Buf::default();
                    b.u32(e.name.len() as u32).bytes(e.name.as_bytes());
                    if let Some(d) = &e.description {
                        b.bytes(d.as_bytes());
                    }
                    reply(s, opt, REP_SERVER, &b.0)?;
                }
                reply(s, opt, REP_ACK, &[])?;
            }
            OPT_STARTTLS => {
                if !tls.offered {
                    reply(s, opt, REP_ERR_UNSUP, b"TLS is not configured")?;
                } else if tls.active || !data.is_empty() {
                    reply(s, opt, REP_ERR_INVALID, b"TLS is already active")?;
                } else {
                    reply(s, opt, REP_ACK, &[])?;
                    s.flush()?;
                    return Ok(Outcome::StartTls);
                }
            }
            OPT_INFO | OPT_GO => {
                let Some((name, requests)) = parse_info(&data) else {
                    reply(s, opt, REP_ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                let Some(i) = config.find(name) else {
                    reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                };
                let e = &config.exports[i];
                let mut b = Buf::default();
                b.u16(INFO_EXPORT)
                    .u64(e.image.size())
                    .u16(e.transmission_flags(structured, config.multi_conn()));
                reply(s, opt, REP_INFO, &b.0)?;
                let mut b = Buf::default();
                b.u16(INFO_BLOCK_SIZE)
                    .u32(1)
                    .u32(PREFERRED_BLOCK)
                    .u32(MAX_PAYLOAD);
                reply(s, opt, REP_INFO, &b.0)?;
                if requests.contains(&INFO_NAME) {
                    let mut b = Buf::default();
                    b.u16(INFO_NAME).bytes(e.name.as_bytes());
                    reply(s, opt, REP_INFO, &b.0)?;
                }
                if let (true, Some(d)) = (requests.contains(&INFO_DESCRIPTION), &e.description) {
                    let mut b = Buf::default();
                    b.u16(INFO_DESCRIPTION).bytes(d.as_bytes());
                    reply(s, opt, REP_INFO, &b.0)?;
                }
                reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    s.flush()?;
                    return Ok(Outcome::Transmission(Session {
                        export: i,
                        structured,
                        contexts: context_for(selected, i),
                    }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(s, opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")?;
                } else {
                    structured = true;
                    reply(s, opt, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set && !structured {
                    reply(s, opt, REP_ERR_INVALID, b"structured replies are needed first")?;
                    continue;
                }
                let parsed = match parse_meta(&data) {
                    Ok(p) => p,
                    Err(code) => {
                        reply(s, opt, code, b"malformed metadata context request")?;
                        continue;
                    }
                };
                let Some(i) = config.find(parsed.export) else {
                    reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                };
                let ctx = match_queries(&parsed.queries, set);
                if ctx.base_allocation {
                    let mut b = Buf::default();
                    b.u32(ID_BASE_ALLOCATION)
                        .bytes(CONTEXT_BASE_ALLOCATION.as_bytes());
                    reply(s, opt, REP_META_CONTEXT, &b.0)?;
                }
                if ctx.allocation_depth {
                    let mut b = Buf::default();
                    b.u32(ID_ALLOCATION_DEPTH)
                        .bytes(CONTEXT_ALLOCATION_DEPTH.as_bytes());
                    reply(s, opt, REP_META_CONTEXT, &b.0)?;
                }
                reply(s, opt, REP_ACK, &[])?;
                if set {
                    selected = Some((i, ctx));
                }
            }
            _ => reply(s, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

fn context_for(selected: Option<(usize, Contexts)>, export: usize) -> Contexts {
    match selected {
        Some((i, c)) if i == export => c,
        _ => Contexts::default(),
    }
}

/// INFO/GO payload: u32 name length, name, u16 count, u16 requests.
fn parse_info(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let mut c = Cursor::new(data);
    let n = c.u32()?;
    if n > MAX_STRING {
        return None;
    }
    let name = c.take(n as usize)?;
    let count = c.u16()?;
    let mut req = Vec::with_capacity(usize::from(count).min(c.remaining() / 2));
    for _ in 0..count {
        req.push(c.u16()?);
    }
    c.is_empty().then_some((name, req))
}

struct MetaRequest<'a> {
    export: &'a [u8],
    queries: Vec<&'a [u8]>,
}

/// META_CONTEXT payload: u32 name length, name, u32 count, {u32 length, query}...
fn parse_meta(data: &[u8]) -> Result<MetaRequest<'_>, u32> {
    let mut c = Cursor::new(data);
    let n = c.u32().ok_or(REP_ERR_INVALID)?;
    if n > MAX_STRING {
        return Err(REP_ERR_TOO_BIG);
    }
    let export = c.take(n as usize).ok_or(REP_ERR_INVALID)?;
    let count = c.u32().ok_or(REP_ERR_INVALID)?;
    if count > MAX_QUERIES {
        return Err(REP_ERR_TOO_BIG);
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let l = c.u32().ok_or(REP_ERR_INVALID)?;
        if l > MAX_STRING {
            return Err(REP_ERR_TOO_BIG);
        }
        queries.push(c.take(l as usize).ok_or(REP_ERR_INVALID)?);
    }
    if !c.is_empty() {
        return Err(REP_ERR_INVALID);
    }
    Ok(MetaRequest { export, queries })
}

/// Which of our contexts the queries name. An empty list means "all" for LIST and "none" for
/// SET; a bare namespace (`base:`) matches its contexts in LIST only. Unknown queries are
/// ignored, as the specification asks.
fn match_queries(queries: &[&[u8]], set: bool) -> Contexts {
    let mut c = Contexts::default();
    if queries.is_empty() {
        if !set {
            c.base_allocation = true;
            c.allocation_depth = true;
        }
        return c;
    }
    for q in queries {
        match *q {
            b"base:allocation" => c.base_allocation = true,
            b"qemu:allocation-depth" => c.allocation_depth = true,
            b"base:" if !set => c.base_allocation = true,
            b"qemu:" if !set => c.allocation_depth = true,
            _ => {}
        }
    }
    c
}
