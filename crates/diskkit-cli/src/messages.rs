//! What the tool says: the one line after a change, warnings, and errors.
//!
//! - A command that creates or changes something prints one line on stdout saying what it did
//!   (path, format, size), unless `-q`.
//! - Warnings: `diskkit: warning: ...` on stderr.
//! - Errors: one line, `diskkit: error: ...` on stderr, naming the path once, with the fix when
//!   there is one (a [`Hint`] in the error chain, printed last).

use std::fmt;
use std::io::{self, Write};
use std::path::Path;

use diskkit::DiskImage;

use crate::size::human;

/// Print the line saying what a command did, unless `quiet`.
pub(crate) fn done(quiet: bool, line: fmt::Arguments<'_>) {
    if !quiet {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// Print a warning on stderr.
pub(crate) fn warn(message: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr(), "diskkit: warning: {message}");
}

/// Print a note on stderr (something worth knowing that is not a problem).
pub(crate) fn note(message: fmt::Arguments<'_>) {
    let _ = writeln!(io::stderr(), "diskkit: note: {message}");
}

/// `'path' (qcow2, 40 GiB)`: how the lines after a change name an image.
pub(crate) fn image(path: &Path, format: impl fmt::Display, size: u64) -> String {
    format!("'{}' ({format}, {})", path.display(), human(size))
}

/// [`image`] for an open image.
pub(crate) fn open_image(path: &Path, image: &DiskImage) -> String {
    self::image(path, image.format(), image.size())
}

/// The fix for an error, added to its chain with `.context(Hint(..))` below the outermost
/// context; printed at the end of the error's line.
#[derive(Debug)]
pub(crate) struct Hint(pub(crate) String);

impl fmt::Display for Hint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The one-line text of an error: its chain joined by `: `, each path once, the hint last.
pub(crate) fn error_line(e: &anyhow::Error) -> String {
    let hint = e.downcast_ref::<Hint>().map(|h| h.0.clone());
    let mut line = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let mut text = cause.to_string();
        if hint.as_deref() == Some(text.as_str()) {
            continue;
        }
        if let Some(lib) = cause.downcast_ref::<diskkit::Error>() {
            if let Some(p) = lib.path() {
                let p = p.display().to_string();
                if line.contains(&format!("'{p}'")) {
                    text = without_path(&text, &p);
                }
            }
            // A bare kind ("not found") in front of its cause ("No such file or directory")
            // says nothing the cause does not.
            if std::error::Error::source(lib).is_some()
                && GENERIC
                    .iter()
                    .any(|g| text == *g || text.starts_with(&format!("{g} (")))
            {
                continue;
            }
        }
        let text = text.trim().to_owned();
        // A cause that only repeats what was said (a wrapper with the same text) is skipped.
        if text.is_empty() || text == last || line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
        last = text;
    }
    if let Some(h) = hint {
        line.push_str("; ");
        line.push_str(&h);
    }
    // One line, whatever a cause's text held; outputs named as the user named them.
    hide_temp_names(&line.replace('\n', " "))
}

/// Outputs are written as `.NAME.diskkit-<32 hex>.tmp` next to NAME and renamed when complete
/// (`diskkit::output::PendingFile`); an error from the middle of that names the temporary
/// file. People know the file as NAME.
fn hide_temp_names(text: &str) -> String {
    const MARK: &str = ".diskkit-";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(MARK) {
        let tail = &rest[at + MARK.len()..];
        let is_temp = tail.len() >= 36
            && tail.as_bytes()[..32].iter().all(u8::is_ascii_hexdigit)
            && tail[32..].starts_with(".tmp");
        // The temporary name starts with a '.' right after a separator.
        let start = rest[..at].rfind(['/', '\'', ' ', '(']).map_or(0, |i| i + 1);
        if is_temp && rest[start..].starts_with('.') && start < at {
            out.push_str(&rest[..start]);
            out.push_str(&rest[start + 1..at]);
            rest = &tail[36..];
        } else {
            out.push_str(&rest[..at + MARK.len()]);
            rest = tail;
        }
    }
    out.push_str(rest);
    out
}

/// What a library error without a message of its own says (its kind).
const GENERIC: [&str; 12] = [
    "I/O error",
    "not a valid image",
    "unsupported",
    "corrupt image",
    "out of bounds",
    "image is read-only",
    "invalid argument",
    "refused by the open policy",
    "layer mismatch",
    "already exists",
    "not found",
    "stack rule violated",
];

/// A library error's text without its path context: `message (path, while x)` becomes
/// `message (while x)`, `message (path)` becomes `message`.
fn without_path(text: &str, path: &str) -> String {
    if let Some(s) = text.strip_suffix(&format!(" ({path})")) {
        return s.to_owned();
    }
    text.replacen(&format!(" ({path}, "), " (", 1)
}

/// `1 file`, `2 files`.
pub(crate) fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Print an error on stderr.
pub(crate) fn error(e: &anyhow::Error) {
    let _ = writeln!(io::stderr(), "diskkit: error: {}", error_line(e));
}

#[cfg(test)]
mod tests {
    use anyhow::Context;

    use super::*;

    #[test]
    fn path_is_named_once() {
        let lib = diskkit::Error::corrupt("bad table")
            .with_path("x.asif")
            .with_offset(4096);
        let e = anyhow::Error::new(lib).context("cannot open 'x.asif'");
        assert_eq!(error_line(&e), "cannot open 'x.asif': bad table (at offset 4096)");
        let lib = diskkit::Error::corrupt("bad table").with_path("y.asif");
        let e = anyhow::Error::new(lib).context("cannot open 'x.asif'");
        assert_eq!(error_line(&e), "cannot open 'x.asif': bad table (y.asif)");
        let io = std::io::Error::from_raw_os_error(2);
        let lib = diskkit::Error::io(io).with_path("x.asif");
        let e = anyhow::Error::new(lib).context("cannot open 'x.asif'");
        assert_eq!(
            error_line(&e),
            "cannot open 'x.asif': No such file or directory (os error 2)"
        );
    }

    #[test]
    fn temporary_names_are_not_shown() {
        let e = anyhow::anyhow!(
            "No space left on device (dir/.out.raw.diskkit-0123456789abcdef0123456789abcdef.tmp, at offset 5)"
        )
        .context("cannot write 'dir/out.raw'");
        assert_eq!(
            error_line(&e),
            "cannot write 'dir/out.raw': No space left on device (dir/out.raw, at offset 5)"
        );
        assert_eq!(hide_temp_names("a .diskkit-x.tmp b"), "a .diskkit-x.tmp b");
    }

    #[test]
    fn hint_comes_last() {
        let e: anyhow::Result<()> = Err(anyhow::anyhow!("parent refused"));
        let e = e
            .context(Hint("add --allow-parent-dir /x".into()))
            .context("cannot open 'a'")
            .unwrap_err();
        assert_eq!(
            error_line(&e),
            "cannot open 'a': parent refused; add --allow-parent-dir /x"
        );
    }
}
