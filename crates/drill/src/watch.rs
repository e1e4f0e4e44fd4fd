//! Reading a guest's serial console as it grows: whether it reached a login prompt, failed to
//! find its root, panicked — and the check channel's verdict. Pure: fed bytes, asked
//! questions; the drill's loop does the reading.

use serde::Serialize;

/// What the console showed that ends the wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConsoleVerdict {
    /// A getty's `… login:` prompt.
    Login,
    /// The initramfs gave up waiting for the root device (initramfs-tools' "Gave up waiting",
    /// dracut's timeout and "does not exist"), or the kernel could not mount it.
    RootNotFound,
    /// systemd's emergency mode (an fstab entry that cannot be mounted, for one).
    EmergencyMode,
    /// `Kernel panic - not syncing` for another reason.
    KernelPanic,
    /// The firmware found nothing to boot: OVMF fell through to its UEFI shell.
    NoBootDevice,
}

const ROOT_NOT_FOUND: &[&str] = &[
    "Gave up waiting for root",
    "Dropping to a shell!",
    "VFS: Unable to mount root fs",
    "dracut-initqueue: starting timeout scripts",
    "Could not boot.",
];
const EMERGENCY: &[&str] = &["You are in emergency mode", "Entering emergency mode"];
const PANIC: &str = "Kernel panic - not syncing";
/// OVMF's prompt once every boot option failed (drawn with terminal escapes around it).
const UEFI_SHELL: &str = "Shell> ";

/// A console log, fed as it grows.
#[derive(Debug, Default)]
pub struct Console {
    /// The line being written (a login prompt has no newline after it).
    partial: String,
    lines: Vec<String>,
    verdict: Option<ConsoleVerdict>,
    bytes: u64,
}

impl Console {
    /// Adds bytes read from the log.
    pub fn feed(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        for ch in String::from_utf8_lossy(data).chars() {
            match ch {
                '\r' => {}
                '\n' => {
                    let line = std::mem::take(&mut self.partial);
                    self.judge(&line);
                    self.lines.push(line);
                }
                c => self.partial.push(c),
            }
        }
        let partial = self.partial.clone();
        self.judge(&partial);
    }

    fn judge(&mut self, line: &str) {
        if matches!(
            self.verdict,
            Some(ConsoleVerdict::RootNotFound | ConsoleVerdict::KernelPanic)
        ) {
            return;
        }
        let v = if ROOT_NOT_FOUND.iter().any(|p| line.contains(p)) {
            Some(ConsoleVerdict::RootNotFound)
        } else if line.contains(PANIC) {
            Some(ConsoleVerdict::KernelPanic)
        } else if EMERGENCY.iter().any(|p| line.contains(p)) {
            Some(ConsoleVerdict::EmergencyMode)
        } else if self.verdict.is_none() && line.contains(UEFI_SHELL) {
            Some(ConsoleVerdict::NoBootDevice)
        } else if self.verdict.is_none() && line.trim_end().ends_with(" login:") {
            Some(ConsoleVerdict::Login)
        } else {
            None
        };
        if v.is_some() {
            self.verdict = v;
        }
    }

    /// The verdict so far. Changes only by [`Console::feed`]; a failure found after a login
    /// prompt (a panic later on) replaces it.
    pub fn verdict(&self) -> Option<ConsoleVerdict> {
        self.verdict
    }

    /// Whether a login prompt was seen at any point.
    pub fn saw_login(&self) -> bool {
        self.lines
            .iter()
            .chain(std::iter::once(&self.partial))
            .any(|l| l.trim_end().ends_with(" login:"))
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The last `n` lines (and the line being written).
    pub fn tail(&self, n: usize) -> Vec<String> {
        let mut v: Vec<String> = self.lines[self.lines.len().saturating_sub(n)..].to_vec();
        if !self.partial.is_empty() {
            v.push(self.partial.clone());
        }
        v
    }

    pub fn last_line(&self) -> &str {
        if self.partial.trim().is_empty() {
            self.lines
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map_or("", |l| l.as_str())
        } else {
            &self.partial
        }
    }
}

/// The marker lines the injected check script writes to the check channel (ttyS1).
pub const CHECK_BEGIN: &str = "SLIPWAY-CHECK-BEGIN";
pub const CHECK_EXIT: &str = "SLIPWAY-CHECK-EXIT ";

/// The check command's exit status and output, once its last line was written.
pub fn parse_check(log: &[u8]) -> Option<(i32, String)> {
    let text = String::from_utf8_lossy(log).replace('\r', "");
    let begin = text.find(CHECK_BEGIN)?;
    let body = &text[begin + CHECK_BEGIN.len()..];
    let at = body.find(CHECK_EXIT)?;
    let rest = &body[at + CHECK_EXIT.len()..];
    let line = rest.split('\n').next()?;
    if !rest.contains('\n') {
        return None; // the status line is not complete yet
    }
    let code = line.trim().parse().ok()?;
    Some((code, body[..at].trim_matches('\n').to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_prompt_without_newline_counts_even_split_across_reads() {
        let mut c = Console::default();
        c.feed(
            b"[    5.9] Run /init\r\nDebian GNU/Linux 12 slipway-src ttyS0\r\n\r\nslipway-src lo",
        );
        assert_eq!(c.verdict(), None);
        c.feed(b"gin: ");
        assert_eq!(c.verdict(), Some(ConsoleVerdict::Login));
        assert!(c.saw_login());
        assert_eq!(c.last_line(), "slipway-src login: ");
    }

    #[test]
    fn an_initramfs_that_gives_up_is_root_not_found_and_stays_so() {
        let mut c = Console::default();
        c.feed(b"Begin: Running /scripts/local-block ... done.\r\nGave up waiting for root file system device.  Common problems:\r\n");
        c.feed(
            b"ALERT!  /dev/sda1 does not exist.  Dropping to a shell!\r\n(initramfs) login: x\n",
        );
        assert_eq!(c.verdict(), Some(ConsoleVerdict::RootNotFound));
        let mut c = Console::default();
        c.feed(b"[  3.1] VFS: Unable to mount root fs on unknown-block(0,0)\n[ 3.1] Kernel panic - not syncing: VFS\n");
        assert_eq!(c.verdict(), Some(ConsoleVerdict::RootNotFound));
        let mut c = Console::default();
        c.feed(b"host login: \n[ 90.0] Kernel panic - not syncing: Attempted to kill init!\n");
        assert_eq!(c.verdict(), Some(ConsoleVerdict::KernelPanic));
        assert!(c.saw_login());
        let mut c = Console::default();
        c.feed(b"You are in emergency mode. After logging in, type \"journalctl -xb\"\n");
        assert_eq!(c.verdict(), Some(ConsoleVerdict::EmergencyMode));
    }

    #[test]
    fn ovmf_falling_through_to_its_shell_is_no_boot_device() {
        let mut c = Console::default();
        c.feed(b"\x1b[40m or any other key to continue.\r\n\x1b[33m\x1b[40mShell> \x1b[37m");
        assert_eq!(c.verdict(), Some(ConsoleVerdict::NoBootDevice));
    }

    #[test]
    fn the_check_verdict_needs_its_whole_status_line() {
        assert_eq!(parse_check(b""), None);
        assert_eq!(
            parse_check(b"SLIPWAY-CHECK-BEGIN\r\nhello\r\nSLIPWAY-CHECK-EXIT 0"),
            None
        );
        assert_eq!(
            parse_check(
                b"noise\r\nSLIPWAY-CHECK-BEGIN\r\nhello\r\nworld\r\nSLIPWAY-CHECK-EXIT 0\r\n"
            ),
            Some((0, "hello\nworld".into()))
        );
        assert_eq!(
            parse_check(b"SLIPWAY-CHECK-BEGIN\nSLIPWAY-CHECK-EXIT 3\n"),
            Some((3, String::new()))
        );
    }
}
