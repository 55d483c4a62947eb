//! A throwaway PostgreSQL per test, started by `scripts/postgres` in a temporary
//! directory (own data dir, free port, socket inside it) and stopped when dropped.
//! The machine's own PostgreSQL (if any, e.g. on 5432) is never touched. A server
//! that cannot start fails the test: nothing is skipped.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// A running throwaway server.
pub struct Postgres {
    dir: tempfile::TempDir,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`
    url: String,
}

fn script() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/postgres")
}

impl Postgres {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for postgres");
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("run scripts/postgres");
        assert!(
            out.status.success(),
            "scripts/postgres start failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(url.starts_with("postgres://"), "unexpected output of scripts/postgres: {url}");
        Self { dir, url }
    }

    /// The URL of the `postgres` database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `pg_ctl restart -m fast`: clients are disconnected, the port stays.
    pub fn restart(&self) {
        let out = Command::new(script())
            .arg("restart")
            .arg(self.dir.path())
            .output()
            .expect("run scripts/postgres restart");
        assert!(
            out.status.success(),
            "scripts/postgres restart failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The first column of the first row of `sql`, as text (None: no row, NULL, or
    /// an error such as a table not created yet).
    /// Runs on a thread of its own, so async tests can call it too.
    pub fn query_text(&self, sql: &str) -> Option<String> {
        std::thread::scope(|s| s.spawn(|| self.query_text_here(sql)).join().expect("query thread"))
    }

    fn query_text_here(&self, sql: &str) -> Option<String> {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let (client, conn) =
                tokio_postgres::connect(&self.url, tokio_postgres::NoTls).await.ok()?;
            tokio::spawn(conn);
            let rows = client.simple_query(sql).await.ok()?;
            rows.iter().find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(self.dir.path()).output();
    }
}
