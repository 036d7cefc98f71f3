//! `fsync`: how long appending a small record to a file and `fdatasync`ing it
//! takes in a directory. A durable write can never be faster than this on
//! the same disk, so it is the floor that write latency is compared against.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;

use crate::report::{self, Latency};

/// Appends before measuring starts: the first ones allocate the file's
/// first blocks and journal entries, which later appends to a WAL do not pay.
const WARMUP_SAMPLES: usize = 10;

/// A p50 below this is faster than any real flush to stable storage: the
/// directory is on tmpfs or behind a cache that ignores flushes.
const SUSPICIOUSLY_FAST: Duration = Duration::from_micros(20);

#[derive(Debug, Clone, Args)]
pub struct FsyncArgs {
    /// Directory to measure in; point it at the server's data dir (a temporary
    /// file is created there and removed afterwards).
    #[arg(long, env = "CHANGEAGENT_BENCH_FSYNC_DIR", default_value = ".")]
    pub dir: PathBuf,
    #[command(flatten)]
    pub sampling: FsyncSampling,
}

/// How many appends of what size; shared by `fsync`, `write` and `all`.
#[derive(Debug, Clone, Args)]
pub struct FsyncSampling {
    /// Number of measured append + fdatasync rounds.
    #[arg(long, env = "CHANGEAGENT_BENCH_FSYNC_SAMPLES", default_value_t = 1000)]
    pub samples: usize,
    /// Bytes appended per round (about one small change in a WAL).
    #[arg(long, env = "CHANGEAGENT_BENCH_FSYNC_BYTES", default_value_t = 512)]
    pub bytes: usize,
}

/// Measures, prints the figures and returns them.
pub async fn run(dir: &Path, sampling: &FsyncSampling) -> Result<Latency> {
    let shown = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    report::header(&format!(
        "fsync: {} appends of {} B + fdatasync in {}",
        report::count(sampling.samples as u64),
        sampling.bytes,
        shown.display()
    ));
    let dir = dir.to_path_buf();
    let (samples, bytes) = (sampling.samples, sampling.bytes);
    let latency = tokio::task::spawn_blocking(move || measure(&dir, samples, bytes))
        .await
        .context("the fsync measuring thread failed")??;
    println!("fsync {}", latency.summary());
    if latency.p50 < SUSPICIOUSLY_FAST {
        println!(
            "note: p50 under {} is faster than a real flush; {} is probably tmpfs or a disk \
             cache that ignores flushes — measure in the server's data dir on its real disk",
            report::ms(SUSPICIOUSLY_FAST),
            shown.display()
        );
    }
    Ok(latency)
}

/// Appends `bytes` bytes and calls `sync_data` (`fdatasync`) `samples` times
/// in a temporary file in `dir`, timing each append + sync.
pub fn measure(dir: &Path, samples: usize, bytes: usize) -> Result<Latency> {
    let mut file = tempfile::Builder::new()
        .prefix(".changeagent-bench-fsync-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a test file in {}", dir.display()))?;
    let block = vec![b'x'; bytes];
    let mut hist = report::histogram()?;
    let mut last_progress = Instant::now();
    for i in 0..WARMUP_SAMPLES + samples {
        let started = Instant::now();
        file.write_all(&block)
            .and_then(|()| file.as_file().sync_data())
            .with_context(|| format!("appending to {}", file.path().display()))?;
        if i >= WARMUP_SAMPLES {
            report::record(&mut hist, started.elapsed());
        }
        if last_progress.elapsed() >= report::PROGRESS_INTERVAL {
            last_progress = Instant::now();
            eprintln!(
                "  … fsync: {} / {} samples",
                report::count(hist.len()),
                report::count(samples as u64)
            );
        }
    }
    // Dropping `file` removes it.
    Ok(Latency::of(&hist))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_in_a_directory_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let latency = measure(dir.path(), 20, 512).unwrap();
        assert_eq!(latency.count, 20);
        assert!(latency.p50 > Duration::ZERO);
        assert!(latency.p50 <= latency.max);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let err = measure(Path::new("/nonexistent/changeagent-bench"), 1, 1).unwrap_err();
        assert!(format!("{err:#}").contains("creating a test file in /nonexistent"));
    }
}
