//! How long one slice of on-the-fly gzip holds a shard, by slice size.
//!
//! `cargo run --release --example gzip_slice [file]` (and without
//! `--release` for what the debug test builds pay). Without a file it
//! compresses 1 MiB of generated JavaScript-like text. The numbers choose
//! `files::GZIP_SLICE`; they are printed, never asserted.

use std::time::{Duration, Instant};

use ringlb::files::gzip::Stream;

fn text(len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "function",
        "return",
        "const",
        "let",
        "this",
        "value",
        "=>",
        "{",
        "}",
        "(",
        ")",
        "if",
        "else",
        "for",
        "of",
        "await",
        "async",
        "import",
        "export",
        "default",
        "null",
        "undefined",
        "true",
        "false",
        "props",
        "state",
        "render",
        "component",
        "element",
        "document",
        "window",
        "length",
        "index",
        "items",
        "map",
        "filter",
        "reduce",
        ";\n",
        "=",
        "===",
        "+",
        "0",
        "1",
        "'use strict'",
        "console.log",
        "Object.keys",
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 32);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = WORDS[(x % WORDS.len() as u64) as usize];
        out.extend_from_slice(w.as_bytes());
        out.push(if x & 0x30 == 0 { b'\n' } else { b' ' });
        if x & 0xff == 7 {
            out.extend_from_slice(format!("id{:x}", x >> 40).as_bytes());
        }
    }
    out.truncate(len);
    out
}

fn main() {
    let data = match std::env::args().nth(1) {
        Some(path) => std::fs::read(path).expect("read the file"),
        None => text(1 << 20),
    };
    println!("input: {} bytes", data.len());
    for slice in [4usize, 8, 16, 32, 64] {
        let slice = slice * 1024;
        let mut times: Vec<Duration> = Vec::new();
        let mut out_len = 0;
        for _round in 0..3 {
            let mut s = Stream::new();
            let mut out = Vec::new();
            for piece in data.chunks(slice) {
                let t = Instant::now();
                s.push(piece, &mut out);
                times.push(t.elapsed());
                out.clear();
            }
            s.finish(&mut out);
            out_len += out.len();
        }
        let _ = out_len;
        times.sort();
        let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
        let total: Duration = times.iter().sum::<Duration>() / 3;
        println!(
            "slice {:>3} KiB: median {:>7.3} ms  p90 {:>7.3} ms  max {:>7.3} ms  whole file {:>7.2} ms",
            slice / 1024,
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.9).as_secs_f64() * 1e3,
            times[times.len() - 1].as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
        );
    }
    let t = Instant::now();
    let gz = ringlb::files::gzip::compress(&data);
    println!(
        "one-shot compress: {:.2} ms, {} -> {} bytes",
        t.elapsed().as_secs_f64() * 1e3,
        data.len(),
        gz.len()
    );
}
