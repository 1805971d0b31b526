//! Free blocks of the filesystem being laid out: the space that placed file data
//! ([`super::ContentSource::placed`]) leaves, handed out first-fit to metadata and to the
//! contents the writer stores itself.

use diskkit::{Error, Result};

/// Holes looked at for one request before it is served from the open end instead: keeps
/// laying out linear when thousands of small holes are too small for the requests.
const SCAN_LIMIT: usize = 64;

/// First-fit allocator over `[start, ∞)` minus the occupied runs.
#[derive(Debug)]
pub(crate) struct Allocator {
    /// Free runs (start, length) below `tail`, ascending; emptied runs stay as length 0.
    holes: Vec<(u64, u64)>,
    /// Index of the first hole that may still have blocks.
    first: usize,
    /// Everything from here on is free.
    tail: u64,
}

impl Allocator {
    /// Free space from block `start` on, except the `occupied` runs (start, length), which
    /// must be ascending and not overlap.
    pub(crate) fn new(start: u64, occupied: &[(u64, u64)]) -> Result<Allocator> {
        let mut holes = Vec::new();
        let mut pos = start;
        for &(s, n) in occupied {
            let end = s
                .checked_add(n)
                .ok_or_else(|| Error::invalid_argument("placed run past the end of the filesystem"))?;
            if s < pos {
                return Err(Error::invalid_argument(format!(
                    "placed block {s} overlaps the filesystem's own metadata or another run"
                )));
            }
            if s > pos {
                holes.push((pos, s - pos));
            }
            pos = pos.max(end);
        }
        Ok(Allocator {
            holes,
            first: 0,
            tail: pos,
        })
    }

    /// `n` contiguous blocks (`n > 0`); returns the first.
    pub(crate) fn take(&mut self, n: u64) -> Result<u64> {
        while self.first < self.holes.len() && self.holes[self.first].1 == 0 {
            self.first += 1;
        }
        let scan_end = self.holes.len().min(self.first + SCAN_LIMIT);
        for h in &mut self.holes[self.first..scan_end] {
            if h.1 >= n {
                let at = h.0;
                h.0 += n;
                h.1 -= n;
                return Ok(at);
            }
        }
        let at = self.tail;
        self.tail = at
            .checked_add(n)
            .ok_or_else(|| Error::unsupported("filesystem too large"))?;
        Ok(at)
    }

    /// First block past everything handed out or occupied.
    pub(crate) fn end(&self) -> u64 {
        self.tail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_around_occupied_runs() {
        let mut a = Allocator::new(10, &[(12, 3), (20, 5)]).unwrap();
        assert_eq!(a.take(2).unwrap(), 10);
        assert_eq!(a.take(3).unwrap(), 15);
        assert_eq!(a.take(3).unwrap(), 25); // [18, 20) is too small
        assert_eq!(a.take(2).unwrap(), 18);
        assert_eq!(a.take(1).unwrap(), 28);
        assert_eq!(a.end(), 29);
        assert!(Allocator::new(10, &[(5, 6)]).is_err());
        assert!(Allocator::new(10, &[(5, 2)]).is_err());
        assert!(Allocator::new(10, &[(12, 3), (14, 1)]).is_err());
        assert_eq!(Allocator::new(0, &[]).unwrap().take(4).unwrap(), 0);
    }
}
