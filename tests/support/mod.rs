//! Shared helpers: the binary under test, workload files, the reference answer.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

/// The `caudal` binary cargo built for these tests.
pub fn caudal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_caudal"))
}

pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn workload_dir() -> PathBuf {
    std::env::var_os("CAUDAL_WORKLOAD_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("../shared/workload"))
}

pub fn erp_pipeline() -> PathBuf {
    manifest_dir().join("config/examples/erp.toml")
}

/// A directory for generated workloads that survives between tests of one run.
fn cache_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("caudal-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create cache dir");
    dir
}

static GENERATE: Mutex<()> = Mutex::new(());

/// `erpgen.py --events N --seed S`, generated once per test run.
pub fn erpgen(events: u64, seed: u64) -> PathBuf {
    let _guard = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
    let path = cache_dir().join(format!("erp-{events}-{seed}.jsonl"));
    if !path.exists() {
        let out = Command::new("python3")
            .arg(workload_dir().join("erpgen.py"))
            .args(["--events", &events.to_string(), "--seed", &seed.to_string()])
            .output()
            .expect("python3 runs erpgen.py");
        assert!(out.status.success(), "erpgen.py failed: {}", String::from_utf8_lossy(&out.stderr));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &out.stdout).expect("write workload");
        std::fs::rename(&tmp, &path).expect("rename workload");
    }
    path
}

/// `reference.py --out DIR < input`: the golden answer.
pub fn reference(input: &Path, out: &Path) {
    let file = std::fs::File::open(input).expect("open input");
    let status = Command::new("python3")
        .arg(workload_dir().join("reference.py"))
        .arg("--out")
        .arg(out)
        .stdin(file)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("python3 runs reference.py");
    assert!(status.success(), "reference.py failed");
}

/// Asserts both reference files in `got` equal those in `want`, byte for byte.
pub fn assert_same_answer(want: &Path, got: &Path) {
    for name in ["gold_sales_10m.csv", "quarantine_summary.csv"] {
        let w = std::fs::read_to_string(want.join(name)).expect("reference file");
        let g = std::fs::read_to_string(got.join(name))
            .unwrap_or_else(|e| panic!("{}: {e}", got.join(name).display()));
        if w != g {
            let wl: Vec<&str> = w.lines().collect();
            let gl: Vec<&str> = g.lines().collect();
            let first =
                wl.iter().zip(&gl).position(|(a, b)| a != b).unwrap_or(wl.len().min(gl.len()));
            panic!(
                "{name} differs (want {} lines, got {}); first difference at line {}:\n want: {:?}\n  got: {:?}",
                wl.len(),
                gl.len(),
                first + 1,
                wl.get(first),
                gl.get(first)
            );
        }
    }
}

/// Runs a command and asserts it succeeded.
pub fn ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `caudal export` of a store into `out`.
pub fn export(store: &Path, out: &Path) {
    ok(caudal().arg("export").arg("--store").arg(store).arg("--out").arg(out));
}
pub mod mariadb;
pub mod postgres;
pub mod serve;

/// `caudal export` of a store given as a string (a path, a postgres:// or mysql:// URL).
pub fn export_from(store: &str, out: &Path) {
    ok(caudal().arg("export").arg("--store").arg(store).arg("--out").arg(out));
}
pub mod tansu;
