//! The ack journal: a test hook that records what the server acknowledged.
//!
//! End-to-end tests kill the server at random moments and then check that every write the
//! agent saw acknowledged is on the replica. The agent is the only party that knows which
//! writes those were, so it appends one line per released write as soon as the ack arrives
//! and flushes it to the kernel (no fsync: the tests kill processes, not machines).

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::retained::{Op, OpKind};

#[derive(Debug, Error)]
#[error("ack journal {path}: {source}")]
pub struct JournalError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Appends `<disk_id> <seq> <offset> <len>` lines.
#[derive(Debug)]
pub struct AckJournal {
    path: PathBuf,
    file: File,
    line: Vec<u8>,
}

impl AckJournal {
    /// Opens `path` for appending, creating it.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| JournalError {
                path: path.to_owned(),
                source,
            })?;
        Ok(AckJournal {
            path: path.to_owned(),
            file,
            line: Vec::new(),
        })
    }

    /// Records the writes and zero ranges among `ops` (markers are not data) in one write.
    pub fn record(&mut self, disk_id: &str, ops: &[Op]) -> Result<(), JournalError> {
        self.line.clear();
        format_lines(&mut self.line, disk_id, ops);
        if self.line.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&self.line)
            .and_then(|()| self.file.flush())
            .map_err(|source| JournalError {
                path: self.path.clone(),
                source,
            })
    }
}

fn format_lines(out: &mut Vec<u8>, disk_id: &str, ops: &[Op]) {
    use std::io::Write as _;
    for op in ops {
        let (offset, len) = match &op.kind {
            OpKind::Write { offset, data } => (*offset, data.len() as u64),
            OpKind::Zeroes { offset, len } => (*offset, *len),
            OpKind::Marker { .. } => continue,
        };
        // Writing into a Vec cannot fail.
        let _ = writeln!(out, "{disk_id} {} {offset} {len}", op.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn lines_for_writes_and_zeroes_only() {
        let ops = vec![
            Op {
                seq: 3,
                kind: OpKind::Write {
                    offset: 4096,
                    data: Bytes::from_static(&[1; 512]),
                },
                charge: 512,
            },
            Op {
                seq: 4,
                kind: OpKind::Marker { marker_id: 1 },
                charge: 0,
            },
            Op {
                seq: 5,
                kind: OpKind::Zeroes {
                    offset: 0,
                    len: 1 << 20,
                },
                charge: 0,
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("acks");
        let mut j = AckJournal::open(&p).unwrap();
        j.record("sda", &ops).unwrap();
        j.record("sdb", &ops[1..2]).unwrap();
        drop(j);
        let mut j = AckJournal::open(&p).unwrap();
        j.record("sdb", &ops[2..]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "sda 3 4096 512\nsda 5 0 1048576\nsdb 5 0 1048576\n"
        );
    }
}
