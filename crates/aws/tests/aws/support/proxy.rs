//! A proxy between the SDK and moto that answers a share of requests itself with throttling
//! or 503 errors (without forwarding them, so nothing happens twice) and forwards the rest.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::http::{forward, read_request, write_response};

/// EC2's query-API throttling answer.
const THROTTLED: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>";
const UNAVAILABLE: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>Unavailable</Code><Message>The server is overloaded.</Message></Error></Errors><RequestID>00000000-0000-0000-0000-000000000001</RequestID></Response>";

#[derive(Debug, Default)]
pub struct ProxyCounters {
    pub requests: AtomicUsize,
    pub injected: AtomicUsize,
    pub forwarded: AtomicUsize,
}

pub struct ThrottleProxy {
    pub endpoint: String,
    pub counters: Arc<ProxyCounters>,
    task: JoinHandle<()>,
}

impl Drop for ThrottleProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ThrottleProxy {
    /// Injects an error into `percent`% of requests (a fixed pseudo-random sequence from
    /// `seed`, so a run is repeatable), alternating RequestLimitExceeded and plain 503s.
    pub async fn start(upstream_port: u16, percent: u64, seed: u64) -> ThrottleProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let counters = Arc::new(ProxyCounters::default());
        let c = counters.clone();
        let rng = Arc::new(AtomicU64::new(seed));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (c, rng) = (c.clone(), rng.clone());
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut r = BufReader::new(r);
                    let Ok(Some(req)) = read_request(&mut r).await else {
                        return;
                    };
                    let n = c.requests.fetch_add(1, Ordering::SeqCst);
                    // splitmix64 step: deterministic, well spread.
                    let mut z = rng
                        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::SeqCst)
                        .wrapping_add(0x9E37_79B9_7F4A_7C15);
                    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                    z ^= z >> 31;
                    if z % 100 < percent {
                        c.injected.fetch_add(1, Ordering::SeqCst);
                        let body = if n % 2 == 0 { THROTTLED } else { UNAVAILABLE };
                        let _ = write_response(
                            &mut w,
                            503,
                            &[("Content-Type", "text/xml")],
                            body.as_bytes(),
                            true,
                        )
                        .await;
                        return;
                    }
                    c.forwarded.fetch_add(1, Ordering::SeqCst);
                    let Some(resp) = forward(upstream_port, &req).await else {
                        return;
                    };
                    let _ = w.write_all(&resp).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        ThrottleProxy {
            endpoint,
            counters,
            task,
        }
    }

    pub fn injected(&self) -> usize {
        self.counters.injected.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> usize {
        self.counters.requests.load(Ordering::SeqCst)
    }
}
