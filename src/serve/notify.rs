//! Notifiers: where alert transitions are sent.
//!
//! Each notifier has its own task and bounded queue. A send is retried with
//! exponential backoff and then logged and dropped; meanwhile only that notifier's
//! later messages wait. The evaluation loop hands events over with `try_send`, so a
//! receiver that is down (or slow) delays neither the other notifiers, nor the
//! dashboard, nor the pipeline.

use std::sync::Arc;
use std::time::Duration;

use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::alerts::{AlertEvent, Transition};
use crate::config::alerts::{NotifierKind, NotifierSpec, SmtpSpec, SmtpTls};
use crate::telemetry;

/// Messages waiting per notifier; beyond this, new ones are dropped and logged
/// (a receiver down for hours must not grow memory).
const QUEUE: usize = 256;
/// Attempts per message, and the backoff between them (doubling).
const ATTEMPTS: u32 = 5;
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// One attempt's limit: a receiver that accepts connections and never answers
/// must not hold the queue forever.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("http request failed")]
    Http(#[from] reqwest::Error),
    #[error("receiver answered {status}")]
    Status { status: u16 },
    #[error("cannot build the mail")]
    Mail(#[from] lettre::error::Error),
    #[error("smtp failed")]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("mail address `{address}` is not valid")]
    Address { address: String },
    #[error("environment variable `{name}` (the smtp password) is not set")]
    Password { name: String },
    #[error("cannot read the CA file `{}`", path.display())]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

/// The senders of every notifier, by index in the pipeline's `notifiers`.
#[derive(Clone)]
pub struct Notifiers {
    queues: Arc<Vec<(String, mpsc::Sender<AlertEvent>)>>,
}

impl Notifiers {
    /// Starts one task per notifier; they end when `shutdown` is cancelled.
    pub fn start(specs: &[NotifierSpec], shutdown: &CancellationToken) -> Self {
        let http = reqwest::Client::builder().timeout(ATTEMPT_TIMEOUT).build().unwrap_or_default();
        let queues = specs
            .iter()
            .map(|spec| {
                let (tx, rx) = mpsc::channel(QUEUE);
                let name = spec.name.clone();
                let spec = spec.clone();
                let http = http.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = run(spec, http, rx) => {}
                        () = shutdown.cancelled() => {}
                    }
                });
                (name, tx)
            })
            .collect();
        Self { queues: Arc::new(queues) }
    }

    /// Queues `event` for the notifiers at `targets`; never waits.
    pub fn send(&self, targets: &[usize], event: &AlertEvent) {
        for &i in targets {
            let Some((name, tx)) = self.queues.get(i) else { continue };
            if let Err(e) = tx.try_send(event.clone()) {
                warn!(notifier = %name, alert = %event.alert, error = %e, "notification dropped");
                metrics::counter!(telemetry::ALERT_NOTIFY_FAILURES, "notifier" => name.clone())
                    .increment(1);
            }
        }
    }
}

async fn run(spec: NotifierSpec, http: reqwest::Client, mut rx: mpsc::Receiver<AlertEvent>) {
    while let Some(event) = rx.recv().await {
        let mut backoff = BACKOFF_MIN;
        for attempt in 1..=ATTEMPTS {
            let result =
                match tokio::time::timeout(ATTEMPT_TIMEOUT, deliver(&spec, &http, &event)).await {
                    Ok(r) => r,
                    Err(_) => Err(NotifyError::Timeout(ATTEMPT_TIMEOUT)),
                };
            match result {
                Ok(()) => {
                    info!(notifier = %spec.name, alert = %event.alert, state = ?event.state, "notification sent");
                    break;
                }
                Err(e) if attempt < ATTEMPTS => {
                    warn!(notifier = %spec.name, alert = %event.alert, attempt, error = %ErrorChain(&e),
                        retry_in_ms = backoff.as_millis() as u64, "notification failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Err(e) => {
                    warn!(notifier = %spec.name, alert = %event.alert, error = %ErrorChain(&e),
                        "notification failed, giving up");
                    metrics::counter!(telemetry::ALERT_NOTIFY_FAILURES, "notifier" => spec.name.clone())
                        .increment(1);
                }
            }
        }
    }
}

/// `error: cause: cause` for logs.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

async fn deliver(
    spec: &NotifierSpec,
    http: &reqwest::Client,
    event: &AlertEvent,
) -> Result<(), NotifyError> {
    match &spec.kind {
        NotifierKind::Slack { url } => {
            let icon = match event.state {
                Transition::Firing => ":rotating_light:",
                Transition::Resolved => ":white_check_mark:",
            };
            let body = serde_json::json!({ "text": format!("{icon} {}", event.message) });
            check(http.post(url).json(&body).send().await?)
        }
        NotifierKind::Webhook { url, headers } => {
            let mut req = http.post(url).json(event);
            for (k, v) in headers {
                req = req.header(k, v);
            }
            check(req.send().await?)
        }
        NotifierKind::Smtp(smtp) => send_mail(smtp, event).await,
    }
}

fn check(resp: reqwest::Response) -> Result<(), NotifyError> {
    let status = resp.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(NotifyError::Status { status: status.as_u16() })
    }
}

/// rustls with the public roots, plus the notifier's own CA file if it names one.
fn tls_parameters(smtp: &SmtpSpec) -> Result<TlsParameters, NotifyError> {
    let mut builder = TlsParameters::builder(smtp.host.clone());
    if let Some(path) = &smtp.ca_file {
        let pem = std::fs::read(path)
            .map_err(|source| NotifyError::CaFile { path: path.clone(), source })?;
        builder = builder.add_root_certificate(Certificate::from_pem(&pem)?);
    }
    Ok(builder.build_rustls()?)
}

async fn send_mail(smtp: &SmtpSpec, event: &AlertEvent) -> Result<(), NotifyError> {
    let mailbox =
        |a: &str| a.parse::<Mailbox>().map_err(|_| NotifyError::Address { address: a.to_owned() });
    let state = match event.state {
        Transition::Firing => "FIRING",
        Transition::Resolved => "RESOLVED",
    };
    let mut builder = Message::builder()
        .from(mailbox(&smtp.from)?)
        .subject(format!("[{state}] {} {}", event.pipeline, event.alert));
    for to in &smtp.to {
        builder = builder.to(mailbox(to)?);
    }
    let body = format!(
        "{}\n\nalert: {}\nseverity: {}\nstate: {}\nvalue: {}\nat: {}\n",
        event.message,
        event.alert,
        event.severity.code(),
        state.to_lowercase(),
        event.value.as_deref().unwrap_or("-"),
        event.at
    );
    let message = builder.body(body)?;
    let tls = match smtp.tls {
        SmtpTls::None => Tls::None,
        SmtpTls::StartTls => Tls::Required(tls_parameters(smtp)?),
        SmtpTls::Tls => Tls::Wrapper(tls_parameters(smtp)?),
    };
    let mut transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&smtp.host)
        .tls(tls)
        .port(smtp.port)
        .timeout(Some(ATTEMPT_TIMEOUT));
    if let (Some(user), Some(var)) = (&smtp.username, &smtp.password_env) {
        let password =
            std::env::var(var).map_err(|_| NotifyError::Password { name: var.clone() })?;
        transport = transport.credentials(Credentials::new(user.clone(), password));
    }
    transport.build().send(message).await?;
    Ok(())
}
