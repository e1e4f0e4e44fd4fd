//! Which distribution a root filesystem holds, from its `os-release`: the family decides the
//! initramfs tool, the boot loader commands and the network stack conversion expects.

use serde::Serialize;

/// Families conversion knows how to handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Debian, Ubuntu and derivatives: initramfs-tools (or dracut), update-grub.
    Debian,
    /// RHEL, CentOS, Rocky, Alma, Oracle Linux, Fedora, Amazon Linux: dracut, grubby.
    Rhel,
}

/// The distribution found on a root filesystem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Distro {
    pub family: Family,
    /// `ID` from os-release (e.g. `debian`, `ubuntu`, `rocky`).
    pub id: String,
    pub version_id: Option<String>,
    pub pretty_name: Option<String>,
}

/// Parses os-release (`KEY=value`, values optionally quoted); `Err(id)` names a distribution
/// conversion does not handle (empty if there was no ID at all).
pub fn detect(os_release: &str) -> Result<Distro, String> {
    let mut id = None;
    let mut like = String::new();
    let mut version_id = None;
    let mut pretty_name = None;
    for line in os_release.lines() {
        let Some((k, v)) = line.trim().split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
        match k {
            "ID" => id = Some(v.to_ascii_lowercase()),
            "ID_LIKE" => like = v.to_ascii_lowercase(),
            "VERSION_ID" => version_id = Some(v),
            "PRETTY_NAME" => pretty_name = Some(v),
            _ => {}
        }
    }
    let id = id.ok_or_else(String::new)?;
    let words: Vec<&str> = std::iter::once(id.as_str())
        .chain(like.split_whitespace())
        .collect();
    let family = if words.iter().any(|w| matches!(*w, "debian" | "ubuntu")) {
        Family::Debian
    } else if words.iter().any(|w| {
        matches!(
            *w,
            "rhel" | "centos" | "fedora" | "rocky" | "almalinux" | "ol" | "amzn"
        )
    }) {
        Family::Rhel
    } else {
        return Err(id);
    };
    Ok(Distro {
        family,
        id,
        version_id,
        pretty_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_from_id_and_id_like() {
        let d = detect(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\nVERSION_ID=\"12\"\n",
        )
        .unwrap();
        assert_eq!(d.family, Family::Debian);
        assert_eq!(d.version_id.as_deref(), Some("12"));
        let d = detect("ID=ubuntu\nID_LIKE=debian\n").unwrap();
        assert_eq!(d.family, Family::Debian);
        let d = detect("ID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n").unwrap();
        assert_eq!(d.family, Family::Rhel);
        let d = detect("ID=\"amzn\"\nID_LIKE=\"centos rhel fedora\"\n").unwrap();
        assert_eq!(d.family, Family::Rhel);
        assert_eq!(
            detect("ID=opensuse-leap\nID_LIKE=\"suse opensuse\"\n"),
            Err("opensuse-leap".into())
        );
        assert_eq!(detect("NAME=x\n"), Err(String::new()));
    }
}
