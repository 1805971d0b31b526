//! `diskkit compare`.

use std::path::Path;

use anyhow::Result;
use diskkit::copy::compare;

use super::open_image;
use crate::args::{Format, OpenArgs, ParentArgs};
use crate::progress::bytes_bar;
use crate::EXIT_DIFFERENT;

pub(crate) fn run(
    format_a: Option<Format>,
    format_b: Option<Format>,
    parents: &ParentArgs,
    strict: bool,
    a: &Path,
    b: &Path,
) -> Result<u8> {
    let open = |format, path| {
        let args = OpenArgs {
            format,
            detached: false,
            repair: false,
            force_share: false,
            parents: parents.clone(),
        };
        open_image(&args, path, false)
    };
    let ia = open(format_a, a)?;
    let ib = open(format_b, b)?;
    if ia.size() != ib.size() {
        if strict {
            println!("Strict mode: Image size mismatch!");
            return Ok(EXIT_DIFFERENT);
        }
        eprintln!("Warning: Image size mismatch!");
    }
    let bar = bytes_bar(ia.size().max(ib.size()), "comparing");
    let result = compare(&ia, &ib, &mut |p| bar.set_position(p))?;
    bar.finish_and_clear();
    match result {
        None => {
            println!("Images are identical.");
            Ok(0)
        }
        Some(offset) => {
            println!("Content mismatch at offset {offset}!");
            Ok(EXIT_DIFFERENT)
        }
    }
}
