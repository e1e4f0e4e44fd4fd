//! Source disks: regular files or block devices, read with positioned reads.
//!
//! Positioned reads (`pread`) need no shared cursor, so one open file serves the reader of a
//! pass and nothing else has to coordinate with it. The size comes from seeking to the end,
//! which works for block devices where `metadata().len()` says 0.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::config::DiskSpec;

/// A disk that cannot be used. Always permanent: it needs a human.
#[derive(Debug, Error)]
pub enum DiskError {
    #[error("opening disk {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {path} is not a regular file or a block device")]
    NotADisk { path: PathBuf },
    #[error("disk {path} is empty")]
    Empty { path: PathBuf },
    #[error("disk {path} has {size} bytes, not a multiple of the block size {block_size} (see --block-size)")]
    Misaligned {
        path: PathBuf,
        size: u64,
        block_size: u32,
    },
    #[error("reading disk {path} at offset {offset}: {source}")]
    Read {
        path: PathBuf,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
}

/// An open source disk.
#[derive(Debug)]
pub struct SourceDisk {
    pub id: String,
    pub path: PathBuf,
    pub size: u64,
    file: File,
}

impl SourceDisk {
    /// Opens `spec.path` read-only and checks that its size is a whole number of blocks.
    pub fn open(spec: &DiskSpec, block_size: u32) -> Result<Self, DiskError> {
        let path = spec.path.clone();
        let open_err = |source| DiskError::Open {
            path: path.clone(),
            source,
        };
        let mut file = File::open(&path).map_err(open_err)?;
        let ft = file.metadata().map_err(open_err)?.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(DiskError::NotADisk { path });
        }
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        if size == 0 {
            return Err(DiskError::Empty { path });
        }
        if size % u64::from(block_size) != 0 {
            return Err(DiskError::Misaligned {
                path,
                size,
                block_size,
            });
        }
        Ok(SourceDisk {
            id: spec.id.clone(),
            path,
            size,
            file,
        })
    }

    /// Fills `buf` from `offset`. A disk that ends early (it shrank) is an error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| DiskError::Read {
                path: self.path.clone(),
                offset,
                source,
            })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn spec(p: &Path) -> DiskSpec {
        DiskSpec {
            path: p.to_owned(),
            id: "d".into(),
        }
    }

    #[test]
    fn open_and_read() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        f.write_all(&data).unwrap();
        let d = SourceDisk::open(&spec(f.path()), 512).unwrap();
        assert_eq!(d.size, 4096);
        let mut buf = vec![0u8; 512];
        d.read_at(&mut buf, 1024).unwrap();
        assert_eq!(&buf[..], &data[1024..1536]);
        assert!(matches!(
            d.read_at(&mut buf, 4000),
            Err(DiskError::Read { offset: 4000, .. })
        ));
    }

    #[test]
    fn bad_disks() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            SourceDisk::open(&spec(&dir.path().join("nope")), 512),
            Err(DiskError::Open { .. })
        ));
        assert!(matches!(
            SourceDisk::open(&spec(dir.path()), 512),
            Err(DiskError::NotADisk { .. })
        ));
        let p = dir.path().join("empty");
        File::create(&p).unwrap();
        assert!(matches!(
            SourceDisk::open(&spec(&p), 512),
            Err(DiskError::Empty { .. })
        ));
        let p = dir.path().join("odd");
        std::fs::write(&p, vec![0u8; 1000]).unwrap();
        let e = SourceDisk::open(&spec(&p), 512).unwrap_err();
        assert!(
            e.to_string()
                .contains("not a multiple of the block size 512"),
            "{e}"
        );
    }
}
