//! What the server serves: exports (a named image) and the server-wide policies.

use std::sync::Arc;

use diskkit::DiskImage;

use crate::proto::*;

/// One named image offered by the server.
#[derive(Debug, Clone)]
pub struct Export {
    /// The export name clients select (`nbd://host/NAME`); may be empty.
    pub name: String,
    /// Free text sent with `NBD_INFO_DESCRIPTION` and in export lists.
    pub description: Option<String>,
    /// The image, shared by every connection.
    pub image: Arc<DiskImage>,
    /// Refuse writes (also implied by an image opened read-only).
    pub read_only: bool,
}

impl Export {
    /// An export of `image` under `name`.
    pub fn new(name: impl Into<String>, image: Arc<DiskImage>) -> Export {
        let read_only = !image.open_mode().is_writable();
        Export {
            name: name.into(),
            description: None,
            image,
            read_only,
        }
    }

    /// Whether clients may change the image.
    pub fn writable(&self) -> bool {
        !self.read_only && self.image.open_mode().is_writable()
    }

    /// The transmission flags for this export; `structured` says whether structured replies
    /// were negotiated (DF needs them); `multi_conn` whether several clients may connect.
    pub fn transmission_flags(&self, structured: bool, multi_conn: bool) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE;
        if self.writable() {
            f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        } else {
            f |= TF_READ_ONLY;
        }
        if structured {
            f |= TF_SEND_DF;
        }
        if multi_conn {
            f |= TF_CAN_MULTI_CONN;
        }
        f
    }
}

/// When FLUSH and FUA make data durable (Virtualization.framework's synchronization mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// FLUSH and FUA are durable, and a connection's end is too (VZ sends no FLUSH).
    #[default]
    Full,
    /// FLUSH and FUA are durable.
    Fsync,
    /// FLUSH and FUA are acknowledged without a durable sync (data reaches the image file;
    /// it is synced only when the server stops).
    None,
}

/// How writes use the host's cache (Virtualization.framework's caching mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Writes go to the page cache; FLUSH/FUA make them durable.
    #[default]
    Writeback,
    /// Write-through: every write, trim and zeroing is made durable before it is acknowledged
    /// (unless the sync mode is `None`).
    None,
}

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The exports; an empty export name from a client selects the first one.
    pub exports: Vec<Export>,
    /// Durability of FLUSH/FUA/disconnect.
    pub sync: SyncMode,
    /// Write-through or write-back.
    pub cache: CacheMode,
    /// Most clients connected at once (`--shared`); more than one advertises CAN_MULTI_CONN.
    pub max_connections: usize,
    /// Worker threads per connection executing requests (0 = in the reading thread).
    pub workers: usize,
    /// TLS, if offered (`NBD_OPT_STARTTLS`).
    pub tls: Option<crate::tls::TlsSettings>,
    /// Print connection events and errors on stderr.
    pub verbose: bool,
    /// Also print one line per request on stderr (for debugging clients).
    pub trace: bool,
}

impl ServerConfig {
    /// A configuration serving `exports` with the defaults: sync full, write-back, 16 clients,
    /// 4 workers per connection.
    pub fn new(exports: Vec<Export>) -> ServerConfig {
        ServerConfig {
            exports,
            sync: SyncMode::Full,
            cache: CacheMode::Writeback,
            max_connections: 16,
            workers: 4,
            tls: None,
            verbose: false,
            trace: false,
        }
    }

    /// Whether CAN_MULTI_CONN is advertised: every connection shares the one image, whose
    /// flush covers every completed write, so this only depends on more than one client
    /// being allowed.
    pub fn multi_conn(&self) -> bool {
        self.max_connections > 1
    }

    /// Find an export by name; the empty name selects the first export.
    pub(crate) fn find(&self, name: &[u8]) -> Option<usize> {
        if let Some(i) = self.exports.iter().position(|e| e.name.as_bytes() == name) {
            return Some(i);
        }
        if name.is_empty() && !self.exports.is_empty() {
            return Some(0);
        }
        None
    }
}
