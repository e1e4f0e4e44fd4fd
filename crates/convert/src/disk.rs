//! What is on a disk, read from its first sectors: the partition table (MBR with logical
//! partitions, or GPT), each partition's content (filesystem type, UUID and label; LUKS; LVM
//! physical volume; swap) and the boot mode the disk was set up for.
//!
//! Pure parsing over byte slices plus one generic driver over [`ReadAt`], so every layout the
//! conversion meets is reachable from unit tests with a few hand-made sectors, and so neither
//! `blkid` nor udev is needed (the staging host may not run udev at all).

use std::io;

use serde::Serialize;

const SECTOR: u64 = 512;
/// How much of a partition [`probe_content`] looks at: the btrfs superblock ends below 68 KiB.
pub const PROBE_LEN: usize = 68 * 1024;

/// Positioned reads: a file, a block device, or bytes in a test.
pub trait ReadAt {
    /// Fills `buf` from `offset`; bytes past the end read as zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Size in bytes.
    fn size(&self) -> io::Result<u64>;
}

impl ReadAt for std::fs::File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        buf.fill(0);
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        use std::io::Seek;
        let mut f = self;
        f.seek(io::SeekFrom::End(0))
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        let start = (offset as usize).min(<[u8]>::len(self));
        let n = (<[u8]>::len(self) - start).min(buf.len());
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(<[u8]>::len(self) as u64)
    }
}

/// The partition table found on a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Mbr,
    Gpt,
    /// A filesystem (or nothing known) on the whole disk.
    None,
}

/// How the machine boots from this disk, as far as its layout tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootMode {
    /// MBR, or GPT with a BIOS boot partition and no EFI system partition.
    LegacyBios,
    /// GPT with an EFI system partition.
    Uefi,
    /// GPT with both an EFI system partition and a BIOS boot partition (cloud images): both
    /// work; launches use legacy BIOS, which every x86 instance type offers.
    Hybrid,
}

/// What a partition holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Content {
    Filesystem {
        fs: String,
        uuid: String,
        label: Option<String>,
    },
    Swap {
        uuid: String,
    },
    /// A LUKS container: an encrypted volume, which conversion cannot open.
    Luks {
        uuid: String,
    },
    /// An LVM physical volume.
    LvmPv,
    Unknown,
}

/// One partition (number as Linux counts them: 1–4 primary, 5+ logical; GPT entries from 1).
/// A disk without a table has one "partition" 0 covering it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Partition {
    pub number: u32,
    /// Byte offset on the disk.
    pub start: u64,
    pub size: u64,
    /// The EFI system partition (GPT type or MBR type 0xEF).
    pub esp: bool,
    /// A GPT BIOS boot partition (GRUB's core image).
    pub bios_boot: bool,
    pub content: Content,
}

/// A disk's layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiskLayout {
    pub table: TableKind,
    pub boot_mode: BootMode,
    pub partitions: Vec<Partition>,
}

impl DiskLayout {
    pub fn partition(&self, number: u32) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.number == number)
    }
}

/// An error reading a disk's layout.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// reading the disk failed
    #[error("reading the disk: {0}")]
    Io(#[from] io::Error),
    /// the partition table is damaged
    #[error("the partition table is damaged: {0}")]
    Corrupt(String),
}

const ESP_GUID: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
const BIOS_BOOT_GUID: &str = "21686148-6449-6e6f-744e-656564454649";

/// Reads the partition table and probes each partition's content.
pub fn probe<R: ReadAt + ?Sized>(disk: &R) -> Result<DiskLayout, LayoutError> {
    let size = disk.size()?;
    let mut mbr = [0u8; 512];
    disk.read_at(0, &mut mbr)?;
    let mut raw: Vec<(u32, u64, u64, bool, bool)> = Vec::new(); // number, start, size, esp, bios
    let table = match parse_mbr(&mbr) {
        Some(entries) if entries.iter().any(|e| e.kind == 0xee) => {
            let mut hdr = [0u8; 512];
            disk.read_at(SECTOR, &mut hdr)?;
            let h = parse_gpt_header(&hdr).ok_or_else(|| {
                LayoutError::Corrupt("protective MBR but no GPT header at LBA 1".into())
            })?;
            let len = h.count as usize * h.entry_size as usize;
            if len > 1 << 20 {
                return Err(LayoutError::Corrupt(format!("{} GPT entries", h.count)));
            }
            let mut entries = vec![0u8; len];
            disk.read_at(h.entries_lba * SECTOR, &mut entries)?;
            for (i, e) in entries.chunks(h.entry_size as usize).enumerate() {
                if let Some(g) = parse_gpt_entry(e) {
                    raw.push((
                        i as u32 + 1,
                        g.first_lba * SECTOR,
                        (g.last_lba + 1 - g.first_lba) * SECTOR,
                        g.type_guid == ESP_GUID,
                        g.type_guid == BIOS_BOOT_GUID,
                    ));
                }
            }
            TableKind::Gpt
        }
        Some(entries) => {
            for (i, e) in entries.iter().enumerate() {
                if e.sectors == 0 {
                    continue;
                }
                if e.is_extended() {
                    logical_partitions(disk, e.start_lba, &mut raw)?;
                } else {
                    raw.push((
                        i as u32 + 1,
                        e.start_lba * SECTOR,
                        e.sectors * SECTOR,
                        e.kind == 0xef,
                        false,
                    ));
                }
            }
            TableKind::Mbr
        }
        None => {
            raw.push((0, 0, size, false, false));
            TableKind::None
        }
    };
    let mut partitions = Vec::new();
    let mut buf = vec![0u8; PROBE_LEN];
    for (number, start, psize, esp, bios_boot) in raw {
        disk.read_at(start, &mut buf)?;
        partitions.push(Partition {
            number,
            start,
            size: psize,
            esp,
            bios_boot,
            content: probe_content(&buf),
        });
    }
    let esp = partitions.iter().any(|p| p.esp);
    let bios = partitions.iter().any(|p| p.bios_boot);
    let boot_mode = match (table, esp, bios) {
        (TableKind::Gpt, true, false) => BootMode::Uefi,
        (TableKind::Gpt, true, true) => BootMode::Hybrid,
        _ => BootMode::LegacyBios,
    };
    Ok(DiskLayout {
        table,
        boot_mode,
        partitions,
    })
}

/// Follows the chain of extended boot records from the extended partition at `ext_lba`.
fn logical_partitions<R: ReadAt + ?Sized>(
    disk: &R,
    ext_lba: u64,
    out: &mut Vec<(u32, u64, u64, bool, bool)>,
) -> Result<(), LayoutError> {
    let mut ebr_lba = ext_lba;
    for number in 5..5 + 128 {
        let mut s = [0u8; 512];
        disk.read_at(ebr_lba * SECTOR, &mut s)?;
        let Some(e) = parse_mbr(&s) else {
            return Ok(());
        };
        if e[0].sectors > 0 {
            out.push((
                number,
                (ebr_lba + e[0].start_lba) * SECTOR,
                e[0].sectors * SECTOR,
                false,
                false,
            ));
        }
        if e[1].sectors == 0 {
            return Ok(());
        }
        ebr_lba = ext_lba + e[1].start_lba;
    }
    Err(LayoutError::Corrupt(
        "more than 128 logical partitions (a loop in the EBR chain?)".into(),
    ))
}

/// One MBR partition entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MbrEntry {
    pub kind: u8,
    pub start_lba: u64,
    pub sectors: u64,
}

impl MbrEntry {
    fn is_extended(&self) -> bool {
        matches!(self.kind, 0x05 | 0x0f | 0x85)
    }
}

/// The four entries of an MBR (or EBR) sector, if it carries the 0x55AA signature and at least
/// one entry; empty slots stay in place with `kind == 0` and `sectors == 0` (so EBR entry 1
/// stays at index 1).
pub fn parse_mbr(s: &[u8; 512]) -> Option<[MbrEntry; 4]> {
    if s[510] != 0x55 || s[511] != 0xaa {
        return None;
    }
    let mut out = [MbrEntry {
        kind: 0,
        start_lba: 0,
        sectors: 0,
    }; 4];
    let mut any = false;
    for (i, o) in out.iter_mut().enumerate() {
        let e = &s[446 + 16 * i..446 + 16 * (i + 1)];
        let kind = e[4];
        let start = u32::from_le_bytes(e[8..12].try_into().unwrap()) as u64;
        let sectors = u32::from_le_bytes(e[12..16].try_into().unwrap()) as u64;
        if kind != 0 && sectors > 0 {
            *o = MbrEntry {
                kind,
                start_lba: start,
                sectors,
            };
            any = true;
        }
    }
    // A boot sector of a filesystem (FAT) also ends in 0x55AA: it is not a partition table.
    let fat =
        s[0x36..0x3b] == *b"FAT12" || s[0x36..0x3b] == *b"FAT16" || s[0x52..0x57] == *b"FAT32";
    (any && !fat).then_some(out)
}

struct GptHeader {
    entries_lba: u64,
    count: u32,
    entry_size: u32,
}

fn parse_gpt_header(s: &[u8; 512]) -> Option<GptHeader> {
    if &s[0..8] != b"EFI PART" {
        return None;
    }
    let entry_size = u32::from_le_bytes(s[84..88].try_into().unwrap());
    if entry_size < 128 {
        return None;
    }
    Some(GptHeader {
        entries_lba: u64::from_le_bytes(s[72..80].try_into().unwrap()),
        count: u32::from_le_bytes(s[80..84].try_into().unwrap()),
        entry_size,
    })
}

struct GptEntry {
    type_guid: String,
    first_lba: u64,
    last_lba: u64,
}

fn parse_gpt_entry(e: &[u8]) -> Option<GptEntry> {
    if e.len() < 128 || e[0..16].iter().all(|&b| b == 0) {
        return None;
    }
    let first_lba = u64::from_le_bytes(e[32..40].try_into().unwrap());
    let last_lba = u64::from_le_bytes(e[40..48].try_into().unwrap());
    (last_lba >= first_lba).then(|| GptEntry {
        type_guid: guid_mixed_endian(&e[0..16]),
        first_lba,
        last_lba,
    })
}

/// A GPT GUID: the first three fields little-endian, the rest as stored.
fn guid_mixed_endian(b: &[u8]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
        b[14], b[15]
    )
}

/// A UUID stored as 16 bytes in order (ext*, xfs, btrfs, swap).
fn uuid_be(b: &[u8]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn label(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).trim_end().to_string();
    (!s.is_empty()).then_some(s)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// What the first [`PROBE_LEN`] bytes of a partition say it holds.
pub fn probe_content(b: &[u8]) -> Content {
    if b.len() < PROBE_LEN {
        return Content::Unknown;
    }
    if b[0..6] == *b"LUKS\xba\xbe" {
        let uuid = label(&b[168..208]).unwrap_or_default();
        return Content::Luks { uuid };
    }
    // LVM2 label: "LABELONE" in one of the first four sectors, "LVM2 001" 24 bytes later.
    for s in 0..4 {
        let o = s * 512;
        if b[o..o + 8] == *b"LABELONE" && b[o + 24..o + 32] == *b"LVM2 001" {
            return Content::LvmPv;
        }
    }
    if b[0..4] == *b"XFSB" {
        return Content::Filesystem {
            fs: "xfs".into(),
            uuid: uuid_be(&b[32..48]),
            label: label(&b[108..120]),
        };
    }
    let sb = 1024;
    if le16(b, sb + 56) == 0xef53 {
        let compat = le32(b, sb + 92);
        let incompat = le32(b, sb + 96);
        // extents, 64bit, flex_bg: ext4; a journal: ext3.
        let fs = if incompat & (0x40 | 0x80 | 0x200) != 0 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        };
        return Content::Filesystem {
            fs: fs.into(),
            uuid: uuid_be(&b[sb + 104..sb + 120]),
            label: label(&b[sb + 120..sb + 136]),
        };
    }
    let bt = 65536;
    if b[bt + 64..bt + 72] == *b"_BHRfS_M" {
        return Content::Filesystem {
            fs: "btrfs".into(),
            uuid: uuid_be(&b[bt + 32..bt + 48]),
            label: label(&b[bt + 299..bt + 299 + 256]),
        };
    }
    if b[4086..4096] == *b"SWAPSPACE2" {
        return Content::Swap {
            uuid: uuid_be(&b[1024 + 12..1024 + 28]),
        };
    }
    let fat = if b[0x52..0x57] == *b"FAT32" {
        Some((0x43, 0x47))
    } else if b[0x36..0x3b] == *b"FAT12" || b[0x36..0x3b] == *b"FAT16" {
        Some((0x27, 0x2b))
    } else {
        None
    };
    if let Some((serial_at, label_at)) = fat {
        let serial = le32(b, serial_at);
        return Content::Filesystem {
            fs: "vfat".into(),
            uuid: format!("{:04X}-{:04X}", serial >> 16, serial & 0xffff),
            label: label(&b[label_at..label_at + 11]).filter(|l| l != "NO NAME"),
        };
    }
    Content::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr_entry(s: &mut [u8], i: usize, kind: u8, start: u32, sectors: u32) {
        let e = &mut s[446 + 16 * i..446 + 16 * (i + 1)];
        e[4] = kind;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
    }

    fn ext4_at(disk: &mut [u8], at: usize, uuid: [u8; 16]) {
        let sb = at + 1024;
        disk[sb + 56..sb + 58].copy_from_slice(&0xef53u16.to_le_bytes());
        disk[sb + 96..sb + 100].copy_from_slice(&0x2c2u32.to_le_bytes());
        disk[sb + 104..sb + 120].copy_from_slice(&uuid);
        disk[sb + 120..sb + 124].copy_from_slice(b"root");
    }

    #[test]
    fn mbr_with_ext4_root_and_a_logical_swap() {
        let mut d = vec![0u8; 8 << 20];
        d[510] = 0x55;
        d[511] = 0xaa;
        mbr_entry(&mut d, 0, 0x83, 2048, 8192);
        mbr_entry(&mut d, 1, 0x05, 10240, 4096);
        ext4_at(&mut d, 2048 * 512, [0x11; 16]);
        // EBR at LBA 10240: one logical at +2048, no next.
        let ebr = 10240 * 512;
        d[ebr + 510] = 0x55;
        d[ebr + 511] = 0xaa;
        mbr_entry(&mut d[ebr..], 0, 0x82, 2048, 2048);
        let sw = (10240 + 2048) * 512;
        d[sw + 4086..sw + 4096].copy_from_slice(b"SWAPSPACE2");
        d[sw + 1036..sw + 1052].copy_from_slice(&[0x22; 16]);
        let l = probe(&d[..]).unwrap();
        assert_eq!(l.table, TableKind::Mbr);
        assert_eq!(l.boot_mode, BootMode::LegacyBios);
        assert_eq!(l.partitions.len(), 2);
        assert_eq!(l.partitions[0].number, 1);
        assert_eq!(l.partitions[0].start, 1 << 20);
        assert_eq!(
            l.partitions[0].content,
            Content::Filesystem {
                fs: "ext4".into(),
                uuid: "11111111-1111-1111-1111-111111111111".into(),
                label: Some("root".into())
            }
        );
        assert_eq!(l.partitions[1].number, 5);
        assert_eq!(
            l.partitions[1].content,
            Content::Swap {
                uuid: "22222222-2222-2222-2222-222222222222".into()
            }
        );
    }

    fn gpt_disk(types: &[[u8; 16]]) -> Vec<u8> {
        let mut d = vec![0u8; 8 << 20];
        d[510] = 0x55;
        d[511] = 0xaa;
        mbr_entry(&mut d, 0, 0xee, 1, 0xffff_ffff);
        let h = 512;
        d[h..h + 8].copy_from_slice(b"EFI PART");
        d[h + 72..h + 80].copy_from_slice(&2u64.to_le_bytes());
        d[h + 80..h + 84].copy_from_slice(&128u32.to_le_bytes());
        d[h + 84..h + 88].copy_from_slice(&128u32.to_le_bytes());
        for (i, t) in types.iter().enumerate() {
            let e = 1024 + 128 * i;
            d[e..e + 16].copy_from_slice(t);
            let first = 2048 + 4096 * i as u64;
            d[e + 32..e + 40].copy_from_slice(&first.to_le_bytes());
            d[e + 40..e + 48].copy_from_slice(&(first + 4095).to_le_bytes());
        }
        d
    }

    const ESP: [u8; 16] = [
        0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9,
        0x3b,
    ];
    const BIOS: [u8; 16] = [
        0x48, 0x61, 0x68, 0x21, 0x49, 0x64, 0x6f, 0x6e, 0x74, 0x4e, 0x65, 0x65, 0x64, 0x45, 0x46,
        0x49,
    ];
    const LINUX: [u8; 16] = [
        0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d,
        0xe4,
    ];

    #[test]
    fn gpt_with_an_esp_is_uefi_and_with_bios_boot_too_is_hybrid() {
        let mut d = gpt_disk(&[ESP, LINUX]);
        // FAT32 on the ESP.
        let esp = 2048 * 512;
        d[esp + 0x52..esp + 0x57].copy_from_slice(b"FAT32");
        d[esp + 0x43..esp + 0x47].copy_from_slice(&0x1234_abcdu32.to_le_bytes());
        d[esp + 510] = 0x55;
        d[esp + 511] = 0xaa;
        ext4_at(&mut d, (2048 + 4096) * 512, [0xab; 16]);
        let l = probe(&d[..]).unwrap();
        assert_eq!(l.table, TableKind::Gpt);
        assert_eq!(l.boot_mode, BootMode::Uefi);
        assert!(l.partitions[0].esp);
        assert_eq!(
            l.partitions[0].content,
            Content::Filesystem {
                fs: "vfat".into(),
                uuid: "1234-ABCD".into(),
                label: None
            }
        );
        assert!(
            matches!(l.partitions[1].content, Content::Filesystem { ref fs, .. } if fs == "ext4")
        );

        let l = probe(&gpt_disk(&[BIOS, ESP, LINUX])[..]).unwrap();
        assert_eq!(l.boot_mode, BootMode::Hybrid);
        let l = probe(&gpt_disk(&[BIOS, LINUX])[..]).unwrap();
        assert_eq!(l.boot_mode, BootMode::LegacyBios);
    }

    #[test]
    fn luks_lvm_xfs_and_a_bare_filesystem_are_recognised() {
        let mut p = vec![0u8; PROBE_LEN];
        p[0..6].copy_from_slice(b"LUKS\xba\xbe");
        p[168..172].copy_from_slice(b"abcd");
        assert_eq!(
            probe_content(&p),
            Content::Luks {
                uuid: "abcd".into()
            }
        );
        let mut p = vec![0u8; PROBE_LEN];
        p[512..520].copy_from_slice(b"LABELONE");
        p[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(probe_content(&p), Content::LvmPv);
        let mut p = vec![0u8; PROBE_LEN];
        p[0..4].copy_from_slice(b"XFSB");
        p[32..48].copy_from_slice(&[0x0f; 16]);
        assert!(matches!(probe_content(&p), Content::Filesystem { ref fs, .. } if fs == "xfs"));

        let mut d = vec![0u8; 1 << 20];
        ext4_at(&mut d, 0, [1; 16]);
        let l = probe(&d[..]).unwrap();
        assert_eq!(l.table, TableKind::None);
        assert_eq!(l.partitions[0].number, 0);
    }
}
