//! `vdim serve --webhook URL`: every incident opened or resolved is POSTed there as JSON,
//! retried with backoff. The watch only queues a notice; one task on the broker's runtime
//! delivers them in order, so a slow or dead endpoint never holds the watch up.

use super::{Notice, Notify};
use std::time::Duration;
use thiserror::Error;

/// Attempts per notice, and the waits between them (doubling, at most [`MAX_BACKOFF`]).
pub const ATTEMPTS: u32 = 8;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long one POST may take.
const POST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum WebhookError {
    #[error("--webhook {0:?} must be an http:// or https:// URL")]
    Url(String),
    #[error("cannot make the webhook's HTTP client: {0}")]
    Client(String),
}

impl crate::error::Kind for WebhookError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            WebhookError::Url(_) => crate::error::ErrorKind::Invalid,
            WebhookError::Client(_) => crate::error::ErrorKind::Internal,
        }
    }
}

/// A checked webhook address.
#[derive(Debug, Clone)]
pub struct Webhook {
    url: reqwest::Url,
}

impl Webhook {
    pub fn parse(url: &str) -> Result<Webhook, WebhookError> {
        let bad = || WebhookError::Url(url.to_string());
        let parsed = reqwest::Url::parse(url).map_err(|_| bad())?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(bad());
        }
        Ok(Webhook { url: parsed })
    }

    /// Starts the delivering task on `rt`; returns what the watch calls with each notice.
    pub fn start(self, rt: &tokio::runtime::Handle) -> Result<Notify, WebhookError> {
        let client = reqwest::Client::builder()
            .timeout(POST_TIMEOUT)
            .user_agent(concat!("vdim/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
        let url = self.url;
        rt.spawn(async move {
            while let Some(body) = rx.recv().await {
                deliver(&client, &url, &body).await;
            }
        });
        Ok(Box::new(move |n: &Notice| {
            // An unbounded send never waits; it fails only when the broker is stopping.
            let _ = tx.send(payload(n));
        }))
    }
}

/// The JSON body: the event, the incident as `incident show --json` has it, and a sentence.
pub fn payload(n: &Notice) -> serde_json::Value {
    let i = &n.incident;
    let summary = match n.event {
        "incident.opened" => format!(
            "vdim incident {}: '{}' version {} in {} — {} ({})",
            i.id,
            i.image,
            i.version,
            i.channel,
            i.report.decision,
            i.action.as_str()
        ),
        _ => format!(
            "vdim incident {} resolved: no desktop of {} runs '{}' version {} any more",
            i.id, i.channel, i.image, i.version
        ),
    };
    serde_json::json!({"event": n.event, "summary": summary, "incident": i})
}

async fn deliver(client: &reqwest::Client, url: &reqwest::Url, body: &serde_json::Value) {
    let mut wait = FIRST_BACKOFF;
    for attempt in 1..=ATTEMPTS {
        match client.post(url.clone()).json(body).send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => tracing::warn!(attempt, status = r.status().as_u16(), "webhook refused the notice"),
            Err(e) => tracing::warn!(attempt, error = %e, "webhook not reached"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_BACKOFF);
        }
    }
    tracing::error!(event = %body["event"], "webhook: notice dropped after {ATTEMPTS} attempts");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https_urls_with_a_host_are_webhooks() {
        assert!(Webhook::parse("https://hooks.example.com/vdim").is_ok());
        assert!(Webhook::parse("http://127.0.0.1:9000/x").is_ok());
        for bad in ["ftp://x/y", "hooks.example.com", "file:///etc/passwd", "http://"] {
            let e = Webhook::parse(bad).unwrap_err().to_string();
            assert!(e.contains("must be an http:// or https:// URL"), "{bad}: {e}");
        }
    }
}
