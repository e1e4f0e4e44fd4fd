//! Which disks to replicate when none are named: every local whole disk, from `/sys/block`.
//!
//! [`select`] decides from a plain list of `/sys/block` entries (name, removable, size), so
//! each rule is a unit test; [`read_sys_block`] is the thin shell that reads the directory.
//!
//! Skipped whatever the patterns say: virtual and stacked devices (`loop`, `ram`, `zram`,
//! `dm-`, `md`, `sr`, `nbd`: their data lives on other disks, or nowhere), removable media and
//! empty devices. Such a device can still be replicated by naming it in `disks`.

use std::io;
use std::path::{Path, PathBuf};

/// One entry of `/sys/block`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry {
    /// The kernel name (`nvme0n1`), also the name under `/dev`.
    pub name: String,
    /// `/sys/block/<name>/removable` is 1.
    pub removable: bool,
    /// `/sys/block/<name>/size`: 512-byte sectors.
    pub sectors: u64,
}

/// Name prefixes of devices that are never discovered.
pub const SKIPPED_PREFIXES: [&str; 7] = ["loop", "ram", "zram", "dm-", "md", "sr", "nbd"];

/// Whether `name` matches `pattern`: an exact name, or a glob where `*` stands for any run of
/// characters (`nvme*`, `sd?` is not supported: only `*`).
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        // No `*`: the whole name must have matched.
        return rest.is_empty();
    };
    for p in middle {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Checks a pattern of `include`/`exclude`: a device name, possibly with `*`.
pub fn check_pattern(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("an empty pattern".into());
    }
    if p.contains('/') {
        return Err(format!(
            "{p:?}: patterns match names in /sys/block (\"sda\", \"nvme*\"), not paths"
        ));
    }
    if !p
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '*' | '-' | '_' | '.' | ':' | '!'))
    {
        return Err(format!("{p:?} is not a device name or a pattern with *"));
    }
    Ok(())
}

/// The whole disks to replicate, in name order: not skipped, matching an `include` pattern
/// (when there are any) and no `exclude` pattern.
pub fn select(entries: &[BlockEntry], include: &[String], exclude: &[String]) -> Vec<String> {
    let mut out: Vec<String> = entries
        .iter()
        .filter(|e| !SKIPPED_PREFIXES.iter().any(|p| e.name.starts_with(p)))
        .filter(|e| !e.removable && e.sectors > 0)
        .filter(|e| include.is_empty() || include.iter().any(|p| glob_match(p, &e.name)))
        .filter(|e| !exclude.iter().any(|p| glob_match(p, &e.name)))
        .map(|e| e.name.clone())
        .collect();
    out.sort();
    out
}

/// The entries of `sys_block` (normally `/sys/block`). An entry whose `removable` or `size`
/// cannot be read is kept as removable and empty, so it is skipped.
pub fn read_sys_block(sys_block: &Path) -> io::Result<Vec<BlockEntry>> {
    let read = |dir: &Path, f: &str| -> Option<u64> {
        std::fs::read_to_string(dir.join(f))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(sys_block)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let dir = e.path();
        out.push(BlockEntry {
            removable: read(&dir, "removable").is_none_or(|r| r != 0),
            sectors: read(&dir, "size").unwrap_or(0),
            name,
        });
    }
    Ok(out)
}

/// The local disks to replicate: `/dev/<name>` for each selected entry of `/sys/block`.
pub fn local_disks(include: &[String], exclude: &[String]) -> io::Result<Vec<PathBuf>> {
    let entries = read_sys_block(Path::new("/sys/block"))?;
    Ok(select(&entries, include, exclude)
        .into_iter()
        .map(|n| Path::new("/dev").join(n))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(name: &str, removable: bool, sectors: u64) -> BlockEntry {
        BlockEntry {
            name: name.into(),
            removable,
            sectors,
        }
    }

    fn v(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    fn machine() -> Vec<BlockEntry> {
        vec![
            e("sdb", false, 1 << 21),
            e("nvme0n1", false, 1 << 24),
            e("nvme1n1", false, 1 << 24),
            e("sda", false, 1 << 21),
            e("loop0", false, 1 << 10),
            e("ram0", false, 1 << 10),
            e("zram0", false, 1 << 10),
            e("dm-0", false, 1 << 20),
            e("md127", false, 1 << 20),
            e("sr0", true, 1 << 20),
            e("nbd0", false, 0),
            e("sdc", true, 1 << 20), // a USB stick
            e("xvdf", false, 0),     // attached, no medium
            e("vda", false, 1 << 22),
        ]
    }

    #[test]
    fn every_local_whole_disk_by_default() {
        assert_eq!(
            select(&machine(), &[], &[]),
            v(&["nvme0n1", "nvme1n1", "sda", "sdb", "vda"])
        );
    }

    #[test]
    fn include_and_exclude() {
        let m = machine();
        assert_eq!(
            select(&m, &v(&["nvme0n1", "sda"]), &[]),
            v(&["nvme0n1", "sda"])
        );
        assert_eq!(select(&m, &v(&["nvme*"]), &[]), v(&["nvme0n1", "nvme1n1"]));
        assert_eq!(
            select(&m, &[], &v(&["sd*"])),
            v(&["nvme0n1", "nvme1n1", "vda"])
        );
        assert_eq!(
            select(&m, &v(&["nvme*", "sd*"]), &v(&["nvme1n1", "sdb"])),
            v(&["nvme0n1", "sda"])
        );
        // The skip list wins over an include: name such a device in `disks`.
        assert_eq!(
            select(&m, &v(&["md127", "loop*"]), &[]),
            Vec::<String>::new()
        );
        // Exact names are exact.
        assert_eq!(select(&m, &v(&["sd"]), &[]), Vec::<String>::new());
        assert_eq!(select(&m, &[], &v(&["*"])), Vec::<String>::new());
    }

    #[test]
    fn globs() {
        assert!(glob_match("sda", "sda"));
        assert!(!glob_match("sda", "sda1"));
        assert!(!glob_match("sda", "sd"));
        assert!(glob_match("sd*", "sda"));
        assert!(glob_match("sd*", "sd"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("*n1", "nvme0n1"));
        assert!(!glob_match("*n1", "nvme0n2"));
        assert!(glob_match("nvme*n1", "nvme10n1"));
        assert!(glob_match("n*e*1", "nvme0n1"));
        assert!(!glob_match("n*x*1", "nvme0n1"));
        // `*a*a` must not use the same `a` twice.
        assert!(!glob_match("*a*a", "xa"));
        assert!(glob_match("*a*a", "xaya"));
        assert!(check_pattern("nvme*").is_ok());
        assert!(check_pattern("").is_err());
        assert!(check_pattern("/dev/sda").is_err());
        assert!(check_pattern("sd[ab]").is_err());
    }

    #[test]
    fn reads_a_sys_block_tree() {
        let d = tempfile::tempdir().unwrap();
        for (n, rem, size) in [
            ("sda", "0", "2097152"),
            ("sr0", "1", "100"),
            ("loop0", "0", "8"),
        ] {
            let dir = d.path().join(n);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("removable"), format!("{rem}\n")).unwrap();
            std::fs::write(dir.join("size"), format!("{size}\n")).unwrap();
        }
        std::fs::create_dir(d.path().join("weird")).unwrap();
        let mut got = read_sys_block(d.path()).unwrap();
        got.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(
            got,
            vec![
                e("loop0", false, 8),
                e("sda", false, 2097152),
                e("sr0", true, 100),
                e("weird", true, 0),
            ]
        );
        assert_eq!(select(&got, &[], &[]), v(&["sda"]));
    }
}
