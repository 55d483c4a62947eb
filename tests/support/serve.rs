//! Helpers for the dashboard and alert tests: a free port, a tiny HTTP client, a
//! webhook receiver that records posts, an SMTP server that records mails (Python's
//! aiosmtpd), headless Chromium driven over the DevTools protocol, and a child
//! process killed when dropped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A child process that is killed (SIGKILL) and reaped when dropped.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// Sends SIGINT (Ctrl-C) and waits up to `limit` for a clean exit.
    pub fn interrupt(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").arg("-INT").arg(self.0.id().to_string()).status();
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// `GET path` over HTTP/1.1; (status, body). Reads `Content-Length` bytes when the
/// server says how many (Chromium's DevTools server keeps the connection open),
/// else to the end; handles chunked bodies.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut reader = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse().ok()));
    let mut raw = Vec::new();
    match length {
        Some(n) => {
            raw.resize(n, 0);
            reader.read_exact(&mut raw)?;
        }
        None => {
            reader.read_to_end(&mut raw)?;
        }
    }
    let body = String::from_utf8_lossy(&raw).into_owned();
    let body = if lower.contains("transfer-encoding: chunked") { dechunk(&body) } else { body };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Polls `GET path` until it answers 200 or `limit` passes.
pub fn wait_http(addr: SocketAddr, path: &str, limit: Duration) -> String {
    let until = Instant::now() + limit;
    loop {
        match http_get(addr, path) {
            Ok((200, body)) => return body,
            other if Instant::now() > until => panic!("GET {path} on {addr}: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// An HTTP server that answers 200 to every request and records each body.
pub struct WebhookReceiver {
    pub addr: SocketAddr,
    pub posts: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl WebhookReceiver {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        let posts = Arc::new(Mutex::new(Vec::new()));
        let recorded = posts.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let recorded = recorded.clone();
                std::thread::spawn(move || {
                    if let Some(body) = read_request(&stream) {
                        recorded.lock().expect("posts").push((Instant::now(), body));
                    }
                    let mut stream = stream;
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                });
            }
        });
        Self { addr, posts }
    }

    pub fn bodies(&self) -> Vec<String> {
        self.posts.lock().expect("posts").iter().map(|(_, b)| b.clone()).collect()
    }
}

fn read_request(stream: &TcpStream) -> Option<String> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().ok()?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(String::from_utf8_lossy(&body).into_owned())
}

/// The Python with aiosmtpd and prometheus_client (`scripts/py-tools`).
pub fn py_tools() -> PathBuf {
    let out = Command::new(super::manifest_dir().join("scripts/py-tools"))
        .output()
        .expect("run scripts/py-tools");
    assert!(out.status.success(), "scripts/py-tools: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// `tests/support/smtp_sink.py`: an aiosmtpd server writing each mail to a file.
pub struct SmtpSink {
    pub port: u16,
    pub dir: PathBuf,
    _child: Running,
}

impl SmtpSink {
    /// With `tls` (certificate and key PEM files) the server requires STARTTLS.
    pub fn start(dir: &Path, login: Option<(&str, &str)>, tls: Option<(&Path, &Path)>) -> Self {
        let mut cmd = Command::new(py_tools());
        cmd.arg(super::manifest_dir().join("tests/support/smtp_sink.py")).arg(dir);
        if let Some((u, p)) = login {
            cmd.args([u, p]);
            if let Some((cert, key)) = tls {
                cmd.arg(cert).arg(key);
            }
        }
        let mut child =
            cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("start smtp sink");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("smtp sink port");
        let port = line.trim().parse().unwrap_or_else(|_| panic!("smtp sink said {line:?}"));
        Self { port, dir: dir.to_owned(), _child: Running(child) }
    }

    /// The recorded mails, oldest first.
    pub fn mails(&self) -> Vec<String> {
        let mut files: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let n = name.strip_prefix("mail-")?.strip_suffix(".eml")?.parse().ok()?;
                        Some((n, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.iter().filter_map(|(_, p)| std::fs::read_to_string(p).ok()).collect()
    }
}

/// Headless Chromium with a DevTools port, showing one page.
pub struct Chromium {
    _child: Running,
    _profile: tempfile::TempDir,
    socket: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
}

impl Chromium {
    /// Starts Chromium on `url` with a fresh profile and the flags that keep it
    /// off the network (without them it keeps trying to reach Google services).
    pub fn open(url: &str) -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1280,2000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium (Debian package `chromium`; scripts/install-deps installs it)");
        let child = Running(child);
        // Chromium writes the port it picked to DevToolsActivePort in the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let until = Instant::now() + Duration::from_secs(30);
        let port: u16 = loop {
            if let Some(p) = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
            {
                break p;
            }
            assert!(Instant::now() < until, "chromium did not open its DevTools port");
            std::thread::sleep(Duration::from_millis(100));
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // The page target's websocket, from the DevTools HTTP list.
        let page_ws = loop {
            let list = http_get(addr, "/json/list").map(|r| r.1).unwrap_or_default();
            let targets: serde_json::Value = serde_json::from_str(&list).unwrap_or_default();
            let ws = targets.as_array().and_then(|a| {
                a.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned))
            });
            if let Some(ws) = ws {
                break ws;
            }
            assert!(Instant::now() < until, "chromium shows no page: {list}");
            std::thread::sleep(Duration::from_millis(100));
        };
        let stream = TcpStream::connect(addr).expect("connect devtools");
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let (socket, _) =
            tungstenite::client(page_ws.as_str(), stream).expect("devtools websocket");
        Self { _child: child, _profile: profile, socket, next_id: 1 }
    }

    /// Calls a DevTools method and returns its `result`.
    pub fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = serde_json::json!({ "id": id, "method": method, "params": params });
        self.socket.send(tungstenite::Message::text(msg.to_string())).expect("devtools send");
        loop {
            let reply = self.socket.read().expect("devtools read");
            let tungstenite::Message::Text(text) = reply else { continue };
            let v: serde_json::Value = serde_json::from_str(text.as_str()).expect("devtools json");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub fn eval(&mut self, expression: &str) -> serde_json::Value {
        let r = self.call(
            "Runtime.evaluate",
            serde_json::json!({ "expression": expression, "returnByValue": true }),
        );
        r["result"]["value"].clone()
    }

    /// A PNG of the page.
    pub fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine as _;
        let r = self.call("Page.captureScreenshot", serde_json::json!({ "format": "png" }));
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64")
    }
}

/// A CA and a server certificate it signed for `localhost`, as PEM files in `dir`:
/// (ca.pem, server.pem, server.key). Made with the `openssl` command line.
pub fn test_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").current_dir(dir).args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=caudal test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext file");
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"))
}
