//! Crash safety with a real process: a child writes to an ASIF image, flushes after every
//! operation and reports each flushed operation; the parent kills it with SIGKILL at random
//! moments, many times. Every reopen must succeed and every reported operation must be intact.
//!
//! The child is this test binary run again with `--ignored --exact crash_child`.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use diskkit::{CreateOptions, DiskImage, ImageFormat, OpenOptions};

const SLOT: u64 = 256 << 10;
const SLOTS: u64 = 2048;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// What operation `i` writes: (offset inside its slot, length, fill byte).
fn plan(i: u64) -> (u64, u64, u8) {
    let mut r = Rng(i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let off = r.next() % (64 << 10);
    let len = r.next() % (190 << 10) + 1;
    (off, len, (i % 251) as u8 + 1)
}

fn slot_of(i: u64) -> u64 {
    // Spread consecutive operations over the image so chunks fill in many orders.
    (i * 769) % SLOTS
}

#[test]
#[ignore = "run by sigkill_during_writes as its child process"]
fn crash_child() {
    let Ok(path) = std::env::var("DISKKIT_CRASH_IMAGE") else { return };
    let start: u64 = std::env::var("DISKKIT_CRASH_START").unwrap().parse().unwrap();
    let image = DiskImage::open(&path, &OpenOptions::new().writable(true).format(ImageFormat::Asif)).unwrap();
    let stdout = std::io::stdout();
    for i in start.. {
        if i % 7 == 6 && i >= 3 {
            // Discard an earlier slot completely.
            let j = i - 3;
            image.discard(slot_of(j) * SLOT, SLOT).unwrap();
            image.flush().unwrap();
            writeln!(stdout.lock(), "@@ d {i} {j}").unwrap();
        } else {
            let (off, len, fill) = plan(i);
            image.write_at(&vec![fill; len as usize], slot_of(i) * SLOT + off).unwrap();
            image.flush().unwrap();
            writeln!(stdout.lock(), "@@ w {i}").unwrap();
        }
        stdout.lock().flush().unwrap();
    }
}

/// What the parent knows of a slot: the writes since its last discard, in order, or that an
/// operation on it may have been in flight at a kill.
#[derive(Clone, Default)]
struct Slot {
    writes: Vec<u64>,
    unknown: bool,
}

fn verify(path: &Path, slots: &[Slot]) {
    let image = DiskImage::open(path, &OpenOptions::new().writable(true).format(ImageFormat::Asif))
        .expect("reopen after SIGKILL");
    let mut buf = vec![0u8; SLOT as usize];
    let mut expect = vec![0u8; SLOT as usize];
    for (s, slot) in slots.iter().enumerate() {
        if slot.unknown {
            continue;
        }
        expect.fill(0);
        for &i in &slot.writes {
            let (off, len, fill) = plan(i);
            expect[off as usize..(off + len) as usize].fill(fill);
        }
        image.read_at(&mut buf, s as u64 * SLOT).unwrap();
        if let Some(bad) = buf.iter().zip(&expect).position(|(a, b)| a != b) {
            panic!(
                "slot {s}: byte {bad} is {:#x}, expected {:#x} after writes {:?}",
                buf[bad], expect[bad], slot.writes
            );
        }
    }
}

#[test]
fn sigkill_during_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.asif");
    DiskImage::create(&path, &CreateOptions::new(ImageFormat::Asif, SLOT * SLOTS)).unwrap();
    let mut slots = vec![Slot::default(); SLOTS as usize];
    // Slots touched by an operation that may have been in flight at a kill: unknown until
    // rewritten.
    let mut next = 0u64;
    let mut rng = Rng(0x5eed);
    let exe = std::env::current_exe().unwrap();
    let mut kills = 0;
    while kills < 40 {
        let mut child = Command::new(&exe)
            .args(["--ignored", "--exact", "crash_child", "--nocapture", "--test-threads=1"])
            .env("DISKKIT_CRASH_IMAGE", &path)
            .env("DISKKIT_CRASH_START", next.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(20 + rng.next() % 250));
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        let mut last = None;
        for line in rx.try_iter() {
            // libtest may print "test crash_child ... " before the first report on the same line.
            let Some(at) = line.find("@@ ") else { continue };
            let report = &line[at + 3..];
            let parts: Vec<u64> = report.split(' ').skip(1).filter_map(|p| p.parse().ok()).collect();
            match (report.as_bytes().first(), parts.as_slice()) {
                (Some(b'w'), [i]) => {
                    slots[slot_of(*i) as usize].writes.push(*i);
                    last = Some(*i);
                }
                (Some(b'd'), [i, j]) => {
                    slots[slot_of(*j) as usize] = Slot::default();
                    last = Some(*i);
                }
                _ => {}
            }
        }
        // The operation after the last reported one may have been in flight: forget its slot.
        let in_flight = last.map_or(next, |l| l + 1);
        for s in [slot_of(in_flight), slot_of(in_flight.saturating_sub(3))] {
            slots[s as usize].unknown = true;
        }
        verify(&path, &slots);
        next = in_flight + 1;
        kills += 1;
    }
    assert!(next > 100, "the child made too little progress ({next} operations)");
}
