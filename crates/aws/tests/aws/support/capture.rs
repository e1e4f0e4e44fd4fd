//! A recording proxy between the SDK and moto: forwards every request unchanged and keeps a
//! copy, so a test can check the bytes the SDK put on the wire against the EC2 API's
//! documented form. moto decodes what it receives by its own reading of the API model, so it
//! accepts some malformed requests (a user data blob encoded twice): it cannot be the judge
//! of the wire format, the captured request can.
//!
//! moto also *rejects* the correct form of one parameter: it decodes ModifyInstanceAttribute's
//! `UserData.Value` blob and then expects base64 again. The proxy forwards that parameter
//! encoded once more ([`moto_compat`]), so the emulator stores what EC2 would; the captured
//! copy is what the SDK sent.

// Used by the fleet tests (which include this support module), not by slipway-aws's own.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::http::{forward, read_request, Request};

pub struct CaptureProxy {
    pub endpoint: String,
    requests: Arc<Mutex<Vec<Request>>>,
    task: JoinHandle<()>,
}

impl Drop for CaptureProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CaptureProxy {
    pub async fn start(upstream_port: u16) -> CaptureProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let (r, mut w) = stream.into_split();
                    let mut r = BufReader::new(r);
                    let Ok(Some(req)) = read_request(&mut r).await else {
                        return;
                    };
                    seen.lock().unwrap().push(req.clone());
                    let Some(resp) = forward(upstream_port, &moto_compat(req)).await else {
                        return;
                    };
                    let _ = w.write_all(&resp).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        CaptureProxy {
            endpoint,
            requests,
            task,
        }
    }

    /// The form parameters of every captured query-API request whose `Action` is `action`,
    /// in the order they arrived (values percent-decoded).
    pub fn calls(&self, action: &str) -> Vec<Vec<(String, String)>> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| form(&r.body))
            .filter(|p| p.iter().any(|(k, v)| k == "Action" && v == action))
            .collect()
    }

    /// Every captured request's `Action` (query API), in order.
    pub fn actions(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| {
                form(&r.body)
                    .into_iter()
                    .find(|(k, _)| k == "Action")
                    .map(|(_, v)| v)
            })
            .collect()
    }
}

/// The request as moto understands it: `UserData.Value` (EC2: base64 of the user data)
/// encoded once more, since moto decodes the blob by its model and then wants base64 text.
pub fn moto_compat(mut req: Request) -> Request {
    let body = String::from_utf8_lossy(&req.body).into_owned();
    if !body.contains("UserData.Value=") {
        return req;
    }
    let out: Vec<String> = body
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, v)) if percent_decode(k) == "UserData.Value" => {
                let again = aws_smithy_types::base64::encode(percent_decode(v));
                format!("{k}={}", percent_encode(&again))
            }
            _ => p.to_string(),
        })
        .collect();
    req.body = out.join("&").into_bytes();
    for (k, v) in req.headers.iter_mut() {
        if k.eq_ignore_ascii_case("content-length") {
            *v = req.body.len().to_string();
        }
    }
    req
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `application/x-www-form-urlencoded` into pairs.
pub fn form(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
