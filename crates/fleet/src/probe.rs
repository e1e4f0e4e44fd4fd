//! What a replication server really runs with: `apply` asks each running server for the
//! fingerprint of its settings file instead of trusting the instance's
//! `slipway:settings-sha256` tag alone.
//!
//! The tag says what `apply` last *wrote* into the user data; the server's own
//! `slipway_settings_info{sha256}` metric says what `slipway-userdata` actually installed and
//! the server loaded. They differ when the user data never took (it was once encoded twice,
//! and an instance kept its old settings while its tag claimed the new ones), when someone
//! edited `/etc/slipway/slipway.toml` by hand, or when a boot failed to fetch the user data.
//! A probe that gets no answer (no route from the operator's machine, server down) is not
//! drift: `apply` falls back to the tag and says so.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fleet::ServerState;
use crate::template::Template;

/// The settings fingerprint a running server reports, `None` if it cannot be read.
pub trait SettingsProbe: Send + Sync + fmt::Debug {
    fn running_settings<'a>(
        &'a self,
        t: &'a Template,
        s: &'a ServerState,
    ) -> Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>>;
}

/// Reads `slipway_settings_info` from `http://PRIVATE_IP:METRICS_PORT/metrics` (the address
/// Prometheus scrapes), bounded by `timeout`.
#[derive(Debug, Clone)]
pub struct MetricsProbe {
    pub timeout: Duration,
}

impl Default for MetricsProbe {
    fn default() -> Self {
        MetricsProbe {
            timeout: Duration::from_secs(3),
        }
    }
}

impl SettingsProbe for MetricsProbe {
    fn running_settings<'a>(
        &'a self,
        t: &'a Template,
        s: &'a ServerState,
    ) -> Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>> {
        Box::pin(async move {
            let ip = s.private_ip.as_deref()?;
            let addr = format!("{ip}:{}", t.metrics_port);
            let body = tokio::time::timeout(self.timeout, get_metrics(&addr))
                .await
                .ok()??;
            settings_from_metrics(&body)
        })
    }
}

async fn get_metrics(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    // The server's metrics page is a few hundred KiB at most; bound what we read.
    s.take(16 << 20).read_to_end(&mut out).await.ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The `sha256` label of `slipway_settings_info` in a Prometheus text page.
pub fn settings_from_metrics(text: &str) -> Option<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix("slipway_settings_info{sha256=\""))
        .and_then(|rest| rest.split_once('"'))
        .map(|(sha, _)| sha.to_string())
        .filter(|sha| !sha.is_empty() && sha.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_is_read_from_the_metrics_page() {
        let page = "# HELP slipway_settings_info 1, labelled\n# TYPE slipway_settings_info gauge\n\
                    slipway_settings_info{sha256=\"0123456789abcdef\"} 1\nslipway_x 2\n";
        assert_eq!(
            settings_from_metrics(page).as_deref(),
            Some("0123456789abcdef")
        );
        assert_eq!(settings_from_metrics("slipway_x 2\n"), None);
        assert_eq!(
            settings_from_metrics("slipway_settings_info{sha256=\"<b>\"} 1\n"),
            None
        );
    }
}
