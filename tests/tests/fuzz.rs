//! The fuzz targets of `fuzz/` (one per parser the network reaches: change bodies, batches,
//! `GET /changes` query strings, Raft RPC bodies and peer-stream frames, checkpoint files)
//! each replay their checked-in corpus, then fuzz for [`FUZZ_SECONDS`]; any crash, failed
//! property or hang fails the test with the input that caused it. Longer runs: see the
//! README's "Fuzzing".
//!
//! cargo fuzz builds the targets with the stable toolchain (`RUSTC_BOOTSTRAP=1` allows the
//! flags it passes; no sanitizer) into `fuzz/` below this build's target dir, so the
//! workspace's own build is left alone. `scripts/install-cargo-fuzz` installs cargo-fuzz
//! (`scripts/test` runs it); without it the test fails saying so.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use changeagent_testkit::tools::Tool;

/// The cargo-fuzz release `scripts/install-cargo-fuzz` installs; its flags are the ones
/// passed below. A test checks that the script pins the same one.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Overrides where the `cargo-fuzz` binary is.
const CARGO_FUZZ_BIN_ENV: &str = "CHANGEAGENT_CARGO_FUZZ_BIN";

/// cargo-fuzz as `scripts/install-cargo-fuzz` installs it.
const CARGO_FUZZ: Tool = Tool {
    name: "cargo-fuzz",
    version: CARGO_FUZZ_VERSION,
    bin_env: CARGO_FUZZ_BIN_ENV,
    script: "install-cargo-fuzz",
};

/// The targets, as named in `fuzz/Cargo.toml`; each has a corpus in `fuzz/corpus/<target>`.
const TARGETS: [&str; 5] = [
    "change_body",
    "batch",
    "changes_query",
    "raft_rpc",
    "checkpoint_file",
];

/// How long each target fuzzes after its corpus: enough for hundreds of thousands of
/// inputs, short enough for every run of the suite.
const FUZZ_SECONDS: u32 = 8;

/// One input taking longer than this counts as a hang (parsing a few KB takes microseconds).
const INPUT_TIMEOUT_SECS: u32 = 10;

/// Flags of both `cargo fuzz build` and `cargo fuzz run`: no sanitizer (those need a nightly
/// toolchain), release with debug assertions and overflow checks.
const BUILD_FLAGS: [&str; 3] = ["--sanitizer", "none", "--debug-assertions"];

/// How much of a failed command's output a failure shows.
const OUTPUT_TAIL_BYTES: usize = 6000;

#[test]
fn every_fuzz_target_survives_its_corpus_and_a_short_run() {
    let bin = CARGO_FUZZ.locate().unwrap_or_else(|e| panic!("{e}"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace root")
        .to_path_buf();
    let target_dir = fuzz_target_dir();

    let started = Instant::now();
    let build = cargo_fuzz(&bin, &root)
        .args(["build"])
        .args(BUILD_FLAGS)
        .arg("--target-dir")
        .arg(&target_dir)
        .output()
        .expect("running cargo fuzz build");
    assert!(
        build.status.success(),
        "cargo fuzz build failed ({}):\n{}",
        build.status,
        tail(&build)
    );
    eprintln!("fuzz: built the targets in {:.0?}", started.elapsed());

    let scratch = tempfile::tempdir().expect("temp dir");
    let mut failures = Vec::new();
    for target in TARGETS {
        let seeds = root.join("fuzz").join("corpus").join(target);
        let count = std::fs::read_dir(&seeds)
            .unwrap_or_else(|e| panic!("reading the corpus {}: {e}", seeds.display()))
            .count();
        assert!(count > 0, "{} holds no seeds", seeds.display());
        // New inputs go to a scratch corpus (the first directory), not into the checkout;
        // the checked-in one is read.
        let found = scratch.path().join(target);
        let artifacts = scratch.path().join(format!("{target}-artifacts"));
        for dir in [&found, &artifacts] {
            std::fs::create_dir_all(dir).expect("creating a scratch dir");
        }
        let started = Instant::now();
        let run = cargo_fuzz(&bin, &root)
            .args(["run"])
            .args(BUILD_FLAGS)
            .arg("--target-dir")
            .arg(&target_dir)
            .arg(target)
            .arg(&found)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={FUZZ_SECONDS}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .output()
            .expect("running cargo fuzz run");
        let stderr = String::from_utf8_lossy(&run.stderr);
        let runs = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("Done "))
            .unwrap_or("no summary")
            .to_owned();
        eprintln!(
            "fuzz: {target}: {count} seeds, {runs}, {:.1?}",
            started.elapsed()
        );
        if !run.status.success() {
            let inputs: Vec<String> = std::fs::read_dir(&artifacts)
                .map(|entries| {
                    entries
                        .filter_map(|e| e.ok())
                        .map(|e| {
                            let bytes = std::fs::read(e.path()).unwrap_or_default();
                            format!("{:?}", String::from_utf8_lossy(&bytes))
                        })
                        .collect()
                })
                .unwrap_or_default();
            failures.push(format!(
                "{target} failed ({}) on {}:\n{}",
                run.status,
                inputs.join(", "),
                tail(&run)
            ));
        } else if !runs.starts_with("Done ") {
            failures.push(format!("{target} did not fuzz:\n{}", tail(&run)));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fuzz targets failed (reproduce with `cargo fuzz run <target> <input>`, \
         see the README's \"Fuzzing\"):\n{}",
        failures.len(),
        TARGETS.len(),
        failures.join("\n\n")
    );
}

/// `cargo-fuzz fuzz …` run from the workspace root (where it finds `fuzz/`), allowed the
/// unstable flags it passes.
fn cargo_fuzz(bin: &Path, root: &Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("fuzz")
        .current_dir(root)
        .env("RUSTC_BOOTSTRAP", "1")
        // The test runner's own flags are not the fuzz targets'.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS");
    cmd
}

/// `fuzz/` below the target dir this test was built in (it runs from
/// `<target>/<profile>/deps/`), so fuzz builds are kept and reused, apart from the
/// workspace's.
fn fuzz_target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    exe.ancestors()
        .nth(3)
        .expect("the test runs from <target>/<profile>/deps/")
        .join("fuzz")
}

/// The end of a command's stdout and stderr.
fn tail(output: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let start = text.len().saturating_sub(OUTPUT_TAIL_BYTES);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_owned()
}

#[test]
fn the_install_script_pins_this_version() {
    let script = include_str!("../../scripts/install-cargo-fuzz");
    let pin = format!("CARGO_FUZZ_VERSION=\"{CARGO_FUZZ_VERSION}\"");
    assert!(
        script.lines().any(|l| l.trim() == pin),
        "scripts/install-cargo-fuzz must pin {pin}"
    );
}

#[test]
fn a_missing_cargo_fuzz_says_how_to_install_it() {
    let default = Path::new("/nonexistent/cargo-fuzz-x/bin/cargo-fuzz");
    let text = CARGO_FUZZ.locate_in(None, default).unwrap_err();
    assert!(text.contains("run scripts/install-cargo-fuzz"), "{text}");
    assert!(text.contains(CARGO_FUZZ_BIN_ENV), "{text}");
    assert!(
        text.contains("/nonexistent/cargo-fuzz-x/bin/cargo-fuzz"),
        "{text}"
    );

    let text = CARGO_FUZZ
        .locate_in(Some("/nonexistent/other".into()), default)
        .unwrap_err();
    assert!(text.contains(CARGO_FUZZ_BIN_ENV), "{text}");
    assert!(text.contains("/nonexistent/other"), "{text}");
}

#[test]
fn every_target_has_a_corpus_and_a_manifest_entry() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).expect("fuzz/Cargo.toml");
    for target in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{target}\"")),
            "fuzz/Cargo.toml has no target {target}"
        );
        assert!(
            fuzz.join("fuzz_targets")
                .join(format!("{target}.rs"))
                .is_file(),
            "fuzz/fuzz_targets/{target}.rs is missing"
        );
        assert!(
            fuzz.join("corpus").join(target).is_dir(),
            "fuzz/corpus/{target} is missing"
        );
    }
    let declared = manifest.matches("[[bin]]").count();
    assert_eq!(
        declared,
        TARGETS.len(),
        "fuzz/Cargo.toml declares {declared} targets"
    );
}
