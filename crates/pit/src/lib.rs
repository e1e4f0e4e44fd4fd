//! Point-in-time (PIT) retention policy: when to take a scheduled restore point and which
//! scheduled restore points to prune.
//!
//! This crate is a pure core in the style of `quinn-proto`: it never reads the clock, never
//! touches a file and keeps no state between calls. The server's snapshot scheduler (the shell)
//! passes in `now` and the restore points that exist, and acts on the answers. Same inputs,
//! same outputs — which is what lets the tests run three weeks of scheduling in milliseconds.
//!
//! # The model
//!
//! **Time** is `u64` Unix seconds, UTC.
//!
//! **Tiers.** A policy is a list of tiers, finest first, each `(every, keep)`: "one point every
//! `every`, for the last `keep` of those periods". The defaults are AWS DRS's: every 10 minutes
//! for an hour, hourly for a day, daily for a week ([`PitPolicy::default`]).
//!
//! **Slots.** A tier cuts time into slots of length `every`, aligned to the Unix epoch: slot
//! `n` is `[n·every, (n+1)·every)`, i.e. `slot(t) = floor(t / every)`. Daily slots are UTC days;
//! a `"7d"` slot starts on a Thursday (1970-01-01 was one).
//!
//! **Slots nest.** Validation requires each tier's `every` to be a strict multiple of the
//! previous tier's. Every coarse slot is then a union of whole finer slots, and every coarse
//! boundary is also a boundary of every finer tier. Two consequences the rest relies on:
//! - the oldest point of a day is also the oldest point of that day's first hour and of its
//!   first ten minutes, so one point serves three tiers at once instead of three points being
//!   kept side by side (the defaults hold 35 points in steady state, not 37);
//! - all window edges fall on boundaries of the finest tier, so a scheduler that wakes on
//!   those boundaries ([`PitPolicy::next_due`]) never misses a change of the policy's answer.
//!
//! **Taking.** A scheduled point is due when the current slot of the finest tier holds no
//! scheduled point ([`PitPolicy::due`]).
//!
//! **Retention.** For each tier `(every E, keep K)` the *window* is the `K` most recent slots
//! ending with the current one (`slot(now) − K + 1 ..= slot(now)`). In each window slot the tier
//! keeps the *oldest* scheduled point of that slot. A scheduled point is kept if any tier keeps
//! it; the newest scheduled point is always kept; everything else scheduled is pruned
//! ([`PitPolicy::plan_prune`]).
//!
//! ## Why the oldest point of a slot
//!
//! A slot's representative is fixed the moment the first point lands in it: points taken later
//! in the same slot are newer and never displace it. So a point's fate is decided when it is
//! taken — the point that opens an hour is kept for 24 hours, the one that opens a day for a
//! week — and an operator who picked "yesterday 14:00" to launch from will not see it swapped
//! for a 14:50 point while the hour is still open. Keeping the *newest* instead would make each
//! coarse tier chase the most recent point of its open slot: its choice would change every ten
//! minutes, the protection it gives would really only start when the slot closes, and coarse
//! points would land wherever the last point before a boundary happened to be (23:50) rather
//! than on the round time the scheduler takes at the boundary (00:00).
//!
//! ## On-demand (unscheduled) points
//!
//! Points an operator takes by hand (`scheduled: false`) belong to the operator: the policy
//! never prunes them, and they do **not** satisfy a slot, do not count toward any tier and are
//! not the "newest point". The operator may delete them at any moment; if one stood in for a
//! slot, deleting it would leave a hole the policy can no longer fill (it cannot take a point in
//! the past), so the tiers' guarantees would depend on what operators do. The cost is only that
//! the scheduler still takes its own point in a slot that already has an on-demand one.
//!
//! ## Guarantees
//!
//! For any inputs:
//! - an unscheduled point is never pruned, nor the newest scheduled point, nor a point stamped
//!   after `now` (see below); the replica therefore always keeps its last restore point, even
//!   when the source has been unable to take a new one for longer than every window;
//! - at most `Σ keep + 1` scheduled points stamped at or before `now` are kept.
//!
//! With a clock that does not go backwards and points stamped with the time they were taken:
//! - **pruning never regrets**: a point [`PitPolicy::plan_prune`] named is never one it would
//!   keep at a later time, even if it were still there. Equivalently, the kept set does not
//!   depend on how often pruning runs — once per slot or once a day give the same survivors;
//! - **steady state**: if the scheduler takes a point in every finest slot (it acts when
//!   [`PitPolicy::due`] says so), then once a tier's window lies entirely after the first point,
//!   every one of that tier's `keep` window slots holds exactly one point kept for that tier —
//!   the one that opened the slot. For the defaults: 6 ten-minute points in the last hour, 24
//!   hourly points in the last day, 7 daily points, 35 points in all.
//!
//! ## Gaps and clock errors
//!
//! Retention is by time, like "hourly for 24 hours": a slot in which no point was taken (server
//! down, source not `continuous`) stays empty, and the policy does not reach further back to
//! make up the count. After a gap the current slot is empty, so a point is due at once.
//!
//! A point stamped after `now` means the clock went backwards (or the point was recorded by a
//! machine with a different clock). The policy cannot place it in a window, so it keeps it, and
//! [`PitPolicy::due`] looks only at the current slot, so a clock stepped back keeps taking
//! points instead of going silent until it catches up: a clock error should never cost restore
//! points. Once `now` passes those points they are treated like any other.

// A peer's input never panics this crate: no `unwrap` outside tests (house style, quinn).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod settings;

use std::collections::BTreeSet;
use std::time::Duration;

pub use settings::{PitError, RawPitSettings, RawTier};

/// A restore point as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RestorePoint {
    /// Identifier the caller uses to delete it; [`PitPolicy::plan_prune`] returns these.
    /// Expected to be unique; if an id is shared, it is never pruned while any point carrying
    /// it is kept.
    pub id: String,
    /// The point in time the restore point captures, Unix seconds (for a local snapshot, when
    /// the consistency marker was applied; for EBS, when `CreateSnapshot` returned).
    pub taken_at: u64,
    /// `true` if the scheduler took it because the policy said it was due; `false` for a point
    /// an operator took on demand, which the policy neither counts nor prunes.
    pub scheduled: bool,
}

/// One retention tier: a point every `every`, for the last `keep` such periods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tier {
    /// Slot length. At least one second, a whole number of seconds.
    pub every: Duration,
    /// Number of slots (the current one included) in which this tier keeps a point.
    pub keep: u32,
}

impl Tier {
    /// A tier; checked only when it becomes part of a [`PitPolicy`].
    pub const fn new(every: Duration, keep: u32) -> Tier {
        Tier { every, keep }
    }

    /// Slot length in seconds (non-zero once validated).
    fn secs(&self) -> u64 {
        self.every.as_secs()
    }

    /// The inclusive range of slot indices this tier keeps a point in at `now`.
    fn window(&self, now: u64) -> (u64, u64) {
        let current = now / self.secs();
        let first = current.saturating_sub(u64::from(self.keep) - 1);
        (first, current)
    }
}

/// The defaults, finest first: every 10 minutes for an hour, hourly for a day, daily for a
/// week (AWS Elastic Disaster Recovery's schedule).
pub const DEFAULT_TIERS: [Tier; 3] = [
    Tier::new(Duration::from_secs(10 * 60), 6),
    Tier::new(Duration::from_secs(60 * 60), 24),
    Tier::new(Duration::from_secs(24 * 60 * 60), 7),
];

/// A validated retention policy: at least one tier, finest first, each tier's `every` a strict
/// multiple of the previous one's, every `keep` at least 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PitPolicy {
    tiers: Vec<Tier>,
}

impl Default for PitPolicy {
    fn default() -> Self {
        PitPolicy {
            tiers: DEFAULT_TIERS.to_vec(),
        }
    }
}

impl PitPolicy {
    /// Builds a policy from tiers given in code, finest first. Errors name the offending tier
    /// by index (`tiers[1].every: …`), exactly as [`PitPolicy::from_raw`] does.
    pub fn new(tiers: Vec<Tier>) -> Result<PitPolicy, PitError> {
        let spelled: Vec<String> = tiers
            .iter()
            .map(|t| humantime::format_duration(t.every).to_string())
            .collect();
        settings::validate(&tiers, &spelled)?;
        Ok(PitPolicy { tiers })
    }

    /// Validates settings read from a file (see [`RawPitSettings`]). Error messages start with
    /// the key relative to the `[pit]` table (`tiers[1].every: "90s" is not a multiple of
    /// tiers[0].every (1m) …`); the caller prefixes the file and the table it read them from.
    pub fn from_raw(raw: &RawPitSettings) -> Result<PitPolicy, PitError> {
        let tiers = settings::parse(raw)?;
        Ok(PitPolicy { tiers })
    }

    /// The tiers, finest first.
    pub fn tiers(&self) -> &[Tier] {
        &self.tiers
    }

    /// Length of the finest tier's slot in seconds: the scheduling period.
    fn finest(&self) -> u64 {
        self.tiers[0].secs()
    }

    /// Is a scheduled restore point due at `now`?
    ///
    /// True when no scheduled point of `existing` lies in the finest tier's current slot.
    /// Unscheduled points are ignored, and so are points stamped in other slots — including
    /// later ones (a clock stepped back still takes points).
    ///
    /// The answer changes when `now` crosses a finest-slot boundary or when a scheduled point
    /// is added to or removed from the current slot. A point being taken but not yet in
    /// `existing` is invisible here: the scheduler must not start a second one meanwhile. If
    /// the source cannot take a point (a disk is not `continuous`), `due` stays true and
    /// [`PitPolicy::next_due`] returns `now`, so wait for the state to change, not for the
    /// clock.
    pub fn due(&self, now: u64, existing: &[RestorePoint]) -> bool {
        let every = self.finest();
        let current = now / every;
        !existing
            .iter()
            .any(|p| p.scheduled && p.taken_at / every == current)
    }

    /// The earliest time `>= now` at which [`PitPolicy::due`] is true if `existing` does not
    /// change: `now` itself if a point is due, otherwise the start of the first later finest
    /// slot holding no scheduled point (normally the next slot). `u64::MAX` if that start is
    /// not representable.
    ///
    /// The answer is the same for every `now` up to it, so a scheduler may sleep until then;
    /// it changes only when `existing` changes.
    pub fn next_due(&self, now: u64, existing: &[RestorePoint]) -> u64 {
        if self.due(now, existing) {
            return now;
        }
        let every = self.finest();
        let current = now / every;
        // Later slots already holding a scheduled point (only after the clock went back).
        let occupied: BTreeSet<u64> = existing
            .iter()
            .filter(|p| p.scheduled)
            .map(|p| p.taken_at / every)
            .filter(|&slot| slot > current)
            .collect();
        let mut slot = current;
        loop {
            slot = match slot.checked_add(1) {
                Some(s) => s,
                None => return u64::MAX,
            };
            if !occupied.contains(&slot) {
                return slot.saturating_mul(every);
            }
        }
    }

    /// The ids of the scheduled points to delete at `now`, oldest first (by `taken_at`, then
    /// id), without duplicates.
    ///
    /// A scheduled point stamped at or before `now` is kept if, for some tier, its slot is in
    /// the tier's window and it is the oldest scheduled point of that slot (ties on `taken_at`
    /// go to the smaller id). The newest scheduled point and points stamped after `now` are
    /// always kept; unscheduled points are never returned. Everything else scheduled is.
    ///
    /// The answer changes only when `existing` changes, when `now` crosses a finest-slot
    /// boundary (all window edges are such boundaries, because slots nest), or when `now`
    /// passes a point stamped in the future.
    pub fn plan_prune(&self, now: u64, existing: &[RestorePoint]) -> Vec<String> {
        let mut scheduled: Vec<&RestorePoint> = existing.iter().filter(|p| p.scheduled).collect();
        scheduled.sort_by(|a, b| (a.taken_at, &a.id).cmp(&(b.taken_at, &b.id)));
        // Points stamped at or before `now` come first; the rest are in the future.
        let past = scheduled.partition_point(|p| p.taken_at <= now);

        let mut kept = vec![false; scheduled.len()];
        kept[past..].iter_mut().for_each(|k| *k = true);
        if let Some(newest) = kept.last_mut() {
            *newest = true;
        }
        for tier in &self.tiers {
            let (first, current) = tier.window(now);
            let mut previous_slot = None;
            for (i, p) in scheduled[..past].iter().enumerate() {
                let slot = p.taken_at / tier.secs();
                // Sorted oldest first: the first point seen in a slot is that slot's oldest.
                if previous_slot != Some(slot) {
                    previous_slot = Some(slot);
                    if (first..=current).contains(&slot) {
                        kept[i] = true;
                    }
                }
            }
        }

        // An id that also names a kept or unscheduled point is never returned.
        let protected: BTreeSet<&str> = existing
            .iter()
            .filter(|p| !p.scheduled)
            .map(|p| p.id.as_str())
            .chain(
                scheduled
                    .iter()
                    .zip(&kept)
                    .filter(|(_, &k)| k)
                    .map(|(p, _)| p.id.as_str()),
            )
            .collect();
        let mut returned = BTreeSet::new();
        scheduled
            .iter()
            .zip(&kept)
            .filter(|(p, &k)| !k && !protected.contains(p.id.as_str()))
            .filter(|(p, _)| returned.insert(p.id.as_str()))
            .map(|(p, _)| p.id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests;
