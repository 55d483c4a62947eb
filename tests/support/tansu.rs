//! A throwaway Kafka-protocol broker (tansu) per test, started by `scripts/tansu`
//! in a temporary directory (own working dir, free port) and stopped when dropped.
//!
//! Starting one takes well under a second once the binary is built (the first
//! `scripts/tansu` call builds it; `scripts/test` does that before the tests). A
//! broker that cannot start fails the test: nothing is skipped.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// A running throwaway broker.
pub struct Tansu {
    dir: tempfile::TempDir,
    storage: &'static str,
    /// `127.0.0.1:PORT`, the same across restarts.
    brokers: String,
    running: bool,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/tansu")
}

fn run_script(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(script()).args(args).output().expect("run scripts/tansu");
    assert!(
        out.status.success(),
        "scripts/tansu {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Tansu {
    /// A broker with in-memory storage (fast; lost when it stops).
    pub fn start() -> Self {
        Self::start_with("memory")
    }

    /// A broker whose log survives a restart (`sqlite://tansu.db` in its dir).
    pub fn start_sqlite() -> Self {
        Self::start_with("sqlite")
    }

    fn start_with(storage: &'static str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for tansu");
        let mut broker = Self { dir, storage, brokers: String::new(), running: false };
        broker.start_again();
        broker
    }

    /// Starts the broker (again) in its dir, on the same address as before.
    pub fn start_again(&mut self) {
        assert!(!self.running, "the broker already runs");
        let brokers =
            run_script(&["start".as_ref(), self.dir.path().as_os_str(), self.storage.as_ref()]);
        assert!(brokers.starts_with("127.0.0.1:"), "unexpected output of scripts/tansu: {brokers}");
        if !self.brokers.is_empty() {
            assert_eq!(brokers, self.brokers, "a restarted broker keeps its address");
        }
        self.brokers = brokers;
        self.running = true;
    }

    /// Stops the broker (SIGTERM, then SIGKILL after 10 s).
    pub fn stop(&mut self) {
        run_script(&["stop".as_ref(), self.dir.path().as_os_str()]);
        self.running = false;
    }

    /// `127.0.0.1:PORT`
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        if self.running {
            let _ = Command::new(script()).arg("stop").arg(self.dir.path()).output();
        }
    }
}

/// A Python with `confluent-kafka` (a Kafka client we did not write), from the
/// venv `scripts/tansu python` keeps in the tools cache.
pub fn confluent_python() -> PathBuf {
    PathBuf::from(run_script(&["python".as_ref()]))
}
