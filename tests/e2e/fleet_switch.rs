//! The instance-type switch end to end: `slipway template apply` changes the replication
//! server's type (stop, modify, start) while the real agent replicates into it, and the
//! replica ends byte-identical to the source. Then an AMI change replaces the server (a new
//! instance and root disk, the volume moved to it), and after a resync the replica is again
//! identical.
//!
//! The emulator only flips EC2 states; what a real instance does when they flip is played by
//! a small "host" in front of it, used by the `slipway template apply` process:
//! - on StopInstances of the server's instance it sends the server SIGTERM (what systemd does
//!   at shutdown), waits for it to drain and exit, checks that every write the agent had
//!   been acknowledged is on the volume, and only then forwards the call;
//! - on StartInstances it forwards the call, then boots the instance: the IMDSv2 stand-in
//!   answers with the instance's type and user data as the emulator now has them, the AMI's
//!   own `slipway-userdata` script writes the settings file from the user data, and
//!   `slipway serve` starts on it with the same data dir (the root disk survives a stop);
//! - on TerminateInstances it shuts the server down if it still runs. A replacement instance
//!   boots once `apply` has attached the volumes to it, with a new root disk.
//!
//! Every boot first runs `slipway identity-volume mount`, as the AMI's slipway-identity.service
//! does: it finds the server's identity volume by the instance's tags and mounts it (a
//! `FileMap` file, which `mount` puts on a loop device: the tests run as root) on the data
//! dir; every shutdown unmounts it. So the replacement server has the replaced one's TLS
//! identity, token secret and disk metadata: the agent, never restarted, reconnects with its
//! pinned fingerprint and old token and resumes its disk without a resync.
//!
//! The server itself talks to the emulator directly; its volumes are files
//! (`SLIPWAY_AWS_DEVICE_MAP_DIR`), as in `aws_backend.rs`.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2::types::InstanceAttributeName;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use crate::aws_backend::aws_support::http::{forward, read_request};
use crate::aws_backend::aws_support::imds::Imds;
use crate::aws_backend::aws_support::{staging_network, tag_map, MotoEnv, REGION, ZONE};
use crate::aws_backend::moto_env;
use crate::support::*;

/// The instance the server runs on, and what happens to the server when EC2 stops or
/// starts it.
struct Host {
    ec2: aws_sdk_ec2::Client,
    imds: Imds,
    instance: Mutex<String>,
    dir: PathBuf,
    /// Environment of `slipway serve`: the emulator, the IMDS stand-in, the device map.
    env: Vec<(String, String)>,
    server: Mutex<Option<Server>>,
    /// The agent's source disk and ack journal, for the check at each stop.
    source: PathBuf,
    journal: PathBuf,
    stops: AtomicUsize,
    boots: AtomicUsize,
    /// What each stop found: acknowledged ranges checked on the volume, or what was wrong.
    stop_checks: Mutex<Vec<Result<usize, String>>>,
    /// What each boot's `slipway identity-volume mount` printed.
    identity_mounts: Mutex<Vec<String>>,
    /// The identity volume's id (its file is not the replica's) and where it is mounted now.
    identity_volume: Mutex<Option<String>>,
    mounted: Mutex<Option<PathBuf>>,
}

/// Unmounts the identity volume when the test ends, however it ends (before the test's
/// directory is removed).
struct Unmount(Arc<Host>);

impl Drop for Unmount {
    fn drop(&mut self) {
        // The server first (its Drop kills it), then the mount, lazily: no panic while a
        // failed test unwinds.
        drop(self.0.server.lock().map(|mut s| s.take()));
        if let Some(dir) = self.0.mounted.lock().ok().and_then(|mut m| m.take()) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&dir)
                .status();
        }
    }
}

impl Host {
    /// The data dir on the instance's root disk: one per instance.
    fn data_dir(&self) -> PathBuf {
        self.dir
            .join(format!("root-{}", self.instance.lock().unwrap()))
            .join("var")
    }

    fn devices(&self) -> PathBuf {
        self.dir.join("devices")
    }

    /// The replica file of the one replica volume (whole GiB; the disk is its prefix).
    fn volume_file(&self) -> Option<PathBuf> {
        let identity = self
            .identity_volume
            .lock()
            .unwrap()
            .as_ref()
            .map(|id| format!("{id}.img"));
        std::fs::read_dir(self.devices())
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()) != identity.as_deref())
    }

    /// The instance shuts down: its identity volume is unmounted.
    fn unmount(&self) {
        if let Some(dir) = self.mounted.lock().unwrap().take() {
            let st = std::process::Command::new("umount")
                .arg(&dir)
                .status()
                .unwrap();
            if !st.success() {
                let who = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "fuser -vm {0} 2>&1; lsof +f -- {0} 2>&1",
                        dir.display()
                    ))
                    .output()
                    .unwrap();
                panic!(
                    "umount {}: {}",
                    dir.display(),
                    String::from_utf8_lossy(&who.stdout)
                );
            }
        }
    }

    /// Boots the instance: IMDS from the emulator's view of it, the AMI's user-data script,
    /// then `slipway serve` (same data dir and port as before, if it ran before).
    async fn boot(self: &Arc<Self>) {
        let id = self.instance.lock().unwrap().clone();
        let inst = self
            .ec2
            .describe_instances()
            .instance_ids(&id)
            .send()
            .await
            .unwrap()
            .reservations()[0]
            .instances()[0]
            .clone();
        let ud = self
            .ec2
            .describe_instance_attribute()
            .instance_id(&id)
            .attribute(InstanceAttributeName::UserData)
            .send()
            .await
            .unwrap();
        let b64 = ud.user_data().and_then(|u| u.value()).unwrap_or_default();
        let user_data = String::from_utf8(aws_smithy_types::base64::decode(b64).unwrap()).unwrap();
        self.imds.set("instance-id", &id);
        self.imds
            .set("instance-type", inst.instance_type().unwrap().as_str());
        self.imds.set(
            "local-ipv4",
            inst.private_ip_address().unwrap_or("10.0.1.10"),
        );
        self.imds.set("user-data", &user_data);
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.start_server())
            .await
            .unwrap();
        self.boots.fetch_add(1, Ordering::SeqCst);
    }

    fn start_server(&self) {
        // slipway-userdata.service, then slipway.service, as the AMI orders them.
        let conf = self.dir.join("etc/slipway.toml");
        std::fs::create_dir_all(conf.parent().unwrap()).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("ami/files/slipway-userdata");
        let out = std::process::Command::new("sh")
            .arg(&script)
            .env("SLIPWAY_IMDS_ENDPOINT", &self.imds.endpoint)
            .env("SLIPWAY_CONFIG_FILE", &conf)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "slipway-userdata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // slipway-identity.service: the data dir is the server's identity volume.
        let data_dir = self.data_dir();
        let out = std::process::Command::new(SLIPWAY)
            .args([
                "identity-volume",
                "mount",
                "--config",
                conf.to_str().unwrap(),
            ])
            .arg("--data-dir")
            .arg(&data_dir)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "slipway identity-volume mount failed: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = said
            .split_whitespace()
            .nth(2)
            .filter(|w| w.starts_with("vol-"))
            .unwrap_or_else(|| panic!("no identity volume mounted: {said}"))
            .to_string();
        *self.identity_volume.lock().unwrap() = Some(id);
        *self.mounted.lock().unwrap() = Some(data_dir);
        self.identity_mounts.lock().unwrap().push(said);
        let mut slot = self.server.lock().unwrap();
        // The first boot picks a free port; later boots keep it (agents have the address).
        let listen = slot
            .as_ref()
            .map_or("127.0.0.1:0".to_string(), |s| s.listen.to_string());
        let s = Server::start_env(
            &self.data_dir(),
            &listen,
            &["--config", conf.to_str().unwrap()],
            &env,
        );
        *slot = Some(s);
    }

    /// Shutdown: SIGTERM, the server drains and exits; then what the agent was told is
    /// durable must be on the volume. Nothing to do if it is down already.
    fn shut_down(&self) {
        let mut slot = self.server.lock().unwrap();
        let s = slot.as_mut().expect("a server ran on the instance");
        if s.child.try_wait().unwrap().is_some() {
            self.unmount();
            return;
        }
        let status = s.terminate(Duration::from_secs(60));
        self.unmount();
        let check = if !status.success() {
            Err(format!(
                "the server exited with {status} on SIGTERM:\n{}",
                s.log()
            ))
        } else {
            let vol = self.volume_file().expect("a replica volume");
            let (journal, source) = (self.journal.clone(), self.source.clone());
            std::panic::catch_unwind(move || check_journal(&journal, "a.img", &source, &vol))
                .map_err(|e| {
                    e.downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_else(|| "check_journal panicked".into())
                })
        };
        self.stop_checks.lock().unwrap().push(check);
        self.stops.fetch_add(1, Ordering::SeqCst);
    }

    fn log(&self) -> String {
        self.server
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| s.log())
            .unwrap_or_default()
    }
}

/// Forwards EC2 calls to the emulator, playing the host's part around StopInstances and
/// StartInstances of its instance.
async fn host_proxy(host: Arc<Host>, upstream: u16) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let host = host.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                let Ok(Some(req)) = read_request(&mut r).await else {
                    return;
                };
                let body = String::from_utf8_lossy(&req.body).into_owned();
                let id = host.instance.lock().unwrap().clone();
                let ours = !id.is_empty() && body.contains(&format!("={id}"));
                let action = body
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("Action="))
                    .unwrap_or_default()
                    .to_string();
                if ours && (action == "StopInstances" || action == "TerminateInstances") {
                    let h = host.clone();
                    tokio::task::spawn_blocking(move || h.shut_down())
                        .await
                        .unwrap();
                }
                let Some(resp) = forward(upstream, &req).await else {
                    return;
                };
                if ours && action == "StartInstances" {
                    host.boot().await;
                }
                let _ = w.write_all(&resp).await;
                let _ = w.shutdown().await;
            });
        }
    });
    endpoint
}

/// A tag of an instance, as EC2 has it.
fn instance_tag(
    rt: &tokio::runtime::Runtime,
    env: &MotoEnv,
    instance: &str,
    key: &str,
) -> Option<String> {
    rt.block_on(async {
        let r = env
            .ec2
            .describe_instances()
            .instance_ids(instance)
            .send()
            .await
            .unwrap();
        tag_map(r.reservations()[0].instances()[0].tags())
            .get(key)
            .cloned()
    })
}

/// The source's one replica volume is attached to `instance`.
fn assert_one_replica_on(rt: &tokio::runtime::Runtime, env: &MotoEnv, instance: &str) {
    let replicas = rt.block_on(env.replicas_of("web"));
    assert_eq!(replicas.len(), 1, "{replicas:?}");
    assert_eq!(replicas[0].attachments()[0].instance_id(), Some(instance));
}

#[test]
fn an_agent_keeps_replicating_across_an_instance_type_switch() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let env = moto_env(&rt);
    let net = rt.block_on(staging_network(&env.ec2));
    let (subnet, sg) = (net.staging_subnet, net.security_group);

    let d = tempfile::tempdir().unwrap();
    let source = d.path().join("a.img");
    // 16 MiB of data, then 8 MiB of zeros the initial sync skips: the changes go there, so
    // each range the agent journals as acknowledged has one content, the source's current one.
    make_disk(&source, 16 << 20, 51);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&source)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    let meta: BTreeMap<String, String> = [
        ("placement/availability-zone", ZONE),
        ("placement/region", REGION),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let imds = rt.block_on(Imds::start(meta));
    let moto = env.moto.endpoint();
    let host_dir = d.path().join("host");
    std::fs::create_dir_all(host_dir.join("devices")).unwrap();
    let common = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", REGION),
    ];
    let mut server_env: Vec<(String, String)> = common
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    server_env.push(("AWS_ENDPOINT_URL".into(), moto.clone()));
    server_env.push((
        "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
        imds.endpoint.clone(),
    ));
    server_env.push((
        "SLIPWAY_AWS_DEVICE_MAP_DIR".into(),
        host_dir.join("devices").to_str().unwrap().into(),
    ));
    let host = Arc::new(Host {
        ec2: env.ec2.clone(),
        imds,
        instance: Mutex::new(String::new()),
        dir: host_dir,
        env: server_env,
        server: Mutex::new(None),
        source: source.clone(),
        journal: d.path().join("agent.journal"),
        stops: AtomicUsize::new(0),
        boots: AtomicUsize::new(0),
        stop_checks: Mutex::new(Vec::new()),
        identity_mounts: Mutex::new(Vec::new()),
        identity_volume: Mutex::new(None),
        mounted: Mutex::new(None),
    });
    let _unmount = Unmount(host.clone());
    let port: u16 = moto.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = rt.block_on(host_proxy(host.clone(), port));

    let template = d.path().join("wave.toml");
    let write_template = |instance_type: &str, ami: &str| {
        std::fs::write(
            &template,
            format!(
                "name = \"wave\"\nregion = \"{REGION}\"\nstaging_subnet = \"{subnet}\"\n\
                 security_groups = [\"{sg}\"]\ninstance_type = \"{instance_type}\"\n\
                 ami = \"{ami}\"\n[[sources]]\nid = \"web\"\ndisks = 1\n"
            ),
        )
        .unwrap();
    };
    let apply = || {
        let mut cmd = std::process::Command::new(SLIPWAY);
        cmd.args(["template", "apply"]).arg(&template);
        cmd.envs(common.iter().copied())
            .env("AWS_ENDPOINT_URL", &proxy)
            // moto answers a RunInstances for the private IP of an instance it has just
            // terminated with a 500 (EC2: InvalidIPAddress.InUse, then free) that the SDK
            // would retry with backoff for ~30 s; the fleet falls back to a new address.
            .env("AWS_MAX_ATTEMPTS", "1")
            .env("RUST_LOG", "info");
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "apply failed:\n{text}");
        text
    };

    // Launch: one m5.large; the host boots it.
    write_template("m5.large", "ami-12345678");
    let first = apply();
    let server_id = rt.block_on(async {
        let r = env.ec2.describe_instances().send().await.unwrap();
        let ours: Vec<String> = r
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| {
                tag_map(i.tags())
                    .get("slipway:template")
                    .map(String::as_str)
                    == Some("wave")
            })
            .map(|i| i.instance_id().unwrap().to_string())
            .collect();
        assert_eq!(ours.len(), 1, "{first}");
        ours[0].clone()
    });
    *host.instance.lock().unwrap() = server_id.clone();
    rt.block_on(host.boot());
    // The first boot made the identity volume's filesystem (apply created it empty).
    assert!(
        host.identity_mounts.lock().unwrap()[0].contains("formatted"),
        "{:?}",
        host.identity_mounts.lock().unwrap()
    );
    // Operators read the fingerprint agents pin from the instance's tags (the server sets
    // it at start) and from /healthz, without a shell on the server.
    let first_fingerprint = host
        .server
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .fingerprint
        .clone();
    assert_eq!(
        instance_tag(&rt, &env, &server_id, "slipway:tls-fingerprint").as_deref(),
        Some(first_fingerprint.as_str())
    );
    let (code, body) = host
        .server
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .http_get("/healthz");
    assert_eq!(code, 200);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["fingerprint"], first_fingerprint.as_str(), "{body}");

    // Replicate, following changes.
    let (token, agent_server) = {
        let slot = host.server.lock().unwrap();
        let s = slot.as_ref().unwrap();
        (s.token("web"), s.listen)
    };
    let agent = {
        let slot = host.server.lock().unwrap();
        Agent::start_logging_in(
            d.path(),
            slot.as_ref().unwrap(),
            "web",
            &token,
            &[&source],
            &[
                "--follow",
                "--rescan-interval",
                "1s",
                "--ack-journal",
                host.journal.to_str().unwrap(),
            ],
        )
    };
    let state = || {
        host.server
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| s.disk_state("web", "a.img"))
            .unwrap_or_default()
    };
    let logs = || {
        format!(
            "server log:\n{}\nagent log:\n{}",
            host.log(),
            agent.log_text()
        )
    };
    wait_until_or(
        "the disk to be continuous",
        Duration::from_secs(120),
        || state() == "continuous",
        logs,
    );

    // One change replicated (and acknowledged) before the switch, one made just before it
    // (acknowledged or not when the server drains, it must arrive), one after it.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&source)
        .unwrap();
    let replica_matches = || {
        host.volume_file()
            .is_some_and(|v| holds_prefix(&v, &source))
    };
    f.write_all_at(&vec![0x11; 1 << 20], 16 << 20).unwrap();
    f.sync_all().unwrap();
    wait_until_or(
        "the first change to replicate",
        Duration::from_secs(60),
        replica_matches,
        logs,
    );
    f.write_all_at(&vec![0x5a; 2 << 20], 18 << 20).unwrap();
    f.sync_all().unwrap();

    // The switch: m5.large → m5.xlarge, in place.
    write_template("m5.xlarge", "ami-12345678");
    let switched = apply();
    assert_eq!(host.stops.load(Ordering::SeqCst), 1, "{switched}");
    assert_eq!(host.boots.load(Ordering::SeqCst), 2, "{switched}");
    let checks = host.stop_checks.lock().unwrap().clone();
    match &checks[..] {
        [Ok(n)] => assert!(*n > 0, "no acknowledged write to check"),
        other => panic!("at the stop: {other:?}"),
    }

    // A change after it.
    f.write_all_at(&vec![0xa5; 1 << 20], 21 << 20).unwrap();
    f.sync_all().unwrap();
    wait_until_or(
        "the replica to catch up after the switch",
        Duration::from_secs(120),
        replica_matches,
        logs,
    );

    // Same instance, new type, the one replica volume still attached to it; the new server
    // saw its new type through IMDS and adopted the volume; the agent resumed (no resync)
    // at the same address.
    rt.block_on(async {
        let i = env
            .ec2
            .describe_instances()
            .instance_ids(&server_id)
            .send()
            .await
            .unwrap()
            .reservations()[0]
            .instances()[0]
            .clone();
        assert_eq!(i.instance_type().unwrap().as_str(), "m5.xlarge");
        assert_eq!(i.state().unwrap().name().unwrap().as_str(), "running");
    });
    assert_one_replica_on(&rt, &env, &server_id);
    let log = host.log();
    assert!(log.contains("m5.xlarge"), "{log}");
    assert!(log.contains("adopted volume"), "{log}");
    assert_eq!(
        host.server.lock().unwrap().as_ref().unwrap().listen,
        agent_server
    );
    let alog = agent.log_text();
    assert_eq!(
        alog.matches("pass starts from offset 0").count(),
        1,
        "only the initial sync is a full pass:\n{alog}"
    );
    assert!(alog.contains("resuming"), "{alog}");

    // Nothing left to do: a second apply stops nothing, and leaves the tag the server set
    // on its instance alone.
    let again = apply();
    assert!(again.contains("no changes"), "{again}");
    assert_eq!(host.stops.load(Ordering::SeqCst), 1);
    assert_eq!(
        instance_tag(&rt, &env, &server_id, "slipway:tls-fingerprint").as_deref(),
        Some(first_fingerprint.as_str()),
        "apply must not remove the server's own fingerprint tag"
    );

    // An upgrade: a new AMI replaces the server. The old one drains (checked like the
    // switch), its replica and identity volumes move to a new instance, which boots with a
    // new root disk but the old data dir: the same TLS identity, token secret and disk
    // metadata.
    let token_secret = |h: &Host| std::fs::read(h.data_dir().join("tls/token.key")).unwrap();
    let old_secret = token_secret(&host);
    let old_identity = host.identity_volume.lock().unwrap().clone().unwrap();
    let resumes_before = agent.log_text().matches("resuming").count();
    write_template("m5.xlarge", "ami-87654321");
    let replaced = apply();
    assert_eq!(host.stops.load(Ordering::SeqCst), 2, "{replaced}");
    match &host.stop_checks.lock().unwrap()[..] {
        [Ok(_), Ok(n)] => assert!(*n > 0),
        other => panic!("at the stops: {other:?}"),
    }
    let new_id = rt.block_on(async {
        let r = env.ec2.describe_instances().send().await.unwrap();
        let mut live = Vec::new();
        for i in r.reservations().iter().flat_map(|r| r.instances()) {
            let state = i.state().unwrap().name().unwrap().as_str().to_string();
            let id = i.instance_id().unwrap().to_string();
            if id == server_id {
                assert_eq!(state, "terminated", "{replaced}");
            } else if tag_map(i.tags())
                .get("slipway:template")
                .map(String::as_str)
                == Some("wave")
                && state == "running"
            {
                assert_eq!(i.image_id(), Some("ami-87654321"));
                live.push(id);
            }
        }
        assert_eq!(live.len(), 1, "{replaced}");
        live.remove(0)
    });
    *host.instance.lock().unwrap() = new_id.clone();
    // The source changes while the server is being replaced; the agent keeps running.
    f.write_all_at(&vec![0x3c; 1 << 20], 22 << 20).unwrap();
    f.sync_all().unwrap();
    rt.block_on(host.boot());
    let mounts = host.identity_mounts.lock().unwrap().clone();
    assert!(
        mounts
            .last()
            .unwrap()
            .contains(&format!("identity volume {old_identity} "))
            && mounts.last().unwrap().contains(" mounted on "),
        "the replacement mounts the replaced server's identity volume as it is: {mounts:?}"
    );
    assert!(!mounts.last().unwrap().contains("formatted"), "{mounts:?}");
    let fingerprint = host
        .server
        .lock()
        .unwrap()
        .as_ref()
        .unwrap()
        .fingerprint
        .clone();
    assert_eq!(
        fingerprint, first_fingerprint,
        "the replacement server has the identity the agent pins"
    );
    assert_eq!(token_secret(&host), old_secret, "the same token secret");
    assert_eq!(
        instance_tag(&rt, &env, &new_id, "slipway:tls-fingerprint").as_deref(),
        Some(first_fingerprint.as_str())
    );
    // The very agent that replicated before — its pinned fingerprint, its old token — finds
    // the replacement at the same address and resumes: no pass from offset 0 beyond the
    // initial sync, the server's metadata says where the disk stands.
    wait_until_or(
        "the replica to be identical on the replacement server",
        Duration::from_secs(120),
        || {
            host.volume_file()
                .is_some_and(|v| holds_prefix(&v, &source))
        },
        logs,
    );
    wait_until_or(
        "the disk to be continuous on the replacement server",
        Duration::from_secs(60),
        || state() == "continuous",
        logs,
    );
    assert_one_replica_on(&rt, &env, &new_id);
    let log = host.log();
    assert!(log.contains("adopted volume"), "{log}");
    let alog = agent.log_text();
    assert_eq!(
        alog.matches("pass starts from offset 0").count(),
        1,
        "only the initial sync is a full pass, also across the replacement:\n{alog}"
    );
    assert!(!alog.contains("resume=Resync"), "{alog}");
    assert!(
        alog.matches("resuming").count() > resumes_before,
        "the agent resumed on the replacement:\n{alog}"
    );
    assert!(!alog.contains("credential refused"), "{alog}");
    // A second apply leaves it alone: one identity volume, on the new server.
    let again = apply();
    assert!(again.contains("no changes"), "{again}");
    rt.block_on(async {
        let vols = env
            .ec2
            .describe_volumes()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("tag:slipway:role")
                    .values("identity")
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let ids: Vec<(&str, Option<&str>)> = vols
            .volumes()
            .iter()
            .map(|v| {
                (
                    v.volume_id().unwrap(),
                    v.attachments().first().and_then(|a| a.instance_id()),
                )
            })
            .collect();
        assert_eq!(ids, [(old_identity.as_str(), Some(new_id.as_str()))]);
    });
    drop(agent);
    let _ = host.server.lock().unwrap().take();
}
