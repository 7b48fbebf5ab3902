//! Replays the committed fuzz corpora on stable, without cargo-fuzz.
//!
//! Every file in `fuzz/corpus/<target>/` (seeds and the minimized set a campaign kept) and
//! in `fuzz/regressions/<target>/` (crash reproducers) goes through the same
//! `hyrelay::fuzzing::<target>` function the fuzz target calls. A missing or empty corpus
//! directory, or a directory for a target that does not exist, fails the test, so the
//! replay cannot pass by finding nothing. See `fuzz/README.md`.

use std::collections::BTreeSet;
use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use hyrelay::fuzzing::TARGETS;

/// Kept small on purpose: a campaign's whole corpus is never committed, only `cmin` output.
const MAX_FILES_PER_TARGET: usize = 100;
const MAX_FILE_BYTES: u64 = 64 * 1024;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Regular files in `dir`, sorted; empty if the directory does not exist.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Names of the subdirectories of `dir`.
fn subdirs(dir: &Path) -> BTreeSet<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return BTreeSet::new();
    };
    entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_dir())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// Runs every file through `f`; returns a line per file that panicked.
fn replay(name: &str, f: hyrelay::fuzzing::FuzzFn, files: &[PathBuf]) -> Vec<String> {
    let mut failures = Vec::new();
    for path in files {
        let data = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| f(&data))).is_err() {
            failures.push(format!("{name}: {} panicked", path.display()));
        }
    }
    failures
}

#[test]
fn every_corpus_and_regression_file_replays_cleanly() {
    let root = fuzz_dir();
    let mut failures = Vec::new();
    let mut total = 0;
    for (name, f) in TARGETS {
        let corpus = files_in(&root.join("corpus").join(name));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{name}/ is missing or empty: every target needs seeds (python3 fuzz/gen_seeds.py)"
        );
        assert!(
            corpus.len() <= MAX_FILES_PER_TARGET,
            "fuzz/corpus/{name}/ has {} files; commit only `cargo fuzz cmin` output (at most {MAX_FILES_PER_TARGET})",
            corpus.len()
        );
        for p in &corpus {
            let len = fs::metadata(p).unwrap().len();
            assert!(
                len <= MAX_FILE_BYTES,
                "{} is {len} bytes; keep corpus files small",
                p.display()
            );
        }
        let regressions = files_in(&root.join("regressions").join(name));
        total += corpus.len() + regressions.len();
        failures.extend(replay(name, *f, &corpus));
        failures.extend(replay(name, *f, &regressions));
    }
    assert!(
        failures.is_empty(),
        "{} of {total} inputs failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn targets_corpora_and_fuzz_binaries_match() {
    let root = fuzz_dir();
    let names: BTreeSet<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(
        names.len(),
        TARGETS.len(),
        "duplicate target name in hyrelay::fuzzing::TARGETS"
    );
    assert_eq!(
        subdirs(&root.join("corpus")),
        names,
        "fuzz/corpus/ directories vs TARGETS"
    );
    let stray: Vec<String> = subdirs(&root.join("regressions")).difference(&names).cloned().collect();
    assert!(
        stray.is_empty(),
        "fuzz/regressions/ has directories for unknown targets: {stray:?}"
    );
    let binaries: BTreeSet<String> = files_in(&root.join("fuzz_targets"))
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    assert_eq!(binaries, names, "fuzz/fuzz_targets/*.rs vs TARGETS");
    let dicts: BTreeSet<String> = files_in(&root.join("dict"))
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    assert_eq!(dicts, names, "fuzz/dict/*.dict vs TARGETS");
}
