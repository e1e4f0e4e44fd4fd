//! The volume contract and its file / block-device implementation.
//!
//! A [`Volume`] is a fixed-size array of bytes with positioned reads and writes and one explicit
//! durability call, [`Volume::flush`]. Nothing written is durable until a `flush` that started
//! after the write returned `Ok`. There is deliberately no "skip flush" mode anywhere.
//!
//! The local default stores each source disk as a sparse file; on EC2 the same type opens the
//! attached EBS block device. [`MemVolume`] is the simulation twin used by crash tests: it keeps
//! unflushed writes apart and can drop them as a power cut would.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::fsutil::{create_dir_all_durable, fsync_dir};
use crate::meta::VolumeStamp;
use crate::StoreError;

/// The extended attribute that holds a file volume's stamp.
const STAMP_XATTR: &std::ffi::CStr = c"user.slipway.stamp";

/// A block volume with explicit durability.
pub trait Volume: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Writes all of `buf` at `offset`. Not durable until [`Volume::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zero. Not durable until [`Volume::flush`].
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Makes every write that completed before this call durable (`fdatasync`).
    fn flush(&self) -> io::Result<()>;
    /// A handle of its own for a flusher thread, whose [`FlushHandle::flush`] does what
    /// [`Volume::flush`] does. Linux reports a failed writeback once per open file: two
    /// `fdatasync`s in flight on one descriptor could share one error between them, one
    /// failing and the other returning `Ok` for data that never reached the disk. A flusher
    /// with a descriptor of its own sees every error that happens after it was opened.
    /// `None` (the default): flushes go through [`Volume::flush`].
    fn flush_handle(&self) -> io::Result<Option<Box<dyn FlushHandle>>> {
        Ok(None)
    }
    /// Human-readable location, for errors and status.
    fn describe(&self) -> String;
}

/// See [`Volume::flush_handle`].
pub trait FlushHandle: Send {
    /// Makes every write to the volume that completed before this call durable.
    fn flush(&self) -> io::Result<()>;
}

impl FlushHandle for File {
    fn flush(&self) -> io::Result<()> {
        self.sync_data()
    }
}

/// A volume backed by a regular file or a block device.
#[derive(Debug)]
pub struct FileVolume {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
}

const ZERO_CHUNK: usize = 1 << 20;

impl FileVolume {
    /// Opens the sparse file at `path`, creating it (durably, with its directory entry) with
    /// `size` bytes if it does not exist. Returns the volume and whether it was created.
    pub fn open_or_create(path: &Path, size: u64) -> Result<(Self, bool), StoreError> {
        if let Some(dir) = path.parent() {
            create_dir_all_durable(dir)?;
        }
        let what = |s: &str| format!("{s} volume {}", path.display());
        let (file, created) = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => {
                f.set_len(size).map_err(StoreError::io(what("sizing")))?;
                f.sync_all().map_err(StoreError::io(what("fsyncing")))?;
                if let Some(dir) = path.parent() {
                    fsync_dir(dir)?;
                }
                (f, true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(StoreError::io(what("opening")))?,
                false,
            ),
            Err(e) => return Err(StoreError::io(what("creating"))(e)),
        };
        let v = Self::from_file(file, path)?;
        if v.size < size {
            return Err(StoreError::TooSmall {
                path: path.display().to_string(),
                actual: v.size,
                expected: size,
            });
        }
        Ok((v, created))
    }

    /// Opens an existing file or block device.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(StoreError::io(format!("opening volume {}", path.display())))?;
        Self::from_file(file, path)
    }

    fn from_file(file: File, path: &Path) -> Result<Self, StoreError> {
        let md = file.metadata().map_err(StoreError::io(format!(
            "inspecting volume {}",
            path.display()
        )))?;
        let block_device = md.file_type().is_block_device();
        let size = if block_device {
            device_size(&file).map_err(StoreError::io(format!(
                "reading the size of block device {}",
                path.display()
            )))?
        } else {
            md.len()
        };
        Ok(FileVolume {
            file,
            path: path.to_owned(),
            size,
            block_device,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the volume is a block device (an attached EBS volume) rather than a file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// The volume's stamp (see [`crate::meta::VolumeStamp`]): `Ok(None)` when it has none.
    /// Stamps live in an extended attribute of a file volume; a block device has none
    /// (`Ok(None)`), and neither does a file on a filesystem without user xattrs.
    pub fn read_stamp(&self) -> Result<Option<VolumeStamp>, StoreError> {
        if self.block_device {
            return Ok(None);
        }
        let mut buf = [0u8; 128];
        // SAFETY: the fd is open for the call; the name is NUL-terminated; buf is valid for
        // buf.len() bytes and the kernel writes at most that many.
        let n = unsafe {
            libc::fgetxattr(
                self.file.as_raw_fd(),
                STAMP_XATTR.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENODATA) | Some(libc::ENOTSUP) => Ok(None),
                _ => Err(StoreError::io(format!(
                    "reading the stamp of volume {}",
                    self.path.display()
                ))(e)),
            };
        }
        Ok(VolumeStamp::decode(&buf[..n as usize]))
    }

    /// Writes `stamp` to the volume durably (xattr, then fsync). `Ok(false)` where stamps
    /// cannot be kept (a block device, a filesystem without user xattrs).
    pub fn write_stamp(&self, stamp: &VolumeStamp) -> Result<bool, StoreError> {
        if self.block_device {
            return Ok(false);
        }
        let v = stamp.encode();
        // SAFETY: the fd is open; the name is NUL-terminated; v is valid for v.len() bytes.
        let r = unsafe {
            libc::fsetxattr(
                self.file.as_raw_fd(),
                STAMP_XATTR.as_ptr(),
                v.as_ptr().cast(),
                v.len(),
                0,
            )
        };
        let what = || format!("stamping volume {}", self.path.display());
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOTSUP) {
                return Ok(false);
            }
            return Err(StoreError::io(what())(e));
        }
        self.file.sync_all().map_err(StoreError::io(what()))?;
        Ok(true)
    }

    fn zero_by_writing(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeros = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let end = offset + len;
        while offset < end {
            let n = ((end - offset) as usize).min(zeros.len());
            self.file.write_all_at(&zeros[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

fn device_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

fn check_range(size: u64, offset: u64, len: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} is outside the volume ({size} bytes)"),
        )),
    }
}

impl Volume for FileVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if !self.block_device {
            // Punching a hole keeps the file sparse; the range then reads as zeros.
            // SAFETY: fallocate on a valid open fd with in-range arguments; no memory is passed.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
        }
        self.zero_by_writing(offset, len)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn flush_handle(&self) -> io::Result<Option<Box<dyn FlushHandle>>> {
        // Read-only is enough for fdatasync; the same inode (the volume is never renamed
        // while open).
        let f = File::open(&self.path)?;
        let same = {
            use std::os::unix::fs::MetadataExt;
            let (a, b) = (self.file.metadata()?, f.metadata()?);
            (a.dev(), a.ino()) == (b.dev(), b.ino())
        };
        if !same {
            return Err(io::Error::other(format!(
                "{} is no longer the volume this server opened",
                self.path.display()
            )));
        }
        Ok(Some(Box::new(f)))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// In-memory volume for crash and fault tests.
///
/// Writes land in a pending overlay; [`Volume::flush`] moves them to the durable image;
/// [`MemVolume::power_cut`] drops the overlay as a power loss would (a real disk may also keep
/// any subset of unflushed writes — [`MemVolume::power_cut_keeping`] models that). Faults can be
/// armed to make the n-th write or the next flush fail.
#[derive(Debug)]
pub struct MemVolume {
    inner: Mutex<MemInner>,
}

#[derive(Debug, Default)]
struct MemInner {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    fail_write_in: Option<u64>,
    fail_flush: Option<io::ErrorKind>,
    fail_write_kind: Option<i32>,
    flushes: u64,
}

impl MemVolume {
    pub fn new(size: usize) -> Self {
        MemVolume {
            inner: Mutex::new(MemInner {
                durable: vec![0; size],
                ..Default::default()
            }),
        }
    }

    /// The image a reader would see now (durable plus pending).
    pub fn current(&self) -> Vec<u8> {
        let g = self.inner.lock().unwrap();
        let mut img = g.durable.clone();
        for (off, data) in &g.pending {
            img[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
        img
    }

    /// The image that would survive a power cut now.
    pub fn durable(&self) -> Vec<u8> {
        self.inner.lock().unwrap().durable.clone()
    }

    /// Drops every unflushed write.
    pub fn power_cut(&self) {
        self.inner.lock().unwrap().pending.clear();
    }

    /// Keeps the unflushed writes for which `keep(index)` is true, drops the rest.
    pub fn power_cut_keeping(&self, mut keep: impl FnMut(usize) -> bool) {
        let mut g = self.inner.lock().unwrap();
        let pending = std::mem::take(&mut g.pending);
        for (i, (off, data)) in pending.into_iter().enumerate() {
            if keep(i) {
                g.durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
        }
    }

    /// The n-th write from now (0 = next) fails with `errno`, and so does every later one until
    /// [`MemVolume::clear_faults`].
    pub fn fail_writes_after(&self, n: u64, errno: i32) {
        let mut g = self.inner.lock().unwrap();
        g.fail_write_in = Some(n);
        g.fail_write_kind = Some(errno);
    }

    /// Every flush fails until [`MemVolume::clear_faults`].
    pub fn fail_flushes(&self) {
        self.inner.lock().unwrap().fail_flush = Some(io::ErrorKind::Other);
    }

    pub fn clear_faults(&self) {
        let mut g = self.inner.lock().unwrap();
        g.fail_write_in = None;
        g.fail_write_kind = None;
        g.fail_flush = None;
    }

    /// Number of successful flushes so far.
    pub fn flushes(&self) -> u64 {
        self.inner.lock().unwrap().flushes
    }
}

impl Volume for MemVolume {
    fn size(&self) -> u64 {
        self.inner.lock().unwrap().durable.len() as u64
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        check_range(g.durable.len() as u64, offset, buf.len() as u64)?;
        if let Some(n) = g.fail_write_in {
            if n == 0 {
                return Err(io::Error::from_raw_os_error(
                    g.fail_write_kind.unwrap_or(libc::EIO),
                ));
            }
            g.fail_write_in = Some(n - 1);
        }
        g.pending.push((offset, buf.to_vec()));
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_at(&vec![0u8; len as usize], offset)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        let img = self.current();
        buf.copy_from_slice(&img[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap();
        if let Some(kind) = g.fail_flush {
            // Like Linux after a writeback error: the dirty data may be gone.
            g.pending.clear();
            return Err(io::Error::new(kind, "injected flush failure"));
        }
        let pending = std::mem::take(&mut g.pending);
        for (off, data) in pending {
            g.durable[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        g.flushes += 1;
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each flusher gets a descriptor of its own on the same file (its own writeback-error
    /// tracking), and a path that no longer names the volume is refused, not flushed.
    #[test]
    fn flush_handles_are_own_descriptors_of_the_same_file() {
        use std::os::unix::fs::MetadataExt;
        use std::os::unix::io::AsRawFd;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.raw");
        let (v, _) = FileVolume::open_or_create(&p, 1 << 20).unwrap();
        let a = v
            .flush_handle()
            .unwrap()
            .expect("a file volume gives handles");
        let b = v
            .flush_handle()
            .unwrap()
            .expect("a file volume gives handles");
        v.write_at(&[7u8; 4096], 0).unwrap();
        a.flush().unwrap();
        b.flush().unwrap();
        // Distinct open files of the volume's inode: /proc shows two new descriptors.
        let fds: Vec<_> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::metadata(e.path()).ok())
            .filter(|m| m.ino() == v.file.metadata().unwrap().ino())
            .collect();
        assert!(
            fds.len() >= 3,
            "the volume's own and two handles: {}",
            fds.len()
        );
        assert!(v.file.as_raw_fd() >= 0);
        // Swapped under the server: refused.
        std::fs::rename(&p, d.path().join("old.raw")).unwrap();
        std::fs::write(&p, b"other").unwrap();
        assert!(v.flush_handle().is_err());
    }

    #[test]
    fn a_file_volume_keeps_its_stamp_durably() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.raw");
        let (v, _) = FileVolume::open_or_create(&p, 1 << 20).unwrap();
        assert_eq!(v.read_stamp().unwrap(), None);
        let s = VolumeStamp::fresh();
        if !v.write_stamp(&s).unwrap() {
            eprintln!("skipped: this filesystem keeps no user xattrs");
            return;
        }
        drop(v);
        let v = FileVolume::open(&p).unwrap();
        assert_eq!(v.read_stamp().unwrap(), Some(s));
        // A copy of the bytes is not the volume.
        let copy = d.path().join("copy.raw");
        std::fs::copy(&p, &copy).unwrap();
        assert_eq!(FileVolume::open(&copy).unwrap().read_stamp().unwrap(), None);
    }

    #[test]
    fn file_volume_create_write_zero_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("src/disk.raw");
        let (v, created) = FileVolume::open_or_create(&p, 1 << 20).unwrap();
        assert!(created);
        assert_eq!(v.size(), 1 << 20);
        v.write_at(&[7u8; 8192], 4096).unwrap();
        v.write_zeroes(8192, 4096).unwrap();
        v.flush().unwrap();
        let mut b = vec![0u8; 8192];
        v.read_at(&mut b, 4096).unwrap();
        assert!(b[..4096].iter().all(|x| *x == 7));
        assert!(b[4096..].iter().all(|x| *x == 0));
        assert!(v.write_at(&[1], 1 << 20).is_err());
        drop(v);
        let (v, created) = FileVolume::open_or_create(&p, 1 << 20).unwrap();
        assert!(!created);
        let mut b = vec![0u8; 4096];
        v.read_at(&mut b, 4096).unwrap();
        assert!(b.iter().all(|x| *x == 7));
        assert!(matches!(
            FileVolume::open_or_create(&p, 2 << 20),
            Err(StoreError::TooSmall { .. })
        ));
    }

    #[test]
    fn mem_volume_loses_only_unflushed() {
        let v = MemVolume::new(4096);
        v.write_at(&[1; 512], 0).unwrap();
        v.flush().unwrap();
        v.write_at(&[2; 512], 512).unwrap();
        assert_eq!(v.current()[512], 2);
        v.power_cut();
        assert_eq!(v.current()[0], 1);
        assert_eq!(v.current()[512], 0);
        v.fail_writes_after(1, libc::ENOSPC);
        v.write_at(&[3; 512], 0).unwrap();
        let e = v.write_at(&[3; 512], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        v.clear_faults();
        v.fail_flushes();
        assert!(v.flush().is_err());
        assert_eq!(v.durable()[0], 1, "a failed flush made nothing durable");
    }
}
