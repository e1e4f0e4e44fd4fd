//! The agent as a service on a source server: the systemd unit (read, and checked with
//! `systemd-analyze verify`) and the Debian package of packaging/build-deb.sh, built around a
//! stand-in binary so no release build is needed, inspected with `dpkg-deb` and installed
//! into a scratch root with `dpkg --root`.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {}\n{text}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// A systemd unit as (section, key) → values, in order.
fn parse_unit(text: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
            continue;
        }
        if let Some(s) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        let (k, v) = l
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {l}"));
        out.entry((section.clone(), k.trim().to_string()))
            .or_default()
            .push(v.trim().to_string());
    }
    out
}

/// A stand-in for the agent binary; the GLIBC_ strings stand for the symbol versions a real
/// binary references.
fn stub(dir: &Path) -> PathBuf {
    let p = dir.join("slipway-agent-stub");
    std::fs::write(
        &p,
        "#!/bin/sh\n# GLIBC_2.4 GLIBC_2.34 GLIBC_2.17\necho slipway-agent-stub \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// `systemd-analyze verify` of the unit at `unit` (a path inside `root`), with the host's units
/// (targets) copied in. Returns its output when it complained.
fn verify(root: &Path, unit: &str) -> Result<(), String> {
    let units = root.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    let st = Command::new("cp")
        .args(["-an", "/usr/lib/systemd/system/."])
        .arg(&units)
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg(unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status.success() && stderr.is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {stderr}", out.status))
    }
}

#[test]
fn the_unit_keeps_what_the_agent_needs_and_passes_systemd_analyze_verify() {
    let text = std::fs::read_to_string(repo().join("deploy/slipway-agent.service")).unwrap();
    let unit = parse_unit(&text);
    let get = |s: &str, k: &str| -> Vec<String> {
        unit.get(&(s.to_string(), k.to_string()))
            .cloned()
            .unwrap_or_default()
    };
    let one = |s: &str, k: &str| -> String {
        let v = get(s, k);
        assert_eq!(v.len(), 1, "[{s}] {k}: {v:?}");
        v[0].clone()
    };
    assert_eq!(one("Service", "Type"), "simple");
    assert_eq!(
        one("Service", "ExecStart"),
        "/usr/bin/slipway-agent replicate --config /etc/slipway/agent.toml"
    );
    assert_eq!(one("Service", "Restart"), "on-failure");
    assert!(humantime_secs(&one("Service", "RestartSec")) >= 5);
    // Exit code 2 is what a restart cannot fix (settings, refused credential).
    assert_eq!(one("Service", "RestartPreventExitStatus"), "2");
    // The freeze watchdog must outlive the agent to thaw.
    assert_eq!(one("Service", "KillMode"), "process");
    assert_eq!(one("Service", "User"), "root");
    assert_eq!(one("Service", "RuntimeDirectory"), "slipway-agent");
    assert_eq!(one("Service", "StateDirectory"), "slipway-agent");
    assert_eq!(one("Service", "NoNewPrivileges"), "yes");
    assert_eq!(one("Service", "PrivateTmp"), "yes");
    assert_eq!(one("Service", "ProtectHome"), "read-only");
    assert_eq!(one("Service", "ProtectSystem"), "full");
    assert_eq!(one("Install", "WantedBy"), "multi-user.target");
    // Hardening that would take away block devices, tracefs under /sys, or FIFREEZE.
    for (k, forbidden) in [
        ("ProtectKernelTunables", "yes"),
        ("PrivateDevices", "yes"),
        ("DevicePolicy", "closed"),
        ("DevicePolicy", "strict"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateMounts", "yes"),
        ("KillMode", "control-group"),
    ] {
        assert!(
            !get("Service", k).iter().any(|v| v == forbidden),
            "{k}={forbidden} breaks the agent"
        );
    }
    assert!(
        get("Service", "CapabilityBoundingSet").is_empty()
            && get("Service", "SystemCallFilter").is_empty(),
        "capabilities and system calls are not filtered (mount, FIFREEZE, hooks)"
    );

    if !have("systemd-analyze") {
        panic!("systemd-analyze is missing: .ci/run installs it (Debian: apt-get install systemd)");
    }
    // A root with the unit and an executable where ExecStart points.
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    let unit_dir = root.join("lib/systemd/system");
    std::fs::create_dir_all(&unit_dir).unwrap();
    std::fs::copy(
        repo().join("deploy/slipway-agent.service"),
        unit_dir.join("slipway-agent.service"),
    )
    .unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::copy(stub(d.path()), root.join("usr/bin/slipway-agent")).unwrap();
    if let Err(e) = verify(&root, "/lib/systemd/system/slipway-agent.service") {
        panic!("systemd-analyze verify: {e}");
    }
    // The check can fail: a misspelt setting is reported.
    std::fs::write(
        unit_dir.join("slipway-agent.service"),
        text.replace("KillMode=process", "KillMode=proces"),
    )
    .unwrap();
    let e = verify(&root, "/lib/systemd/system/slipway-agent.service").unwrap_err();
    assert!(e.to_lowercase().contains("kill mode"), "{e}");
}

/// Seconds of a systemd time span such as `10s` or `1min`.
fn humantime_secs(s: &str) -> u64 {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits.parse().unwrap_or_else(|_| panic!("{s}"));
    match &s[digits.len()..] {
        "" | "s" => n,
        "min" => n * 60,
        other => panic!("unit {other} in {s}"),
    }
}

/// Builds the package around the stub; returns its path.
fn build_deb(dir: &Path) -> PathBuf {
    let out = run(Command::new("bash")
        .arg(repo().join("packaging/build-deb.sh"))
        .env("SLIPWAY_AGENT_BINARY", stub(dir))
        .env("SLIPWAY_DEB_OUT", dir.join("out"))
        .env("SLIPWAY_DEB_VERSION", "1.2.3")
        .env("SLIPWAY_DEB_ARCH", "amd64"));
    let deb = PathBuf::from(out.trim());
    assert_eq!(
        deb,
        dir.join("out/slipway-agent_1.2.3_amd64.deb"),
        "the script prints the package's path"
    );
    deb
}

#[test]
fn the_deb_holds_the_agent_its_unit_and_an_example_config() {
    if !have("dpkg-deb") {
        eprintln!("skipped: dpkg-deb is missing (Debian: apt-get install dpkg)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let deb = build_deb(d.path());

    let field = |f: &str| run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg(f));
    assert_eq!(field("Package").trim(), "slipway-agent");
    assert_eq!(field("Version").trim(), "1.2.3");
    assert_eq!(field("Architecture").trim(), "amd64");
    // libc6 alone, at the newest symbol version the binary uses.
    assert_eq!(field("Depends").trim(), "libc6 (>= 2.34)");
    assert!(field("Installed-Size").trim().parse::<u64>().unwrap() > 0);
    let info = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for script in ["postinst", "prerm", "postrm", "conffiles"] {
        assert!(info.contains(script), "{script} missing:\n{info}");
    }

    // Files, modes, owners.
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let entry = |path: &str| -> (String, String) {
        let line = contents
            .lines()
            .find(|l| l.ends_with(&format!(" .{path}")))
            .unwrap_or_else(|| panic!("{path} not in the package:\n{contents}"));
        let mut f = line.split_whitespace();
        (f.next().unwrap().to_string(), f.next().unwrap().to_string())
    };
    let want = [
        ("/usr/bin/slipway-agent", "-rwxr-xr-x"),
        ("/lib/systemd/system/slipway-agent.service", "-rw-r--r--"),
        ("/etc/slipway/agent.toml.example", "-rw-r--r--"),
        ("/usr/share/doc/slipway-agent/agent.md", "-rw-r--r--"),
        ("/usr/share/doc/slipway-agent/copyright", "-rw-r--r--"),
    ];
    for (path, perms) in want {
        assert_eq!(
            entry(path),
            (perms.to_string(), "root/root".to_string()),
            "{path}"
        );
    }
    assert!(
        !contents.contains("./etc/slipway/agent.toml\n") && !contents.contains("token"),
        "no live config and no credential are shipped:\n{contents}"
    );

    // The control files.
    let ctl = d.path().join("control");
    run(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&ctl));
    assert_eq!(
        std::fs::read_to_string(ctl.join("conffiles")).unwrap(),
        "/etc/slipway/agent.toml.example\n"
    );
    let postinst = std::fs::read_to_string(ctl.join("postinst")).unwrap();
    assert!(postinst.contains("systemctl daemon-reload"), "{postinst}");
    assert!(
        postinst.contains("[ -d /run/systemd/system ]"),
        "{postinst}"
    );
    for never in ["enable", "start", "deb-systemd"] {
        assert!(
            !postinst
                .lines()
                .filter(|l| !l.trim_start().starts_with('#'))
                .any(|l| l.contains(never)),
            "postinst must not {never}:\n{postinst}"
        );
    }
    for s in ["postinst", "prerm", "postrm"] {
        assert_eq!(mode(&ctl.join(s)), 0o755, "{s}");
        run(Command::new("sh").arg("-n").arg(ctl.join(s)));
    }

    // Installed into a scratch root with a dpkg database of its own (chrootless: the root has
    // no shell; DPKG_ROOT keeps the scripts away from the host's systemd).
    if !have("dpkg") {
        eprintln!("skipped the installation: dpkg is missing");
        return;
    }
    let root = d.path().join("root");
    let db = root.join("var/lib/dpkg");
    for sub in ["info", "updates", "triggers"] {
        std::fs::create_dir_all(db.join(sub)).unwrap();
    }
    std::fs::write(db.join("status"), "").unwrap();
    std::fs::write(db.join("available"), "").unwrap();
    let dpkg = || {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", root.display())).args([
            "--force-script-chrootless",
            "--force-not-root",
            "--force-depends",
            "--log=/dev/null",
        ]);
        c
    };
    run(dpkg().arg("--install").arg(&deb));
    let status = run(dpkg().args(["--status", "slipway-agent"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    let bin = root.join("usr/bin/slipway-agent");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(stub(d.path())).unwrap(),
        "the given binary is the one installed"
    );
    let unit = root.join("lib/systemd/system/slipway-agent.service");
    assert_eq!(mode(&unit), 0o644);
    assert_eq!(
        std::fs::read_to_string(&unit).unwrap(),
        std::fs::read_to_string(repo().join("deploy/slipway-agent.service")).unwrap()
    );
    let example = root.join("etc/slipway/agent.toml.example");
    assert_eq!(mode(&example), 0o644);
    assert!(
        !root
            .join("etc/systemd/system/multi-user.target.wants")
            .exists(),
        "installed, not enabled"
    );
    assert!(!root.join("etc/slipway/agent.toml").exists());

    // Remove keeps the (edited) conffile; purge takes it.
    std::fs::write(&example, "# edited\n").unwrap();
    run(dpkg().args(["--remove", "slipway-agent"]));
    assert!(!bin.exists() && !unit.exists());
    assert_eq!(std::fs::read_to_string(&example).unwrap(), "# edited\n");
    run(dpkg().args(["--purge", "slipway-agent"]));
    assert!(!example.exists());
}

#[test]
fn build_deb_refuses_a_missing_binary() {
    if !have("dpkg-deb") {
        eprintln!("skipped: dpkg-deb is missing (Debian: apt-get install dpkg)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let out = Command::new("bash")
        .arg(repo().join("packaging/build-deb.sh"))
        .env("SLIPWAY_AGENT_BINARY", d.path().join("nope"))
        .env("SLIPWAY_DEB_OUT", d.path().join("out"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not an executable file"), "{err}");
    assert!(!d.path().join("out").exists());
}
