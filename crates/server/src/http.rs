//! A deliberately small HTTP/1.1 endpoint: `GET /metrics` and `GET /healthz`, nothing else.
//!
//! Prometheus needs no more, and a few dozen lines we can read beat a web framework in the
//! server's dependency tree. Requests are bounded (8 KiB of headers, 5 s to send them) and every
//! response closes the connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Inner;

pub(crate) async fn serve(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), handle(sock, inner)).await;
        });
    }
}

async fn handle(mut sock: TcpStream, inner: Arc<Inner>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > 8192 {
            return respond(
                &mut sock,
                "431 Request Header Fields Too Large",
                "text/plain",
                "too large\n",
            )
            .await;
        }
    }
    let line = String::from_utf8_lossy(&buf[..buf.iter().position(|b| *b == b'\r').unwrap_or(0)])
        .into_owned();
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            let body = inner.render_metrics();
            respond(
                &mut sock,
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                &body,
            )
            .await
        }
        ("GET", "/healthz") => {
            if inner.is_shutting_down() {
                respond(
                    &mut sock,
                    "503 Service Unavailable",
                    "application/json",
                    "{\"status\":\"draining\"}\n",
                )
                .await
            } else {
                // The fingerprint agents pin: public (a hash of the certificate the server
                // shows every client), and here it is readable without a shell on the server.
                let body = format!(
                    "{{\"status\":\"ok\",\"agents_connected\":{},\"fingerprint\":\"{}\"}}\n",
                    inner.metrics.agents_connected.get(),
                    inner.fingerprint
                );
                respond(&mut sock, "200 OK", "application/json", &body).await
            }
        }
        ("GET", _) => respond(&mut sock, "404 Not Found", "text/plain", "not found\n").await,
        _ => {
            respond(
                &mut sock,
                "405 Method Not Allowed",
                "text/plain",
                "method not allowed\n",
            )
            .await
        }
    }
}

async fn respond(
    sock: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}
