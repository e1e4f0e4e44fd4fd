//! Small random writes at a target rate: 4 KiB blocks of random content written (pwrite, no
//! sync: like an application writing through the page cache) at random block-aligned offsets
//! of the source disk files, paced every millisecond to follow `rate` writes per second.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::{Rng, RngCore, SeedableRng};

pub const BLOCK: u64 = 4096;

pub struct Workload {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<u64>>,
}

impl Workload {
    /// Starts writing to `files` (each `size` bytes) at `rate` writes/s in total.
    pub fn start(files: Vec<PathBuf>, size: u64, rate: f64, seed: u64) -> Result<Workload> {
        let fs: Vec<File> = files
            .iter()
            .map(|p| OpenOptions::new().write(true).open(p))
            .collect::<std::io::Result<_>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle =
            std::thread::Builder::new()
                .name("workload".into())
                .spawn(move || -> Result<u64> {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
                    let blocks = size / BLOCK;
                    let mut buf = vec![0u8; BLOCK as usize];
                    let start = Instant::now();
                    let mut done: u64 = 0;
                    while !s.load(Ordering::Relaxed) {
                        let target = (start.elapsed().as_secs_f64() * rate) as u64;
                        while done < target {
                            rng.fill_bytes(&mut buf);
                            let f = &fs[rng.gen_range(0..fs.len())];
                            let b = rng.gen_range(0..blocks);
                            f.write_all_at(&buf, b * BLOCK)?;
                            done += 1;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Ok(done)
                })?;
        Ok(Workload { stop, handle })
    }

    /// Stops; returns how many writes were made.
    pub fn stop(self) -> Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("workload thread panicked"))?
    }
}
