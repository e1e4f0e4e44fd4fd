//! The replication state of one source, as an I/O-free state machine.
//!
//! Everything that decides *what* goes on the wire lives here: the one sequence counter the
//! disks share, the unacked operations of each disk, which pass each disk is in, what a
//! `DiskOpened` answer means for them, and which phase to report. The async shell (readers,
//! streams, timers) only moves bytes and calls in under one short-held lock, never across an
//! await. Keeping the rules here means resume, restart and marker ordering are unit-tested
//! without sockets.
//!
//! Ordering invariant: a sequence number is taken from the counter and the op is appended to
//! its disk's queue under the same lock, so every queue is in increasing order and a marker's
//! sequence number splits every disk's stream at one point of the global order.

use slipway_proto::{Phase, ResumeKind};
use thiserror::Error;

use crate::plan::{PlannedOp, ZeroPolicy};
use crate::retained::{Op, OpKind, Released, Retained};

/// Which kind of pass over a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassKind {
    /// Full pass onto an all-zero volume: zero blocks are skipped.
    Fresh,
    /// Full pass onto a volume of unknown content: every range is sent.
    Resync,
    /// Follow-mode rescan: only chunks that changed since they were last sent.
    Follow,
}

impl PassKind {
    pub fn zero_policy(self) -> ZeroPolicy {
        match self {
            PassKind::Fresh => ZeroPolicy::Skip,
            PassKind::Resync => ZeroPolicy::Send,
            // A changed chunk may have been non-zero before: it is rewritten whole.
            PassKind::Follow => ZeroPolicy::WholeChunk,
        }
    }

    pub fn is_full(self) -> bool {
        !matches!(self, PassKind::Follow)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PassKind::Fresh => "initial-sync",
            PassKind::Resync => "resync",
            PassKind::Follow => "rescan",
        }
    }
}

/// A pass asked for by an older generation or connection than the current one: the caller
/// stops what it was doing.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("superseded by a newer pass or connection")]
pub struct Stale;

/// An ack that cannot be true.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AckError {
    #[error("ack for seq {seq}, but no op after {last} was ever sent")]
    Unsent { seq: u64, last: u64 },
    #[error(transparent)]
    Stale(#[from] Stale),
}

/// What to report for a disk in a `Progress` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub phase: Phase,
    pub backlog_bytes: u64,
    pub pass_seq: u64,
}

/// How a `DiskOpened` answer was applied.
#[derive(Debug)]
pub enum OpenOutcome {
    /// Same run: the durable prefix was released, the rest will be resent.
    Resumed { released: Released, resend: usize },
    /// A full pass (re)starts from offset 0.
    Restarted {
        kind: PassKind,
        /// Window bytes freed by dropping the retained ops.
        freed: u64,
        /// Why the agent restarted although the server offered a resume.
        overruled: Option<&'static str>,
    },
}

/// Counters for progress display and the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Write payload bytes handed to the transport (resends included).
    pub payload_sent: u64,
    /// Write payload bytes acknowledged durable.
    pub payload_acked: u64,
    /// Zeroed bytes acknowledged durable.
    pub zeroes_acked: u64,
}

/// A copy of one disk's state for display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSnapshot {
    pub id: String,
    pub size: u64,
    /// Kind of the current or last pass; `None` before the first.
    pub pass: Option<PassKind>,
    pub scanning: bool,
    pub scanned: u64,
    /// Disk bytes retained (unacked).
    pub unacked: u64,
    pub report: Option<Report>,
    pub stats: DiskStats,
}

impl DiskSnapshot {
    /// Bytes of the disk the current full pass has covered durably: scanned and not waiting
    /// for an ack. Grows from 0 to `size` over a full pass.
    pub fn covered(&self) -> u64 {
        match self.pass {
            Some(k) if k.is_full() => self.scanned.saturating_sub(self.unacked),
            Some(_) => self.size.saturating_sub(self.unacked),
            None => 0,
        }
    }
}

#[derive(Debug, Clone)]
struct Pass {
    kind: PassKind,
    scanning: bool,
    scanned: u64,
    /// Sequence of the last op this pass enqueued (0: none yet).
    last_seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Binding {
    epoch: u64,
    handle: u32,
}

/// One disk of the source.
#[derive(Debug)]
pub struct DiskState {
    id: String,
    size: u64,
    retained: Retained,
    /// Highest seq the server has acknowledged as durable for this disk.
    acked: u64,
    binding: Option<Binding>,
    /// Highest seq handed to the transport on the current connection, or the resume point.
    sent: u64,
    /// Bumped whenever a full pass (re)starts, so a reader of the old pass stops.
    gen: u64,
    pass: Option<Pass>,
    /// A full pass the reader must start.
    requested: Option<PassKind>,
    /// `pass_seq` of the last completed pass (reported with `Continuous`).
    complete_seq: u64,
    /// A full pass has enqueued its last op since the last restart.
    initial_done: bool,
    stats: DiskStats,
}

/// All disks of one source and their shared sequence counter.
#[derive(Debug)]
pub struct Source {
    next_seq: u64,
    disks: Vec<DiskState>,
}

impl Source {
    /// Disks as (id, size in bytes).
    pub fn new(disks: impl IntoIterator<Item = (String, u64)>) -> Self {
        Source {
            next_seq: 1,
            disks: disks
                .into_iter()
                .map(|(id, size)| DiskState {
                    id,
                    size,
                    retained: Retained::new(),
                    acked: 0,
                    binding: None,
                    sent: 0,
                    gen: 0,
                    pass: None,
                    requested: None,
                    complete_seq: 0,
                    initial_done: false,
                    stats: DiskStats::default(),
                })
                .collect(),
        }
    }

    /// The state a cleanly stopped run saved (see `persist`): per disk (id, size, acked,
    /// complete_seq), everything acknowledged and a pass complete, sequence numbers going on
    /// from `next_seq`.
    pub fn restored(
        disks: impl IntoIterator<Item = (String, u64, u64, u64)>,
        next_seq: u64,
    ) -> Self {
        let disks: Vec<_> = disks.into_iter().collect();
        let mut s = Source::new(disks.iter().map(|(id, size, _, _)| (id.clone(), *size)));
        s.next_seq = next_seq.max(1);
        for (d, (_, size, acked, complete_seq)) in s.disks.iter_mut().zip(disks) {
            d.acked = acked;
            d.sent = acked;
            d.complete_seq = complete_seq;
            d.initial_done = true;
            d.pass = Some(Pass {
                kind: PassKind::Follow,
                scanning: false,
                scanned: size,
                last_seq: 0,
            });
        }
        s
    }

    /// Whether a run stopped now may be saved for this disk (see `persist`): a full pass has
    /// completed (every chunk has a hash), none is due or running, and nothing is
    /// unacknowledged. A follow-mode rescan cut short by the stop is fine: the chunks it queued
    /// are acknowledged, the ones it did not reach keep the hash of what the server has.
    pub fn can_save(&self, disk: usize) -> bool {
        let d = &self.disks[disk];
        d.initial_done
            && d.requested.is_none()
            && d.retained.is_empty()
            && d.pass
                .as_ref()
                .is_some_and(|p| !p.scanning || p.kind == PassKind::Follow)
    }

    /// (acked, complete_seq) of a disk, what a saved run keeps of it.
    pub fn positions(&self, disk: usize) -> (u64, u64) {
        let d = &self.disks[disk];
        (d.acked, d.complete_seq)
    }

    pub fn disk_count(&self) -> usize {
        self.disks.len()
    }

    pub fn disk_id(&self, disk: usize) -> &str {
        &self.disks[disk].id
    }

    /// The next sequence number the counter will hand out.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Applies the server's `DiskOpened` answer, received on connection `epoch`, and binds
    /// the disk to `handle` on it. `max_write` is the connection's negotiated write limit.
    pub fn open(
        &mut self,
        disk: usize,
        epoch: u64,
        handle: u32,
        resume: ResumeKind,
        durable_seq: u64,
        max_write: u64,
    ) -> OpenOutcome {
        let last_assigned = self.next_seq - 1;
        let d = &mut self.disks[disk];
        d.binding = Some(Binding { epoch, handle });
        let kind = match resume {
            ResumeKind::Fresh => PassKind::Fresh,
            ResumeKind::Resync => PassKind::Resync,
            ResumeKind::Resume => {
                // A resume is only as good as the server's claim; when it cannot be true of
                // this run, rewriting the whole volume is the one safe answer.
                // A durable point below an earlier ack is fine: the server's metadata may lag
                // its volume (never lead it), and what it acked is on the volume; resending
                // what is retained (all above that ack) is enough.
                let overruled = if d.pass.is_none() {
                    Some("nothing of this disk was sent in this run yet")
                } else if durable_seq > last_assigned {
                    Some("the server's durable point is ahead of anything this run sent")
                } else if d.retained.max_payload() > max_write {
                    Some("the server's write limit shrank below writes waiting to be resent")
                } else {
                    None
                };
                if let Some(why) = overruled {
                    let mut o = Self::restart(d, PassKind::Resync, durable_seq, last_assigned);
                    if let OpenOutcome::Restarted { overruled, .. } = &mut o {
                        *overruled = Some(why);
                    }
                    return o;
                }
                let released = d.retained.release(durable_seq);
                count_acked(&mut d.stats, &released);
                d.acked = d.acked.max(durable_seq);
                // Everything retained goes again; with nothing retained everything up to the
                // ack went already (the server's metadata may lag its volume).
                d.sent = if d.retained.is_empty() {
                    d.acked
                } else {
                    durable_seq
                };
                return OpenOutcome::Resumed {
                    released,
                    resend: d.retained.len(),
                };
            }
        };
        Self::restart(d, kind, durable_seq, last_assigned)
    }

    fn restart(d: &mut DiskState, kind: PassKind, durable_seq: u64, last: u64) -> OpenOutcome {
        // Markers are kept: they carry no data, they stay in order (every new op gets a
        // higher seq), and the server may be waiting for them to close a consistency point.
        let freed = d.retained.clear_keeping_markers(durable_seq);
        d.gen += 1;
        d.requested = Some(kind);
        d.pass = Some(Pass {
            kind,
            scanning: true,
            scanned: 0,
            last_seq: 0,
        });
        d.initial_done = false;
        d.complete_seq = 0;
        d.acked = durable_seq.min(last);
        d.sent = d.retained.first_seq().map_or(last, |s| s - 1);
        OpenOutcome::Restarted {
            kind,
            freed,
            overruled: None,
        }
    }

    /// The reader takes the full pass it must start, with its generation.
    pub fn take_request(&mut self, disk: usize) -> Option<(PassKind, u64)> {
        let d = &mut self.disks[disk];
        d.requested.take().map(|k| (k, d.gen))
    }

    /// Whether a full pass is waiting to be started.
    pub fn has_request(&self, disk: usize) -> bool {
        self.disks[disk].requested.is_some()
    }

    /// Whether the disk is between passes after a completed full pass: a follow-mode rescan
    /// may start.
    pub fn can_rescan(&self, disk: usize) -> bool {
        let d = &self.disks[disk];
        d.initial_done && d.requested.is_none() && d.pass.as_ref().is_some_and(|p| !p.scanning)
    }

    /// Whether pass generation `gen` is still the disk's current one.
    pub fn is_current(&self, disk: usize, gen: u64) -> bool {
        let d = &self.disks[disk];
        d.gen == gen && d.requested.is_none()
    }

    /// Starts a follow-mode rescan. `None` when a full pass is due or running.
    pub fn start_rescan(&mut self, disk: usize) -> Option<u64> {
        if !self.can_rescan(disk) {
            return None;
        }
        let d = &mut self.disks[disk];
        d.pass = Some(Pass {
            kind: PassKind::Follow,
            scanning: true,
            scanned: 0,
            last_seq: 0,
        });
        Some(d.gen)
    }

    /// Enqueues the ops planned from one chunk of pass `gen`, giving each the next sequence
    /// number; `scanned` is where the pass's reading now stands. `extra_charge` (the part of
    /// the chunk buffer that the writes share but do not cover) is charged to the last write.
    /// Returns the window bytes the ops now hold.
    pub fn enqueue(
        &mut self,
        disk: usize,
        gen: u64,
        ops: &mut Vec<PlannedOp>,
        extra_charge: u64,
        scanned: u64,
    ) -> Result<u64, Stale> {
        if self.disks[disk].gen != gen
            || !self.disks[disk].pass.as_ref().is_some_and(|p| p.scanning)
        {
            ops.clear();
            return Err(Stale);
        }
        let last_write = ops
            .iter()
            .rposition(|o| matches!(o, PlannedOp::Write { .. }));
        let mut charged = 0;
        for (i, op) in ops.drain(..).enumerate() {
            let seq = self.next_seq;
            self.next_seq += 1;
            let (kind, mut charge) = match op {
                PlannedOp::Write { offset, data } => {
                    let n = data.len() as u64;
                    (OpKind::Write { offset, data }, n)
                }
                PlannedOp::Zeroes { offset, len } => (OpKind::Zeroes { offset, len }, 0),
            };
            if Some(i) == last_write {
                charge += extra_charge;
            }
            charged += charge;
            let d = &mut self.disks[disk];
            d.retained.push(Op { seq, kind, charge });
            if let Some(p) = &mut d.pass {
                p.last_seq = seq;
            }
        }
        if let Some(p) = &mut self.disks[disk].pass {
            p.scanned = p.scanned.max(scanned);
        }
        Ok(charged)
    }

    /// The pass `gen` has enqueued its last op.
    pub fn finish_pass(&mut self, disk: usize, gen: u64) -> Result<(), Stale> {
        let d = &mut self.disks[disk];
        let Some(p) = d.pass.as_mut().filter(|p| p.scanning && d.gen == gen) else {
            return Err(Stale);
        };
        p.scanning = false;
        p.scanned = d.size;
        if p.kind.is_full() {
            d.complete_seq = p.last_seq;
            d.initial_done = true;
        } else if p.last_seq != 0 {
            d.complete_seq = p.last_seq;
        }
        Ok(())
    }

    /// Takes one sequence number and places marker `marker_id` at it on every disk.
    pub fn place_marker(&mut self, marker_id: u64) -> u64 {
        let seq = self.take_seq();
        for d in &mut self.disks {
            d.retained.push(Op {
                seq,
                kind: OpKind::Marker { marker_id },
                charge: 0,
            });
        }
        seq
    }

    fn bound(&self, disk: usize, epoch: u64) -> Result<&DiskState, Stale> {
        let d = &self.disks[disk];
        match d.binding {
            Some(b) if b.epoch == epoch => Ok(d),
            _ => Err(Stale),
        }
    }

    /// Where the stream of connection `epoch` starts sending: every op after this seq.
    pub fn send_from(&self, disk: usize, epoch: u64) -> Result<u64, Stale> {
        Ok(self.bound(disk, epoch)?.sent)
    }

    /// Copies up to `max` ops after `after` for the stream of connection `epoch`.
    pub fn unsent(
        &self,
        disk: usize,
        epoch: u64,
        after: u64,
        max: usize,
        out: &mut Vec<Op>,
    ) -> Result<(), Stale> {
        self.bound(disk, epoch)?.retained.after(after, max, out);
        Ok(())
    }

    /// The stream of connection `epoch` has written every op up to `upto`, `payload` bytes of
    /// write payload since the last call. Returns whether the reported phase changed.
    pub fn mark_sent(
        &mut self,
        disk: usize,
        epoch: u64,
        upto: u64,
        payload: u64,
    ) -> Result<bool, Stale> {
        self.bound(disk, epoch)?;
        let before = self.report(disk).map(|r| (r.phase, r.pass_seq));
        let d = &mut self.disks[disk];
        d.sent = d.sent.max(upto);
        d.stats.payload_sent += payload;
        Ok(self.report(disk).map(|r| (r.phase, r.pass_seq)) != before)
    }

    /// Applies a cumulative ack from connection `epoch`: releases every op up to `seq`.
    pub fn ack(&mut self, disk: usize, epoch: u64, seq: u64) -> Result<Released, AckError> {
        self.bound(disk, epoch)?;
        let last = self.next_seq - 1;
        if seq > last {
            return Err(AckError::Unsent { seq, last });
        }
        let d = &mut self.disks[disk];
        d.acked = d.acked.max(seq);
        let released = d.retained.release(seq);
        count_acked(&mut d.stats, &released);
        Ok(released)
    }

    /// What to report for the disk now; `None` before its first pass.
    ///
    /// A full pass reports `InitialSync` (onto a fresh volume) or `Rescan` until its last op
    /// has been handed to the transport, then `Continuous` with that op's seq. A follow-mode
    /// rescan reports `Rescan` once it has found a change, `Backlog` while found changes
    /// wait to be sent, and leaves `Continuous` (and its `pass_seq`) alone when it found
    /// nothing.
    pub fn report(&self, disk: usize) -> Option<Report> {
        let d = &self.disks[disk];
        let p = d.pass.as_ref()?;
        let backlog = d.retained.disk_bytes()
            + if p.scanning && p.kind.is_full() {
                d.size.saturating_sub(p.scanned)
            } else {
                0
            };
        let unsent = d.sent < p.last_seq.max(d.complete_seq);
        let phase = match p.kind {
            PassKind::Fresh if p.scanning || unsent => Phase::InitialSync,
            PassKind::Resync if p.scanning || unsent => Phase::Rescan,
            PassKind::Follow if p.scanning && p.last_seq != 0 => Phase::Rescan,
            PassKind::Follow if unsent => Phase::Backlog,
            _ => Phase::Continuous,
        };
        Some(if phase == Phase::Continuous {
            Report {
                phase,
                backlog_bytes: 0,
                pass_seq: d.complete_seq,
            }
        } else {
            Report {
                phase,
                backlog_bytes: backlog,
                pass_seq: 0,
            }
        })
    }

    /// Every disk has finished a full pass and the server has acknowledged all of it.
    pub fn all_done(&self) -> bool {
        (0..self.disks.len()).all(|d| self.disk_done(d))
    }

    /// The disk has finished a full pass and the server has acknowledged all of it.
    pub fn disk_done(&self, disk: usize) -> bool {
        let d = &self.disks[disk];
        d.initial_done
            && d.requested.is_none()
            && d.pass.as_ref().is_some_and(|p| !p.scanning)
            && d.retained.is_empty()
    }

    /// Nothing is waiting for an ack.
    pub fn all_acked(&self) -> bool {
        self.disks.iter().all(|d| d.retained.is_empty())
    }

    pub fn snapshot(&self, disk: usize) -> DiskSnapshot {
        let d = &self.disks[disk];
        DiskSnapshot {
            id: d.id.clone(),
            size: d.size,
            pass: d.pass.as_ref().map(|p| p.kind),
            scanning: d.pass.as_ref().is_some_and(|p| p.scanning),
            scanned: d.pass.as_ref().map_or(0, |p| p.scanned),
            unacked: d.retained.disk_bytes(),
            report: self.report(disk),
            stats: d.stats,
        }
    }
}

fn count_acked(stats: &mut DiskStats, r: &Released) {
    for op in &r.ops {
        match &op.kind {
            OpKind::Write { data, .. } => stats.payload_acked += data.len() as u64,
            OpKind::Zeroes { len, .. } => stats.zeroes_acked += len,
            OpKind::Marker { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const MW: u64 = 1 << 20;

    fn src(n: usize) -> Source {
        Source::new((0..n).map(|i| (format!("d{i}"), 1 << 20)))
    }

    fn write(offset: u64, len: usize) -> PlannedOp {
        PlannedOp::Write {
            offset,
            data: Bytes::from(vec![1u8; len]),
        }
    }

    fn seqs(s: &Source, disk: usize, epoch: u64) -> Vec<u64> {
        let mut out = vec![];
        s.unsent(disk, epoch, 0, usize::MAX, &mut out).unwrap();
        out.iter().map(|o| o.seq).collect()
    }

    /// Opens disk `d` fresh on `epoch` and starts its pass; returns the generation.
    fn fresh(s: &mut Source, d: usize, epoch: u64) -> u64 {
        s.open(d, epoch, d as u32, ResumeKind::Fresh, 0, MW);
        let (k, gen) = s.take_request(d).unwrap();
        assert_eq!(k, PassKind::Fresh);
        gen
    }

    /// A run restored from a clean stop resumes (nothing to resend, continuous at its last
    /// pass), even when the server's metadata lags the ack; a server that no longer holds the
    /// run gets a full pass.
    #[test]
    fn a_restored_run_resumes_or_resyncs_as_the_server_says() {
        let mut s = Source::restored(
            [
                ("d0".to_string(), 1 << 20, 40, 38),
                ("d1".to_string(), 1 << 20, 41, 38),
            ],
            42,
        );
        assert!(s.all_done());
        assert_eq!(s.positions(1), (41, 38));
        match s.open(0, 1, 1, ResumeKind::Resume, 35, 1 << 20) {
            OpenOutcome::Resumed { resend, .. } => assert_eq!(resend, 0),
            other => panic!("{other:?}"),
        }
        let r = s.report(0).unwrap();
        assert_eq!((r.phase, r.pass_seq), (Phase::Continuous, 38));
        assert!(matches!(
            s.open(1, 1, 2, ResumeKind::Resync, 0, 1 << 20),
            OpenOutcome::Restarted {
                kind: PassKind::Resync,
                ..
            }
        ));
        assert!(!s.disk_done(1));
        assert!(!s.can_save(1), "a full pass is due");
        assert_eq!(
            s.next_seq(),
            42,
            "sequence numbers go on from the saved run"
        );
        // A rescan cut short by a stop, everything it queued acknowledged: still savable.
        let g = s.start_rescan(0).unwrap();
        assert!(s.can_save(0));
        s.enqueue(0, g, &mut vec![write(0, 512)], 0, 512).unwrap();
        assert!(!s.can_save(0), "a write is unacknowledged");
        let seq = s.next_seq() - 1;
        s.ack(0, 1, seq).unwrap();
        assert!(s.can_save(0));
    }

    #[test]
    fn one_counter_shared_by_all_disks() {
        let mut s = src(2);
        let g0 = fresh(&mut s, 0, 1);
        let g1 = fresh(&mut s, 1, 1);
        s.enqueue(0, g0, &mut vec![write(0, 512), write(512, 512)], 0, 1024)
            .unwrap();
        s.enqueue(1, g1, &mut vec![write(0, 512)], 0, 512).unwrap();
        s.enqueue(0, g0, &mut vec![write(1024, 512)], 0, 1536)
            .unwrap();
        assert_eq!(seqs(&s, 0, 1), vec![1, 2, 4]);
        assert_eq!(seqs(&s, 1, 1), vec![3]);
        assert_eq!(s.next_seq(), 5);
    }

    #[test]
    fn a_marker_takes_one_seq_on_every_disk() {
        let mut s = src(3);
        let g = fresh(&mut s, 0, 1);
        for d in 1..3 {
            fresh(&mut s, d, 1);
        }
        s.enqueue(0, g, &mut vec![write(0, 512)], 0, 512).unwrap();
        let m = s.place_marker(77);
        assert_eq!(m, 2);
        s.enqueue(0, g, &mut vec![write(512, 512)], 0, 1024)
            .unwrap();
        for d in 0..3 {
            let mut out = vec![];
            s.unsent(d, 1, 0, usize::MAX, &mut out).unwrap();
            let marker: Vec<_> = out
                .iter()
                .filter(|o| matches!(o.kind, OpKind::Marker { marker_id: 77 }))
                .map(|o| o.seq)
                .collect();
            assert_eq!(marker, vec![2], "disk {d}");
        }
        assert_eq!(seqs(&s, 0, 1), vec![1, 2, 3]);
    }

    #[test]
    fn acks_release_and_count() {
        let mut s = src(1);
        let g = fresh(&mut s, 0, 1);
        let charged = s
            .enqueue(
                0,
                g,
                &mut vec![
                    write(0, 512),
                    PlannedOp::Zeroes {
                        offset: 512,
                        len: 4096,
                    },
                    write(8192, 512),
                ],
                100,
                1 << 20,
            )
            .unwrap();
        assert_eq!(
            charged,
            512 + 512 + 100,
            "extra charge rides on the last write"
        );
        let r = s.ack(0, 1, 2).unwrap();
        assert_eq!(r.ops.len(), 2);
        assert_eq!(r.charge, 512);
        let st = s.snapshot(0).stats;
        assert_eq!((st.payload_acked, st.zeroes_acked), (512, 4096));
        assert_eq!(seqs(&s, 0, 1), vec![3]);
        // An ack for a seq never handed out is a lie.
        assert!(matches!(
            s.ack(0, 1, 4),
            Err(AckError::Unsent { seq: 4, last: 3 })
        ));
        // An ack arriving on an old connection is ignored.
        assert!(matches!(s.ack(0, 0, 3), Err(AckError::Stale(_))));
    }

    #[test]
    fn resume_drops_the_durable_prefix_and_resends_the_rest() {
        let mut s = src(1);
        let g = fresh(&mut s, 0, 1);
        s.enqueue(
            0,
            g,
            &mut (0..5).map(|i| write(i * 512, 512)).collect(),
            0,
            2560,
        )
        .unwrap();
        s.ack(0, 1, 1).unwrap();
        // Connection 2: the server has 1..=3.
        match s.open(0, 2, 9, ResumeKind::Resume, 3, MW) {
            OpenOutcome::Resumed { released, resend } => {
                assert_eq!(
                    released.ops.iter().map(|o| o.seq).collect::<Vec<_>>(),
                    vec![2, 3]
                );
                assert_eq!(resend, 2);
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(s.send_from(0, 2).unwrap(), 3);
        let mut out = vec![];
        s.unsent(0, 2, 3, usize::MAX, &mut out).unwrap();
        assert_eq!(out.iter().map(|o| o.seq).collect::<Vec<_>>(), vec![4, 5]);
        // The old connection is cut off.
        assert_eq!(s.unsent(0, 1, 0, 1, &mut out), Err(Stale));
        // The pass goes on where it was: same generation, no new request.
        assert!(!s.has_request(0));
        s.enqueue(0, g, &mut vec![write(4096, 512)], 0, 4608)
            .unwrap();
    }

    #[test]
    fn fresh_or_resync_on_reconnect_restarts_the_pass() {
        for (resume, kind) in [
            (ResumeKind::Fresh, PassKind::Fresh),
            (ResumeKind::Resync, PassKind::Resync),
        ] {
            let mut s = src(1);
            let g = fresh(&mut s, 0, 1);
            s.enqueue(0, g, &mut vec![write(0, 512), write(512, 512)], 0, 1024)
                .unwrap();
            s.place_marker(5);
            match s.open(0, 2, 1, resume, 0, MW) {
                OpenOutcome::Restarted {
                    kind: k,
                    freed,
                    overruled,
                } => {
                    assert_eq!(k, kind);
                    assert_eq!(freed, 1024);
                    assert!(overruled.is_none());
                }
                o => panic!("{o:?}"),
            }
            // The old reader is stale; the new pass has a new generation.
            assert_eq!(
                s.enqueue(0, g, &mut vec![write(0, 512)], 0, 512),
                Err(Stale)
            );
            let (k, g2) = s.take_request(0).unwrap();
            assert_eq!(k, kind);
            assert_ne!(g, g2);
            // Writes are gone, the marker stays; new ops follow it.
            assert_eq!(seqs(&s, 0, 2), vec![3]);
            assert_eq!(s.send_from(0, 2).unwrap(), 2);
            s.enqueue(0, g2, &mut vec![write(0, 512)], 0, 512).unwrap();
            assert_eq!(seqs(&s, 0, 2), vec![3, 4]);
            assert_eq!(
                s.report(0).unwrap().phase,
                if kind == PassKind::Fresh {
                    Phase::InitialSync
                } else {
                    Phase::Rescan
                }
            );
        }
    }

    #[test]
    fn a_lagging_durable_point_resumes_with_what_is_retained() {
        // The server acked 2, crashed, and its metadata says 0: acked ops are on its volume,
        // the retained ones (all above 2) are resent.
        let mut s = src(1);
        let g = fresh(&mut s, 0, 1);
        s.enqueue(
            0,
            g,
            &mut (0..4).map(|i| write(i * 512, 512)).collect(),
            0,
            2048,
        )
        .unwrap();
        s.ack(0, 1, 2).unwrap();
        match s.open(0, 2, 1, ResumeKind::Resume, 0, MW) {
            OpenOutcome::Resumed { released, resend } => {
                assert!(released.ops.is_empty());
                assert_eq!(resend, 2);
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(s.send_from(0, 2).unwrap(), 0);
        assert_eq!(seqs(&s, 0, 2), vec![3, 4]);
        // The pass goes on; a later ack below the old one changes nothing.
        s.enqueue(0, g, &mut vec![write(4096, 512)], 0, 4608)
            .unwrap();
        assert!(s.ack(0, 2, 1).unwrap().ops.is_empty());
    }

    #[test]
    fn impossible_resumes_are_overruled_with_a_resync() {
        // Nothing sent yet in this run.
        let mut s = src(1);
        assert!(matches!(
            s.open(0, 1, 1, ResumeKind::Resume, 0, MW),
            OpenOutcome::Restarted {
                kind: PassKind::Resync,
                overruled: Some(_),
                ..
            }
        ));
        // Durable point past anything assigned.
        let mut s = src(1);
        let g = fresh(&mut s, 0, 1);
        s.enqueue(0, g, &mut vec![write(0, 512)], 0, 512).unwrap();
        assert!(matches!(
            s.open(0, 2, 1, ResumeKind::Resume, 9, MW),
            OpenOutcome::Restarted {
                overruled: Some(_),
                ..
            }
        ));
        // Write limit below a retained write.
        let mut s = src(1);
        let g = fresh(&mut s, 0, 1);
        s.enqueue(0, g, &mut vec![write(0, 4096)], 0, 4096).unwrap();
        assert!(matches!(
            s.open(0, 2, 1, ResumeKind::Resume, 0, 1024),
            OpenOutcome::Restarted {
                overruled: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn phases_of_a_full_pass() {
        let mut s = src(1);
        assert_eq!(s.report(0), None);
        let g = fresh(&mut s, 0, 1);
        let r = s.report(0).unwrap();
        assert_eq!((r.phase, r.backlog_bytes), (Phase::InitialSync, 1 << 20));
        s.enqueue(0, g, &mut vec![write(0, 512)], 0, 4096).unwrap();
        let r = s.report(0).unwrap();
        assert_eq!(r.backlog_bytes, 512 + (1 << 20) - 4096);
        s.finish_pass(0, g).unwrap();
        // Scanned but not yet sent: still syncing.
        assert_eq!(s.report(0).unwrap().phase, Phase::InitialSync);
        assert!(s.mark_sent(0, 1, 1, 512).unwrap(), "phase changed");
        assert_eq!(
            s.report(0).unwrap(),
            Report {
                phase: Phase::Continuous,
                backlog_bytes: 0,
                pass_seq: 1
            }
        );
        assert!(!s.all_done(), "sent is not acked");
        s.ack(0, 1, 1).unwrap();
        assert!(s.all_done());
    }

    #[test]
    fn a_pass_that_sent_nothing_reports_pass_seq_zero() {
        let mut s = src(1);
        let g = fresh(&mut s, 0, 1);
        s.finish_pass(0, g).unwrap();
        assert_eq!(
            s.report(0).unwrap(),
            Report {
                phase: Phase::Continuous,
                backlog_bytes: 0,
                pass_seq: 0
            }
        );
        assert!(s.all_done());
    }

    #[test]
    fn follow_rescans() {
        let mut s = src(1);
        assert_eq!(s.start_rescan(0), None, "no rescan before the first pass");
        let g = fresh(&mut s, 0, 1);
        assert_eq!(s.start_rescan(0), None, "nor during it");
        s.enqueue(0, g, &mut vec![write(0, 512)], 0, 1 << 20)
            .unwrap();
        s.finish_pass(0, g).unwrap();
        s.mark_sent(0, 1, 1, 512).unwrap();

        // A rescan that finds nothing leaves Continuous and its pass_seq alone.
        let g2 = s.start_rescan(0).unwrap();
        assert_eq!(g2, g);
        assert_eq!(s.report(0).unwrap().phase, Phase::Continuous);
        s.finish_pass(0, g2).unwrap();
        assert_eq!(s.report(0).unwrap().pass_seq, 1);

        // One that finds a change: Rescan, then Backlog until sent, then Continuous.
        let g3 = s.start_rescan(0).unwrap();
        s.enqueue(0, g3, &mut vec![write(4096, 512)], 0, 8192)
            .unwrap();
        assert_eq!(s.report(0).unwrap().phase, Phase::Rescan);
        s.finish_pass(0, g3).unwrap();
        assert_eq!(s.report(0).unwrap().phase, Phase::Backlog);
        s.mark_sent(0, 1, 2, 512).unwrap();
        assert_eq!(
            s.report(0).unwrap(),
            Report {
                phase: Phase::Continuous,
                backlog_bytes: 0,
                pass_seq: 2
            }
        );

        // A restart during a rescan makes it stale.
        let g4 = s.start_rescan(0).unwrap();
        s.open(0, 2, 1, ResumeKind::Resync, 0, MW);
        assert_eq!(
            s.enqueue(0, g4, &mut vec![write(0, 512)], 0, 512),
            Err(Stale)
        );
        assert_eq!(s.finish_pass(0, g4), Err(Stale));
        assert_eq!(s.start_rescan(0), None, "the full pass comes first");
    }

    #[test]
    fn after_a_resume_the_completed_pass_is_continuous_once_resent() {
        let mut s = src(1);
        let g = fresh(&mut s, 0, 1);
        s.enqueue(0, g, &mut vec![write(0, 512), write(512, 512)], 0, 1024)
            .unwrap();
        s.finish_pass(0, g).unwrap();
        s.mark_sent(0, 1, 2, 1024).unwrap();
        assert_eq!(s.report(0).unwrap().phase, Phase::Continuous);
        // Reconnect: only 1 is durable, 2 must go again.
        s.open(0, 2, 1, ResumeKind::Resume, 1, MW);
        assert_eq!(s.report(0).unwrap().phase, Phase::InitialSync);
        s.mark_sent(0, 2, 2, 512).unwrap();
        assert_eq!(s.report(0).unwrap().phase, Phase::Continuous);
        // Everything durable at reconnect: continuous at once.
        s.open(0, 3, 1, ResumeKind::Resume, 2, MW);
        assert_eq!(s.report(0).unwrap().phase, Phase::Continuous);
        assert!(s.all_done());
    }

    #[test]
    fn covered_bytes_grow_over_a_pass() {
        let mut s = src(1);
        let g = fresh(&mut s, 0, 1);
        s.enqueue(0, g, &mut vec![write(0, 4096)], 0, 8192).unwrap();
        assert_eq!(s.snapshot(0).covered(), 4096);
        s.ack(0, 1, 1).unwrap();
        assert_eq!(s.snapshot(0).covered(), 8192);
        s.finish_pass(0, g).unwrap();
        assert_eq!(s.snapshot(0).covered(), 1 << 20);
    }
}
