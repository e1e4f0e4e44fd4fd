//! A userspace WAN link emulator: two TUN devices, each moved into its own network namespace,
//! joined by this process. Each direction applies, in order: Bernoulli loss on arrival, a
//! token-bucket rate limit with a FIFO queue (tail drop past `queue_bytes`), then a fixed
//! one-way delay. netem is absent on these machines, so this stands in for
//! `tc qdisc add dev X root netem delay 20ms loss 0.5% rate 1gbit`.
//!
//! Run as `slipway-bench linkemu ...` (root: it creates TUN devices and moves them); it prints
//! `ready DEV_A DEV_B` on stdout once both ends are configured, a JSON stats line per direction on stderr
//! every second, and exits when a device goes away (its namespace was deleted), on SIGTERM,
//! or after `--max-seconds`.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, Args)]
pub struct LinkArgs {
    /// Namespace of end A (created by the caller).
    #[arg(long)]
    pub ns_a: String,
    /// Namespace of end B.
    #[arg(long)]
    pub ns_b: String,
    /// IPv4 address of end A (a /24 is configured on both ends).
    #[arg(long)]
    pub addr_a: String,
    #[arg(long)]
    pub addr_b: String,
    /// One-way delay in milliseconds (each direction).
    #[arg(long, default_value_t = 20.0)]
    pub delay_ms: f64,
    /// Probability that a packet is lost (each direction).
    #[arg(long, default_value_t = 0.005)]
    pub loss: f64,
    /// Rate of each direction in Mbit/s (10^6 bit/s).
    #[arg(long, default_value_t = 1000.0)]
    pub rate_mbit: f64,
    /// Token bucket depth in bytes.
    #[arg(long, default_value_t = 16384)]
    pub burst_bytes: u64,
    /// Bytes that may wait for the rate limit before arrivals are dropped (tail drop).
    #[arg(long, default_value_t = 5_000_000)]
    pub queue_bytes: u64,
    /// MTU of both TUN devices.
    #[arg(long, default_value_t = 1500)]
    pub mtu: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Exit by itself after this long.
    #[arg(long, default_value_t = 1800)]
    pub max_seconds: u64,
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// Opens a TUN device (IFF_TUN | IFF_NO_PI): one read or write is one IP packet.
fn open_tun(name: &str) -> Result<File> {
    // SAFETY: a plain open of a path we own the string of.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        bail!("open /dev/net/tun: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq, which IfReq lays out (40 bytes).
    let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if r < 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(file)
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Moves `dev` into `ns`, gives it `addr/24`, the MTU, a long queue, and brings it and lo up.
fn configure(dev: &str, ns: &str, addr: &str, mtu: u32) -> Result<()> {
    ip(&["link", "set", dev, "netns", ns])?;
    let mtu = mtu.to_string();
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
    ip(&[
        "-n",
        ns,
        "link",
        "set",
        dev,
        "mtu",
        &mtu,
        "txqueuelen",
        "10000",
        "up",
    ])?;
    Ok(())
}

#[derive(Default)]
struct Counters {
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    lost: AtomicU64,
    queue_drops: AtomicU64,
    delivered: AtomicU64,
    delivered_bytes: AtomicU64,
}

struct Queue {
    q: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    cv: Condvar,
}

/// Token bucket with a FIFO in front: departure time of each arrival.
struct Bucket {
    rate: f64,  // bytes per second
    burst: f64, // bytes
    tokens: f64,
    at: Instant,
    last_depart: Instant,
}

impl Bucket {
    /// When a packet of `size` bytes arriving at `now` leaves the bucket.
    fn depart(&mut self, now: Instant, size: f64) -> Instant {
        let start = now.max(self.last_depart);
        let tokens =
            (self.tokens + start.duration_since(self.at).as_secs_f64() * self.rate).min(self.burst);
        let (depart, left) = if tokens >= size {
            (start, tokens - size)
        } else {
            (
                start + Duration::from_secs_f64((size - tokens) / self.rate),
                0.0,
            )
        };
        self.tokens = left;
        self.at = depart;
        self.last_depart = depart;
        depart
    }
}

fn direction(
    name: &'static str,
    mut input: File,
    mut output: File,
    a: &LinkArgs,
    seed: u64,
    counters: Arc<Counters>,
) {
    let queue = Arc::new(Queue {
        q: Mutex::new(VecDeque::new()),
        cv: Condvar::new(),
    });
    let delay = Duration::from_secs_f64(a.delay_ms / 1000.0);
    let rate = a.rate_mbit * 1e6 / 8.0;
    let (loss, queue_bytes, burst, mtu) =
        (a.loss, a.queue_bytes as f64, a.burst_bytes as f64, a.mtu);
    {
        let queue = queue.clone();
        let counters = counters.clone();
        std::thread::Builder::new()
            .name(format!("rx-{name}"))
            .spawn(move || {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
                let now = Instant::now();
                let mut bucket = Bucket {
                    rate,
                    burst,
                    tokens: burst,
                    at: now,
                    last_depart: now,
                };
                let mut buf = vec![0u8; mtu as usize + 64];
                loop {
                    let n = match input.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let now = Instant::now();
                    counters.packets_in.fetch_add(1, Ordering::Relaxed);
                    counters.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                    if loss > 0.0 && rng.gen::<f64>() < loss {
                        counters.lost.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    // Bytes already waiting ahead of this one ≈ (wait time) × rate.
                    let backlog = bucket
                        .last_depart
                        .saturating_duration_since(now)
                        .as_secs_f64()
                        * rate;
                    if backlog + n as f64 > queue_bytes {
                        counters.queue_drops.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let at = bucket.depart(now, n as f64) + delay;
                    let mut q = queue.q.lock().unwrap();
                    let was_empty = q.is_empty();
                    q.push_back((at, buf[..n].to_vec()));
                    drop(q);
                    if was_empty {
                        queue.cv.notify_one();
                    }
                }
                // Wake the writer so it can notice the end.
                queue
                    .q
                    .lock()
                    .unwrap()
                    .push_back((Instant::now(), Vec::new()));
                queue.cv.notify_one();
            })
            .expect("spawning the link reader");
    }
    std::thread::Builder::new()
        .name(format!("tx-{name}"))
        .spawn(move || {
            let mut due: Vec<Vec<u8>> = Vec::new();
            loop {
                {
                    let mut q = queue.q.lock().unwrap();
                    loop {
                        let now = Instant::now();
                        match q.front() {
                            None => q = queue.cv.wait(q).unwrap(),
                            Some((t, _)) if *t > now => {
                                let d = *t - now;
                                q = queue.cv.wait_timeout(q, d).unwrap().0;
                            }
                            Some(_) => break,
                        }
                    }
                    let now = Instant::now();
                    while q.front().is_some_and(|(t, _)| *t <= now) {
                        due.push(q.pop_front().unwrap().1);
                    }
                }
                for p in due.drain(..) {
                    if p.is_empty() {
                        return; // the reader ended
                    }
                    if output.write(&p).is_ok() {
                        counters.delivered.fetch_add(1, Ordering::Relaxed);
                        counters
                            .delivered_bytes
                            .fetch_add(p.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        })
        .expect("spawning the link writer");
}

pub fn run(a: LinkArgs) -> Result<()> {
    let pid = std::process::id();
    let (dev_a, dev_b) = (
        format!("swba{}", pid % 100000),
        format!("swbb{}", pid % 100000),
    );
    let tun_a = open_tun(&dev_a)?;
    let tun_b = open_tun(&dev_b)?;
    configure(&dev_a, &a.ns_a, &a.addr_a, a.mtu)?;
    configure(&dev_b, &a.ns_b, &a.addr_b, a.mtu)?;
    let ab = Arc::new(Counters::default());
    let ba = Arc::new(Counters::default());
    direction(
        "ab",
        tun_a.try_clone()?,
        tun_b.try_clone()?,
        &a,
        a.seed,
        ab.clone(),
    );
    direction("ba", tun_b, tun_a, &a, a.seed.wrapping_add(1), ba.clone());
    println!("ready {dev_a} {dev_b}");
    std::io::stdout().flush()?;
    let started = Instant::now();
    let stats = |name: &str, c: &Counters| {
        serde_json::json!({
            "dir": name,
            "packets_in": c.packets_in.load(Ordering::Relaxed),
            "bytes_in": c.bytes_in.load(Ordering::Relaxed),
            "lost": c.lost.load(Ordering::Relaxed),
            "queue_drops": c.queue_drops.load(Ordering::Relaxed),
            "delivered": c.delivered.load(Ordering::Relaxed),
            "delivered_bytes": c.delivered_bytes.load(Ordering::Relaxed),
        })
    };
    while started.elapsed() < Duration::from_secs(a.max_seconds) {
        std::thread::sleep(Duration::from_secs(1));
        eprintln!("{}", stats("ab", &ab));
        eprintln!("{}", stats("ba", &ba));
        // The namespaces were deleted: the devices are gone.
        let alive = Command::new("ip")
            .args(["-n", &a.ns_a, "link", "show", &dev_a])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !alive {
            break;
        }
    }
    Ok(())
}
