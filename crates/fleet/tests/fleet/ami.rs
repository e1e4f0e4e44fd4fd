//! ami/provision.sh installed into a scratch root (DESTDIR): files, user, units (checked with
//! `systemd-analyze verify` and by reading them), default settings (checked by the server's own
//! validation), sysctl; and the user-data helper against an IMDSv2 stand-in.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is missing: .ci/run installs it (Debian: apt-get install {package})"
    );
}

/// Installs into `root` with a stand-in binary; returns the script's output.
fn provision(root: &Path) -> String {
    let stub = root.parent().unwrap().join("slipway-stub");
    std::fs::write(&stub, "#!/bin/sh\necho slipway-stub \"$@\"\n").unwrap();
    std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("bash")
        .arg(repo().join("ami/provision.sh"))
        .env("DESTDIR", root)
        .env("SLIPWAY_BINARY", &stub)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "provision.sh failed:\n{text}");
    text
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

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn provision_installs_a_hardened_service_into_a_scratch_root() {
    need("systemd-sysusers", "systemd");
    need("systemd-analyze", "systemd");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    provision(&root);

    assert_eq!(mode(&root.join("usr/local/bin/slipway")), 0o755);
    assert_eq!(
        mode(&root.join("usr/local/lib/slipway/slipway-userdata")),
        0o755
    );
    assert_eq!(mode(&root.join("etc/slipway/slipway.toml")), 0o644);

    // The user: no login, in group disk (EBS block devices are root:disk 0660).
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("slipway:"))
        .unwrap_or_else(|| panic!("no slipway user in {passwd}"));
    assert!(
        user.ends_with(":/var/lib/slipway:/usr/sbin/nologin"),
        "{user}"
    );
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    let disk = group.lines().find(|l| l.starts_with("disk:")).unwrap();
    assert!(
        disk.split(':')
            .nth(3)
            .unwrap()
            .split(',')
            .any(|m| m == "slipway"),
        "{disk}"
    );

    // The unit, as read by a parser.
    let unit_path = root.join("usr/lib/systemd/system/slipway.service");
    let unit = parse_unit(&std::fs::read_to_string(&unit_path).unwrap());
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
    assert_eq!(one("Service", "Type"), "notify");
    assert_eq!(
        one("Service", "ExecStart"),
        "/usr/local/bin/slipway serve --config /etc/slipway/slipway.toml"
    );
    assert_eq!(one("Service", "Restart"), "on-failure");
    assert_eq!(one("Service", "User"), "slipway");
    assert_eq!(one("Service", "SupplementaryGroups"), "disk");
    assert_eq!(one("Service", "NoNewPrivileges"), "yes");
    assert_eq!(one("Service", "ProtectSystem"), "strict");
    assert_eq!(one("Service", "StateDirectory"), "slipway");
    // Its writable /var/tmp, where the default settings put capture spill files.
    assert_eq!(one("Service", "PrivateTmp"), "yes");
    assert!(one("Service", "ReadWritePaths").ends_with("/var/lib/slipway"));
    assert!(one("Service", "LimitNOFILE").parse::<u64>().unwrap() >= 65536);
    assert_eq!(one("Service", "StandardOutput"), "journal");
    assert_eq!(one("Service", "CapabilityBoundingSet"), "");
    assert_eq!(one("Install", "WantedBy"), "multi-user.target");
    assert!(get("Unit", "Requires").contains(&"slipway-userdata.service".to_string()));
    // The data dir is the identity volume: the server never starts without its mount.
    assert!(get("Unit", "Requires").contains(&"slipway-identity.service".to_string()));
    assert!(get("Unit", "After").iter().any(|a| a
        .split_whitespace()
        .any(|u| u == "slipway-identity.service")));
    // Enabled: the server, its settings, its identity volume, and the SSM agent (Session
    // Manager is the operators' only way onto a server: no key pair, no SSH).
    for u in [
        "slipway.service",
        "slipway-userdata.service",
        "slipway-identity.service",
        "amazon-ssm-agent.service",
    ] {
        let link = root
            .join("etc/systemd/system/multi-user.target.wants")
            .join(u);
        assert_eq!(
            std::fs::read_link(&link).unwrap_or_else(|e| panic!("{u} is not enabled: {e}")),
            Path::new("/usr/lib/systemd/system").join(u)
        );
    }

    // The identity volume's unit: a root oneshot before the server, in the host's mount
    // namespace (a private one would hide the mount from slipway.service).
    let ident = parse_unit(
        &std::fs::read_to_string(root.join("usr/lib/systemd/system/slipway-identity.service"))
            .unwrap(),
    );
    let iget = |s: &str, k: &str| -> Vec<String> {
        ident
            .get(&(s.to_string(), k.to_string()))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(iget("Service", "Type"), ["oneshot"]);
    assert_eq!(iget("Service", "RemainAfterExit"), ["yes"]);
    assert_eq!(
        iget("Service", "ExecStart"),
        ["/usr/local/bin/slipway identity-volume mount --config /etc/slipway/slipway.toml"]
    );
    assert!(iget("Service", "User").is_empty(), "runs as root");
    assert_eq!(iget("Unit", "Before"), ["slipway.service"]);
    assert!(iget("Unit", "After")
        .iter()
        .any(|a| a.contains("slipway-userdata.service")));
    for k in [
        "PrivateTmp",
        "ProtectSystem",
        "ProtectHome",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "TemporaryFileSystem",
        "BindPaths",
        "MountFlags",
        "PrivateMounts",
        "PrivateNetwork",
    ] {
        assert!(
            iget("Service", k).is_empty(),
            "slipway-identity.service sets {k}=, which gives it a mount namespace of its own"
        );
    }
    assert_eq!(iget("Install", "WantedBy"), ["multi-user.target"]);

    // systemd's own check, in a copy of the root that also has the host's units (targets).
    let vroot = dir.path().join("verify");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&root)
        .arg(&vroot)
        .status()
        .unwrap();
    assert!(st.success());
    let st = Command::new("cp")
        .args(["-an", "/usr/lib/systemd/system/."])
        .arg(vroot.join("usr/lib/systemd/system"))
        .status()
        .unwrap();
    assert!(st.success());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", vroot.display()))
        .arg("/usr/lib/systemd/system/slipway.service")
        .arg("/usr/lib/systemd/system/slipway-userdata.service")
        .arg("/usr/lib/systemd/system/slipway-identity.service")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );

    // Default settings: the server accepts them; AWS backend, agents and metrics on all addresses.
    let conf = root.join("etc/slipway/slipway.toml");
    let s = slipway_settings::Settings::load(Some(&conf), &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(s.backend, slipway_settings::BackendKind::Aws);
    assert_eq!(s.listen.to_string(), "0.0.0.0:1500");
    assert_eq!(s.metrics_listen.to_string(), "0.0.0.0:9500");
    assert_eq!(s.data_dir, Path::new("/var/lib/slipway"));
    // Spill files on the root disk (the unit's private /var/tmp), not on the identity volume.
    assert_eq!(s.spill_dir, Path::new("/var/tmp/slipway-spill"));
    let (aws, _) = s.aws.clone().unwrap_or_default();
    let raw: slipway_aws::RawAwsSettings = toml::Value::Table(aws).try_into().unwrap();
    slipway_aws::AwsSettings::validate(raw).unwrap();

    let sysctl = std::fs::read_to_string(root.join("etc/sysctl.d/90-slipway.conf")).unwrap();
    for key in ["net.core.rmem_max", "net.core.wmem_max"] {
        let line = sysctl.lines().find(|l| l.starts_with(key)).unwrap();
        assert_eq!(line.split('=').nth(1).unwrap().trim(), "16777216", "{line}");
    }
    let journald =
        std::fs::read_to_string(root.join("etc/systemd/journald.conf.d/slipway.conf")).unwrap();
    assert!(journald.contains("Storage=persistent"));

    // Re-provisioning keeps an edited settings file.
    std::fs::write(&conf, "# edited\n").unwrap();
    provision(&root);
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), "# edited\n");
}

/// `files/install-ssm-agent` with stand-ins for `curl` (serves the files of `served`, logs
/// the URLs) and `dpkg` (amd64; logs what it installs): (success, output, URLs, installed).
fn install_ssm_agent(
    dir: &Path,
    served: &Path,
    key: &Path,
) -> (bool, String, Vec<String>, Vec<String>) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.join("log");
    let _ = std::fs::remove_file(&log);
    let stub = |name: &str, body: &str| {
        let p = bin.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    stub(
        "curl",
        &format!(
            "out=; url=\nwhile [ $# -gt 0 ]; do case \"$1\" in -o) out=$2; shift 2;; -*) shift;; *) url=$1; shift;; esac; done\n\
             echo \"url $url\" >> {log}\ncp \"{served}/${{url##*/}}\" \"$out\"",
            log = log.display(),
            served = served.display()
        ),
    );
    stub(
        "dpkg",
        &format!(
            "case \"$1\" in --print-architecture) echo amd64;; -i) echo \"installed $(cat \"$2\")\" >> {log};; *) exit 2;; esac",
            log = log.display()
        ),
    );
    let out = Command::new("sh")
        .arg(repo().join("ami/files/install-ssm-agent"))
        .arg("eu-west-1")
        .arg(key)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap();
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    let pick = |p: &str| -> Vec<String> {
        logged
            .lines()
            .filter_map(|l| l.strip_prefix(p))
            .map(str::to_string)
            .collect()
    };
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        pick("url "),
        pick("installed "),
    )
}

/// The SSM agent comes from its own regional bucket and is installed only when its signature
/// verifies against the key the build brings: here a key made for the test, a package signed
/// with it, then the same package altered, and no key at all.
#[test]
fn the_ssm_agent_is_installed_from_its_bucket_only_when_its_signature_verifies() {
    need("gpg", "gpg");
    need("gpgv", "gpgv");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let home = d.join("gnupg");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let gpg = |args: &[&str]| {
        let out = Command::new("gpg")
            .env("GNUPGHOME", &home)
            .args(["--batch", "--quiet", "--passphrase", ""])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    gpg(&[
        "--quick-gen-key",
        "SSM Agent stand-in <ssm@example.invalid>",
        "ed25519",
        "sign",
        "never",
    ]);
    let key = d.join("amazon-ssm-agent.gpg");
    gpg(&["--armor", "--export", "-o", key.to_str().unwrap()]);
    let served = d.join("served");
    std::fs::create_dir_all(&served).unwrap();
    let deb = served.join("amazon-ssm-agent.deb");
    std::fs::write(&deb, "the agent package").unwrap();
    gpg(&[
        "--detach-sign",
        "-o",
        served.join("amazon-ssm-agent.deb.sig").to_str().unwrap(),
        deb.to_str().unwrap(),
    ]);

    let base = "https://s3.eu-west-1.amazonaws.com/amazon-ssm-eu-west-1/latest/debian_amd64/amazon-ssm-agent.deb";
    let (ok, out, urls, installed) = install_ssm_agent(d, &served, &key);
    assert!(ok, "{out}");
    assert_eq!(urls, [base.to_string(), format!("{base}.sig")]);
    assert_eq!(installed, ["the agent package"]);

    // Altered after signing: refused, nothing installed.
    std::fs::write(&deb, "the agent package, altered").unwrap();
    let (ok, out, _, installed) = install_ssm_agent(d, &served, &key);
    assert!(!ok, "{out}");
    assert!(out.contains("does not verify"), "{out}");
    assert!(installed.is_empty(), "{installed:?}");

    // No key: refused before anything is fetched.
    let (ok, out, urls, installed) = install_ssm_agent(d, &served, &d.join("missing.gpg"));
    assert!(!ok && out.contains("missing"), "{out}");
    assert!(urls.is_empty() && installed.is_empty());

    // provision.sh runs it on a real system (not on a scratch root), with the key from files/.
    let prov = std::fs::read_to_string(repo().join("ami/provision.sh")).unwrap();
    let real = prov
        .split("if [ -z \"$dest\" ]; then")
        .nth(1)
        .and_then(|b| b.split("\nfi\n").next())
        .unwrap();
    assert!(
        real.contains("install-ssm-agent") && real.contains("$files/amazon-ssm-agent.gpg"),
        "provision.sh does not install the SSM agent:\n{real}"
    );
}

/// An IMDSv2 stand-in serving `user_data` (None: 404) for `requests` requests.
fn imds(user_data: Option<String>, requests: usize) -> (String, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        for _ in 0..requests {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let mut token = None;
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                r.read_line(&mut h).unwrap();
                if h.trim().is_empty() {
                    break;
                }
                let (k, v) = h.split_once(':').unwrap();
                match k.to_ascii_lowercase().as_str() {
                    "x-aws-ec2-metadata-token" => token = Some(v.trim().to_string()),
                    "content-length" => len = v.trim().parse().unwrap(),
                    _ => {}
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            let (status, body) = if line.starts_with("PUT /latest/api/token") {
                (200, "tok".to_string())
            } else if line.starts_with("GET /latest/user-data") && token.as_deref() == Some("tok") {
                match &user_data {
                    Some(u) => (200, u.clone()),
                    None => (404, String::new()),
                }
            } else {
                (401, String::new())
            };
            let mut s = s;
            write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    (url, h)
}

#[test]
fn the_user_data_helper_writes_rendered_settings_and_keeps_the_default_otherwise() {
    need("curl", "curl");
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("slipway.toml");
    let script = repo().join("ami/files/slipway-userdata");
    let run = |url: &str| {
        Command::new("sh")
            .arg(&script)
            .env("SLIPWAY_IMDS_ENDPOINT", url)
            .env("SLIPWAY_CONFIG_FILE", &conf)
            .output()
            .unwrap()
    };

    // A template-rendered settings file replaces the default.
    std::fs::write(&conf, "# default\n").unwrap();
    let tpath = dir.path().join("t.toml");
    std::fs::write(
        &tpath,
        "name = \"w\"\nregion = \"eu-west-1\"\nstaging_subnet = \"subnet-1\"\n\
         security_groups = [\"sg-1\"]\ninstance_type = \"m5.large\"\nami = \"ami-1\"\n",
    )
    .unwrap();
    let t = slipway_fleet::template::load(&tpath).unwrap();
    let rendered = t.server_settings(0);
    let (url, h) = imds(Some(rendered.clone()), 2);
    let out = run(&url);
    h.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), rendered);

    // Foreign user data (a cloud-init script) and no user data leave the file alone.
    for ud in [Some("#!/bin/sh\necho hi\n".to_string()), None] {
        std::fs::write(&conf, "# default\n").unwrap();
        let (url, h) = imds(ud, 2);
        let out = run(&url);
        h.join().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "# default\n");
    }
    // No temp files left behind.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".slipway"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The Packer template, parsed as HCL2 (python-hcl2; Packer itself is not installable here),
/// and wired to what provision.sh really installs.
#[test]
fn the_packer_template_parses_and_its_build_runs_the_provisioning_script() {
    let hcl = repo().join("ami/slipway.pkr.hcl");
    let out = Command::new("python3")
        .arg("-c")
        .arg("import hcl2, json, sys; print(json.dumps(hcl2.load(open(sys.argv[1]))))")
        .arg(&hcl)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "parsing {} as HCL2 failed (python-hcl2 missing? .ci/run installs it into its tools \
         venv: pip install python-hcl2):\n{}",
        hcl.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = std::fs::read_to_string(&hcl).unwrap();
    // python-hcl2 keeps string literals quoted and wraps expressions in ${…}.
    let unq = |v: &serde_json::Value| -> String {
        let s = v.as_str().unwrap_or_default();
        s.trim_matches('"').to_string()
    };

    // Variables: the ones the Makefile passes, and every var.X the template uses, declared.
    let declared: Vec<String> = doc["variable"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v.as_object().unwrap().keys())
        .map(|k| k.trim_matches('"').to_string())
        .collect();
    for v in ["region", "base_ami", "version", "binary", "architecture"] {
        assert!(
            declared.iter().any(|d| d == v),
            "variable {v}: {declared:?}"
        );
    }
    let makefile = std::fs::read_to_string(repo().join("Makefile")).unwrap();
    for part in makefile.split("-var ").skip(1) {
        let name = part.split('=').next().unwrap();
        assert!(
            declared.iter().any(|d| d == name),
            "make ami passes -var {name}, which the template does not declare"
        );
    }
    let locals: Vec<String> = doc["locals"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v.as_object().unwrap().keys())
        .cloned()
        .collect();
    for (prefix, names) in [("var.", &declared), ("local.", &locals)] {
        for part in text.split(prefix).skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                names.contains(&name),
                "{prefix}{name} is used but not declared"
            );
        }
    }

    // One amazon-ebs source: encrypted, IMDSv2 only; the build uses it.
    let src = &doc["source"][0]["\"amazon-ebs\""]["\"slipway\""];
    assert!(
        src.is_object(),
        "no source \"amazon-ebs\" \"slipway\": {doc}"
    );
    assert_eq!(src["encrypt_boot"], true);
    assert_eq!(unq(&src["imds_support"]), "v2.0");
    assert_eq!(
        unq(&src["metadata_options"][0]["http_tokens"]),
        "required",
        "{src}"
    );
    let build = &doc["build"][0];
    assert_eq!(
        build["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(unq)
            .collect::<Vec<_>>(),
        ["source.amazon-ebs.slipway"]
    );

    // Uploads name files that exist beside the template; the commands run provision.sh and
    // check paths it installs (verified here by installing into a scratch root).
    let provisioners = build["provisioner"].as_array().unwrap();
    let mut uploads = 0;
    let mut commands = Vec::new();
    for p in provisioners {
        if let Some(f) = p.get("\"file\"") {
            let source = unq(&f["source"]);
            if let Some(rel) = source.strip_prefix("${path.root}/") {
                assert!(
                    repo().join("ami").join(rel).exists(),
                    "file provisioner uploads missing ami/{rel}"
                );
                uploads += 1;
            }
        }
        if let Some(s) = p.get("\"shell\"") {
            commands.extend(s["inline"].as_array().unwrap().iter().map(unq));
        }
    }
    assert_eq!(uploads, 2, "provision.sh and files/ are uploaded");
    assert!(
        commands
            .iter()
            .any(|c| c.contains("SLIPWAY_BINARY=") && c.contains("provision.sh")),
        "{commands:?}"
    );
    // The SSM agent's bucket is the build region's; the build checks the agent is enabled.
    assert!(
        commands
            .iter()
            .any(|c| c.contains("SLIPWAY_SSM_REGION=${var.region}") && c.contains("provision.sh")),
        "{commands:?}"
    );
    assert!(
        commands
            .iter()
            .any(|c| c.contains("systemctl is-enabled") && c.contains("amazon-ssm-agent")),
        "{commands:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    provision(&root);
    let mut checked = 0;
    for c in &commands {
        for word in c.split_whitespace() {
            if word.starts_with("/usr/") || word.starts_with("/etc/") {
                assert!(
                    root.join(word.trim_start_matches('/')).exists(),
                    "the build runs `{c}`, but provision.sh installs no {word}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 2, "{commands:?}");
}
