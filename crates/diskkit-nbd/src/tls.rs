//! TLS via `NBD_OPT_STARTTLS` (rustls, X.509 server certificates).
//!
//! During haggling the connection is a plain `rustls::StreamOwned`. For the transmission
//! phase it is split: the reading thread feeds bytes from the socket into the shared
//! `ServerConnection` and takes plaintext out; the writer encrypts a whole reply under the
//! output lock and writes the records to the socket, so records leave in the order they were
//! made.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConnection;

use crate::server::Stream;

/// TLS settings of a server.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The rustls configuration (certificate chain and key).
    pub config: Arc<rustls::ServerConfig>,
    /// Refuse every option but STARTTLS and ABORT until TLS is active (`--tls require`).
    pub required: bool,
}

impl TlsSettings {
    /// Load a PEM certificate chain and private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(cert: &Path, key: &Path, required: bool) -> io::Result<TlsSettings> {
        let ctx = |what: &str, p: &Path, e: &dyn std::fmt::Display| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{what} {}: {e}", p.display()))
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| ctx("cannot read certificates from", cert, &e))?
            .collect::<Result<_, _>>()
            .map_err(|e| ctx("bad certificate in", cert, &e))?;
        if certs.is_empty() {
            return Err(ctx("no certificate in", cert, &"empty"));
        }
        let key =
            PrivateKeyDer::from_pem_file(key).map_err(|e| ctx("cannot read private key from", key, &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("TLS configuration: {e}")))?;
        Ok(TlsSettings {
            config: Arc::new(config),
            required,
        })
    }
}

/// Run the TLS handshake on `sock` (after STARTTLS was acknowledged).
pub(crate) fn accept(
    settings: &TlsSettings,
    sock: Stream,
) -> io::Result<rustls::StreamOwned<ServerConnection, Stream>> {
    let conn = ServerConnection::new(settings.config.clone()).map_err(io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        let (rd, wr) = s.conn.complete_io(&mut s.sock)?;
        if rd == 0 && wr == 0 && s.conn.is_handshaking() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(s)
}

struct Shared {
    conn: Mutex<ServerConnection>,
    out: Mutex<Stream>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The reading half of a TLS connection.
pub(crate) struct TlsReader {
    shared: Arc<Shared>,
    sock: Stream,
    pending: Vec<u8>,
    raw: Box<[u8]>,
}

/// The writing half of a TLS connection.
pub(crate) struct TlsWriter {
    shared: Arc<Shared>,
}

/// Split an established TLS stream for the transmission phase.
pub(crate) fn split(s: rustls::StreamOwned<ServerConnection, Stream>) -> io::Result<(TlsReader, TlsWriter)> {
    let rustls::StreamOwned { mut conn, sock } = s;
    conn.set_buffer_limit(None);
    let reader_sock = sock.try_clone()?;
    let shared = Arc::new(Shared {
        conn: Mutex::new(conn),
        out: Mutex::new(sock),
    });
    Ok((
        TlsReader {
            shared: shared.clone(),
            sock: reader_sock,
            pending: Vec::new(),
            raw: vec![0u8; 64 * 1024].into_boxed_slice(),
        },
        TlsWriter { shared },
    ))
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            {
                let mut c = lock(&self.shared.conn);
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if !self.pending.is_empty() {
                    let mut rd = &self.pending[..];
                    let n = c.read_tls(&mut rd)?;
                    self.pending.drain(..n);
                    c.process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    continue;
                }
            }
            let n = self.sock.read(&mut self.raw)?;
            if n == 0 {
                return Ok(0);
            }
            self.pending.extend_from_slice(&self.raw[..n]);
        }
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = lock(&self.shared.out);
        let mut records = Vec::with_capacity(buf.len() + 1024);
        {
            let mut c = lock(&self.shared.conn);
            let mut done = 0;
            while done < buf.len() {
                let n = c.writer().write(&buf[done..])?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                done += n;
                while c.wants_write() {
                    c.write_tls(&mut records)?;
                }
            }
        }
        out.write_all(&records)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
