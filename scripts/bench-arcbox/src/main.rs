//! Benchmark peer: turn layer tars (plain, or gzip/zstd by magic bytes), applied in order with
//! their whiteouts, into one ext4 image with the `arcbox-ext4` crate (a Rust port of Apple's
//! EXT4.Formatter), as `diskkit unpack` does. Usage: bench-arcbox OUT.img LAYER...
//! (`MIN_SIZE` in the environment: the image's minimum size in bytes, default 256 MiB).
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::ExitCode;

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: bench-arcbox OUT.img LAYER.tar[.gz|.zst]...".into());
    }
    let min_size: u64 = match std::env::var("MIN_SIZE") {
        Ok(s) => s.parse().map_err(|e| format!("bad MIN_SIZE {s}: {e}"))?,
        Err(_) => 256 << 20,
    };
    let mut fmt = arcbox_ext4::Formatter::new(Path::new(&args[1]), 4096, min_size)
        .map_err(|e| format!("creating {}: {e:?}", args[1]))?;
    for layer in &args[2..] {
        let f = File::open(layer).map_err(|e| format!("{layer}: {e}"))?;
        let mut r = BufReader::with_capacity(1 << 20, f);
        let magic = r.fill_buf().map_err(|e| e.to_string())?.to_vec();
        let input: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::bufread::MultiGzDecoder::new(r))
        } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(zstd::stream::read::Decoder::with_buffer(r).map_err(|e| e.to_string())?)
        } else {
            Box::new(r)
        };
        fmt.unpack_tar(input)
            .map_err(|e| format!("unpacking {layer}: {e:?}"))?;
    }
    fmt.close().map_err(|e| format!("closing: {e:?}"))
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-arcbox: {e}");
            ExitCode::from(2)
        }
    }
}
