//! The AWS backend end to end: the real `slipway serve` with `backend = "aws"` against the AWS
//! API emulator (moto's server mode) and an IMDSv2 stand-in, the real agent replicating two
//! disks. Emulated attachments create no block devices, so the server maps volume ids to files
//! (`SLIPWAY_AWS_DEVICE_MAP_DIR`). The emulator and stand-in are slipway-aws's own test support.

use std::collections::BTreeMap;
use std::time::Duration;

#[path = "../../crates/aws/tests/aws/support/mod.rs"]
#[allow(dead_code, unused_imports)]
pub(crate) mod aws_support;

use aws_support::imds::Imds;
use aws_support::{tag_map, MotoEnv};

use crate::support::*;

/// The AWS API emulator, reset, with one instance of its own (slipway-aws's test support,
/// which installs the emulator with `crates/aws/tests/setup-moto.sh` the first time). Tests
/// using it take turns.
pub(crate) fn moto_env(rt: &tokio::runtime::Runtime) -> MotoEnv {
    rt.block_on(MotoEnv::start())
}

/// The IMDSv2 stand-in answering for the emulator's replication-server instance.
async fn imds_of(env: &MotoEnv) -> Imds {
    let meta: BTreeMap<String, String> = [
        ("instance-id", env.identity.instance_id.as_str()),
        ("placement/availability-zone", aws_support::ZONE),
        ("placement/region", aws_support::REGION),
        ("instance-type", "m5.large"),
        ("local-ipv4", "10.0.0.10"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Imds::start(meta).await
}

/// The environment `slipway serve` needs to use the emulator at `endpoint` (or a proxy in front
/// of it), the IMDSv2 stand-in, and files for the emulated volumes in `devs`.
fn server_env(endpoint: &str, imds: &Imds, devs: &std::path::Path) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.endpoint.clone()),
        (
            "SLIPWAY_AWS_DEVICE_MAP_DIR",
            devs.to_str().unwrap().to_string(),
        ),
    ]
}

/// The first `len` bytes of a snapshot as EBS direct serves them: ListSnapshotBlocks (every
/// page), GetSnapshotBlock of each listed block with its SHA-256 checked; unlisted blocks are
/// zeros.
async fn snapshot_data(env: &MotoEnv, snapshot_id: &str, len: usize) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let ebs = aws_sdk_ebs::Client::new(&env.sdk);
    let mut out = vec![0u8; len];
    let mut token: Option<String> = None;
    loop {
        let page = ebs
            .list_snapshot_blocks()
            .snapshot_id(snapshot_id)
            .set_next_token(token.take())
            .send()
            .await
            .unwrap_or_else(|e| panic!("ListSnapshotBlocks {snapshot_id}: {e:?}"));
        let bs = page.block_size().unwrap() as usize;
        assert_eq!(bs, 512 << 10, "EBS blocks are 512 KiB");
        for b in page.blocks() {
            let i = b.block_index().unwrap() as usize;
            let got = ebs
                .get_snapshot_block()
                .snapshot_id(snapshot_id)
                .block_index(b.block_index().unwrap())
                .block_token(b.block_token().unwrap())
                .send()
                .await
                .unwrap();
            let sum = got.checksum().unwrap().to_string();
            let data = got.block_data.collect().await.unwrap().into_bytes();
            assert_eq!(
                aws_smithy_types::base64::encode(Sha256::digest(&data)),
                sum,
                "block {i} of {snapshot_id}"
            );
            let at = i * bs;
            if at < len {
                let n = (len - at).min(data.len());
                out[at..at + n].copy_from_slice(&data[..n]);
            }
        }
        match page.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => break,
        }
    }
    out
}

#[test]
fn agent_replicates_into_ebs_volumes_and_restore_points_are_ebs_snapshots() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let env = moto_env(&rt);
    let imds = rt.block_on(imds_of(&env));

    let d = tempfile::tempdir().unwrap();
    // The emulator reads a volume's file here when it accepts a snapshot of it.
    let devs = env.moto.device_dir.clone();
    let cfg = d.path().join("slipway.toml");
    std::fs::write(
        &cfg,
        "backend = \"aws\"\n[aws]\nregion = \"us-east-1\"\nserver_tag = \"e2e\"\npoll_interval = \"100ms\"\nwait_timeout = \"30s\"\n\
         [pit]\ntiers = [{ every = \"2s\", keep = 2 }]\n",
    )
    .unwrap();
    let endpoint = env.moto.endpoint();
    let owned = server_env(&endpoint, &imds, &devs);
    let envs: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let var = d.path().join("var");
    let mut server = Server::start_env(
        &var,
        "127.0.0.1:0",
        &["--config", cfg.to_str().unwrap()],
        &envs,
    );
    let token = server.token("web");
    let a = d.path().join("a.img");
    let b = d.path().join("b.img");
    make_disk(&a, 24 << 20, 31);
    make_disk(&b, 8 << 20, 32);
    let mut agent = Agent::start(
        &server,
        "web",
        &token,
        &[&a, &b],
        &["--follow", "--rescan-interval", "1s"],
    );
    wait_until_or(
        "both disks to be continuous",
        Duration::from_secs(120),
        || {
            server.disk_state("web", "a.img") == "continuous"
                && server.disk_state("web", "b.img") == "continuous"
        },
        || {
            format!(
                "server log:\n{}\nagent log:\n{}",
                server.log(),
                agent.log_text()
            )
        },
    );

    // Two tagged, encrypted volumes attached to the replication server's instance.
    let vols = rt.block_on(env.data_volumes());
    let ours = rt.block_on(env.replicas_of("web"));
    assert_eq!(ours.len(), 2, "{vols:?}");
    for v in &ours {
        let tags = tag_map(v.tags());
        assert_eq!(
            tags.get("slipway:role").map(String::as_str),
            Some("replica")
        );
        assert!(v.encrypted().unwrap_or(false));
        let att = v.attachments();
        assert_eq!(att.len(), 1);
        assert_eq!(
            att[0].instance_id(),
            Some(env.identity.instance_id.as_str())
        );
        // The replica behind the volume id is byte-identical to its source.
        let disk = tags.get("slipway:disk-id").unwrap();
        let src = if disk == "a.img" { &a } else { &b };
        let dev = std::fs::read_dir(&devs)
            .unwrap()
            .flatten()
            .find(|e| {
                e.file_name()
                    .to_string_lossy()
                    .contains(v.volume_id().unwrap())
            })
            .map(|e| e.path())
            .unwrap_or_else(|| panic!("no device file for {:?}", v.volume_id()));
        assert_same(src, &dev, std::fs::metadata(src).unwrap().len());
    }

    // The attachment slots in use (root volume and two replicas) and the type's limit
    // (from DescribeInstanceTypes) are scraped like the rest.
    let (code, metrics) = server.http_get("/metrics");
    assert_eq!(code, 200);
    crate::promtool_check(&metrics);
    assert!(
        metrics.contains("slipway_ebs_attachment_slots{kind=\"used\"} 3\n"),
        "{metrics}"
    );
    let limit = metrics
        .lines()
        .find_map(|l| l.strip_prefix("slipway_ebs_attachment_slots{kind=\"limit\"} "))
        .unwrap_or_else(|| panic!("no attachment limit in {metrics}"));
    assert!(limit.parse::<u32>().unwrap() > 3, "{limit}");
    let status = server.status();
    assert_eq!(status["backend"], "aws", "{status}");
    assert_eq!(status["attachment_slots"][0], 3, "{status}");
    // What the server runs with, as `slipway template apply` reads it back.
    let sha = slipway_server::settings::settings_sha256(&std::fs::read_to_string(&cfg).unwrap());
    assert_eq!(status["settings_sha256"], sha.as_str(), "{status}");
    assert!(
        metrics.contains(&format!("slipway_settings_info{{sha256=\"{sha}\"}} 1\n")),
        "{metrics}"
    );

    // A restore point is a pair of tagged EBS snapshots, and they hold the source at the
    // marker: a write made just before the request is in them (the marker comes after it),
    // read back through the EBS direct APIs block by block.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        f.write_all_at(&vec![0x5a; 3 << 20], 5 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let rp = server.create_restore_point("web");
    let snaps = rt.block_on(env.snapshots());
    let of_rp: Vec<_> = snaps
        .iter()
        .filter(|s| tag_map(s.tags()).get("slipway:restore-point") == Some(&rp))
        .collect();
    assert_eq!(of_rp.len(), 2, "{snaps:?}");
    let listed = server.restore_points();
    let entry = listed.iter().find(|r| r["id"] == rp.as_str()).unwrap();
    assert_eq!(
        entry["snapshots"].as_array().map(|s| s.len()),
        Some(2),
        "{entry}"
    );
    for s in &of_rp {
        let disk = tag_map(s.tags()).remove("slipway:disk-id").unwrap();
        let src = if disk == "a.img" { &a } else { &b };
        let want = std::fs::read(src).unwrap();
        let got = rt.block_on(snapshot_data(&env, s.snapshot_id().unwrap(), want.len()));
        assert!(
            got == want,
            "snapshot {:?} of {disk} differs from the source at the marker (first difference at byte {:?})\nserver log:\n{}",
            s.snapshot_id(),
            got.iter().zip(&want).position(|(x, y)| x != y),
            server.log()
        );
    }
    // `restore-points verify` reads the same blocks through the server and checks them
    // against the manifest.
    let (ok, out, err) = server.cli(&["restore-points", "verify", &rp]);
    assert!(ok, "verify: {out}{err}");

    // Deleting it deletes its snapshots.
    let (ok, _, err) = server.cli(&["restore-points", "delete", &rp]);
    assert!(ok, "{err}");
    let left = rt.block_on(env.snapshots());
    assert!(
        !left
            .iter()
            .any(|s| tag_map(s.tags()).get("slipway:restore-point") == Some(&rp)),
        "{left:?}"
    );

    // A restart adopts the volumes; the agent resumes and changes still arrive.
    server.kill9();
    server.restart_env(&envs);
    let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&vec![0x42; 1 << 20], 3 << 20).unwrap();
    f.sync_all().unwrap();
    let a_volume = || {
        let vols = rt.block_on(env.data_volumes());
        let id = vols
            .iter()
            .find(|v| tag_map(v.tags()).get("slipway:disk-id").map(String::as_str) == Some("a.img"))
            .and_then(|v| v.volume_id())
            .unwrap()
            .to_string();
        std::fs::read_dir(&devs)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains(&id))
    };
    wait_until_or(
        "the change to replicate after the restart",
        Duration::from_secs(180),
        || a_volume().is_some_and(|v| holds_prefix(&v, &a)),
        || {
            format!(
                "server log:\n{}\nagent log:\n{}",
                server.log(),
                agent.log_text()
            )
        },
    );
    assert!(server.log().contains("adopted volume"), "{}", server.log());
    assert_eq!(
        rt.block_on(env.data_volumes()).len(),
        vols.len(),
        "no new volumes after the restart"
    );

    // The PIT policy (every 2 s, keep 2) prunes scheduled restore points by deleting their
    // snapshots: what it pruned is gone from EBS, what it keeps is there, two snapshots each.
    wait_until(
        "the PIT policy to prune two restore points",
        Duration::from_secs(60),
        || {
            let (_, m) = server.http_get("/metrics");
            m.lines()
                .find_map(|l| {
                    l.strip_prefix("slipway_restore_points_pruned_total{source=\"web\"} ")
                })
                .is_some_and(|v| v.parse::<f64>().unwrap() >= 2.0)
        },
    );
    let log = server.log();
    let pruned: Vec<String> = log
        .lines()
        .filter(|l| l.contains("restore point deleted") && l.contains("slipway_server::restore"))
        .filter_map(|l| l.split("id=\"").nth(1))
        .filter_map(|r| r.split('"').next())
        .map(str::to_string)
        .filter(|id| *id != rp)
        .collect();
    assert!(pruned.len() >= 2, "{log}");
    let by_rp = rt.block_on(async {
        let mut by_rp: BTreeMap<String, usize> = BTreeMap::new();
        for s in env.snapshots().await {
            if let Some(id) = tag_map(s.tags()).remove("slipway:restore-point") {
                *by_rp.entry(id).or_default() += 1;
            }
        }
        by_rp
    });
    for id in &pruned {
        assert!(
            !by_rp.contains_key(id),
            "pruned {id} still has snapshots: {by_rp:?}"
        );
    }
    // Two kept, and a third at most between a tick's new point and its prune.
    assert!((1..=3).contains(&by_rp.len()), "{by_rp:?}");
    assert!(by_rp.values().all(|n| *n == 2), "{by_rp:?}");
    let newest_pruned = pruned.iter().max().unwrap();
    assert!(
        by_rp.keys().all(|k| k > newest_pruned),
        "the kept points are the newest: kept {by_rp:?}, pruned {pruned:?}"
    );
    let _ = agent.child.kill();
}

/// A proxy in front of the emulator that, while `throttle` is set, answers every
/// CreateSnapshot(s) request itself with EC2's throttling error (never forwarding it, so
/// nothing is created) and forwards everything else.
async fn snapshot_throttling_proxy(
    upstream: u16,
    throttle: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> String {
    use aws_support::http::{forward, read_request, write_response};
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let throttle = throttle.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = tokio::io::BufReader::new(r);
                let Ok(Some(req)) = read_request(&mut r).await else {
                    return;
                };
                let body = String::from_utf8_lossy(&req.body);
                let snapshot = body
                    .split('&')
                    .any(|kv| kv == "Action=CreateSnapshots" || kv == "Action=CreateSnapshot");
                if snapshot && throttle.load(std::sync::atomic::Ordering::SeqCst) {
                    let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>0</RequestID></Response>";
                    let _ = write_response(
                        &mut w,
                        503,
                        &[("Content-Type", "text/xml")],
                        xml.as_bytes(),
                        true,
                    )
                    .await;
                    return;
                }
                let Some(resp) = forward(upstream, &req).await else {
                    return;
                };
                let _ = w.write_all(&resp).await;
                let _ = w.shutdown().await;
            });
        }
    });
    endpoint
}

/// Item 2 of issue 14: a restore point's snapshot requests are made while the source's writes
/// are held, but a throttled account cannot hold them longer than
/// `replication.max_snapshot_hold`: the point fails after the bound (counted, and the abandoned
/// point leaves no snapshot), the writes go on, and once AWS answers again a point is taken.
#[test]
fn a_throttled_snapshot_request_holds_the_writes_no_longer_than_the_bound() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let env = moto_env(&rt);
    let imds = rt.block_on(imds_of(&env));
    let throttle = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let endpoint = rt.block_on(snapshot_throttling_proxy(env.moto.port, throttle.clone()));

    let d = tempfile::tempdir().unwrap();
    let devs = env.moto.device_dir.clone();
    let cfg = d.path().join("slipway.toml");
    // The SDK alone would retry a throttled CreateSnapshots for 8 attempts with backoff from
    // 1 s (tens of seconds); the hold bound is 2 s. No scheduled points (every week, and the
    // first one is refused like the others while throttled).
    std::fs::write(
        &cfg,
        "backend = \"aws\"\n[replication]\nmax_snapshot_hold = \"2s\"\n\
         [aws]\nregion = \"us-east-1\"\nserver_tag = \"e2e-hold\"\npoll_interval = \"100ms\"\nwait_timeout = \"30s\"\n\
         max_attempts = 8\ninitial_backoff = \"1s\"\n[pit]\ntiers = [{ every = \"1w\", keep = 1 }]\n",
    )
    .unwrap();
    let owned = server_env(&endpoint, &imds, &devs);
    let envs: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let var = d.path().join("var");
    let server = Server::start_env(
        &var,
        "127.0.0.1:0",
        &["--config", cfg.to_str().unwrap()],
        &envs,
    );
    let token = server.token("web");
    let a = d.path().join("a.img");
    make_disk(&a, 8 << 20, 41);
    let agent = Agent::start(
        &server,
        "web",
        &token,
        &[&a],
        &["--follow", "--rescan-interval", "1s"],
    );
    wait_until_or(
        "the disk to be continuous",
        Duration::from_secs(120),
        || server.disk_state("web", "a.img") == "continuous",
        || {
            format!(
                "server log:\n{}\nagent log:\n{}",
                server.log(),
                agent.log_text()
            )
        },
    );

    // Throttled: the on-demand point fails at the bound, not after the SDK's retries.
    let started = std::time::Instant::now();
    let (ok, _, err) = server.cli(&["restore-points", "create", "--source", "web", "--wait"]);
    let took = started.elapsed();
    assert!(
        !ok,
        "a restore point was taken while CreateSnapshots was throttled"
    );
    assert!(err.contains("not accepted within 2s"), "{err}");
    assert!(
        took < Duration::from_secs(8),
        "restore-points create took {took:?}: the writes were held past the 2 s bound"
    );
    let (_, metrics) = server.http_get("/metrics");
    assert!(
        metrics.contains("slipway_restore_points_failed_total{source=\"web\"} "),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l.starts_with(
            "slipway_aws_requests_total{op=\"CreateSnapshots\",outcome=\"throttled\"}"
        ) || l.starts_with(
            "slipway_aws_requests_total{op=\"CreateSnapshot\",outcome=\"throttled\"}"
        )),
        "{metrics}"
    );

    // The writes were let go: a change made now arrives on the volume.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
        f.write_all_at(&[0xAB; 4096], 1 << 20).unwrap();
        f.sync_all().unwrap();
    }
    let vol = rt.block_on(env.replicas_of("web"))[0]
        .volume_id()
        .unwrap()
        .to_string();
    let dev = std::fs::read_dir(&devs)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().contains(&vol))
        .map(|e| e.path())
        .unwrap();
    wait_until_or(
        "the change to reach the volume after the failed point",
        Duration::from_secs(60),
        || {
            use std::os::unix::fs::FileExt;
            let mut buf = [0u8; 4096];
            std::fs::File::open(&dev)
                .and_then(|f| f.read_exact_at(&mut buf, 1 << 20))
                .is_ok()
                && buf == [0xAB; 4096]
        },
        || {
            format!(
                "server log:\n{}\nagent log:\n{}",
                server.log(),
                agent.log_text()
            )
        },
    );
    assert!(
        rt.block_on(env.snapshots()).is_empty(),
        "the abandoned point left snapshots behind"
    );

    // AWS answers again: the next point is taken.
    throttle.store(false, std::sync::atomic::Ordering::SeqCst);
    let rp = server.create_restore_point("web");
    let snaps = rt.block_on(env.snapshots());
    assert!(
        snaps
            .iter()
            .any(|s| tag_map(s.tags()).get("slipway:restore-point") == Some(&rp)),
        "{snaps:?}"
    );
    drop(agent);
}

/// Tags every snapshot of restore point `rp` with `slipway:keep = value`, as `slipway cutover
/// finalize` (or an operator) does.
async fn keep_restore_point(env: &MotoEnv, rp: &str, value: &str) -> usize {
    let ids: Vec<String> = env
        .snapshots()
        .await
        .iter()
        .filter(|s| {
            tag_map(s.tags())
                .get("slipway:restore-point")
                .map(String::as_str)
                == Some(rp)
        })
        .filter_map(|s| s.snapshot_id().map(str::to_string))
        .collect();
    env.ec2
        .create_tags()
        .set_resources(Some(ids.clone()))
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("slipway:keep")
                .value(value)
                .build(),
        )
        .send()
        .await
        .unwrap();
    ids.len()
}

/// Restore-point ids that have snapshots, with how many.
async fn snapshots_by_rp(env: &MotoEnv) -> BTreeMap<String, usize> {
    let mut by_rp: BTreeMap<String, usize> = BTreeMap::new();
    for s in env.snapshots().await {
        if let Some(id) = tag_map(s.tags()).remove("slipway:restore-point") {
            *by_rp.entry(id).or_default() += 1;
        }
    }
    by_rp
}

/// The launch lifecycle's end on the server (issue 14 item 4): a restore point whose
/// snapshots carry `slipway:keep` is outside the PIT policy (never pruned, never deleted by
/// `restore-points delete`), and once one of a source's restore points is kept as
/// `cutover-finalized` (`slipway cutover finalize`) the server closes the source's connection
/// with a refusal the agent does not retry, refuses it from then on, and takes no more
/// restore points of it.
#[test]
fn kept_restore_points_are_never_pruned_and_a_finalized_source_is_refused() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let env = moto_env(&rt);
    let imds = rt.block_on(imds_of(&env));
    let d = tempfile::tempdir().unwrap();
    let devs = env.moto.device_dir.clone();
    let cfg = d.path().join("slipway.toml");
    // A point every 2 s, two kept: scheduled points are pruned within seconds.
    std::fs::write(
        &cfg,
        "backend = \"aws\"\n[aws]\nregion = \"us-east-1\"\nserver_tag = \"e2e\"\npoll_interval = \"100ms\"\n\
         wait_timeout = \"30s\"\ndescribe_interval = \"1s\"\n[pit]\ntiers = [{ every = \"2s\", keep = 2 }]\n",
    )
    .unwrap();
    let endpoint = env.moto.endpoint();
    let owned = server_env(&endpoint, &imds, &devs);
    let envs: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let var = d.path().join("var");
    let mut server = Server::start_env(
        &var,
        "127.0.0.1:0",
        &["--config", cfg.to_str().unwrap()],
        &envs,
    );
    let token = server.token("web");
    let a = d.path().join("a.img");
    make_disk(&a, 8 << 20, 41);
    let mut agent = Agent::start(&server, "web", &token, &[&a], &["--follow"]);
    let logs = |server: &Server, agent: &Agent| {
        format!(
            "server log:\n{}\nagent log:\n{}",
            server.log(),
            agent.log_text()
        )
    };
    // The newest scheduled point (the last one the policy would prune), kept by an operator's
    // tag as soon as it is listed.
    let mut kept: Option<String> = None;
    wait_until_or(
        "a scheduled restore point to keep",
        Duration::from_secs(120),
        || {
            kept = server
                .restore_points()
                .iter()
                .rev()
                .find(|r| {
                    r["trigger"] == "scheduled"
                        && r["snapshots"].as_array().is_some_and(|s| !s.is_empty())
                })
                .and_then(|r| r["id"].as_str().map(str::to_string));
            kept.is_some()
        },
        || logs(&server, &agent),
    );
    let kept = kept.unwrap();
    assert_eq!(rt.block_on(keep_restore_point(&env, &kept, "operator")), 1);
    // Three prunes later (every other point is gone within seconds of its successor), the
    // kept one is still there, whole.
    let pruned = |server: &Server| {
        let (_, m) = server.http_get("/metrics");
        metric(&m, "slipway_restore_points_pruned_total{source=\"web\"} ")
    };
    let before = pruned(&server);
    wait_until_or(
        "the PIT policy to prune three more restore points",
        Duration::from_secs(120),
        || pruned(&server) >= before + 3.0,
        || logs(&server, &agent),
    );
    let by_rp = rt.block_on(snapshots_by_rp(&env));
    assert_eq!(
        by_rp.get(&kept),
        Some(&1),
        "the kept restore point {kept} was pruned: {by_rp:?}\n{}",
        logs(&server, &agent)
    );
    // Listed as kept (the policy leaves it out: `restore::hold_tests::kept_restore_points_are_outside_the_policy`).
    assert!(
        server
            .restore_points()
            .iter()
            .any(|r| r["id"] == kept.as_str() && r["keep"] == "operator"),
        "{:?}",
        server.restore_points()
    );
    // An operator's delete is refused too, and says why.
    let (ok, out, err) = server.cli(&["restore-points", "delete", &kept]);
    assert!(!ok, "deleting a kept restore point succeeded: {out}");
    assert!(err.contains("kept"), "{err}");
    assert_eq!(rt.block_on(snapshots_by_rp(&env)).get(&kept), Some(&1));

    // Finalized: the agent is told and stops for good (a permanent refusal, not a retry).
    rt.block_on(keep_restore_point(&env, &kept, "cutover-finalized"));
    let st = agent.wait(Duration::from_secs(60));
    assert!(!st.success(), "the agent of a finalized source exited 0");
    assert!(
        agent.log_text().contains("finalized"),
        "{}",
        logs(&server, &agent)
    );
    let (_, m) = server.http_get("/metrics");
    assert_eq!(metric(&m, "slipway_sources_finalized "), 1.0, "{m}");
    // Kept in the data dir, so a restarted server refuses the source from its first hello.
    let saved = std::fs::read_to_string(var.join("finalized-sources")).unwrap_or_default();
    assert_eq!(saved, "web\n");
    let points = server.restore_points().len();
    // A new agent of the source is refused at its hello.
    let mut again = Agent::start(&server, "web", &token, &[&a], &["--follow"]);
    let st = again.wait(Duration::from_secs(60));
    assert!(!st.success());
    assert!(
        again.log_text().contains("finalized"),
        "{}",
        again.log_text()
    );
    // Refused at its hello, not let in and closed at the scheduler's next look.
    assert!(
        server
            .log()
            .lines()
            .any(|l| l.contains("refused agent") && l.contains("finalized")),
        "{}",
        server.log()
    );
    // And no restore point of it is taken on demand.
    let (ok, _, err) = server.cli(&["restore-points", "create", "--source", "web"]);
    assert!(!ok);
    assert!(err.contains("finalized"), "{err}");
    assert_eq!(server.restore_points().len(), points);
    // After a restart too.
    server.kill9();
    server.restart_env(&envs);
    let mut after = Agent::start(&server, "web", &token, &[&a], &["--follow"]);
    assert!(!after.wait(Duration::from_secs(60)).success());
    assert!(
        after.log_text().contains("finalized"),
        "{}",
        after.log_text()
    );
}
