//! The server's QUIC receive windows are shares of one budget (`quic.receive_memory`), so the
//! bytes its QUIC buffers may hold do not grow with the number of agents (issue 13).
//!
//! What an agent may send ahead of the server's reads is the credit the server grants it:
//! a client can measure it exactly, because quinn accepts a stream write only up to the
//! peer's flow-control credit (a write beyond it stays pending whatever the network does).
//! The tests never let the server read the bulk stream (it waits for a Hello on the control
//! stream), so the credit measured is the window the server gave that connection.

use std::future::Future;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::support::*;

const MIB: u64 = 1 << 20;

/// Bytes `bulk` may send right now: writes until one would wait for credit.
fn take_credit(bulk: &mut quinn::SendStream) -> u64 {
    let chunk = vec![0u8; 64 << 10];
    let mut cx = Context::from_waker(Waker::noop());
    let mut sent = 0u64;
    // Bounded: the largest window the server could give is 32 MiB (the default).
    for _ in 0..(64 * MIB / chunk.len() as u64) {
        let polled = std::pin::pin!(bulk.write(&chunk)).as_mut().poll(&mut cx);
        match polled {
            Poll::Ready(Ok(n)) => sent += n as u64,
            Poll::Ready(Err(e)) => panic!("write failed: {e}"),
            Poll::Pending => return sent,
        }
    }
    panic!("the server granted more than 64 MiB of credit");
}

/// Opens the control stream (left empty: the server waits for a Hello and never reads
/// anything else) and a bulk stream, and takes all the credit the server gave `conn`. The
/// streams are returned: dropping the control stream would finish it, ending the session.
async fn credit(conn: &quinn::Connection) -> (u64, quinn::SendStream, quinn::SendStream) {
    let (ctl, _) = conn.open_bi().await.unwrap();
    let (mut bulk, _) = conn.open_bi().await.unwrap();
    let n = take_credit(&mut bulk);
    (n, ctl, bulk)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connection_gets_a_share_of_the_quic_receive_memory() {
    let d = tempfile::tempdir().unwrap();
    let server = Server::with_settings(
        d.path(),
        "[quic]\nreceive_memory = \"8MiB\"\nconnection_window = \"32MiB\"\nstream_window = \"32MiB\"\n",
    );
    let window = || {
        metric(
            &server.http_get("/metrics").1,
            "slipway_quic_connection_window_bytes",
        ) as u64
    };

    // Alone, a connection gets the whole budget (below the configured 32 MiB window).
    let (_ep1, c1) = quic_connect(&server).await;
    let (first, ctl1, _bulk1) = credit(&c1).await;
    assert_eq!(first, 8 * MIB, "one connection's credit");

    // Three more: the fourth is accepted with a quarter of it from its first packet on.
    let mut leaving = vec![ctl1];
    let mut eps = Vec::new();
    for _ in 0..2 {
        let (ep, c) = quic_connect(&server).await;
        leaving.push(c.open_bi().await.unwrap().0);
        eps.push((ep, c));
    }
    let (_ep4, c4) = quic_connect(&server).await;
    let (fourth, _ctl4, mut bulk4) = credit(&c4).await;
    assert_eq!(fourth, 2 * MIB, "the fourth connection's credit");
    assert_eq!(window(), 2 * MIB);

    // The others go: each finishes its control stream without a Hello (a stream FIN is
    // retransmitted until it arrives, unlike a CONNECTION_CLOSE), and the server ends the
    // session. The one left is resized to the whole budget, and the server grants it the
    // difference (the write below completes when that credit arrives).
    for mut ctl in leaving {
        ctl.finish().unwrap();
    }
    wait_until(
        "the window to grow back to the whole budget",
        Duration::from_secs(30),
        || window() == 8 * MIB,
    );
    // The grow arrives as MAX_DATA frames: await writes until the whole difference is there
    // (each write completes when some credit arrives), then check that no more comes.
    let chunk = vec![0u8; 64 << 10];
    let mut more = take_credit(&mut bulk4);
    while more < 6 * MIB {
        more += tokio::time::timeout(Duration::from_secs(30), bulk4.write(&chunk))
            .await
            .expect("no more credit after the others left")
            .unwrap() as u64;
        more += take_credit(&mut bulk4);
    }
    assert_eq!(more, 6 * MIB, "credit granted to the connection left");
}
