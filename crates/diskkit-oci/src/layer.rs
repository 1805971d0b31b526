//! Reading one layer: digest check, decompression by magic, diff_id check, tar entries.

use std::io::Read;
use std::rc::Rc;

use diskkit::{Error, ErrorKind, Result};
use diskkit_ext4::writer::{Metadata, Timestamp};
use tar::EntryType;

use crate::decode::{Decoded, Digests};
use crate::merge::{clean_path, Entry, EntryKind, MergedTree};
use crate::placement::Placer;

/// What the layer's blob is expected to be.
pub(crate) struct LayerInfo {
    /// Expected `sha256:` hex of the blob, if known.
    pub(crate) digest: Option<String>,
    /// Expected blob size, if known.
    pub(crate) size: Option<u64>,
    /// Expected `sha256:` hex of the uncompressed tar (diff_id), if known.
    pub(crate) diff_id: Option<String>,
    /// Media type, if known.
    pub(crate) media_type: Option<String>,
    /// Name for messages.
    pub(crate) name: String,
    /// Position in the image, from 0 (bottom).
    pub(crate) index: u32,
}

fn layer_err(info: &LayerInfo, e: Error) -> Error {
    Error::new(e.kind(), format!("layer {}", info.name)).with_source(e)
}

fn io_err(e: &std::io::Error, what: &'static str) -> Error {
    // Errors without an OS error code come from the decoders and the tar parser: bad data.
    let kind = if e.raw_os_error().is_some() {
        ErrorKind::Io
    } else {
        ErrorKind::Corrupt
    };
    Error::new(kind, format!("{what}: {e}"))
}

/// Start decoding a layer blob on its own threads (see [`crate::decode`]). The decoder runs
/// ahead by a bounded number of chunks: started while the layer before is still being
/// applied, it has the start of this one ready when that one ends.
pub(crate) fn start_layer(blob: Box<dyn Read + Send>, info: &LayerInfo) -> Result<Decoded> {
    if let Some(mt) = &info.media_type {
        if mt.contains("encrypted") {
            return Err(Error::unsupported(format!(
                "encrypted layer {} ({mt})",
                info.name
            )));
        }
    }
    let checked = info.digest.is_some() || info.diff_id.is_some();
    Decoded::spawn(blob, None, checked)
        .map_err(|e| layer_err(info, io_err(&e, "starting the decoder thread")))
}

/// Read one layer (started with [`start_layer`]) into `tree`, placing file data in the output
/// image. Entries are merged as they are parsed, in archive order (whiteout semantics in
/// [`crate::merge`]), and every digest that is known is verified at the end of the layer. A
/// failure anywhere fails the whole unpack, so merging before the digests are checked cannot
/// leave a wrong tree behind; when the merge fails, the digests are still checked first, so a
/// damaged layer is reported as such.
pub(crate) fn apply_layer(
    decoded: Decoded,
    info: &LayerInfo,
    tree: &mut MergedTree,
    placer: &mut Placer<'_>,
    progress: Option<Rc<dyn Fn(u64)>>,
) -> Result<Digests> {
    decoded.set_progress(progress);
    let data = decoded.external();
    let mut archive = tar::Archive::new(decoded);
    tree.begin_layer(info.index);
    let merge_failed = read_entries(&mut archive, &data, placer, tree).map_err(|e| layer_err(info, e))?;
    // Read to the end (end-of-archive padding) so the digests cover the whole stream.
    let digests = archive
        .into_inner()
        .finish()
        .map_err(|e| layer_err(info, io_err(&e, "reading past the end of the archive")))?;
    if let Some(want) = &info.diff_id {
        let got = format!("sha256:{}", digests.diff);
        if &got != want {
            return Err(Error::corrupt(format!(
                "layer {}: diff_id mismatch: config says {want}, content is {got}",
                info.name
            )));
        }
    }
    if let Some(want) = &info.digest {
        let got = format!("sha256:{}", digests.blob);
        if &got != want {
            return Err(Error::corrupt(format!(
                "layer {}: digest mismatch: expected {want}, blob is {got}",
                info.name
            )));
        }
    }
    if let Some(size) = info.size {
        if digests.blob_bytes != size {
            return Err(Error::corrupt(format!(
                "layer {}: size mismatch: expected {size} bytes, blob has {}",
                info.name, digests.blob_bytes
            )));
        }
    }
    if let Some(e) = merge_failed {
        return Err(e);
    }
    // What this layer deleted or replaced gives its blocks back.
    placer.release_unreachable(&tree.live_contents())?;
    Ok(digests)
}

/// Parse a PAX time (`-12.5`, `1700000000.123456789`).
fn pax_time(v: &[u8]) -> Option<Timestamp> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = int.parse().ok()?;
    let mut nanos: u32 = 0;
    for (i, c) in frac.bytes().take(9).enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        nanos += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
    }
    Some(if neg {
        if nanos == 0 {
            Timestamp {
                secs: -secs,
                nanos: 0,
            }
        } else {
            Timestamp {
                secs: -secs - 1,
                nanos: 1_000_000_000 - nanos,
            }
        }
    } else {
        Timestamp { secs, nanos }
    })
}

fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s: Vec<u8> = s
        .iter()
        .copied()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | val(c)?;
        }
        acc <<= 6 * (4 - chunk.len() as u32);
        let bytes = acc.to_be_bytes();
        let n = match chunk.len() {
            4 => 3,
            3 => 2,
            2 => 1,
            _ => return None,
        };
        out.extend_from_slice(&bytes[1..1 + n]);
    }
    Some(out)
}

fn url_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' && i + 2 < s.len() {
            if let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(&s[i + 1..i + 3]), 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// Permission bits (`rwxrwxrwx`) an access ACL in the user-space format implies.
fn acl_mode(v: &[u8]) -> Option<u16> {
    if v.len() < 4 || (v.len() - 4) % 8 != 0 || v[..4] != [2, 0, 0, 0] {
        return None;
    }
    let (mut user, mut group, mut mask, mut other) = (None, None, None, None);
    for e in v[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]) & 7;
        match tag {
            0x01 => user = Some(perm),
            0x04 => group = Some(perm),
            0x10 => mask = Some(perm),
            0x20 => other = Some(perm),
            _ => {}
        }
    }
    Some((user? << 6) | (mask.or(group)? << 3) | other?)
}

/// Xattrs that describe the overlay of the machine that built the layer, not the file.
fn dropped_xattr(name: &[u8]) -> bool {
    name.starts_with(b"trusted.overlay.") || name.starts_with(b"user.overlay.")
}

/// overlayfs marks an opaque directory with this xattr (`user.` with `userxattr` mounts);
/// layers tarred straight from an overlay upper directory carry it.
fn overlay_opaque(name: &[u8], value: &[u8]) -> bool {
    (name == b"trusted.overlay.opaque" || name == b"user.overlay.opaque") && value == b"y"
}

/// What a whiteout entry made from an overlay-style one is (only its name matters).
const WHITEOUT_ENTRY: EntryKind = EntryKind::File { size: 0, content: 0 };

/// Overlay-style whiteouts, as a layer tarred from an overlay upper directory holds them,
/// turned into OCI ones: a character device 0:0 deletes its name (it becomes `.wh.NAME`),
/// and a directory with `trusted.overlay.opaque=y` (or `user.overlay.opaque=y`) is followed
/// by its `.wh..wh..opq` marker. A real 0:0 device ("no device") has no use in a root
/// filesystem, so the conversion is unconditional.
fn overlay_whiteout(path: &[Vec<u8>], kind: &EntryKind, opaque: bool) -> Option<Vec<Vec<u8>>> {
    let mut out = path.to_vec();
    match kind {
        EntryKind::Char(0, 0) => {
            let name = out.pop()?;
            out.push([crate::merge::WHITEOUT, &name].concat());
        }
        EntryKind::Dir if opaque => out.push(crate::merge::OPAQUE.to_vec()),
        _ => return None,
    }
    Some(out)
}

/// Parse the entries and merge them into `tree`; regular files' data goes from `data` (the
/// stream's external handle) straight to the image. A parse error is returned as the error;
/// a merge error stops the parsing and is returned inside `Ok`.
fn read_entries(
    archive: &mut tar::Archive<Decoded>,
    data: &Decoded,
    placer: &mut Placer<'_>,
    tree: &mut MergedTree,
) -> Result<Option<Error>> {
    let mut out = Vec::new();
    let iter = archive
        .entries_with_seek()
        .map_err(|e| io_err(&e, "reading the tar archive"))?;
    for entry in iter {
        let mut entry = entry.map_err(|e| io_err(&e, "reading a tar header"))?;
        let etype = entry.header().entry_type();
        if matches!(
            etype,
            EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink
        ) {
            continue;
        }
        let raw_path = entry.path_bytes().into_owned();
        let name = String::from_utf8_lossy(&raw_path).into_owned();
        let bad = |what: &str| Error::corrupt(format!("tar entry {name}: {what}"));
        let hdr = entry.header();
        let mode = (hdr.mode().map_err(|_| bad("bad mode"))? & 0o7777) as u16;
        let uid = u32::try_from(hdr.uid().map_err(|_| bad("bad uid"))?).map_err(|_| bad("uid too large"))?;
        let gid = u32::try_from(hdr.gid().map_err(|_| bad("bad gid"))?).map_err(|_| bad("gid too large"))?;
        let mtime_raw = hdr.mtime().unwrap_or(0);
        let mut mtime = Timestamp {
            secs: i64::try_from(mtime_raw).unwrap_or(0),
            nanos: 0,
        };
        let mut atime = None;
        let mut ctime = None;
        let mut xattrs = Vec::new();
        let mut opaque = false;
        let mut sparse = SparseInfo::default();
        let device = (
            hdr.device_major().ok().flatten().unwrap_or(0),
            hdr.device_minor().ok().flatten().unwrap_or(0),
        );
        if let Some(pax) = entry
            .pax_extensions()
            .map_err(|e| io_err(&e, "reading PAX headers"))?
        {
            for ext in pax {
                let ext = ext.map_err(|e| io_err(&e, "reading PAX headers"))?;
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                if key == b"mtime" {
                    mtime = pax_time(value).ok_or_else(|| bad("bad PAX mtime"))?;
                } else if key == b"atime" {
                    atime = pax_time(value);
                } else if key == b"ctime" {
                    ctime = pax_time(value);
                } else if let Some(n) = key.strip_prefix(b"SCHILY.xattr.") {
                    opaque |= overlay_opaque(n, value);
                    if !dropped_xattr(n) {
                        xattrs.push((n.to_vec(), value.to_vec()));
                    }
                } else if let Some(n) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
                    let n = url_decode(n);
                    let v = base64_decode(value).ok_or_else(|| bad("bad base64 xattr value"))?;
                    opaque |= overlay_opaque(&n, &v);
                    if !dropped_xattr(&n) {
                        xattrs.push((n, v));
                    }
                } else if let Some(k) = key.strip_prefix(b"GNU.sparse.") {
                    sparse.record(k, value).map_err(|m| bad(&m))?;
                }
            }
        }
        // Setting an access ACL sets the permission bits from it (as setxattr does): owner
        // from USER_OBJ, group from MASK (or GROUP_OBJ), other from OTHER.
        let mode = xattrs
            .iter()
            .find(|(n, _)| n.as_slice() == b"system.posix_acl_access")
            .and_then(|(_, v)| acl_mode(v))
            .map_or(mode, |rwx| (mode & 0o7000) | rwx);
        let meta = Metadata {
            mode,
            uid,
            gid,
            mtime,
            atime: atime.unwrap_or(mtime),
            ctime: ctime.unwrap_or(mtime),
            xattrs,
        };
        let path = clean_path(sparse.name.as_deref().unwrap_or(&raw_path));
        let kind = match etype {
            EntryType::Regular | EntryType::Continuous if sparse.is_sparse() => {
                let stored = entry.size();
                let (chunks, real) = sparse.map(&mut entry, stored).map_err(|m| bad(&m))?;
                let content = placer
                    .place_sparse(&mut entry, &chunks, real)
                    .map_err(|e| Error::new(e.kind(), format!("tar entry {name}")).with_source(e))?;
                EntryKind::File { size: real, content }
            }
            EntryType::Regular | EntryType::Continuous => {
                let size = entry.size();
                let content = placer
                    .place_from(data, size)
                    .map_err(|e| Error::new(e.kind(), format!("tar entry {name}")).with_source(e))?;
                EntryKind::File { size, content }
            }
            EntryType::GNUSparse => {
                // Old GNU sparse: the parser fills the holes with zeroes as it reads.
                let size = entry.size();
                let content = placer
                    .place(&mut entry, size)
                    .map_err(|e| Error::new(e.kind(), format!("tar entry {name}")).with_source(e))?;
                EntryKind::File { size, content }
            }
            EntryType::Directory => EntryKind::Dir,
            EntryType::Symlink => {
                let t = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad("symlink without a target"))?;
                EntryKind::Symlink(t.into_owned())
            }
            EntryType::Link => {
                let t = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad("hard link without a target"))?;
                EntryKind::HardLink(clean_path(&t))
            }
            EntryType::Char => EntryKind::Char(device.0, device.1),
            EntryType::Block => EntryKind::Block(device.0, device.1),
            EntryType::Fifo => EntryKind::Fifo,
            _ => continue, // volume labels, sockets and other types carry no file
        };
        match overlay_whiteout(&path, &kind, opaque) {
            Some(wh) if kind == EntryKind::Dir => {
                out.push(Entry {
                    path,
                    kind,
                    meta: meta.clone(),
                });
                out.push(Entry {
                    path: wh,
                    kind: WHITEOUT_ENTRY,
                    meta,
                });
            }
            Some(wh) => out.push(Entry {
                path: wh,
                kind: WHITEOUT_ENTRY,
                meta,
            }),
            None => out.push(Entry { path, kind, meta }),
        }
        for e in out.drain(..) {
            if let Err(e) = tree.apply(e) {
                return Ok(Some(e));
            }
        }
    }
    Ok(None)
}

/// Most entries accepted in a sparse map.
const MAX_SPARSE_CHUNKS: u64 = 1 << 20;

/// PAX sparse-file records (GNU formats 0.0, 0.1 and 1.0).
#[derive(Debug, Default)]
struct SparseInfo {
    major: Option<u64>,
    name: Option<Vec<u8>>,
    real_size: Option<u64>,
    /// 0.0/0.1 map (offset, length).
    map: Vec<(u64, u64)>,
    pending_offset: Option<u64>,
}

fn num(v: &[u8]) -> Result<u64, String> {
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("bad number {:?} in a sparse header", String::from_utf8_lossy(v)))
}

impl SparseInfo {
    fn record(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        match key {
            b"major" => self.major = Some(num(value)?),
            b"minor" => {}
            b"name" => self.name = Some(value.to_vec()),
            b"realsize" | b"size" => self.real_size = Some(num(value)?),
            b"numblocks" => {}
            b"offset" => self.pending_offset = Some(num(value)?),
            b"numbytes" => {
                let off = self
                    .pending_offset
                    .take()
                    .ok_or("sparse numbytes without offset")?;
                self.push(off, num(value)?)?;
            }
            b"map" => {
                let nums: Vec<u64> = value
                    .split(|&c| c == b',')
                    .filter(|p| !p.is_empty())
                    .map(num)
                    .collect::<Result<_, _>>()?;
                if nums.len() % 2 != 0 {
                    return Err("odd number of values in GNU.sparse.map".into());
                }
                for p in nums.chunks(2) {
                    self.push(p[0], p[1])?;
                }
            }
            _ => {
                return Err(format!(
                    "unknown sparse record GNU.sparse.{}",
                    String::from_utf8_lossy(key)
                ))
            }
        }
        Ok(())
    }

    fn push(&mut self, off: u64, len: u64) -> Result<(), String> {
        if self.map.len() as u64 >= MAX_SPARSE_CHUNKS {
            return Err("sparse map too large".into());
        }
        self.map.push((off, len));
        Ok(())
    }

    fn is_sparse(&self) -> bool {
        self.real_size.is_some() || self.major.is_some() || !self.map.is_empty()
    }

    /// The chunk map and the real size; for format 1.0 the map is read from the data.
    fn map(&mut self, data: &mut dyn Read, stored: u64) -> Result<(Vec<(u64, u64)>, u64), String> {
        let real = self.real_size.ok_or("sparse file without a real size")?;
        let mut consumed = 0u64;
        let map = if self.major == Some(1) {
            let mut read_num = |consumed: &mut u64| -> Result<u64, String> {
                let mut v: u64 = 0;
                let mut digits = 0;
                loop {
                    let mut b = [0u8; 1];
                    data.read_exact(&mut b).map_err(|_| "truncated sparse map")?;
                    *consumed += 1;
                    match b[0] {
                        b'\n' if digits > 0 => return Ok(v),
                        c @ b'0'..=b'9' if digits < 20 => {
                            v = v
                                .checked_mul(10)
                                .and_then(|v| v.checked_add(u64::from(c - b'0')))
                                .ok_or("sparse map number overflows")?;
                            digits += 1;
                        }
                        _ => return Err("malformed sparse map".into()),
                    }
                }
            };
            let n = read_num(&mut consumed)?;
            if n > MAX_SPARSE_CHUNKS {
                return Err("sparse map too large".into());
            }
            let mut map = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let off = read_num(&mut consumed)?;
                let len = read_num(&mut consumed)?;
                map.push((off, len));
            }
            let pad = consumed.next_multiple_of(512) - consumed;
            std::io::copy(&mut data.take(pad), &mut std::io::sink()).map_err(|_| "truncated sparse map")?;
            consumed += pad;
            map
        } else {
            std::mem::take(&mut self.map)
        };
        let data_bytes: u64 = map
            .iter()
            .try_fold(0u64, |a, &(_, n)| a.checked_add(n))
            .ok_or("sparse map overflows")?;
        if consumed.checked_add(data_bytes) != Some(stored) {
            return Err(format!(
                "sparse map describes {data_bytes} bytes but the entry stores {}",
                stored.saturating_sub(consumed)
            ));
        }
        Ok((map, real))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_times() {
        assert_eq!(
            pax_time(b"12.5"),
            Some(Timestamp {
                secs: 12,
                nanos: 500_000_000
            })
        );
        assert_eq!(
            pax_time(b"-1.25"),
            Some(Timestamp {
                secs: -2,
                nanos: 750_000_000
            })
        );
        assert_eq!(pax_time(b"-100"), Some(Timestamp { secs: -100, nanos: 0 }));
        assert_eq!(pax_time(b"x"), None);
    }

    #[test]
    fn acl_sets_permission_bits() {
        let mut v = vec![2, 0, 0, 0];
        for (t, p) in [(1u16, 6u16), (4, 4), (0x10, 5), (0x20, 0)] {
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&p.to_le_bytes());
            v.extend_from_slice(&[0; 4]);
        }
        assert_eq!(acl_mode(&v), Some(0o650));
        assert_eq!(acl_mode(b"junk"), None);
    }

    #[test]
    fn decoders() {
        assert_eq!(base64_decode(b"aGVsbG8=").unwrap(), b"hello");
        assert_eq!(url_decode(b"user.a%3Db"), b"user.a=b");
    }
}
