//! `diskkit compare`.

use std::path::Path;

use anyhow::Result;
use diskkit::copy::compare;

use super::open_image;
use crate::args::{Format, OpenArgs};
use crate::progress::bytes_bar;
use crate::EXIT_DIFFERENT;

pub(crate) fn run(
    format_a: Option<Format>,
    format_b: Option<Format>,
    strict: bool,
    a: &Path,
    b: &Path,
) -> Result<u8> {
    let ia = open_image(
        &OpenArgs {
            format: format_a,
            detached: false,
        },
        a,
        false,
    )?;
    let ib = open_image(
        &OpenArgs {
            format: format_b,
            detached: false,
        },
        b,
        false,
    )?;
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
