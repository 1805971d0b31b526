//! Running QEMU: its output and the guest channel, signals, the timeout, SSH, and the exit
//! status.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::guest::{self, Status};
use super::qemu::{Console, VmSpec};
use super::rundir::RunDir;
use super::ssh::Ssh;

/// How long the guest may take to come up when `--timeout` is not given (COMMAND and --ssh).
const DEFAULT_COME_UP: Duration = Duration::from_secs(600);
/// How long a guest keeping a --persist overlay may take to power off after the command.
const POWEROFF_GRACE: Duration = Duration::from_secs(120);
/// How long QEMU may take to exit after SIGTERM before it is killed.
const QEMU_TERM_GRACE: Duration = Duration::from_secs(5);
/// Longest status line read from the guest.
const STATUS_LINE: u64 = 256;
/// Bytes of console output and of QEMU's stderr kept for error messages.
const TAIL: usize = 64 << 10;

/// What is launched.
pub(super) struct Launch<'a> {
    pub(super) qemu: &'a Path,
    pub(super) args: Vec<OsString>,
    pub(super) run: &'a RunDir,
    pub(super) spec: &'a VmSpec,
    pub(super) command: &'a [String],
    pub(super) ssh: Option<&'a Ssh>,
    pub(super) persist: bool,
    pub(super) timeout: Option<Duration>,
    pub(super) console_log: Option<&'a Path>,
    pub(super) verbose: bool,
    pub(super) start: Instant,
}

/// Things the threads report to the main loop.
enum Event {
    Status(Status),
    SshReady,
    Signal(i32),
}

/// The last bytes of a stream.
#[derive(Default)]
struct Tail(VecDeque<u8>);

impl Tail {
    fn push(&mut self, b: &[u8]) {
        self.0.extend(b);
        let excess = self.0.len().saturating_sub(TAIL);
        self.0.drain(..excess);
    }

    /// The last `n` lines, control characters (colour codes) removed.
    fn lines(&self, n: usize) -> Vec<String> {
        let bytes: Vec<u8> = self.0.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let mut clean = String::with_capacity(text.len());
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // CSI sequences: ESC [ ... final byte.
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for d in chars.by_ref() {
                        if ('@'..='~').contains(&d) {
                            break;
                        }
                    }
                }
                continue;
            }
            if c == '\n' || c == '\t' || !c.is_control() {
                clean.push(c);
            }
        }
        let lines: Vec<&str> = clean.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| l.to_string())
            .collect()
    }
}

/// A socket QEMU connects to, served by a thread once it does.
fn listen(path: &Path) -> Result<UnixListener> {
    let l = UnixListener::bind(path).with_context(|| format!("listening on '{}'", path.display()))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Wait for QEMU's connection (or `stop`), then hand the stream to `serve`.
fn accept_then(
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    serve: impl FnOnce(UnixStream) + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || loop {
        match listener.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                serve(s);
                return;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return,
        }
    })
}

/// Copy `from` to `to` until EOF; a closed `to` (a reader that went away) discards the rest.
fn pump(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 64 << 10];
    let mut open = true;
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if open && (to.write_all(&buf[..n]).is_err() || to.flush().is_err()) {
                    open = false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The terminal's settings, restored when dropped (QEMU puts it in raw mode; a QEMU that is
/// killed cannot put it back).
struct Terminal(Option<libc::termios>);

impl Terminal {
    fn save() -> Terminal {
        let stdin = io::stdin();
        if !stdin.is_terminal() {
            return Terminal(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid descriptor.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: stdin's descriptor is open; `t` is a valid termios to fill.
        let ok = unsafe { libc::tcgetattr(stdin.as_raw_fd(), &mut t) } == 0;
        Terminal(ok.then_some(t))
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores settings read from the same descriptor.
            unsafe {
                libc::tcsetattr(io::stdin().as_raw_fd(), libc::TCSANOW, t);
            }
        }
    }
}

/// Send SIGTERM to QEMU (it exits cleanly, closing its images), SIGKILL after a grace period.
fn stop(child: &mut Child) -> Option<ExitStatus> {
    if let Ok(Some(s)) = child.try_wait() {
        return Some(s);
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill() on our own child's pid, which has not been reaped (try_wait above
        // returned None), so the pid still names it.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let until = Instant::now() + QEMU_TERM_GRACE;
    while Instant::now() < until {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().ok()
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.0}s", d.as_secs_f64())
}

/// How the run ended, before the exit status is worked out.
enum End {
    /// The command (or ssh) finished with this status.
    Command(u8),
    /// A signal asked diskkit to stop.
    Signal(i32),
    /// QEMU exited by itself.
    Qemu(ExitStatus),
    /// The guest did not come up in time.
    Timeout(Duration),
}

pub(super) fn run(l: &Launch<'_>) -> Result<u8> {
    let console_mode = matches!(l.spec.console, Console::Stdio(_));
    let command_mode = !l.command.is_empty() && l.ssh.is_none();
    let stop_flag = Arc::new(AtomicBool::new(false));
    let (tx, rx): (Sender<Event>, Receiver<Event>) = mpsc::channel();
    let console_tail = Arc::new(Mutex::new(Tail::default()));
    let mut threads: Vec<JoinHandle<()>> = Vec::new();

    // SIGPIPE on a closed stdout must not kill diskkit mid-run: writes fail instead.
    // SAFETY: SIG_IGN is a valid disposition; other threads do not change SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).context("installing signal handlers")?;
    let signal_handle = signals.handle();
    {
        let tx = tx.clone();
        threads.push(std::thread::spawn(move || {
            for s in signals.forever() {
                if tx.send(Event::Signal(s)).is_err() {
                    break;
                }
            }
        }));
    }

    // Sockets QEMU connects to, bound before it starts.
    if let Console::Socket(path) = &l.spec.console {
        let listener = listen(path)?;
        let tail = console_tail.clone();
        let mut log = match l.console_log {
            Some(p) => Some(File::create(p).with_context(|| format!("creating '{}'", p.display()))?),
            None => None,
        };
        threads.push(accept_then(listener, stop_flag.clone(), move |s| {
            let mut s = s;
            let mut buf = vec![0u8; 16 << 10];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        tail.lock().unwrap_or_else(|e| e.into_inner()).push(&buf[..n]);
                        if let Some(f) = &mut log {
                            let _ = f.write_all(&buf[..n]);
                        }
                    }
                }
            }
        }));
    }
    for (name, path) in &l.spec.ports {
        let listener = listen(path)?;
        let tx = tx.clone();
        let handle = match name.as_str() {
            guest::PORT_STDOUT => accept_then(listener, stop_flag.clone(), |s| pump(s, io::stdout())),
            guest::PORT_STDERR => accept_then(listener, stop_flag.clone(), |s| pump(s, io::stderr())),
            _ => accept_then(listener, stop_flag.clone(), move |s| {
                // The guest writes here: lines are short, and a longer one is ignored
                // without being kept.
                let mut r = BufReader::new(s);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match (&mut r).take(STATUS_LINE).read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if line.last() != Some(&b'\n') && line.len() as u64 == STATUS_LINE => {
                            // Skip the rest of an over-long line.
                            let mut sink = Vec::new();
                            while matches!((&mut r).take(STATUS_LINE).read_until(b'\n', &mut sink), Ok(n) if n > 0 && sink.last() != Some(&b'\n'))
                            {
                                sink.clear();
                            }
                        }
                        Ok(_) => {
                            if let Some(st) = guest::parse_status(&String::from_utf8_lossy(&line)) {
                                let _ = tx.send(Event::Status(st));
                            }
                        }
                    }
                }
            }),
        };
        threads.push(handle);
    }

    // QEMU.
    let terminal = if console_mode {
        Terminal::save()
    } else {
        Terminal(None)
    };
    let mut cmd = Command::new(l.qemu);
    cmd.args(&l.args).stderr(Stdio::piped());
    if console_mode {
        cmd.stdin(Stdio::inherit()).stdout(Stdio::inherit());
    } else {
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
    }
    let lock_fd = l.run.lock_fd().as_raw_fd();
    let parent = std::process::id();
    let own_group = !console_mode;
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe system calls (prctl, getppid, kill, fcntl, setpgid).
    unsafe {
        cmd.pre_exec(move || {
            // Die with diskkit, even when diskkit is killed with SIGKILL.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent as libc::pid_t {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            // Keep the runtime directory's lock while QEMU runs.
            libc::fcntl(lock_fd, libc::F_SETFD, 0);
            // Terminal signals (Ctrl-C) go to diskkit, which stops QEMU in order; on the
            // console QEMU must stay in the terminal's foreground group to read it.
            if own_group {
                libc::setpgid(0, 0);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting '{}'", l.qemu.display()))?;
    let qemu_err = Arc::new(Mutex::new(Tail::default()));
    if let Some(mut e) = child.stderr.take() {
        let tail = qemu_err.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = e.read(&mut buf) {
                if n == 0 {
                    break;
                }
                tail.lock().unwrap_or_else(|e| e.into_inner()).push(&buf[..n]);
            }
        }));
    }
    if l.verbose {
        eprintln!(
            "diskkit: QEMU started ({:.2}s in all)",
            l.start.elapsed().as_secs_f64()
        );
    }
    let started = Instant::now();
    let ssh_stop = Arc::new(AtomicBool::new(false));
    if let Some(ssh) = l.ssh {
        let ssh = ssh.clone();
        let tx = tx.clone();
        let stop = ssh_stop.clone();
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if ssh.ready() {
                    let _ = tx.send(Event::SshReady);
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }));
    }
    drop(tx);

    let come_up = if console_mode {
        l.timeout
    } else {
        Some(l.timeout.unwrap_or(DEFAULT_COME_UP))
    };
    let mut up = console_mode;
    let mut ssh_child: Option<Child> = None;
    let mut finished: Option<u8> = None;
    let mut poweroff_deadline: Option<Instant> = None;
    let end = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Event::Signal(s)) => break End::Signal(s),
            Ok(Event::Status(Status::Up)) => {
                up = true;
                if l.verbose {
                    eprintln!("diskkit: guest up after {:.2}s", started.elapsed().as_secs_f64());
                }
            }
            Ok(Event::Status(Status::Exit(code))) if command_mode => {
                if l.verbose {
                    eprintln!(
                        "diskkit: command exited {code} after {:.2}s",
                        started.elapsed().as_secs_f64()
                    );
                }
                if !l.persist {
                    break End::Command(code);
                }
                // Keep what the guest wrote: it powers off by itself (poweroff-force).
                finished = Some(code);
                poweroff_deadline = Some(Instant::now() + POWEROFF_GRACE);
            }
            Ok(Event::Status(_)) => {}
            Ok(Event::SshReady) => {
                up = true;
                if l.verbose {
                    eprintln!(
                        "diskkit: SSH answered after {:.2}s",
                        started.elapsed().as_secs_f64()
                    );
                }
                let ssh = l.ssh.context("ssh")?;
                let interactive = l.command.is_empty();
                let mut c = ssh.command(interactive && io::stdin().is_terminal());
                if !interactive {
                    let remote: Vec<String> = l.command.iter().map(|a| guest::sh_quote(a)).collect();
                    c.arg("--").arg(remote.join(" "));
                }
                ssh_child = Some(c.spawn().context("running ssh")?);
            }
            Err(mpsc::RecvTimeoutError::Timeout) | Err(mpsc::RecvTimeoutError::Disconnected) => {}
        }
        if let Some(c) = &mut ssh_child {
            if let Ok(Some(st)) = c.try_wait() {
                ssh_child = None;
                let code = st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0));
                let code = u8::try_from(code).unwrap_or(255);
                if !l.persist {
                    break End::Command(code);
                }
                finished = Some(code);
                // Power off cleanly so the overlay is consistent.
                let mut p = l.ssh.context("ssh")?.command(false);
                let _ = p
                    .args(["-o", "ConnectTimeout=10", "--", "systemctl poweroff --no-block"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                poweroff_deadline = Some(Instant::now() + POWEROFF_GRACE);
            }
        }
        if let Ok(Some(st)) = child.try_wait() {
            break End::Qemu(st);
        }
        if let Some(d) = poweroff_deadline {
            if Instant::now() > d {
                break End::Command(finished.unwrap_or(0));
            }
        }
        if let Some(limit) = come_up {
            if (!up || console_mode) && finished.is_none() && started.elapsed() > limit {
                break End::Timeout(limit);
            }
        }
    };

    // Tear down: QEMU first (its exit closes every socket), then the threads.
    ssh_stop.store(true, Ordering::SeqCst);
    if let Some(mut c) = ssh_child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let qemu_status = match &end {
        End::Qemu(s) => Some(*s),
        _ => stop(&mut child),
    };
    drop(terminal);
    stop_flag.store(true, Ordering::SeqCst);
    signal_handle.close();
    for t in threads {
        let _ = t.join();
    }
    let qemu_lines = || qemu_err.lock().unwrap_or_else(|e| e.into_inner()).lines(40);
    let console_lines = |n| console_tail.lock().unwrap_or_else(|e| e.into_inner()).lines(n);
    let show = |title: &str, lines: Vec<String>| {
        if !lines.is_empty() {
            eprintln!("{title}");
            for line in lines {
                eprintln!("  | {line}");
            }
        }
    };
    match end {
        End::Command(code) => Ok(code),
        End::Signal(s) => {
            let name = match s {
                SIGINT => "SIGINT",
                SIGTERM => "SIGTERM",
                _ => "SIGHUP",
            };
            eprintln!("diskkit: {name}: stopped the VM");
            Ok(u8::try_from(128 + s).unwrap_or(255))
        }
        End::Timeout(limit) => {
            if console_mode {
                bail!("stopped the VM after --timeout {}", secs(limit));
            }
            show("last console lines:", console_lines(25));
            let what = if l.ssh.is_some() {
                "SSH did not answer"
            } else {
                "the guest did not come up (COMMAND did not start)"
            };
            Err(anyhow!("{what} within {}; the VM was stopped", secs(limit)))
        }
        End::Qemu(status) => {
            if let Some(code) = finished {
                return Ok(code);
            }
            let clean = status.success();
            if console_mode && clean {
                return Ok(crate::exit::SUCCESS);
            }
            if clean {
                show("last console lines:", console_lines(25));
                if up {
                    bail!("the guest powered off before COMMAND finished (no exit status came back)");
                }
                bail!("the guest powered off (or rebooted) before it came up");
            }
            show("QEMU's error output:", qemu_lines());
            if !console_mode {
                show("last console lines:", console_lines(15));
            }
            let last = qemu_lines()
                .into_iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default();
            let _ = qemu_status;
            if last.is_empty() {
                bail!("QEMU failed ({})", describe(status));
            }
            bail!("QEMU failed ({}): {}", describe(status), last.trim());
        }
    }
}
