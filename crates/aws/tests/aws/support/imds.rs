//! A stand-in for the EC2 instance metadata service, IMDSv2 only: `PUT /latest/api/token`
//! with a TTL header gives a token (and echoes the TTL header, which the SDK's client
//! requires and moto's stand-in omits); every `GET` must carry that token. The key
//! `user-data` is served at `/latest/user-data`; `set` changes a value while it runs (an
//! instance type changed by a stop/modify/start).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::BufReader;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::http::{read_request, write_response};

const TOKEN: &str = "slipway-test-token-AQAAAexample==";

#[derive(Debug, Default)]
pub struct ImdsCounters {
    pub tokens: AtomicUsize,
    pub gets: AtomicUsize,
    pub refused: AtomicUsize,
}

pub struct Imds {
    pub endpoint: String,
    pub counters: Arc<ImdsCounters>,
    meta: Arc<Mutex<BTreeMap<String, String>>>,
    task: JoinHandle<()>,
}

impl Drop for Imds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Imds {
    /// Serves `meta` (paths under `/latest/meta-data/`) on a free loopback port.
    pub async fn start(meta: BTreeMap<String, String>) -> Imds {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let counters = Arc::new(ImdsCounters::default());
        let c = counters.clone();
        let meta = Arc::new(Mutex::new(meta));
        let shared = meta.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (c, meta) = (c.clone(), meta.clone());
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut r = BufReader::new(r);
                    while let Ok(Some(req)) = read_request(&mut r).await {
                        let (status, headers, body): (u16, Vec<(&str, String)>, String) =
                            if req.method == "PUT" && req.path == "/latest/api/token" {
                                match req
                                    .header("x-aws-ec2-metadata-token-ttl-seconds")
                                    .and_then(|t| t.parse::<u32>().ok())
                                    .filter(|t| (1..=21600).contains(t))
                                {
                                    Some(ttl) => {
                                        c.tokens.fetch_add(1, Ordering::SeqCst);
                                        (
                                            200,
                                            vec![(
                                                "x-aws-ec2-metadata-token-ttl-seconds",
                                                ttl.to_string(),
                                            )],
                                            TOKEN.to_string(),
                                        )
                                    }
                                    None => (400, vec![], String::new()),
                                }
                            } else if req.method == "GET" {
                                if req.header("x-aws-ec2-metadata-token") != Some(TOKEN) {
                                    c.refused.fetch_add(1, Ordering::SeqCst);
                                    (401, vec![], String::new())
                                } else {
                                    c.gets.fetch_add(1, Ordering::SeqCst);
                                    let key = match req.path.as_str() {
                                        "/latest/user-data" => Some("user-data"),
                                        p => p.strip_prefix("/latest/meta-data/"),
                                    };
                                    let value =
                                        key.and_then(|k| meta.lock().unwrap().get(k).cloned());
                                    match value {
                                        Some(v) => (200, vec![], v),
                                        None => (404, vec![], String::new()),
                                    }
                                }
                            } else {
                                (400, vec![], String::new())
                            };
                        let mut h: Vec<(&str, &str)> =
                            headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                        h.push(("Content-Type", "text/plain"));
                        let close = req
                            .header("connection")
                            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                        if write_response(&mut w, status, &h, body.as_bytes(), close)
                            .await
                            .is_err()
                            || close
                        {
                            return;
                        }
                    }
                });
            }
        });
        Imds {
            endpoint,
            counters,
            meta: shared,
            task,
        }
    }

    /// Sets (or adds) one value, e.g. `instance-type` or `user-data`.
    pub fn set(&self, key: &str, value: &str) {
        self.meta
            .lock()
            .unwrap()
            .insert(key.to_string(), value.to_string());
    }
}
