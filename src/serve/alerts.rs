//! Alert rules evaluated against what the store (and the running pipeline) show.
//!
//! Each rule is a small state machine, evaluated once per refresh:
//!
//! ```text
//! ok --breached--> firing (notify "firing" unless a notification was sent less
//!  ^                 |     than `cooldown` ago)
//!  +---cleared-------+     (notify "resolved" if the firing was notified)
//! ```
//!
//! One notification per episode, however long it lasts; a flapping condition is
//! held back by the cooldown. No data (an empty gold table, a pipeline that has not
//! committed yet) never breaches. Evaluation is pure: the caller hands the events
//! it returns to the notifiers, which run in their own tasks.

use std::collections::VecDeque;
use std::time::Duration;

use rust_decimal::Decimal;

use super::reader::GoldView;
use crate::config::alerts::{AlertSpec, Condition, Severity, WindowPick};
use crate::config::spec::PipelineSpec;
use crate::event::time;

/// Transitions kept for the dashboard's history.
const HISTORY: usize = 200;

/// What a refresh observed, as the rules need it.
pub struct Observation<'a> {
    pub now_ms: i64,
    pub gold: &'a [GoldView],
    /// Quarantine records ever opened (the highest id).
    pub quarantine_opened: i64,
    /// Events committed so far (any origin; only differences are used).
    pub events: Option<i64>,
    pub lag_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    Firing,
    Resolved,
}

/// One state change of one rule.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AlertEvent {
    pub pipeline: String,
    pub alert: String,
    pub severity: Severity,
    pub state: Transition,
    pub at_ms: i64,
    pub at: String,
    /// The observed value, as text (exact for money).
    pub value: Option<String>,
    pub message: String,
    /// Sent to the rule's notifiers (false: held back by the cooldown, or the
    /// resolution of an episode that was not sent).
    pub notified: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RuleStatus {
    pub alert: String,
    pub severity: Severity,
    pub firing: bool,
    pub since: Option<String>,
    pub value: Option<String>,
    pub condition: String,
}

#[derive(Debug, Default)]
struct RuleState {
    firing_since_ms: Option<i64>,
    /// Whether the current episode's firing was sent.
    notified: bool,
    last_notified_ms: Option<i64>,
    value: Option<String>,
}

/// Every rule's state, the recent transitions, and the samples rates need.
pub struct AlertEngine {
    pipeline: String,
    rules: Vec<AlertSpec>,
    states: Vec<RuleState>,
    history: VecDeque<AlertEvent>,
    /// (time, quarantine records opened, events) per evaluation, oldest first.
    samples: VecDeque<(i64, i64, i64)>,
    keep_ms: i64,
}

impl AlertEngine {
    pub fn new(spec: &PipelineSpec) -> Self {
        let keep = spec
            .alerts
            .iter()
            .filter_map(|a| match a.condition {
                Condition::QuarantineRate { window, .. } => Some(window),
                _ => None,
            })
            .max()
            .unwrap_or(Duration::ZERO);
        Self {
            pipeline: spec.name.clone(),
            rules: spec.alerts.clone(),
            states: spec.alerts.iter().map(|_| RuleState::default()).collect(),
            history: VecDeque::new(),
            samples: VecDeque::new(),
            keep_ms: i64::try_from(keep.as_millis()).unwrap_or(i64::MAX),
        }
    }

    pub fn rules(&self) -> &[AlertSpec] {
        &self.rules
    }

    /// Evaluates every rule and returns the transitions, oldest first.
    pub fn evaluate(&mut self, spec: &PipelineSpec, obs: &Observation<'_>) -> Vec<AlertEvent> {
        if let Some(events) = obs.events {
            self.samples.push_back((obs.now_ms, obs.quarantine_opened, events));
            // Keep one sample at or before the longest window's start: the rate then
            // covers the whole window.
            while self.samples.get(1).is_some_and(|s| obs.now_ms - s.0 >= self.keep_ms) {
                self.samples.pop_front();
            }
        }
        let mut out = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let (value, breached, what) = measure(spec, rule, obs, &self.samples);
            let Some(state) = self.states.get_mut(i) else { continue };
            state.value.clone_from(&value);
            match (state.firing_since_ms, breached) {
                (None, true) => {
                    let cooling = state.last_notified_ms.is_some_and(|t| {
                        u128::try_from(obs.now_ms - t).unwrap_or(0) < rule.cooldown.as_millis()
                    });
                    let notify = !cooling && !rule.notify.is_empty();
                    state.firing_since_ms = Some(obs.now_ms);
                    state.notified = notify;
                    if notify {
                        state.last_notified_ms = Some(obs.now_ms);
                    }
                    out.push(self.event(
                        rule,
                        Transition::Firing,
                        obs.now_ms,
                        value,
                        &what,
                        notify,
                    ));
                }
                (Some(_), false) => {
                    let notify = state.notified;
                    state.firing_since_ms = None;
                    state.notified = false;
                    out.push(self.event(
                        rule,
                        Transition::Resolved,
                        obs.now_ms,
                        value,
                        &what,
                        notify,
                    ));
                }
                _ => {}
            }
        }
        for e in &out {
            if self.history.len() == HISTORY {
                self.history.pop_back();
            }
            self.history.push_front(e.clone());
        }
        out
    }

    fn event(
        &self,
        rule: &AlertSpec,
        state: Transition,
        now_ms: i64,
        value: Option<String>,
        what: &str,
        notified: bool,
    ) -> AlertEvent {
        let verb = match state {
            Transition::Firing => "firing",
            Transition::Resolved => "resolved",
        };
        AlertEvent {
            pipeline: self.pipeline.clone(),
            alert: rule.name.clone(),
            severity: rule.severity,
            state,
            at_ms: now_ms,
            at: time::format_timestamp(now_ms * 1000, 0),
            message: format!(
                "[{}] {} `{}` {verb}: {what}",
                rule.severity.code().to_uppercase(),
                self.pipeline,
                rule.name
            ),
            value,
            notified,
        }
    }

    /// The current state of every rule.
    pub fn status(&self, spec: &PipelineSpec) -> Vec<RuleStatus> {
        self.rules
            .iter()
            .zip(&self.states)
            .map(|(r, s)| RuleStatus {
                alert: r.name.clone(),
                severity: r.severity,
                firing: s.firing_since_ms.is_some(),
                since: s.firing_since_ms.map(|t| time::format_timestamp(t * 1000, 0)),
                value: s.value.clone(),
                condition: describe(spec, r),
            })
            .collect()
    }

    /// Recent transitions, newest first.
    pub fn history(&self) -> impl Iterator<Item = &AlertEvent> {
        self.history.iter()
    }
}

/// The rule's condition in words, for the dashboard.
pub fn describe(spec: &PipelineSpec, rule: &AlertSpec) -> String {
    match &rule.condition {
        Condition::GoldThreshold { gold, measure, below, above, on } => {
            let mut parts = Vec::new();
            if let Some(b) = below {
                parts.push(format!("below {b}"));
            }
            if let Some(a) = above {
                parts.push(format!("above {a}"));
            }
            format!("{} {}", measure_name(spec, *gold, *measure, *on), parts.join(" or "))
        }
        Condition::GoldChange { gold, measure, drop_percent, rise_percent, on } => {
            let mut parts = Vec::new();
            if let Some(d) = drop_percent {
                parts.push(format!("drops over {d}%"));
            }
            if let Some(r) = rise_percent {
                parts.push(format!("rises over {r}%"));
            }
            format!(
                "{} {} against the window before",
                measure_name(spec, *gold, *measure, *on),
                parts.join(" or ")
            )
        }
        Condition::QuarantineRate { above_percent, window } => {
            format!("quarantine rate over {above_percent}% in {}s", window.as_secs())
        }
        Condition::Lag { max } => format!("lag over {}s", max.as_secs_f64()),
    }
}

fn measure_name(spec: &PipelineSpec, gold: usize, measure: usize, on: WindowPick) -> String {
    let g = spec.gold.get(gold);
    let m = g.and_then(|g| g.measures.get(measure)).map_or("?", |m| m.name.as_str());
    let which = match on {
        WindowPick::LastClosed => "last closed window",
        WindowPick::Current => "current window",
    };
    format!("{m} of the {which} of `{}`", g.map_or("?", |g| g.name.as_str()))
}

/// The measure summed over all groups, per window start, oldest first.
pub fn window_totals(view: &GoldView, measure: usize) -> Vec<(i64, Decimal)> {
    let mut out: Vec<(i64, Decimal)> = Vec::new();
    for (start, _, measures) in &view.rows {
        let v = measures.get(measure).copied().flatten().unwrap_or_default();
        match out.last_mut() {
            Some((s, total)) if s == start => *total += v,
            _ => out.push((*start, v)),
        }
    }
    out
}

/// (value, breached, description) of one rule.
fn measure(
    spec: &PipelineSpec,
    rule: &AlertSpec,
    obs: &Observation<'_>,
    samples: &VecDeque<(i64, i64, i64)>,
) -> (Option<String>, bool, String) {
    let pick = |gold: usize, measure: usize, on: WindowPick| {
        let totals = obs.gold.get(gold).map(|v| window_totals(v, measure)).unwrap_or_default();
        let back = match on {
            WindowPick::Current => 0,
            WindowPick::LastClosed => 1,
        };
        let at = totals.len().checked_sub(1 + back)?;
        let cur = totals.get(at).copied()?;
        let prev = at.checked_sub(1).and_then(|p| totals.get(p).copied());
        Some((cur, prev))
    };
    let describe = describe(spec, rule);
    match &rule.condition {
        Condition::GoldThreshold { gold, measure, below, above, on } => {
            let Some(((start, v), _)) = pick(*gold, *measure, *on) else {
                return (None, false, describe);
            };
            let breached = below.is_some_and(|b| v < b) || above.is_some_and(|a| v > a);
            let text = format!(
                "{describe}: {v} in the window from {}",
                time::format_timestamp(start * 1000, 0)
            );
            (Some(v.to_string()), breached, text)
        }
        Condition::GoldChange { gold, measure, drop_percent, rise_percent, on } => {
            let Some(((start, v), Some((_, prev)))) = pick(*gold, *measure, *on) else {
                return (None, false, describe);
            };
            if prev.is_zero() {
                return (None, false, describe);
            }
            let change = ((v - prev) / prev * Decimal::ONE_HUNDRED).round_dp(1);
            let breached = drop_percent.is_some_and(|d| -change > d)
                || rise_percent.is_some_and(|r| change > r);
            let text = format!(
                "{describe}: {prev} -> {v} ({change:+}%) in the window from {}",
                time::format_timestamp(start * 1000, 0)
            );
            (Some(format!("{change}%")), breached, text)
        }
        Condition::QuarantineRate { above_percent, window } => {
            let from = obs.now_ms - i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
            let (Some(first), Some(last)) =
                (samples.iter().rev().find(|s| s.0 <= from).or(samples.front()), samples.back())
            else {
                return (None, false, describe);
            };
            let (opened, events) = (last.1 - first.1, last.2 - first.2);
            if events <= 0 {
                return (None, false, describe);
            }
            let rate =
                (Decimal::from(opened) * Decimal::ONE_HUNDRED / Decimal::from(events)).round_dp(2);
            let text = format!("{describe}: {rate}% ({opened} of {events} events)");
            (Some(format!("{rate}%")), rate > *above_percent, text)
        }
        Condition::Lag { max } => {
            let Some(lag) = obs.lag_ms else { return (None, false, describe) };
            let secs = Decimal::new(lag, 3).round_dp(1);
            let breached = u128::try_from(lag).unwrap_or(0) > max.as_millis();
            (Some(format!("{secs}s")), breached, format!("{describe}: {secs}s"))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const BASE: &str = include_str!("../../config/examples/erp.toml");

    fn spec(rules: &str) -> PipelineSpec {
        let text = format!(
            "{BASE}\n[notifiers.hook]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/\"\n{rules}"
        );
        crate::config::parse(Path::new("erp.toml"), &text).expect("valid")
    }

    fn gold(windows: &[(i64, &[&str])]) -> GoldView {
        // sales_10m measures: lines, units, revenue; two groups per window.
        let mut v = GoldView::default();
        for (start, revenues) in windows {
            for (i, r) in revenues.iter().enumerate() {
                let revenue = r.parse::<Decimal>().ok();
                v.rows.push((*start, vec![format!("g{i}")], vec![None, None, revenue]));
            }
        }
        v
    }

    fn obs(now_ms: i64, gold: &[GoldView], lag_ms: Option<i64>) -> Observation<'_> {
        Observation { now_ms, gold, quarantine_opened: 0, events: None, lag_ms }
    }

    #[test]
    fn fires_once_per_episode_resolves_and_respects_the_cooldown() {
        let s = spec(
            "[[alerts]]\nname = \"stale\"\nkind = \"lag\"\nmax_lag = \"5s\"\ncooldown = \"60s\"\nnotify = [\"hook\"]\n",
        );
        let mut e = AlertEngine::new(&s);
        let g: Vec<GoldView> = Vec::new();
        let at = |e: &mut AlertEngine, t: i64, lag: i64| {
            e.evaluate(&s, &obs(t, &g, Some(lag)))
                .into_iter()
                .map(|x| (x.state, x.notified))
                .collect::<Vec<_>>()
        };
        assert_eq!(at(&mut e, 0, 1_000), vec![]);
        assert_eq!(at(&mut e, 1_000, 6_000), vec![(Transition::Firing, true)]);
        assert_eq!(at(&mut e, 2_000, 7_000), vec![], "one notification per episode");
        assert_eq!(at(&mut e, 3_000, 100), vec![(Transition::Resolved, true)]);
        // Again within the cooldown: recorded, not sent, and so is its resolution.
        assert_eq!(at(&mut e, 10_000, 9_000), vec![(Transition::Firing, false)]);
        assert_eq!(at(&mut e, 11_000, 0), vec![(Transition::Resolved, false)]);
        // After the cooldown it is sent again.
        assert_eq!(at(&mut e, 70_000, 9_000), vec![(Transition::Firing, true)]);
        assert_eq!(e.history().count(), 5);
        assert!(e.status(&s)[0].firing);
    }

    #[test]
    fn gold_rules_read_the_last_closed_window_exactly() {
        let s = spec(
            r#"
[[alerts]]
name = "low"
kind = "gold_threshold"
gold = "sales_10m"
measure = "revenue"
below = "100.00"
[[alerts]]
name = "drop"
kind = "gold_change"
gold = "sales_10m"
measure = "revenue"
drop_percent = 50
"#,
        );
        let mut e = AlertEngine::new(&s);
        // Closed windows: 0 -> 150.00, 600000 -> 60.00 + 39.99 = 99.99 (a 33.3% drop);
        // the current window (1200000) is ignored.
        let g = [gold(&[
            (0, &["100.00", "50.00"]),
            (600_000, &["60.00", "39.99"]),
            (1_200_000, &["1"]),
        ])];
        let fired = e.evaluate(&s, &obs(1, &g, None));
        assert_eq!(fired.len(), 1, "{fired:?}");
        assert_eq!((fired[0].alert.as_str(), fired[0].value.as_deref()), ("low", Some("99.99")));
        let status = e.status(&s);
        assert_eq!(status[1].value.as_deref(), Some("-33.3%"));
        // A 60% drop fires the change rule; 100.00 is not below 100.00.
        let g = [gold(&[(0, &["250.00"]), (600_000, &["100.00"]), (1_200_000, &["1"])])];
        let fired = e.evaluate(&s, &obs(2, &g, None));
        let states: Vec<_> = fired.iter().map(|f| (f.alert.as_str(), f.state)).collect();
        assert_eq!(states, vec![("low", Transition::Resolved), ("drop", Transition::Firing)]);
    }

    #[test]
    fn quarantine_rate_is_opened_records_over_events_in_the_window() {
        let s = spec(
            "[[alerts]]\nname = \"dirty\"\nkind = \"quarantine_rate\"\nabove_percent = 5\nwindow = \"10s\"\n",
        );
        let mut e = AlertEngine::new(&s);
        let g: Vec<GoldView> = Vec::new();
        let mut at = |t: i64, q: i64, ev: i64| {
            let o = Observation {
                now_ms: t,
                gold: &g,
                quarantine_opened: q,
                events: Some(ev),
                lag_ms: None,
            };
            e.evaluate(&s, &o).into_iter().map(|x| x.state).collect::<Vec<_>>()
        };
        assert_eq!(at(0, 0, 0), vec![]);
        assert_eq!(at(5_000, 4, 100), vec![], "4% is not over 5%");
        assert_eq!(at(9_000, 12, 200), vec![Transition::Firing], "6%");
        // 20s later the window starts at the sample of 9s: 1 of 1000.
        assert_eq!(at(20_000, 13, 1_200), vec![Transition::Resolved]);
    }
}
