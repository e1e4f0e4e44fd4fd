//! Free page reporting off for the run: a condition of the machine, like an idle CPU.
//!
//! On a virtual machine with virtio-balloon's free page reporting, the guest hands memory it
//! has freed back to its host; the next time the kernel allocates such a page (a page-cache
//! page for a `pwrite`, a fresh heap page) the host faults it in again. Every contender that
//! writes gigabytes through the page cache pays for it, by an amount that depends on what ran
//! a few seconds earlier: on the development machine `dd` of 3200 MiB took 2.6–7.6 s of system
//! time with reporting on and 0.78 s with it off (docs/decisions.md, "Benchmarks run with free
//! page reporting off"). The instances Slipway runs on in production (EC2 Nitro) have no
//! virtio balloon, so the figures are taken without it: the run raises the reporting order
//! above any block the kernel has (nothing is reported) and puts the old value back when it
//! ends. `--keep-page-reporting` measures with it on.

use std::path::{Path, PathBuf};

const ORDER: &str = "/sys/module/page_reporting/parameters/page_reporting_order";
/// Kernel-side counter of reported memory (present on some kernels only).
const REPORTED: &str = "/sys/module/page_reporting/parameters/reported_kib";

/// Holds reporting off; restores the previous order when dropped.
pub struct Off {
    path: PathBuf,
    old: String,
    reported_at_start: Option<u64>,
}

fn reported_kib() -> Option<u64> {
    std::fs::read_to_string(REPORTED).ok()?.trim().parse().ok()
}

/// Turns free page reporting off if the kernel has it (and `keep` is false). Returns the
/// guard that restores it (`None`: left as it was) and what was done, for the report.
pub fn turn_off(keep: bool) -> (Option<Off>, String) {
    let path = Path::new(ORDER);
    let Ok(old) = std::fs::read_to_string(path) else {
        return (
            None,
            "not present (no virtio-balloon free page reporting)".into(),
        );
    };
    let old = old.trim().to_string();
    if keep {
        return (
            None,
            format!(
                "left on (--keep-page-reporting; order {old}): page-cache figures include the \
             host faulting freed memory back in"
            ),
        );
    }
    // An order above every buddy block: nothing is reported. Mainline kernels clamp the
    // parameter to MAX_PAGE_ORDER (10 on x86-64) and refuse 11; there the order can only be
    // raised to 10, which still reports 4 MiB blocks, and the report says so.
    let leftover = if old.parse::<u32>().is_ok_and(|o| o >= 10) {
        " — it was already raised when the run began (an interrupted run leaves it so; the \
         kernel's default is 9, pageblock_order): the end of this run restores that raised \
         value"
    } else {
        ""
    };
    for (v, what) in [
        (
            "11",
            "turned off for the run: freed guest memory is not handed back to the host, as on \
             EC2 Nitro instances (no virtio balloon)",
        ),
        (
            "10",
            "only reduced for the run (this kernel refuses 11): free 4 MiB blocks are still \
             handed back to the host, so page-cache figures may include its faults",
        ),
    ] {
        if std::fs::write(path, v).is_ok() {
            let off = Off {
                path: path.to_owned(),
                old: old.clone(),
                reported_at_start: reported_kib(),
            };
            return (
                Some(off),
                format!("{what} (page_reporting_order {old} → {v}, restored at the end{leftover})"),
            );
        }
    }
    (
        None,
        format!(
            "on (order {old}; could not raise it: not root?): page-cache figures include the host \
         faulting freed memory back in"
        ),
    )
}

impl Off {
    /// KiB the kernel reported to the host since the guard was made (if it counts them).
    pub fn reported_since(&self) -> Option<u64> {
        Some(reported_kib()?.saturating_sub(self.reported_at_start?))
    }
}

impl Drop for Off {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, &self.old) {
            eprintln!(
                "slipway-bench: could not restore {} to {}: {e}",
                self.path.display(),
                self.old
            );
        }
    }
}
