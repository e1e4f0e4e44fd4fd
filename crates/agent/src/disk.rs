//! Source disks: regular files or block devices, read with positioned reads.
//!
//! Positioned reads (`pread`) need no shared cursor, so one open file serves the reader of a
//! pass and nothing else has to coordinate with it. The size comes from seeking to the end,
//! which works for block devices where `metadata().len()` says 0.
//!
//! Block devices are opened with `O_DIRECT`. A filesystem mounted on the device writes its
//! file data with bios straight to the device, past the device's own page cache, so a
//! buffered read of the device can keep returning bytes it cached earlier: measured here,
//! reading a block of a loop device, rewriting that block through the ext4 mounted on it
//! (`fsync`, `sync`) and reading it again returned the old bytes buffered and the new ones
//! with `O_DIRECT`. On a live source the first pass fills that cache, and every rescan after
//! it would see the stale bytes, so the replica would silently keep old data. Direct reads
//! need the buffer address, the offset and the length aligned to the device's logical block
//! size: reads go through an aligned bounce buffer, and a device whose logical block does not
//! divide `--block-size` is refused when opened. Regular files (images) keep buffered reads:
//! the page cache is theirs, and some filesystems (tmpfs) refuse `O_DIRECT`.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

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
    #[error(
        "disk {path} has a logical block size of {logical_block} bytes, which does not divide \
         the block size {block_size} (see --block-size): its direct reads need whole logical blocks"
    )]
    LogicalBlock {
        path: PathBuf,
        logical_block: u32,
        block_size: u32,
    },
    #[error(
        "reading disk {path}: {len} bytes at offset {offset} are not whole logical blocks of \
         {logical_block} bytes, as its direct reads need"
    )]
    Unaligned {
        path: PathBuf,
        offset: u64,
        len: usize,
        logical_block: u32,
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
    /// Set for block devices, which are read with `O_DIRECT` (see the module doc).
    direct: Option<Direct>,
}

/// What direct reads of a block device need.
#[derive(Debug)]
struct Direct {
    /// The device's logical block size: offsets and lengths are multiples of it.
    logical_block: u32,
    /// The aligned buffer every read goes through. A disk's reads come from its pass, so the
    /// lock is normally uncontended; it serialises reads that would share the buffer.
    bounce: Mutex<AlignedBuf>,
}

/// Bytes per direct read: the bounce buffer's size. A multiple of every logical block size
/// accepted (powers of two up to the largest `--block-size`).
const BOUNCE_LEN: usize = 1 << 20;

/// Alignment of the bounce buffer's address: a page, which satisfies every device's DMA
/// alignment and every logical block size up to it.
const PAGE_ALIGN: usize = 4096;

/// A zeroed byte buffer whose start is aligned to `align`: a window into a slightly larger
/// `Vec` (never resized, so the window never moves).
#[derive(Debug)]
struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `align` must be a power of two.
    fn new(len: usize, align: usize) -> Self {
        debug_assert!(align.is_power_of_two());
        let storage = vec![0u8; len + align - 1];
        let start = storage.as_ptr().addr().wrapping_neg() & (align - 1);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// The logical block size of the block device open as `file` (`BLKSSZGET`).
fn logical_block_size(file: &File) -> std::io::Result<u32> {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one `int` through its pointer argument, which points to a live,
    // writable `c_int`; the descriptor stays open for the call since `file` is borrowed.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::BLKSSZGET,
            &mut size as *mut libc::c_int,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    u32::try_from(size)
        .ok()
        .filter(|s| s.is_power_of_two())
        .ok_or_else(|| {
            std::io::Error::other(format!("the device reports a logical block size of {size}"))
        })
}

/// Fills `buf` from `offset` of `file` through `bounce`, one bounce buffer at a time.
/// With `O_DIRECT`, `offset` and `buf.len()` must be multiples of the logical block size,
/// and so must the bounce buffer's length and address.
fn read_through(
    file: &File,
    bounce: &mut AlignedBuf,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), (u64, std::io::Error)> {
    let bounce = bounce.as_mut_slice();
    let mut at = offset;
    for piece in buf.chunks_mut(bounce.len()) {
        let tmp = &mut bounce[..piece.len()];
        file.read_exact_at(tmp, at).map_err(|e| (at, e))?;
        piece.copy_from_slice(tmp);
        at += piece.len() as u64;
    }
    Ok(())
}

impl SourceDisk {
    /// Opens `spec.path` read-only and checks that its size is a whole number of blocks.
    pub fn open(spec: &DiskSpec, block_size: u32) -> Result<Self, DiskError> {
        let path = spec.path.clone();
        let open_err = |source| DiskError::Open {
            path: path.clone(),
            source,
        };
        // Decide on O_DIRECT before opening: it must not be used for regular files.
        let block_device = std::fs::metadata(&path)
            .map_err(open_err)?
            .file_type()
            .is_block_device();
        let mut opts = OpenOptions::new();
        opts.read(true);
        if block_device {
            opts.custom_flags(libc::O_DIRECT);
        }
        let mut file = opts.open(&path).map_err(open_err)?;
        let ft = file.metadata().map_err(open_err)?.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(DiskError::NotADisk { path });
        }
        let direct = if block_device {
            // Fails (ENOTTY) should the path have stopped being a device since the stat.
            let logical_block = logical_block_size(&file).map_err(open_err)?;
            // Both are powers of two: the logical block divides the block size iff it is
            // not larger.
            if logical_block > block_size {
                return Err(DiskError::LogicalBlock {
                    path,
                    logical_block,
                    block_size,
                });
            }
            let align = PAGE_ALIGN.max(logical_block as usize);
            Some(Direct {
                logical_block,
                bounce: Mutex::new(AlignedBuf::new(BOUNCE_LEN, align)),
            })
        } else {
            None
        };
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
            direct,
        })
    }

    /// Fills `buf` from `offset`. A disk that ends early (it shrank) is an error. On a block
    /// device `offset` and `buf.len()` must be whole logical blocks (whole `--block-size`
    /// blocks always are); any buffer will do.
    /// Whether the disk is a block device (read with `O_DIRECT`) rather than an image file.
    pub fn is_block_device(&self) -> bool {
        self.direct.is_some()
    }

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        let read_err = |offset, source| DiskError::Read {
            path: self.path.clone(),
            offset,
            source,
        };
        let Some(direct) = &self.direct else {
            return self
                .file
                .read_exact_at(buf, offset)
                .map_err(|e| read_err(offset, e));
        };
        let lb = direct.logical_block;
        if !offset.is_multiple_of(u64::from(lb)) || !buf.len().is_multiple_of(lb as usize) {
            return Err(DiskError::Unaligned {
                path: self.path.clone(),
                offset,
                len: buf.len(),
                logical_block: lb,
            });
        }
        let mut bounce = direct.bounce.lock().unwrap_or_else(PoisonError::into_inner);
        read_through(&self.file, &mut bounce, buf, offset).map_err(|(at, e)| read_err(at, e))
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
    fn aligned_buffers_start_aligned() {
        for align in [512, 4096, 65536] {
            for len in [512, 4096, 12288, BOUNCE_LEN] {
                let mut b = AlignedBuf::new(len, align);
                let s = b.as_mut_slice();
                assert_eq!(s.len(), len);
                assert_eq!(s.as_ptr().addr() % align, 0, "align {align} len {len}");
                assert!(s.iter().all(|&x| x == 0));
            }
        }
    }

    /// The direct read path on a file opened with `O_DIRECT` (where the filesystem allows it,
    /// as ext4 and xfs do; tmpfs may not): a misaligned caller buffer and a read spanning
    /// several bounce buffers come back intact.
    #[test]
    fn reads_through_an_aligned_bounce_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let data: Vec<u8> = (0..40960u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("O_DIRECT refused here ({e}); testing the bounce logic buffered");
                File::open(&p).unwrap()
            }
        };
        let mut bounce = AlignedBuf::new(8192, PAGE_ALIGN);
        let mut storage = vec![0u8; 5 * 4096 + 1];
        let buf = &mut storage[1..]; // never aligned to more than one byte
        read_through(&file, &mut bounce, buf, 4096).unwrap();
        assert!(buf[..] == data[4096..6 * 4096]);
        let (at, e) = read_through(&file, &mut bounce, buf, 8 * 4096).unwrap_err();
        assert_eq!(at, 10 * 4096, "the piece past the end fails: {e}");
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
