//! A throwaway MariaDB per test, started by `scripts/mariadb` in a temporary
//! directory (own data dir, free port, binlog on) and stopped when dropped.
//!
//! Starting one takes about two seconds; a server per test keeps tests
//! independent (each may also pass its own server flags). A server that cannot
//! start fails the test: nothing is skipped.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use mysql_async::prelude::Queryable;

/// A running throwaway server.
pub struct MariaDb {
    dir: tempfile::TempDir,
    /// `mysql://root@127.0.0.1:PORT/`
    base_url: String,
}

impl MariaDb {
    /// A server with the defaults of `scripts/mariadb` (binlog ROW, FULL images).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with extra `mariadbd` flags, e.g. `--binlog-format=STATEMENT`.
    pub fn start_with(args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for mariadb");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/mariadb");
        let out = Command::new(&script)
            .arg("start")
            .arg(dir.path())
            .args(args)
            .output()
            .expect("run scripts/mariadb");
        assert!(
            out.status.success(),
            "scripts/mariadb start failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let base_url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            base_url.starts_with("mysql://"),
            "unexpected output of scripts/mariadb: {base_url}"
        );
        Self { dir, base_url }
    }

    /// The URL of database `db` as root.
    pub fn url(&self, db: &str) -> String {
        format!("{}{db}", self.base_url)
    }

    /// The URL of database `db` as `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str, db: &str) -> String {
        self.base_url.replacen("root@", &format!("{user}:{password}@"), 1) + db
    }

    /// Creates database `db` (dropping an old one).
    pub async fn create_db(&self, db: &str) {
        self.exec(
            "",
            &[&format!("DROP DATABASE IF EXISTS `{db}`"), &format!("CREATE DATABASE `{db}`")],
        )
        .await;
    }

    /// Runs statements in database `db` (or none with `""`), one connection, in order.
    pub async fn exec(&self, db: &str, statements: &[&str]) {
        let mut conn = self.conn(db).await;
        for s in statements {
            conn.query_drop(*s).await.unwrap_or_else(|e| panic!("`{s}` failed: {e}"));
        }
        let _ = conn.disconnect().await;
    }

    /// A connection to database `db`.
    pub async fn conn(&self, db: &str) -> mysql_async::Conn {
        let opts = mysql_async::Opts::from_url(&self.url(db)).expect("valid url");
        mysql_async::Conn::new(opts).await.expect("connect to the test mariadb")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/mariadb");
        let _ = Command::new(script).arg("stop").arg(self.dir.path()).output();
    }
}
