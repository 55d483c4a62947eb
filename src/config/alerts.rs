//! `[[alerts]]` and `[notifiers.<name>]`: validated into [`AlertSpec`] and
//! [`NotifierSpec`]. Pure like the rest of validation: a notifier's password is
//! named by an environment variable here and read only when a mail is sent.

use std::str::FromStr;
use std::time::Duration;

use indexmap::IndexMap;
use rust_decimal::Decimal;

use super::error::{did_you_mean, Problems};
use super::raw::{RawAlert, RawNotifier};
use super::spec::{parse_duration, Agg, GoldSpec};

/// A rule stays quiet this long after a notification unless the file says otherwise.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(600);
/// `quarantine_rate` looks back over one default gold window.
pub const DEFAULT_RATE_WINDOW: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn code(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Which window of a gold table a rule reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowPick {
    /// The window before the newest one: complete, unless events arrive late.
    LastClosed,
    /// The newest window, still filling.
    Current,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The measure, summed over all groups of one window, is below/above a bound.
    GoldThreshold {
        gold: usize,
        measure: usize,
        below: Option<Decimal>,
        above: Option<Decimal>,
        on: WindowPick,
    },
    /// The window's measure changed against the window before by more than a percentage.
    GoldChange {
        gold: usize,
        measure: usize,
        drop_percent: Option<Decimal>,
        rise_percent: Option<Decimal>,
        on: WindowPick,
    },
    /// Quarantine records opened per event read over `window`, in percent.
    QuarantineRate { above_percent: Decimal, window: Duration },
    /// Now minus the newest source time applied to the store.
    Lag { max: Duration },
}

#[derive(Debug, Clone, PartialEq)]
pub struct AlertSpec {
    pub name: String,
    pub severity: Severity,
    pub cooldown: Duration,
    /// Indices into [`super::PipelineSpec::notifiers`].
    pub notify: Vec<usize>,
    pub condition: Condition,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (required, not opportunistic).
    StartTls,
    /// TLS from the first byte (SMTPS).
    Tls,
    /// No TLS: local relays and tests only.
    None,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SmtpSpec {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<String>,
    pub password_env: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    pub from: String,
    pub to: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NotifierKind {
    Slack { url: String },
    Webhook { url: String, headers: Vec<(String, String)> },
    Smtp(SmtpSpec),
}

#[derive(Debug, Clone, PartialEq)]
pub struct NotifierSpec {
    pub name: String,
    pub kind: NotifierKind,
}

const KINDS: [&str; 4] = ["gold_threshold", "gold_change", "quarantine_rate", "lag"];

fn quote(s: &str) -> String {
    format!("{s:?}")
}

/// Validates the notifiers, then the rules that refer to them and to `gold`.
pub(crate) fn alerts_spec(
    p: &mut Problems,
    raw_alerts: &[RawAlert],
    raw_notifiers: &IndexMap<String, RawNotifier>,
    gold: &[GoldSpec],
) -> (Vec<AlertSpec>, Vec<NotifierSpec>) {
    let notifiers: Vec<NotifierSpec> =
        raw_notifiers.iter().map(|(name, n)| notifier_spec(p, name, n)).collect();
    let mut alerts = Vec::new();
    for (i, a) in raw_alerts.iter().enumerate() {
        if raw_alerts[..i].iter().any(|o| o.name == a.name) {
            p.add(format!("alerts[{i}].name"), Some(quote(&a.name)), "duplicate alert name");
        }
        if let Some(spec) = alert_spec(p, i, a, &notifiers, gold) {
            alerts.push(spec);
        }
    }
    (alerts, notifiers)
}

fn alert_spec(
    p: &mut Problems,
    i: usize,
    a: &RawAlert,
    notifiers: &[NotifierSpec],
    gold: &[GoldSpec],
) -> Option<AlertSpec> {
    let key = format!("alerts[{i}]");
    let before = p.0.len();
    if a.name.trim().is_empty() {
        p.add(format!("{key}.name"), Some(quote(&a.name)), "must not be empty");
    }
    let severity = match a.severity.as_deref() {
        None | Some("warning") => Severity::Warning,
        Some("info") => Severity::Info,
        Some("critical") => Severity::Critical,
        Some(other) => {
            p.hint(
                format!("{key}.severity"),
                Some(quote(other)),
                "unknown severity",
                "one of `info`, `warning`, `critical`",
            );
            Severity::Warning
        }
    };
    let cooldown = duration(p, &format!("{key}.cooldown"), a.cooldown.as_deref(), DEFAULT_COOLDOWN);
    let mut notify = Vec::new();
    for (j, n) in a.notify.iter().enumerate() {
        match notifiers.iter().position(|x| &x.name == n) {
            Some(idx) => notify.push(idx),
            None => {
                let hint = did_you_mean(n, notifiers.iter().map(|x| x.name.as_str())).map_or_else(
                    || format!("declare it as [notifiers.{n}]"),
                    |m| format!("did you mean `{m}`?"),
                );
                p.hint(format!("{key}.notify[{j}]"), Some(quote(n)), "unknown notifier", hint);
            }
        }
    }
    // Keys that belong to other kinds are mistakes, not settings to ignore.
    let given: [(&str, bool); 10] = [
        ("gold", a.gold.is_some()),
        ("measure", a.measure.is_some()),
        ("below", a.below.is_some()),
        ("above", a.above.is_some()),
        ("drop_percent", a.drop_percent.is_some()),
        ("rise_percent", a.rise_percent.is_some()),
        ("on", a.on.is_some()),
        ("above_percent", a.above_percent.is_some()),
        ("window", a.window.is_some()),
        ("max_lag", a.max_lag.is_some()),
    ];
    let allowed: &[&str] = match a.kind.as_str() {
        "gold_threshold" => &["gold", "measure", "below", "above", "on"],
        "gold_change" => &["gold", "measure", "drop_percent", "rise_percent", "on"],
        "quarantine_rate" => &["above_percent", "window"],
        "lag" => &["max_lag"],
        other => {
            let hint = did_you_mean(other, KINDS).map_or_else(
                || format!("one of {}", KINDS.map(|k| format!("`{k}`")).join(", ")),
                |m| format!("did you mean `{m}`?"),
            );
            p.hint(format!("{key}.kind"), Some(quote(other)), "unknown alert kind", hint);
            return None;
        }
    };
    for (name, present) in given {
        if present && !allowed.contains(&name) {
            p.hint(
                format!("{key}.{name}"),
                None,
                format!("does not apply to kind `{}`", a.kind),
                format!("keys of `{}`: {}", a.kind, allowed.join(", ")),
            );
        }
    }
    let condition = match a.kind.as_str() {
        "gold_threshold" | "gold_change" => {
            // Resolved first, used last: the bounds' problems are reported too.
            let gm = gold_measure(p, &key, a, gold);
            let on = match a.on.as_deref() {
                None | Some("last_closed") => WindowPick::LastClosed,
                Some("current") => WindowPick::Current,
                Some(other) => {
                    p.hint(
                        format!("{key}.on"),
                        Some(quote(other)),
                        "unknown window",
                        "`last_closed` or `current`",
                    );
                    WindowPick::LastClosed
                }
            };
            if a.kind == "gold_threshold" {
                let below = decimal(p, &format!("{key}.below"), a.below.as_ref(), false);
                let above = decimal(p, &format!("{key}.above"), a.above.as_ref(), false);
                if a.below.is_none() && a.above.is_none() {
                    p.hint(
                        key.clone(),
                        None,
                        "a threshold needs a bound",
                        "set `below` or `above`",
                    );
                }
                let (g, m) = gm?;
                Condition::GoldThreshold { gold: g, measure: m, below, above, on }
            } else {
                let drop_percent =
                    decimal(p, &format!("{key}.drop_percent"), a.drop_percent.as_ref(), true);
                let rise_percent =
                    decimal(p, &format!("{key}.rise_percent"), a.rise_percent.as_ref(), true);
                if a.drop_percent.is_none() && a.rise_percent.is_none() {
                    p.hint(
                        key.clone(),
                        None,
                        "a change rule needs a percentage",
                        "set `drop_percent` or `rise_percent`, e.g. drop_percent = 50",
                    );
                }
                let (g, m) = gm?;
                Condition::GoldChange { gold: g, measure: m, drop_percent, rise_percent, on }
            }
        }
        "quarantine_rate" => {
            let k = format!("{key}.above_percent");
            let above_percent = match a.above_percent.as_ref() {
                Some(v) => decimal(p, &k, Some(v), true).unwrap_or_default(),
                None => {
                    p.hint(k, None, "missing", "e.g. above_percent = 5");
                    Decimal::ZERO
                }
            };
            let window =
                duration(p, &format!("{key}.window"), a.window.as_deref(), DEFAULT_RATE_WINDOW);
            Condition::QuarantineRate { above_percent, window }
        }
        _ => {
            let k = format!("{key}.max_lag");
            let max = match a.max_lag.as_deref() {
                Some(v) => duration(p, &k, Some(v), Duration::ZERO),
                None => {
                    p.hint(k, None, "missing", "e.g. max_lag = \"60s\"");
                    Duration::ZERO
                }
            };
            Condition::Lag { max }
        }
    };
    (p.0.len() == before).then(|| AlertSpec {
        name: a.name.clone(),
        severity,
        cooldown,
        notify,
        condition,
    })
}

fn gold_measure(
    p: &mut Problems,
    key: &str,
    a: &RawAlert,
    gold: &[GoldSpec],
) -> Option<(usize, usize)> {
    let Some(name) = a.gold.as_deref() else {
        p.hint(format!("{key}.gold"), None, "missing", "the name of a [[gold]] table");
        return None;
    };
    let Some(g) = gold.iter().position(|g| g.name == name) else {
        let hint = did_you_mean(name, gold.iter().map(|g| g.name.as_str())).map_or_else(
            || "declare it as a [[gold]] table".to_owned(),
            |m| format!("did you mean `{m}`?"),
        );
        p.hint(format!("{key}.gold"), Some(quote(name)), "unknown gold table", hint);
        return None;
    };
    let Some(measure) = a.measure.as_deref() else {
        p.hint(format!("{key}.measure"), None, "missing", "one of the gold table's measures");
        return None;
    };
    let measures = &gold[g].measures;
    let Some(m) = measures.iter().position(|m| m.name == measure) else {
        let hint = did_you_mean(measure, measures.iter().map(|m| m.name.as_str())).map_or_else(
            || {
                format!(
                    "one of {}",
                    measures.iter().map(|m| format!("`{}`", m.name)).collect::<Vec<_>>().join(", ")
                )
            },
            |m| format!("did you mean `{m}`?"),
        );
        p.hint(format!("{key}.measure"), Some(quote(measure)), "unknown measure", hint);
        return None;
    };
    // Groups are summed into one figure per window: only additive measures allow it.
    if !matches!(measures[m].agg, Agg::Count | Agg::Sum) {
        p.hint(
            format!("{key}.measure"),
            Some(quote(measure)),
            "not a `count` or `sum` measure",
            "alerts add the measure over all groups of a window",
        );
        return None;
    }
    Some((g, m))
}

/// A decimal written as `"100.50"` or `100`; percentages must be 0..=100 (drops) or
/// positive (rises), thresholds any value.
fn decimal(p: &mut Problems, key: &str, v: Option<&toml::Value>, percent: bool) -> Option<Decimal> {
    let v = v?;
    let d = match v {
        toml::Value::Integer(i) => Some(Decimal::from(*i)),
        toml::Value::String(s) => Decimal::from_str(s.trim()).ok(),
        // Floats are not exact; a float literal like 2.5 is read from its decimal text.
        toml::Value::Float(f) => Decimal::from_str(&f.to_string()).ok(),
        _ => None,
    };
    match d {
        Some(d) if percent && d <= Decimal::ZERO => {
            p.add(key, Some(v.to_string()), "must be a positive percentage");
            None
        }
        Some(d) => Some(d),
        None => {
            p.hint(key, Some(v.to_string()), "not a decimal number", "e.g. \"1500.00\" or 50");
            None
        }
    }
}

fn duration(p: &mut Problems, key: &str, v: Option<&str>, default: Duration) -> Duration {
    match v {
        None => default,
        Some(s) => parse_duration(s).unwrap_or_else(|| {
            p.hint(key, Some(quote(s)), "not a duration", "e.g. \"30s\", \"10m\", \"1h\"");
            default
        }),
    }
}

fn notifier_spec(p: &mut Problems, name: &str, n: &RawNotifier) -> NotifierSpec {
    let key = format!("notifiers.{name}");
    let check_url = |p: &mut Problems, url: &str| {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            // Not echoed: webhook URLs are secrets (Slack's carry the token).
            p.hint(
                format!("{key}.url"),
                None,
                "not an http(s) URL",
                "https://hooks.example.com/...",
            );
        }
    };
    let kind = match n {
        RawNotifier::Slack { url } => {
            check_url(p, url);
            NotifierKind::Slack { url: url.clone() }
        }
        RawNotifier::Webhook { url, headers } => {
            check_url(p, url);
            NotifierKind::Webhook {
                url: url.clone(),
                headers: headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            }
        }
        RawNotifier::Smtp { host, port, tls, username, password_env, ca_file, from, to } => {
            let tls = match tls.as_deref() {
                None | Some("starttls") => SmtpTls::StartTls,
                Some("tls") => SmtpTls::Tls,
                Some("none") => SmtpTls::None,
                Some(other) => {
                    p.hint(
                        format!("{key}.tls"),
                        Some(quote(other)),
                        "unknown TLS mode",
                        "`starttls`, `tls` or `none`",
                    );
                    SmtpTls::StartTls
                }
            };
            let default_port = match tls {
                SmtpTls::StartTls => 587,
                SmtpTls::Tls => 465,
                SmtpTls::None => 25,
            };
            let port = match port {
                None => default_port,
                Some(v) => u16::try_from(*v).ok().filter(|v| *v > 0).unwrap_or_else(|| {
                    p.add(format!("{key}.port"), Some(v.to_string()), "not a TCP port (1-65535)");
                    default_port
                }),
            };
            if host.trim().is_empty() {
                p.add(format!("{key}.host"), Some(quote(host)), "must not be empty");
            }
            if ca_file.is_some() && tls == SmtpTls::None {
                p.hint(
                    format!("{key}.ca_file"),
                    None,
                    "does not apply without TLS",
                    "set tls = \"starttls\" or \"tls\"",
                );
            }
            if username.is_some() != password_env.is_some() {
                p.hint(
                    key.clone(),
                    None,
                    "`username` and `password_env` go together",
                    "set both for AUTH, or neither",
                );
            }
            for (k, addr) in std::iter::once(("from".to_owned(), from))
                .chain(to.iter().enumerate().map(|(i, t)| (format!("to[{i}]"), t)))
            {
                if addr.parse::<lettre::message::Mailbox>().is_err() {
                    p.hint(
                        format!("{key}.{k}"),
                        Some(quote(addr)),
                        "not a mail address",
                        "`alerts@example.com` or `Caudal <alerts@example.com>`",
                    );
                }
            }
            if to.is_empty() {
                p.add(format!("{key}.to"), None, "needs at least one recipient");
            }
            NotifierKind::Smtp(SmtpSpec {
                host: host.clone(),
                port,
                tls,
                username: username.clone(),
                password_env: password_env.clone(),
                ca_file: ca_file.as_ref().map(std::path::PathBuf::from),
                from: from.clone(),
                to: to.clone(),
            })
        }
    };
    NotifierSpec { name: name.to_owned(), kind }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const BASE: &str = include_str!("../../config/examples/erp.toml");

    fn parse(extra: &str) -> Result<crate::config::PipelineSpec, crate::config::ConfigError> {
        crate::config::parse(Path::new("erp.toml"), &format!("{BASE}\n{extra}"))
    }

    #[test]
    fn rules_and_notifiers_resolve() {
        let spec = parse(
            r#"
[notifiers.ops]
type = "slack"
url = "https://hooks.example.com/x"
[notifiers.mail]
type = "smtp"
host = "127.0.0.1"
tls = "none"
from = "caudal <alerts@example.com>"
to = ["oncall@example.com"]

[[alerts]]
name = "revenue_low"
kind = "gold_threshold"
gold = "sales_10m"
measure = "revenue"
below = "100.50"
severity = "critical"
cooldown = "5m"
notify = ["mail", "ops"]

[[alerts]]
name = "stale"
kind = "lag"
max_lag = "90s"
"#,
        )
        .expect("valid");
        assert_eq!(spec.notifiers.len(), 2);
        assert_eq!(spec.alerts[0].notify, vec![1, 0]);
        assert_eq!(spec.alerts[0].severity, Severity::Critical);
        assert_eq!(spec.alerts[0].cooldown, Duration::from_secs(300));
        let Condition::GoldThreshold { below, on, .. } = &spec.alerts[0].condition else {
            panic!("threshold")
        };
        assert_eq!(*below, Some(Decimal::new(10050, 2)));
        assert_eq!(*on, WindowPick::LastClosed);
        assert_eq!(spec.alerts[1].condition, Condition::Lag { max: Duration::from_secs(90) });
        let NotifierKind::Smtp(smtp) = &spec.notifiers[1].kind else { panic!("smtp") };
        assert_eq!((smtp.port, smtp.tls), (25, SmtpTls::None));
    }

    #[test]
    fn every_problem_names_its_key() {
        let err = parse(
            r#"
[[alerts]]
name = "a"
kind = "gold_treshold"

[[alerts]]
name = "b"
kind = "gold_change"
gold = "sales_10m"
measure = "revenu"
max_lag = "1m"
notify = ["opz"]
"#,
        )
        .expect_err("invalid")
        .to_string();
        for want in [
            "`alerts[0].kind` = \"gold_treshold\": unknown alert kind (hint: did you mean `gold_threshold`?)",
            "`alerts[1].measure` = \"revenu\": unknown measure (hint: did you mean `revenue`?)",
            "`alerts[1].max_lag`: does not apply to kind `gold_change`",
            "`alerts[1].notify[0]` = \"opz\": unknown notifier",
        ] {
            assert!(err.contains(want), "{want}\nnot in\n{err}");
        }
    }
}
