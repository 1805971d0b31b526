//! Listening, accepting and running connections; orderly shutdown.
//!
//! One thread per connection does the handshake and then reads requests; a few worker
//! threads per connection execute them (see [`crate::transmission`]). On shutdown the server
//! stops accepting, shuts the reading side of every connection (so in-flight requests finish
//! and are answered), joins the connections and flushes every writable image.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::export::{ServerConfig, SyncMode};
use crate::handshake::{greet, negotiate, Outcome, TlsState};
use crate::{tls, transmission};

/// How long a client may take to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A Unix domain socket at this path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

/// A connected client socket.
#[derive(Debug)]
pub enum Stream {
    /// Unix domain socket.
    Unix(UnixStream),
    /// TCP socket.
    Tcp(TcpStream),
}

impl Stream {
    /// Another handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Shut down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    /// Set the read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// Connect to `address` (used by tests and to wake the accepting thread).
    pub fn connect(address: &Address) -> io::Result<Stream> {
        Ok(match address {
            Address::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
            Address::Tcp(a) => Stream::Tcp(TcpStream::connect(a)?),
        })
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

struct State {
    stopping: AtomicBool,
    conns: Mutex<HashMap<u64, Stream>>,
    /// Connections being served; the accepting thread waits while `--shared` are.
    active: Mutex<usize>,
    slot_freed: Condvar,
    wake: Address,
    /// Another handle to the listening socket, shut down to wake the accepting thread.
    listener: Option<std::os::fd::OwnedFd>,
}

impl State {
    fn release_slot(&self) {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        *active = active.saturating_sub(1);
        self.slot_freed.notify_all();
    }
}

/// Stops a running [`Server`] from another thread (a signal handler thread).
#[derive(Clone)]
pub struct ShutdownHandle {
    state: Arc<State>,
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle").finish_non_exhaustive()
    }
}

impl ShutdownHandle {
    /// Stop accepting, let in-flight requests finish, then end every connection.
    pub fn shutdown(&self) {
        self.state.stopping.store(true, Ordering::SeqCst);
        self.state.slot_freed.notify_all();
        // Wake the accepting thread; it sees `stopping` and leaves its loop. Shutting the
        // listening socket down makes a blocked accept() fail at once (Linux); connecting to
        // it is the fallback (it only works while the socket path still leads to it).
        if let Some(l) = &self.state.listener {
            let _ = rustix::net::shutdown(l, rustix::net::Shutdown::Read);
        }
        let wake = match &self.state.wake {
            Address::Tcp(a) if a.ip().is_unspecified() => {
                let ip: std::net::IpAddr = if a.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                };
                Address::Tcp(SocketAddr::new(ip, a.port()))
            }
            other => other.clone(),
        };
        let _ = Stream::connect(&wake);
        let conns = self.state.conns.lock().unwrap_or_else(|e| e.into_inner());
        for s in conns.values() {
            let _ = s.shutdown(Shutdown::Read);
        }
    }
}

/// An NBD server bound to an address.
pub struct Server {
    config: Arc<ServerConfig>,
    listener: Listener,
    address: Address,
    state: Arc<State>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Bind to `address`. A Unix socket path that exists is replaced only if it is a socket
    /// nobody listens on (left over by a killed server).
    pub fn bind(address: &Address, config: ServerConfig) -> io::Result<Server> {
        if config.exports.is_empty() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "no exports to serve"));
        }
        let (listener, address) = match address {
            Address::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot listen on {}: {e}", path.display()))
                })?;
                (Listener::Unix(l, path.clone()), Address::Unix(path.clone()))
            }
            Address::Tcp(a) => {
                let l = TcpListener::bind(a)
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {a}: {e}")))?;
                let local = l.local_addr()?;
                (Listener::Tcp(l), Address::Tcp(local))
            }
        };
        let listener_fd = match &listener {
            Listener::Unix(l, _) => l.try_clone().ok().map(std::os::fd::OwnedFd::from),
            Listener::Tcp(l) => l.try_clone().ok().map(std::os::fd::OwnedFd::from),
        };
        let state = Arc::new(State {
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            active: Mutex::new(0),
            slot_freed: Condvar::new(),
            wake: address.clone(),
            listener: listener_fd,
        });
        Ok(Server {
            config: Arc::new(config),
            listener,
            address,
            state,
        })
    }

    /// The address actually bound (with the port chosen by the system for port 0).
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            state: self.state.clone(),
        }
    }

    /// Accept and serve clients until [`ShutdownHandle::shutdown`] is called; then wait for
    /// every connection to finish and flush the images.
    pub fn run(self) -> io::Result<()> {
        let next_id = AtomicU64::new(0);
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        loop {
            // At the connection limit, stop accepting until a client leaves (new clients
            // wait in the listen queue instead of being dropped).
            {
                let mut active = self.state.active.lock().unwrap_or_else(|e| e.into_inner());
                while *active >= self.config.max_connections && !self.state.stopping.load(Ordering::SeqCst) {
                    active = self
                        .state
                        .slot_freed
                        .wait_timeout(active, Duration::from_millis(200))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
            if self.state.stopping.load(Ordering::SeqCst) {
                break;
            }
            let accepted = match &self.listener {
                Listener::Unix(l, _) => l.accept().map(|(s, _)| (Stream::Unix(s), None)),
                Listener::Tcp(l) => l.accept().map(|(s, peer)| {
                    let _ = s.set_nodelay(true);
                    (Stream::Tcp(s), Some(peer))
                }),
            };
            if self.state.stopping.load(Ordering::SeqCst) {
                break;
            }
            let stream = match accepted {
                Ok((s, peer)) => {
                    let id = next_id.load(Ordering::Relaxed);
                    match peer {
                        Some(p) => self.log(format_args!("connection {id}: from {p}")),
                        None => self.log(format_args!("connection {id}: on the Unix socket")),
                    }
                    s
                }
                Err(e) => {
                    self.log(format_args!("accept failed: {e}"));
                    // Out of descriptors or similar: do not spin.
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            };
            threads.retain(|t| !t.is_finished());
            *self.state.active.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            if let Ok(clone) = stream.try_clone() {
                self.state
                    .conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, clone);
            }
            let config = self.config.clone();
            let state = self.state.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-conn-{id}"))
                .spawn(move || {
                    if let Err(e) = handle_connection(stream, &config, id) {
                        if config.verbose {
                            let _ = writeln!(io::stderr(), "diskkit serve: connection {id}: {e}");
                        }
                    }
                    state.conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                    state.release_slot();
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.log(format_args!("cannot start a connection thread: {e}"));
                    self.state
                        .conns
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    self.state.release_slot();
                }
            }
        }
        for t in threads {
            let _ = t.join();
        }
        let mut result = Ok(());
        for e in self.config.exports.iter().filter(|e| e.writable()) {
            if let Err(err) = e.image.flush() {
                result = Err(io::Error::other(format!("flushing export '{}': {err}", e.name)));
            }
        }
        result
    }

    fn log(&self, args: std::fmt::Arguments<'_>) {
        if self.config.verbose {
            let _ = writeln!(io::stderr(), "diskkit serve: {args}");
        }
    }
}

fn remove_stale_socket(path: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by another server", path.display()),
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(_) => Ok(()),
    }
}

/// Handshake, then transmission, for one client.
fn handle_connection(mut stream: Stream, config: &ServerConfig, id: u64) -> io::Result<()> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let Some(mut haggle) = greet(&mut stream)? else {
        return Ok(());
    };
    let mut tls_state = TlsState {
        offered: config.tls.is_some(),
        required: config.tls.as_ref().is_some_and(|t| t.required),
        active: false,
    };
    let session = match negotiate(&mut stream, config, &mut haggle, tls_state)? {
        Outcome::Transmission(s) => s,
        Outcome::Closed => return Ok(()),
        Outcome::StartTls => {
            let Some(settings) = &config.tls else {
                return Ok(());
            };
            let mut tls = tls::accept(settings, stream)?;
            tls_state.active = true;
            // Options negotiated before STARTTLS are forgotten: haggling starts afresh.
            let session = match negotiate(&mut tls, config, &mut haggle, tls_state)? {
                Outcome::Transmission(s) => s,
                Outcome::StartTls | Outcome::Closed => return Ok(()),
            };
            log_session(config, id, session, true);
            tls.sock.set_read_timeout(None)?;
            let killer = tls.sock.try_clone()?;
            let kill = move || {
                let _ = killer.shutdown(Shutdown::Both);
            };
            let (reader, writer) = tls::split(tls)?;
            let result = transmission::serve(reader, writer, config, session, id, &kill);
            return end_session(config, session.export, id, result);
        }
    };
    log_session(config, id, session, false);
    stream.set_read_timeout(None)?;
    let reader = stream.try_clone()?;
    let killer = stream.try_clone()?;
    let kill = move || {
        let _ = killer.shutdown(Shutdown::Both);
    };
    let result = transmission::serve(reader, stream, config, session, id, &kill);
    end_session(config, session.export, id, result)
}

fn log_session(config: &ServerConfig, id: u64, session: crate::handshake::Session, tls: bool) {
    if config.verbose {
        let e = &config.exports[session.export];
        let mut features = Vec::new();
        if session.structured {
            features.push("structured replies");
        }
        if session.contexts.base_allocation {
            features.push("base:allocation");
        }
        if session.contexts.allocation_depth {
            features.push("qemu:allocation-depth");
        }
        if tls {
            features.push("TLS");
        }
        let features = if features.is_empty() {
            "simple replies".to_owned()
        } else {
            features.join(", ")
        };
        let _ = writeln!(
            io::stderr(),
            "diskkit serve: connection {id}: using export '{}' ({}; {features})",
            e.name,
            if e.writable() { "read-write" } else { "read-only" },
        );
    }
}

fn end_session(
    config: &ServerConfig,
    export: usize,
    id: u64,
    result: io::Result<transmission::End>,
) -> io::Result<()> {
    finish_session(config, export);
    if config.verbose {
        let _ = writeln!(io::stderr(), "diskkit serve: connection {id}: closed");
    }
    result.map(|_| ())
}

/// `--sync full`: a client's data is durable when it goes away, FLUSH or not.
fn finish_session(config: &ServerConfig, export: usize) {
    let e = &config.exports[export];
    if config.sync == SyncMode::Full && e.writable() {
        if let Err(err) = e.image.flush() {
            if config.verbose {
                let _ = writeln!(io::stderr(), "diskkit serve: flushing '{}': {err}", e.name);
            }
        }
    }
}
