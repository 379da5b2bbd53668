//! Throughput of the frame codec on one core, beside the reference tools.
//!
//! ```sh
//! taskset -c 0 cargo run --release -p pipeline --example codec_throughput -- FILE [--size-mib 256] [--rounds 5]
//! ```
//!
//! If FILE does not exist it is first filled with deterministic disk-like
//! data: runs of 64 KiB to 1 MiB, a third zeros, a third compressible (log
//! text and database-like pages), a third random. An existing FILE is used
//! as is. Each round then measures, over the whole file in 1 MiB plaintexts:
//! our `Sealer` (zstd level 1 + AES-256-GCM), our `Opener`, the zstd crate at
//! level 1 alone and ring's AES-256-GCM alone (each the fastest of its passes
//! over 3 s, as `zstd -b` reports its fastest); and runs `zstd -b1 FILE` and
//! `openssl speed -evp aes-256-gcm -seconds 3`. The markdown report (medians
//! across rounds, then every round) goes to stdout, progress to stderr. Pin the process to one
//! CPU (`benches/codec.sh` does, with `taskset -c 0`); the tools it runs
//! inherit the pinning.

use std::fs;
use std::hint::black_box;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use pipeline::codec::{Direction, FrameKind, FrameMeta, Opener, Sealer, SessionSalt};
use pipeline::key::Key;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

/// The same allocator as the `cdp` binary, so allocation costs match.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MIB: usize = 1 << 20;
/// Plaintext size per frame, as the pipeline will cut batches.
const CHUNK: usize = MIB;
const SEED: u64 = 0x0cdf_5eed;
/// How long each of our measurements runs per round, as long as
/// `zstd -b1` (3 s by default) and `openssl speed -seconds 3`.
const MIN_MEASURE_TIME: Duration = Duration::from_secs(3);

struct Options {
    file: PathBuf,
    size_mib: usize,
    rounds: usize,
}

fn parse_options() -> Result<Options> {
    let usage = "usage: codec_throughput FILE [--size-mib N] [--rounds N]";
    let mut args = std::env::args_os().skip(1);
    let mut file = None;
    let mut size_mib = 256;
    let mut rounds = 5;
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<usize> {
            let value = args
                .next()
                .with_context(|| format!("{name} needs a value; {usage}"))?;
            let value = value.to_string_lossy();
            match value.parse() {
                Ok(n) if n > 0 => Ok(n),
                _ => bail!("{name} must be a positive integer, not {value:?}; {usage}"),
            }
        };
        match arg.to_str() {
            Some("--size-mib") => size_mib = number("--size-mib")?,
            Some("--rounds") => rounds = number("--rounds")?,
            Some(flag) if flag.starts_with("--") => bail!("unknown option {flag}; {usage}"),
            _ if file.is_none() => file = Some(PathBuf::from(arg)),
            _ => bail!("more than one FILE given; {usage}"),
        }
    }
    Ok(Options {
        file: file.context(usage)?,
        size_mib,
        rounds,
    })
}

/// SplitMix64: small, fast and deterministic; good enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    fn fill(&mut self, out: &mut [u8]) {
        for word in out.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            word.copy_from_slice(&bytes[..word.len()]);
        }
    }
}

#[derive(Clone, Copy)]
enum RunKind {
    Zeros,
    Compressible,
    Random,
}

/// Bytes of each kind in a generated file.
#[derive(Default)]
struct Composition {
    zeros: usize,
    compressible: usize,
    random: usize,
}

/// Log lines with varying fields, like a service's log file.
fn push_log_text(rng: &mut Rng, out: &mut Vec<u8>, len: usize) {
    const HOSTS: [&str; 4] = ["web-01", "web-02", "db-primary", "cache-3"];
    const METHODS: [&str; 3] = ["GET", "POST", "PUT"];
    const PATHS: [&str; 5] = ["users", "orders", "items", "sessions", "invoices"];
    const STATUS: [u16; 5] = [200, 200, 200, 404, 500];
    let end = out.len() + len;
    while out.len() < end {
        let line = format!(
            "2025-06-{:02}T{:02}:{:02}:{:02}.{:03}Z {} nginx[{}]: {} /api/v1/{}/{} {} {}B {}.{}ms\n",
            1 + rng.below(28),
            rng.below(24),
            rng.below(60),
            rng.below(60),
            rng.below(1000),
            rng.pick(&HOSTS),
            1000 + rng.below(50),
            rng.pick(&METHODS),
            rng.pick(&PATHS),
            rng.below(100_000),
            rng.pick(&STATUS),
            rng.below(65_536),
            rng.below(100),
            rng.below(10),
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.truncate(end);
}

/// 4 KiB database-like pages of fixed-size records.
fn push_pages(rng: &mut Rng, out: &mut Vec<u8>, len: usize, next_id: &mut u64) {
    const NAMES: [&str; 4] = ["alice", "bob", "carol-anne", "dave"];
    const PAGE: usize = 4096;
    const RECORD: usize = 96;
    let end = out.len() + len;
    while out.len() < end {
        let page_start = out.len();
        out.extend_from_slice(b"PAGE");
        out.extend_from_slice(&(*next_id / 40).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        while out.len() + RECORD <= page_start + PAGE {
            let record_start = out.len();
            out.extend_from_slice(&next_id.to_le_bytes());
            out.extend_from_slice(&(1_750_000_000 + *next_id * 3).to_le_bytes());
            out.extend_from_slice(&(rng.below(10_000) as u32).to_le_bytes());
            out.push(rng.below(4) as u8);
            out.extend_from_slice(rng.pick(&NAMES).as_bytes());
            out.resize(record_start + RECORD, 0);
            *next_id += 1;
        }
        out.resize(page_start + PAGE, 0);
    }
    out.truncate(end);
}

/// Deterministic disk-like data: runs of 64 KiB to 1 MiB (multiples of
/// 4 KiB), each group of three runs one of each kind in a random order.
fn generate(len: usize) -> (Vec<u8>, Composition) {
    let mut rng = Rng(SEED);
    let mut data = Vec::with_capacity(len);
    let mut composition = Composition::default();
    let mut next_id = 0;
    let mut kinds = [RunKind::Zeros, RunKind::Compressible, RunKind::Random];
    let mut compressible_runs = 0u64;
    'fill: loop {
        for i in (1..kinds.len()).rev() {
            kinds.swap(i, rng.below(i as u64 + 1) as usize);
        }
        for kind in kinds {
            let remaining = len - data.len();
            if remaining == 0 {
                break 'fill;
            }
            let run = ((16 + rng.below(241) as usize) * 4096).min(remaining);
            match kind {
                RunKind::Zeros => {
                    data.resize(data.len() + run, 0);
                    composition.zeros += run;
                }
                RunKind::Compressible => {
                    if compressible_runs % 2 == 0 {
                        push_log_text(&mut rng, &mut data, run);
                    } else {
                        push_pages(&mut rng, &mut data, run, &mut next_id);
                    }
                    compressible_runs += 1;
                    composition.compressible += run;
                }
                RunKind::Random => {
                    let start = data.len();
                    data.resize(start + run, 0);
                    rng.fill(&mut data[start..]);
                    composition.random += run;
                }
            }
        }
    }
    (data, composition)
}

/// Loads FILE, or generates it first if it does not exist. The composition
/// is known if the data is what [`generate`] makes (also when it was
/// generated by an earlier run).
fn load_or_generate(options: &Options) -> Result<(Vec<u8>, Option<Composition>)> {
    let path = &options.file;
    if path.exists() {
        let data = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        ensure!(!data.is_empty(), "{} is empty", path.display());
        eprintln!("using existing {} ({} bytes)", path.display(), data.len());
        let (generated, composition) = generate(data.len());
        let is_generated = generated == data;
        return Ok((data, is_generated.then_some(composition)));
    }
    eprintln!("generating {} ({} MiB)", path.display(), options.size_mib);
    let (data, composition) = generate(options.size_mib * MIB);
    let partial = path.with_extension("partial");
    fs::write(&partial, &data).with_context(|| format!("writing {}", partial.display()))?;
    fs::rename(&partial, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok((data, Some(composition)))
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e6
}

fn meta(index: usize) -> FrameMeta {
    FrameMeta {
        kind: FrameKind::Batch,
        disk_id: *b"bench-disk-00001",
        first_seq: index as u64 * 1000,
        last_seq: index as u64 * 1000 + 999,
        point_time_ns: 1_750_000_000_000_000_000 + index as u64,
    }
}

fn new_salt() -> SessionSalt {
    SessionSalt {
        source_nonce: SessionSalt::random_half(),
        target_nonce: SessionSalt::random_half(),
    }
}

/// Repeats `pass` (one pass over the data, giving MB/s) for at least
/// [`MIN_MEASURE_TIME`] and keeps the fastest pass, the statistic `zstd -b`
/// reports; on a shared machine it is the one least disturbed by others.
fn fastest_pass(mut pass: impl FnMut() -> Result<f64>) -> Result<f64> {
    let start = Instant::now();
    let mut fastest = pass()?;
    while start.elapsed() < MIN_MEASURE_TIME {
        fastest = fastest.max(pass()?);
    }
    Ok(fastest)
}

fn time_sealer(key: &Key, data: &[u8]) -> f64 {
    let mut sealer = Sealer::new(key, &new_salt(), Direction::SourceToTarget);
    let start = Instant::now();
    for (i, chunk) in data.chunks(CHUNK).enumerate() {
        black_box(sealer.seal(&meta(i), chunk));
    }
    mb_per_s(data.len(), start.elapsed())
}

fn time_opener(key: &Key, salt: &SessionSalt, frames: &[Vec<u8>], plain_len: usize) -> f64 {
    let mut opener = Opener::new(key, salt, Direction::SourceToTarget);
    let start = Instant::now();
    for frame in frames {
        black_box(opener.open(frame).expect("a frame we sealed opens"));
    }
    mb_per_s(plain_len, start.elapsed())
}

fn time_zstd_crate(data: &[u8]) -> Result<f64> {
    let mut compressor = zstd::bulk::Compressor::new(1)?;
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(CHUNK));
    let start = Instant::now();
    for chunk in data.chunks(CHUNK) {
        black_box(compressor.compress_to_buffer(chunk, &mut out)?);
    }
    Ok(mb_per_s(data.len(), start.elapsed()))
}

fn time_aes_gcm(data_len: usize) -> f64 {
    let mut key_bytes = [0u8; 32];
    Rng(SEED).fill(&mut key_bytes);
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key_bytes).expect("32-byte key"));
    let mut buffer = vec![0x5au8; CHUNK];
    let start = Instant::now();
    let mut done = 0;
    for counter in 0u64.. {
        if done == data_len {
            break;
        }
        let len = CHUNK.min(data_len - done);
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&counter.to_be_bytes());
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from([0u8; 64]),
                &mut buffer[..len],
            )
            .expect("1 MiB is within AES-GCM's limit");
        black_box(tag.as_ref());
        done += len;
    }
    mb_per_s(data_len, start.elapsed())
}

fn run_tool(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program).args(args).output().with_context(|| {
        format!(
            "running `{program} {}` (install it with scripts/install-deps.sh)",
            args.join(" ")
        )
    })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        output.status.success(),
        "`{program} {}` failed ({}): {text}",
        args.join(" "),
        output.status
    );
    Ok(text)
}

/// What `zstd -b1` reports: compression and decompression MB/s and ratio.
struct ZstdBench {
    compress: f64,
    decompress: f64,
    ratio: f64,
}

/// Parses the last result line of `zstd -b1`, e.g.
/// ` =-data.bin  :  268435456 ->  96468723 (x2.783),  612.4 MB/s, 2455.1 MB/s`
/// (progress lines are separated by `\r`; `-q` prints `(2.783)` instead).
fn parse_zstd_bench(output: &str) -> Result<ZstdBench> {
    let line = output
        .split(['\r', '\n'])
        .rfind(|line| line.matches("MB/s").count() == 2)
        .with_context(|| format!("no result line in zstd -b1 output: {output}"))?;
    let mut speeds = line
        .split("MB/s")
        .filter_map(|part| part.rsplit([' ', ',']).find(|w| !w.is_empty()))
        .map(str::parse::<f64>);
    let (Some(Ok(compress)), Some(Ok(decompress))) = (speeds.next(), speeds.next()) else {
        bail!("cannot read the MB/s figures in zstd -b1's line {line:?}");
    };
    let ratio = line
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .and_then(|(ratio, _)| ratio.trim_start_matches('x').parse().ok())
        .with_context(|| format!("cannot read the ratio in zstd -b1's line {line:?}"))?;
    Ok(ZstdBench {
        compress,
        decompress,
        ratio,
    })
}

/// The 16384-byte column of `openssl speed -evp aes-256-gcm`, in MB/s
/// (openssl reports thousands of bytes per second).
fn parse_openssl_speed(output: &str) -> Result<f64> {
    let line = output
        .lines()
        .rfind(|line| line.starts_with("AES-256-GCM") || line.starts_with("aes-256-gcm"))
        .with_context(|| format!("no AES-256-GCM line in openssl speed output: {output}"))?;
    let last = line.split_whitespace().last().unwrap_or_default();
    let thousands: f64 = last
        .trim_end_matches('k')
        .parse()
        .with_context(|| format!("cannot read {last:?} in openssl's line {line:?}"))?;
    Ok(thousands / 1000.0)
}

/// One measurement's MB/s, one value per round.
struct Series {
    name: &'static str,
    values: Vec<f64>,
}

impl Series {
    fn new(name: &'static str) -> Self {
        Series {
            name,
            values: Vec::new(),
        }
    }

    fn push(&mut self, value: f64) {
        self.values.push(value);
    }

    fn median(&self) -> f64 {
        median(&self.values)
    }

    fn range(&self) -> String {
        let min = self.values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self
            .values
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        format!("{min:.0}–{max:.0}")
    }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 0 {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    }
}

fn allowed_cpus() -> String {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|cpus| cpus.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn first_line(program: &str, args: &[&str]) -> String {
    run_tool(program, args)
        .ok()
        .and_then(|out| {
            out.lines()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| format!("{program}: version unknown"))
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn main() -> Result<()> {
    let options = parse_options()?;
    let cpus = allowed_cpus();
    if cpus.contains([',', '-']) {
        eprintln!("warning: not pinned to one CPU (allowed: {cpus}); run under taskset -c 0");
    }
    let (data, composition) = load_or_generate(&options)?;
    let file = options.file.to_string_lossy().into_owned();

    let key_dir = tempfile::tempdir()?;
    let key = Key::generate(key_dir.path().join("key"))?;
    // Frames for the opener, sealed once; this pass also warms the allocator.
    let salt = new_salt();
    let mut sealer = Sealer::new(&key, &salt, Direction::SourceToTarget);
    let frames: Vec<Vec<u8>> = data
        .chunks(CHUNK)
        .enumerate()
        .map(|(i, chunk)| sealer.seal(&meta(i), chunk))
        .collect();
    let sealed_bytes: usize = frames.iter().map(Vec::len).sum();

    let mut sealer = Series::new("ours: `Sealer::seal` (zstd-1, AES-256-GCM)");
    let mut opener = Series::new("ours: `Opener::open` (AES-256-GCM, zstd -d)");
    let mut zstd_crate = Series::new("zstd crate, level 1 alone, 1 MiB chunks");
    let mut aes = Series::new("ring AES-256-GCM alone, 1 MiB in place");
    let mut zstd_compress = Series::new("`zstd -b1 FILE`, compression");
    let mut zstd_decompress = Series::new("`zstd -b1 FILE`, decompression");
    let mut openssl = Series::new("`openssl speed -evp aes-256-gcm`, 16384-byte column");
    let mut zstd_ratios = Vec::new();
    let rounds = options.rounds;
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}: codec");
        sealer.push(fastest_pass(|| Ok(time_sealer(&key, &data)))?);
        opener.push(fastest_pass(|| {
            Ok(time_opener(&key, &salt, &frames, data.len()))
        })?);
        zstd_crate.push(fastest_pass(|| time_zstd_crate(&data))?);
        aes.push(fastest_pass(|| Ok(time_aes_gcm(data.len())))?);
        eprintln!("round {round}/{rounds}: zstd -b1 {file}");
        let bench = parse_zstd_bench(&run_tool("zstd", &["-b1", &file])?)?;
        zstd_compress.push(bench.compress);
        zstd_decompress.push(bench.decompress);
        zstd_ratios.push(bench.ratio);
        eprintln!("round {round}/{rounds}: openssl speed -evp aes-256-gcm -seconds 3");
        openssl.push(parse_openssl_speed(&run_tool(
            "openssl",
            &["speed", "-evp", "aes-256-gcm", "-seconds", "3"],
        )?)?);
    }

    println!("# Codec throughput: Sealer and Opener vs zstd -b1 and openssl speed");
    println!();
    println!(
        "- kernel {}; CPU: {}; measured on CPU(s) {cpus} (the tools run inherit the pinning)",
        first_line("uname", &["-r"]),
        cpu_model()
    );
    println!(
        "- {}; {}; ring 0.17 (AES-256-GCM); zstd crate on libzstd {}",
        first_line("zstd", &["--version"])
            .trim_start_matches("*** ")
            .trim_end_matches(" ***"),
        first_line("openssl", &["version"]),
        zstd::zstd_safe::version_string()
    );
    let describe = match &composition {
        Some(c) => format!(
            "generated, seed {SEED:#x}: {:.1}% zeros, {:.1}% compressible (log text, 4 KiB record pages), {:.1}% random, in runs of 64 KiB–1 MiB",
            100.0 * c.zeros as f64 / data.len() as f64,
            100.0 * c.compressible as f64 / data.len() as f64,
            100.0 * c.random as f64 / data.len() as f64
        ),
        None => "an existing file of other data, used as is".into(),
    };
    println!(
        "- data: {file}, {} MiB; {describe}",
        data.len() as f64 / MIB as f64
    );
    println!(
        "- our frames: 1 MiB plaintexts; {} frames, {:.3}x smaller than the plaintext (`zstd -b1` on the whole file: {:.3}x)",
        frames.len(),
        data.len() as f64 / sealed_bytes as f64,
        median(&zstd_ratios)
    );
    println!(
        "- MB/s = 10^6 bytes of plaintext per second. Per round, each of ours repeats passes over the whole file for {} s and keeps the fastest pass, as `zstd -b1` keeps its fastest; openssl averages over 3 s. Tables: median and range over {rounds} rounds, then each round",
        MIN_MEASURE_TIME.as_secs()
    );
    println!();
    println!("| measurement | MB/s (median) | range | ours / reference |");
    println!("|---|---:|---:|---|");
    let versus = |ours: &Series, reference: &Series| {
        format!(
            "{:.2} vs {}",
            ours.median() / reference.median(),
            reference.name
        )
    };
    let rows = [
        (&sealer, versus(&sealer, &zstd_compress)),
        (&opener, versus(&opener, &zstd_decompress)),
        (&zstd_crate, versus(&zstd_crate, &zstd_compress)),
        (&aes, versus(&aes, &openssl)),
        (&zstd_compress, String::new()),
        (&zstd_decompress, String::new()),
        (&openssl, String::new()),
    ];
    for (series, versus) in &rows {
        println!(
            "| {} | {:.0} | {} | {versus} |",
            series.name,
            series.median(),
            series.range()
        );
    }
    println!();
    let round_numbers: Vec<String> = (1..=rounds).map(|r| format!("round {r}")).collect();
    println!("| measurement | {} |", round_numbers.join(" | "));
    println!("|---|{}", "---:|".repeat(rounds));
    for (series, _) in &rows {
        let values: Vec<String> = series.values.iter().map(|v| format!("{v:.0}")).collect();
        println!("| {} | {} |", series.name, values.join(" | "));
    }
    let goal = sealer.median() / zstd_compress.median();
    println!();
    println!(
        "Sealer / `zstd -b1`: **{goal:.2}** (goal ≥ 0.8: {}); Sealer / zstd crate alone: {:.2}",
        if goal >= 0.8 { "met" } else { "not met" },
        sealer.median() / zstd_crate.median()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_zstd_bench_lines() {
        let default = " =-d.bin :  268435456 ->  96468723 (x2.783),  612.4 MB/s \r =-d.bin :  268435456 ->  96468723 (x2.783),  612.4 MB/s, 2455.1 MB/s\r 1#\n";
        let z = parse_zstd_bench(default).unwrap();
        assert_eq!((z.compress, z.decompress, z.ratio), (612.4, 2455.1, 2.783));
        let quiet = "bench 1.5.4 : input 20000000 bytes, 3 seconds, 0 KB blocks\n-1     20000469 (1.000) 4434.34 MB/s 12485.5 MB/s  zb.bin\n";
        let z = parse_zstd_bench(quiet).unwrap();
        assert_eq!((z.compress, z.decompress, z.ratio), (4434.34, 12485.5, 1.0));
    }

    #[test]
    fn parses_openssl_speed() {
        let out = "The 'numbers' are in 1000s of bytes per second processed.\ntype             16 bytes     64 bytes    256 bytes   1024 bytes   8192 bytes  16384 bytes\nAES-256-GCM      48480.11k   189069.83k   684898.30k  2039051.26k  5042249.73k  5635522.56k\n";
        let mb_per_s = parse_openssl_speed(out).unwrap();
        assert!((mb_per_s - 5635.52256).abs() < 1e-6, "{mb_per_s}");
    }

    #[test]
    fn generated_data_is_deterministic_and_mixed() {
        let (a, composition) = generate(8 * MIB);
        let (b, _) = generate(8 * MIB);
        assert_eq!(a.len(), 8 * MIB);
        assert!(a == b);
        let total = composition.zeros + composition.compressible + composition.random;
        assert_eq!(total, 8 * MIB);
        assert!(composition.zeros > 0 && composition.compressible > 0 && composition.random > 0);
    }
}
