//! `serve`: the dashboard, `/metrics`, `/health`, server-sent events and alerts,
//! each against real processes: `caudal run`/`demo` serving while they write a
//! store, headless Chromium, a webhook receiver and an SMTP server (aiosmtpd).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;

use crate::support::serve::*;
use crate::support::*;

/// The shipped ERP pipeline, reading `input` as it grows (`follow`), committing
/// every 200 ms into `store`, with `extra` appended (alerts, notifiers).
fn pipeline(dir: &Path, input: &Path, store: &Path, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(erp_pipeline()).expect("erp.toml");
    let text = text
        .replace(
            "[source]\ntype = \"file\"\npath = \"erp.jsonl\"",
            &format!(
                "[source]\ntype = \"file\"\npath = {:?}\nfollow = true",
                input.display().to_string()
            ),
        )
        .replace("trigger_interval = \"1s\"", "trigger_interval = \"200ms\"")
        .replace("path = \"caudal.db\"", &format!("path = {:?}", store.display().to_string()));
    assert!(text.contains("follow = true"), "erp.toml's [source] changed: update this test");
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, format!("{text}\n{extra}")).expect("write pipeline");
    path
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn snapshot(at: SocketAddr) -> serde_json::Value {
    serde_json::from_str(&wait_http(at, "/api/snapshot", Duration::from_secs(10))).expect("json")
}

/// Polls the snapshot until `ok` holds.
fn wait_snapshot(
    at: SocketAddr,
    limit: Duration,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let until = Instant::now() + limit;
    loop {
        let s = snapshot(at);
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}; last snapshot: {s:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Running {
    let log = std::fs::File::create(log).expect("log file");
    Running(cmd.stdout(Stdio::null()).stderr(log).spawn().expect("start caudal"))
}

#[test]
fn dashboard_api_metrics_and_health_follow_a_running_pipeline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("erp.jsonl");
    std::fs::copy(erpgen(20_000, 7), &input).expect("copy workload");
    let store = dir.path().join("erp.db");
    let file = pipeline(dir.path(), &input, &store, "");
    let port = free_port();
    let mut run = spawn(
        caudal().arg("run").arg(&file).arg("--quiet").arg("--listen").arg(port.to_string()),
        &dir.path().join("caudal.log"),
    );
    let at = addr(port);
    // 20,000 changes plus the workload's re-deliveries and unreadable lines.
    let snap = wait_snapshot(at, Duration::from_secs(60), "every event committed", |s| {
        s["health"]["events_total"].as_i64() >= Some(20_000)
            && s["health"]["checkpoint"]["event_count"] == s["health"]["events_total"]
            && s["business"][0]["windows"].as_array().is_some_and(|w| !w.is_empty())
            // The top lists are read apart, every 5 s while they are still empty.
            && s["top"]["products"].as_array().is_some_and(|p| !p.is_empty())
    });
    let events = snap["health"]["events_total"].as_f64().expect("events");

    // Business panels equal the stored gold, exactly: the newest window's revenue
    // is the sum over its groups in the export.
    let out = dir.path().join("export");
    export(&store, &out);
    let csv = std::fs::read_to_string(out.join("gold_sales_10m.csv")).expect("gold csv");
    let current = &snap["business"][0]["current"];
    let revenue = current
        .as_array()
        .and_then(|c| c.iter().find(|m| m["measure"] == "revenue"))
        .expect("revenue compare");
    let window_ms = revenue["window_ms"].as_i64().expect("window_ms");
    let window = caudal::event::time::format_timestamp(window_ms * 1000, 0);
    let sum: Decimal = csv
        .lines()
        .filter(|l| l.starts_with(&window))
        .map(|l| Decimal::from_str(l.rsplit(',').next().expect("revenue")).expect("decimal"))
        .sum();
    assert_eq!(revenue["value"].as_str(), Some(sum.to_string().as_str()), "window {window}");
    assert!(snap["top"]["products"].as_array().is_some_and(|p| !p.is_empty()), "{snap:#}");
    assert!(snap["top"]["cities"].as_array().is_some_and(|p| !p.is_empty()), "{snap:#}");
    let tables = snap["health"]["tables"].as_array().expect("tables");
    assert!(tables.iter().any(|t| t["table"] == "order_items" && t["events"].as_u64() > Some(0)));
    assert!(snap["health"]["latency_ms"]["p50"].is_u64(), "{:#}", snap["health"]);
    assert!(snap["quarantine"]["open_total"].as_u64() > Some(0), "the workload has dirt");

    // The latest quarantined rows of one reason.
    let reason = snap["quarantine"]["by_reason"][0][0].as_str().expect("a reason").to_owned();
    let (status, body) =
        http_get(at, &format!("/api/quarantine?reason={reason}&limit=3")).expect("quarantine");
    assert_eq!(status, 200);
    let rows: serde_json::Value = serde_json::from_str(&body).expect("json");
    let rows = rows.as_array().expect("array");
    assert!(!rows.is_empty() && rows.len() <= 3, "{body}");
    assert!(rows.iter().all(|r| r["reason"] == reason.as_str() && r["payload"].is_string()));

    // Health: live, and ready because the store answers.
    assert_eq!(http_get(at, "/health/live").expect("live").0, 200);
    let (status, body) = http_get(at, "/health").expect("health");
    assert_eq!((status, body.contains("\"ready\":true")), (200, true), "{body}");

    // /metrics parses with Prometheus' own Python parser and has the pipeline's series.
    let (status, metrics) = http_get(at, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    let metrics_file = dir.path().join("metrics.txt");
    std::fs::write(&metrics_file, &metrics).expect("write metrics");
    let parsed = Command::new(py_tools())
        .arg("-c")
        .arg(
            "import json, sys\n\
             from prometheus_client.parser import text_string_to_metric_families\n\
             text = open(sys.argv[1]).read()\n\
             print(json.dumps([[s.name, s.labels, s.value] for f in text_string_to_metric_families(text) for s in f.samples]))",
        )
        .arg(&metrics_file)
        .output()
        .expect("python parser");
    assert!(parsed.status.success(), "{}", String::from_utf8_lossy(&parsed.stderr));
    let samples: Vec<(String, serde_json::Value, f64)> =
        serde_json::from_slice(&parsed.stdout).expect("parser output");
    let value = |name: &str, label: Option<(&str, &str)>| {
        samples
            .iter()
            .filter(|(n, l, _)| n == name && label.is_none_or(|(k, v)| l[k] == v))
            .map(|s| s.2)
            .sum::<f64>()
    };
    assert_eq!(value("caudal_process_events_in_total", None), events);
    assert!(value("caudal_process_events_in_total", Some(("table", "order_items"))) > 0.0);
    assert!(value("caudal_store_rows_out_total", Some(("table", "orders"))) > 0.0);
    assert_eq!(value("caudal_store_events_committed_total", None), events);
    assert!(value("caudal_store_commit_seconds_count", None) > 0.0);
    assert!(value("caudal_store_commit_seconds_bucket", Some(("le", "+Inf"))) > 0.0);
    assert!(value("caudal_process_batch_seconds_count", None) > 0.0);
    assert!(value("caudal_pipeline_latency_seconds_count", None) > 0.0);
    assert!(value("caudal_store_quarantined_total", None) > 0.0);
    assert!(samples.iter().any(|s| s.0 == "caudal_pipeline_lag_seconds"));
    assert!(samples.iter().any(|s| s.0 == "caudal_quarantine_open_rows"));

    // Server-sent events: the current snapshot at once, then the next ones.
    let mut events = std::net::TcpStream::connect(at).expect("connect events");
    events.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    std::io::Write::write_all(&mut events, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("get");
    let mut seen = String::new();
    let mut buf = [0u8; 65536];
    while seen.matches("event: snapshot").count() < 2 {
        let n = std::io::Read::read(&mut events, &mut buf).expect("read events");
        assert!(n > 0, "event stream ended: {seen:.200}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("text/event-stream"), "{seen:.300}");

    let status = run.interrupt(Duration::from_secs(20)).expect("caudal run stops on Ctrl-C");
    assert!(status.success(), "{status}");
}

#[test]
fn browser_shows_live_charts_and_a_number_that_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let at = addr(port);
    let _demo = spawn(
        caudal()
            .arg("demo")
            .args(["--rate", "400/s", "--listen", &port.to_string(), "--store"])
            .arg(dir.path().join("demo.db")),
        &dir.path().join("demo.log"),
    );
    wait_snapshot(at, Duration::from_secs(60), "gold rows", |s| {
        s["business"][0]["windows"].as_array().is_some_and(|w| !w.is_empty())
    });
    let mut browser = Chromium::open(&format!("http://{at}/"));
    let until = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let state = browser.eval(
            "JSON.stringify({updates: window.caudal ? window.caudal.updates : 0, \
             points: window.caudal ? window.caudal.points : 0, \
             canvases: document.querySelectorAll('canvas').length, \
             events: document.getElementById('kpi-events').dataset.value, \
             revenue: (document.getElementById('kpi-revenue') || {}).textContent})",
        );
        let state: serde_json::Value =
            serde_json::from_str(state.as_str().unwrap_or("{}")).expect("page state");
        if state["updates"].as_u64() >= Some(1) && state["points"].as_u64() > Some(0) {
            assert!(state["canvases"].as_u64() >= Some(4), "charts drawn: {state}");
            assert!(state["revenue"]
                .as_str()
                .is_some_and(|r| r.chars().any(|c| c.is_ascii_digit())));
            break state;
        }
        assert!(Instant::now() < until, "the page got no data: {state}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let events_at = |b: &mut Chromium| -> u64 {
        b.eval("document.getElementById('kpi-events').dataset.value")
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before: u64 = first["events"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0);
    // Without a reload: the server pushes new snapshots as events arrive.
    let until = Instant::now() + Duration::from_secs(15);
    let after = loop {
        let now = events_at(&mut browser);
        if now > before {
            break now;
        }
        assert!(Instant::now() < until, "the events number stayed at {before}");
        std::thread::sleep(Duration::from_millis(250));
    };
    // The number as people read it: with thousands separators once it is large.
    let text = browser.eval("document.getElementById('kpi-events').textContent");
    assert!(text.as_str().is_some_and(|t| !t.is_empty()), "{text}");
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    std::fs::write(&shot, &png).expect("save screenshot");
    // On a phone's width the page reflows to one column without sideways scrolling.
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        serde_json::json!({ "width": 390, "height": 2400, "deviceScaleFactor": 1, "mobile": true }),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let width = browser.eval("document.documentElement.scrollWidth").as_u64().unwrap_or(0);
    assert!(width <= 400, "the page is {width} px wide on a 390 px screen");
    let phone = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-phone.png");
    std::fs::write(&phone, browser.screenshot()).expect("save phone screenshot");
    eprintln!("events {before} -> {after}; screenshots: {} {}", shot.display(), phone.display());
}

/// Appends the simulator's changes `from..to` (line numbers), with source times of
/// now. The simulator starts over at every call: the earlier lines are skipped so
/// that positions keep growing (equal positions would be dropped as re-deliveries).
fn append_fresh(input: &Path, from: usize, to: usize) {
    let now_us = caudal::event::time::now_ms() * 1000;
    let start = caudal::event::time::format_timestamp(now_us, 0);
    let out = input.with_extension("part");
    ok(caudal()
        .args(["simulate", "--events", &to.to_string(), "--seed", "1", "--start", &start])
        .arg("--out")
        .arg(&out));
    let data = std::fs::read_to_string(&out).expect("simulated events");
    let lines: String = data.lines().skip(from).map(|l| format!("{l}\n")).collect();
    assert_eq!(lines.lines().count(), to - from);
    let mut file = std::fs::OpenOptions::new().append(true).open(input).expect("open input");
    std::io::Write::write_all(&mut file, lines.as_bytes()).expect("append");
}

/// (alert, state) of every webhook post, in arrival order.
fn transitions(posts: &[String]) -> Vec<(String, String)> {
    posts
        .iter()
        .map(|p| {
            let v: serde_json::Value = serde_json::from_str(p).expect("webhook json");
            (
                v["alert"].as_str().unwrap_or("").to_owned(),
                v["state"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// The log without terminal colours (tracing colours it even into a file).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn wait_until(limit: Duration, what: &str, ok: impl Fn() -> bool) {
    let until = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn alerts_fire_once_respect_the_cooldown_resolve_and_a_down_receiver_delays_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hook = WebhookReceiver::start();
    let smtp = SmtpSink::start(&dir.path().join("mails"), Some(("caudal", "s3cret")), None);
    let down = free_port(); // nothing listens: every post is refused and retried
    let extra = format!(
        r#"
[notifiers.down]
type = "slack"
url = "http://127.0.0.1:{down}/hook"
[notifiers.hook]
type = "webhook"
url = "http://{hook}/alerts"
headers = {{ X-Caudal-Test = "1" }}
[notifiers.mail]
type = "smtp"
host = "127.0.0.1"
port = {smtp}
tls = "none"
username = "caudal"
password_env = "CAUDAL_TEST_SMTP_PASSWORD"
from = "caudal <caudal@example.com>"
to = ["oncall@example.com"]

[[alerts]]
name = "stale"
kind = "lag"
max_lag = "3s"
severity = "critical"
cooldown = "1ms"
notify = ["down", "hook", "mail"]

[[alerts]]
name = "stale_quiet"
kind = "lag"
max_lag = "3s"
cooldown = "1h"
notify = ["down", "hook"]
"#,
        hook = hook.addr,
        smtp = smtp.port,
    );
    let (input, port, _run) = run_alerting(dir.path(), &extra);
    let at = addr(port);
    let log = dir.path().join("caudal.log");
    let rule = |s: &serde_json::Value, name: &str| {
        s["alerts"]["rules"].as_array().and_then(|r| r.iter().find(|x| x["alert"] == name).cloned())
    };

    // Episode 1: fresh events, then silence: the lag passes 3 s and both rules fire.
    append_fresh(&input, 0, 300);
    wait_snapshot(at, Duration::from_secs(30), "fresh data, nothing firing", |s| {
        s["health"]["events_total"] == 300 && rule(s, "stale").is_some_and(|r| r["firing"] == false)
    });
    wait_until(Duration::from_secs(20), "the firing posts", || hook.bodies().len() >= 2);
    let fired_at = snapshot(at)["alerts"]["history"]
        .as_array()
        .and_then(|h| {
            h.iter().filter(|e| e["state"] == "firing").map(|e| e["at_ms"].as_i64()).min()
        })
        .flatten()
        .expect("firing in the history");
    // The down receiver is retried in its own task: the others got theirs at once.
    wait_until(Duration::from_secs(5), "the firing mail", || !smtp.mails().is_empty());
    let now_ms = caudal::event::time::now_ms();
    assert!(now_ms - fired_at < 8_000, "notifications took {} ms", now_ms - fired_at);
    let want = vec![
        ("stale".to_owned(), "firing".to_owned()),
        ("stale_quiet".to_owned(), "firing".to_owned()),
    ];
    let mut got = transitions(&hook.bodies());
    got.sort();
    assert_eq!(got, want);
    // Still firing a while later: still one notification per rule.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(hook.bodies().len(), 2, "{:?}", transitions(&hook.bodies()));
    assert_eq!(smtp.mails().len(), 1);
    let mail = &smtp.mails()[0];
    assert!(mail.contains("Subject: [FIRING]") && mail.contains("stale"), "{mail}");
    assert!(mail.contains("X-Envelope-To: oncall@example.com"), "{mail}");

    // New events: the lag drops, both resolve and say so.
    append_fresh(&input, 300, 600);
    wait_until(Duration::from_secs(20), "the resolved posts", || hook.bodies().len() >= 4);
    let mut got = transitions(&hook.bodies()[2..]);
    got.sort();
    assert_eq!(
        got,
        vec![
            ("stale".to_owned(), "resolved".to_owned()),
            ("stale_quiet".to_owned(), "resolved".to_owned())
        ]
    );
    wait_until(Duration::from_secs(10), "the resolved mail", || smtp.mails().len() >= 2);
    assert!(smtp.mails()[1].contains("Subject: [RESOLVED]"), "{}", smtp.mails()[1]);

    // Episode 2: `stale` (cooldown 1 ms) is sent again, `stale_quiet` (1 h) is not.
    wait_snapshot(at, Duration::from_secs(30), "the second episode", |s| {
        rule(s, "stale").is_some_and(|r| r["firing"] == true)
            && rule(s, "stale_quiet").is_some_and(|r| r["firing"] == true)
    });
    wait_until(Duration::from_secs(10), "the second firing post", || hook.bodies().len() >= 5);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(transitions(&hook.bodies()[4..]), vec![("stale".to_owned(), "firing".to_owned())]);
    let history = snapshot(at)["alerts"]["history"].clone();
    let quiet = history
        .as_array()
        .and_then(|h| {
            h.iter().find(|e| e["alert"] == "stale_quiet" && e["state"] == "firing").cloned()
        })
        .expect("stale_quiet in the history");
    assert_eq!(quiet["notified"], false, "held back by the cooldown: {history:#}");

    // The pipeline went on throughout and the dead receiver was retried, logged.
    assert_eq!(snapshot(at)["health"]["events_total"], 600);
    let log = strip_ansi(&std::fs::read_to_string(&log).expect("log"));
    assert!(
        log.lines()
            .any(|l| l.contains("notification failed, retrying") && l.contains("notifier=down")),
        "{log}"
    );
    let (status, metrics) = http_get(at, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("caudal_alert_firing{alert=\"stale\",severity=\"critical\"} 1"),
        "{metrics}"
    );
}

/// Grafana's `$__timeFilter(col)` over all time: the workload's event times are fixed.
fn expand_grafana_macros(sql: &str) -> String {
    let mut out = String::new();
    let mut rest = sql;
    while let Some(i) = rest.find("$__timeFilter(") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "$__timeFilter(".len()..];
        let end = after.find(')').expect("closing parenthesis");
        let col = &after[..end];
        out.push_str(&format!("{col} BETWEEN '1970-01-01' AND '2100-01-01'"));
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    assert!(!out.contains("$__"), "an unexpanded Grafana macro: {out}");
    out
}

#[test]
fn grafana_panels_query_the_postgres_store_and_name_real_metrics() {
    let grafana = manifest_dir().join("deploy/grafana");
    let datasources = std::fs::read_to_string(grafana.join("provisioning/datasources/caudal.yaml"))
        .expect("yaml");
    for want in ["uid: caudal-postgres", "uid: caudal-prometheus", "type: prometheus"] {
        assert!(datasources.contains(want), "datasources lack {want}");
    }
    let providers =
        std::fs::read_to_string(grafana.join("provisioning/dashboards/caudal.yaml")).expect("yaml");
    assert!(providers.contains("type: file"));
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(grafana.join("dashboards/caudal.json")).expect("dashboard"),
    )
    .expect("the dashboard is valid JSON");
    let targets: Vec<serde_json::Value> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .collect();
    let sql: Vec<String> =
        targets.iter().filter_map(|t| t["rawSql"].as_str().map(expand_grafana_macros)).collect();
    let promql: Vec<&str> = targets.iter().filter_map(|t| t["expr"].as_str()).collect();
    assert!(sql.len() >= 8 && promql.len() >= 5, "{} SQL, {} PromQL", sql.len(), promql.len());

    // Every Prometheus panel reads a metric caudal exports.
    let names = [
        caudal::telemetry::PROCESS_EVENTS_IN,
        caudal::telemetry::PIPELINE_LAG_SECONDS,
        caudal::telemetry::PIPELINE_LATENCY_SECONDS,
        caudal::telemetry::STORE_COMMIT_SECONDS,
        caudal::telemetry::PROCESS_BATCH_SECONDS,
        caudal::telemetry::STORE_QUARANTINED,
        caudal::telemetry::ALERT_FIRING,
    ];
    for expr in &promql {
        assert!(names.iter().any(|n| expr.contains(n)), "unknown metric in {expr}");
    }

    // Every SQL panel runs against a store the pipeline filled and returns rows.
    let pg = crate::support::postgres::Postgres::start();
    ok(caudal().arg("run").arg(erp_pipeline()).arg("--input").arg(erpgen(20_000, 7)).args([
        "--store",
        pg.url(),
        "-q",
    ]));
    // `caudal serve` reads the same PostgreSQL store: business panels, quarantine,
    // checkpoint and readiness.
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut serve = spawn(
        caudal().args(["serve", "--store", pg.url(), "--listen", &port.to_string()]),
        &dir.path().join("serve.log"),
    );
    let snap = wait_snapshot(addr(port), Duration::from_secs(30), "the PostgreSQL store", |s| {
        s["business"][0]["windows"].as_array().is_some_and(|w| !w.is_empty())
            && s["top"]["products"].as_array().is_some_and(|p| !p.is_empty())
    });
    assert!(
        snap["store"].as_str().is_some_and(|s| s.starts_with("postgres ")),
        "{}",
        snap["store"]
    );
    assert!(!snap["store"].as_str().unwrap_or("").contains("postgres@"), "no user in the label");
    assert!(snap["quarantine"]["open_total"].as_u64() > Some(0));
    assert!(snap["health"]["checkpoint"]["event_count"].as_i64() >= Some(20_000));
    assert!(snap["health"]["lag_s"].is_f64(), "lag from the silver tables: {:#}", snap["health"]);
    assert_eq!(http_get(addr(port), "/health").expect("health").0, 200);
    let status = serve.interrupt(Duration::from_secs(20)).expect("caudal serve stops on Ctrl-C");
    assert!(status.success(), "{status}");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async {
        let (client, conn) =
            tokio_postgres::connect(pg.url(), tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(conn);
        for q in &sql {
            let rows = client.query(q.as_str(), &[]).await.unwrap_or_else(|e| panic!("{q}: {e}"));
            assert!(!rows.is_empty(), "no rows: {q}");
        }
    });
}

#[test]
fn a_taken_port_stops_run_with_a_clear_message_but_not_the_demo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let demo = ok(caudal()
        .args(["demo", "--rate", "max", "--events", "2000", "--listen", &port, "--store"])
        .arg(dir.path().join("demo.db")));
    let stderr = String::from_utf8_lossy(&demo.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && stderr.contains("running without the dashboard"),
        "{stderr}"
    );
    let run = caudal()
        .arg("run")
        .arg(erp_pipeline())
        .arg("--input")
        .arg(erpgen(20_000, 7))
        .arg("--store")
        .arg(dir.path().join("run.db"))
        .args(["--quiet", "--listen", &port])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("error: cannot listen on 127.0.0.1:{port}")), "{stderr}");
    assert!(!dir.path().join("run.db").exists(), "the pipeline did not start");
}

#[test]
fn mail_alerts_go_over_starttls_with_auth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = test_certificates(dir.path());
    let smtp = SmtpSink::start(
        &dir.path().join("mails"),
        Some(("caudal", "s3cret")),
        Some((cert.as_path(), key.as_path())),
    );
    let extra = format!(
        r#"
[notifiers.mail]
type = "smtp"
host = "localhost"
port = {port}
tls = "starttls"
ca_file = {ca:?}
username = "caudal"
password_env = "CAUDAL_TEST_SMTP_PASSWORD"
from = "caudal@example.com"
to = ["oncall@example.com", "Audit <audit@example.com>"]

[[alerts]]
name = "stale"
kind = "lag"
max_lag = "1s"
notify = ["mail"]
"#,
        port = smtp.port,
        ca = ca.display().to_string(),
    );
    let (input, _port, _run) = run_alerting(dir.path(), &extra);
    append_fresh(&input, 0, 100);
    wait_until(Duration::from_secs(30), "a mail over STARTTLS", || !smtp.mails().is_empty());
    let mail = &smtp.mails()[0];
    assert!(mail.contains("Subject: [FIRING]"), "{mail}");
    assert!(mail.contains("X-Envelope-To: oncall@example.com,audit@example.com"), "{mail}");
}

/// `caudal run --listen` on an empty, growing input with the alert rules of
/// `extra` (validated first); its log is `caudal.log` in `dir`.
fn run_alerting(dir: &Path, extra: &str) -> (std::path::PathBuf, u16, Running) {
    let input = dir.join("erp.jsonl");
    std::fs::write(&input, b"").expect("input");
    let file = pipeline(dir, &input, &dir.join("erp.db"), extra);
    ok(caudal().arg("validate").arg(&file));
    let port = free_port();
    let run = spawn(
        caudal()
            .arg("run")
            .arg(&file)
            .args(["--quiet", "--listen", &port.to_string()])
            .env("CAUDAL_TEST_SMTP_PASSWORD", "s3cret"),
        &dir.join("caudal.log"),
    );
    (input, port, run)
}
