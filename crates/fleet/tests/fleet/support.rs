//! moto's server mode as a child process (installed by `crates/aws/tests/setup-moto.sh`, or
//! `SLIPWAY_MOTO_SERVER`), shared by the tests of this binary and serialized between them:
//! each test starts from `POST /moto-api/reset`. A shell watchdog stops moto once this test
//! process is gone.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::config::Credentials;
use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use slipway_fleet::{Fleet, Template};
use tempfile::TempDir;
use tokio::sync::{Mutex, MutexGuard};

pub const REGION: &str = "us-east-1";
pub const ZONE: &str = "us-east-1a";

static MOTO: OnceLock<Result<u16, String>> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::const_new(());

fn call(port: u16, method: &str, path: &str) -> std::io::Result<u16> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))
}

fn moto_server_path() -> Result<String, String> {
    if let Ok(p) = std::env::var("SLIPWAY_MOTO_SERVER") {
        if !p.is_empty() {
            return Ok(p);
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../aws/tests/setup-moto.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed ({})", script.display(), out.status));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .ok_or_else(|| format!("{} printed no path", script.display()))
}

fn start() -> Result<u16, String> {
    let server = moto_server_path()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log: PathBuf = std::env::temp_dir().join(format!(
        "slipway-fleet-moto-{}-{port}.log",
        std::process::id()
    ));
    let watchdog = r#"
        MOTO_EC2_LOAD_DEFAULT_AMIS=false "$0" -H 127.0.0.1 -p "$1" >"$2" 2>&1 &
        moto=$!
        while kill -0 "$3" 2>/dev/null && kill -0 "$moto" 2>/dev/null; do sleep 0.5; done
        kill "$moto" 2>/dev/null
    "#;
    Command::new("bash")
        .arg("-c")
        .arg(watchdog)
        .arg(&server)
        .arg(port.to_string())
        .arg(&log)
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {server}: {e}"))?;
    let started = Instant::now();
    loop {
        if let Ok(200) = call(port, "POST", "/moto-api/reset") {
            return Ok(port);
        }
        if started.elapsed() > Duration::from_secs(60) {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "moto_server did not answer on port {port} within 60 s:\n{tail}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A reset emulator with a VPC, a staging subnet, a target subnet and security groups.
pub struct Env {
    _guard: MutexGuard<'static, ()>,
    pub ec2: aws_sdk_ec2::Client,
    pub fleet: Fleet,
    pub subnet: String,
    pub target_subnet: String,
    pub sg: String,
    pub dir: TempDir,
    /// Disk counts other than 1, by source id, for the templates built here.
    pub disks: BTreeMap<String, u32>,
}

impl Env {
    pub async fn start() -> Env {
        let guard = SERIAL.lock().await;
        let port = match tokio::task::spawn_blocking(|| MOTO.get_or_init(start).clone())
            .await
            .unwrap()
        {
            Ok(p) => p,
            Err(e) => panic!("AWS emulator unavailable: {e}"),
        };
        let status = tokio::task::spawn_blocking(move || call(port, "POST", "/moto-api/reset"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status, 200, "moto reset");
        let sdk: SdkConfig = aws_config::defaults(BehaviorVersion::latest())
            .http_client(slipway_aws::https_client())
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
            .endpoint_url(format!("http://127.0.0.1:{port}"))
            .load()
            .await;
        let ec2 = aws_sdk_ec2::Client::new(&sdk);
        let mut fleet = Fleet::new(&sdk);
        fleet.poll_interval = Duration::from_millis(10);
        fleet.wait_timeout = Duration::from_secs(20);
        let vpc = ec2
            .create_vpc()
            .cidr_block("10.0.0.0/16")
            .send()
            .await
            .unwrap()
            .vpc()
            .unwrap()
            .vpc_id()
            .unwrap()
            .to_string();
        let subnet = |cidr: &'static str| {
            let ec2 = ec2.clone();
            let vpc = vpc.clone();
            async move {
                ec2.create_subnet()
                    .vpc_id(vpc)
                    .cidr_block(cidr)
                    .availability_zone(ZONE)
                    .send()
                    .await
                    .unwrap()
                    .subnet()
                    .unwrap()
                    .subnet_id()
                    .unwrap()
                    .to_string()
            }
        };
        let staging = subnet("10.0.1.0/24").await;
        let target = subnet("10.0.2.0/24").await;
        let sg = ec2
            .create_security_group()
            .group_name("slipway-replication")
            .description("replication servers")
            .vpc_id(&vpc)
            .send()
            .await
            .unwrap()
            .group_id()
            .unwrap()
            .to_string();
        Env {
            _guard: guard,
            ec2,
            fleet,
            subnet: staging,
            target_subnet: target,
            sg,
            dir: tempfile::tempdir().unwrap(),
            disks: BTreeMap::new(),
        }
    }

    /// A template with `n` single-disk sources (`src-00`, …), written and loaded; `extra` is
    /// appended to the top-level keys.
    pub fn template(&self, n: usize, extra: &str) -> Template {
        self.template_with(n, "m5.large", "ami-12345678", extra)
    }

    pub fn template_with(&self, n: usize, instance_type: &str, ami: &str, extra: &str) -> Template {
        self.template_full(n, instance_type, ami, extra, "Project = \"exit\"")
    }

    /// `tags`: the body of the `[tags]` table.
    pub fn template_full(
        &self,
        n: usize,
        instance_type: &str,
        ami: &str,
        extra: &str,
        tags: &str,
    ) -> Template {
        let mut text = format!(
            "name = \"wave1\"\nregion = \"{REGION}\"\nstaging_subnet = \"{}\"\n\
             security_groups = [\"{}\"]\ninstance_type = \"{instance_type}\"\nami = \"{ami}\"\n\
             {extra}\n[tags]\n{tags}\n",
            self.subnet, self.sg
        );
        for i in 0..n {
            let disks = self.disks.get(&format!("src-{i:02}")).copied().unwrap_or(1);
            text.push_str(&format!(
                "[[sources]]\nid = \"src-{i:02}\"\ndisks = {disks}\n"
            ));
        }
        text.push_str(&format!(
            "[launch]\ninstance_type = \"m5.xlarge\"\nsubnet = \"{}\"\nsecurity_groups = [\"{}\"]\n\
             tags = {{ Environment = \"migrated\" }}\n",
            self.target_subnet, self.sg
        ));
        let p = self.dir.path().join("template.toml");
        std::fs::write(&p, text).unwrap();
        slipway_fleet::template::load(&p).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Every instance of the emulator: (id, state, type, tags).
    pub async fn instances(&self) -> Vec<aws_sdk_ec2::types::Instance> {
        self.ec2
            .describe_instances()
            .send()
            .await
            .unwrap()
            .reservations()
            .iter()
            .flat_map(|r| r.instances().to_vec())
            .collect()
    }

    /// A tagged replica volume of `source`/`disk` attached to `instance` at `device`.
    pub async fn replica_on(
        &self,
        source: &str,
        disk: &str,
        server_tag: &str,
        instance: &str,
        device: &str,
    ) -> String {
        let tags = [
            (slipway_aws::tags::SOURCE_ID, source),
            (slipway_aws::tags::DISK_ID, disk),
            (slipway_aws::tags::ROLE, slipway_aws::tags::ROLE_REPLICA),
            (slipway_aws::tags::SERVER, server_tag),
        ];
        let id = self
            .ec2
            .create_volume()
            .availability_zone(ZONE)
            .size(8)
            .encrypted(true)
            .tag_specifications(spec(ResourceType::Volume, &tags))
            .send()
            .await
            .unwrap()
            .volume_id()
            .unwrap()
            .to_string();
        self.ec2
            .attach_volume()
            .volume_id(&id)
            .instance_id(instance)
            .device(device)
            .send()
            .await
            .unwrap();
        id
    }

    /// Attachments of a volume: (instance, state).
    pub async fn attachments(&self, volume: &str) -> Vec<(String, String)> {
        self.ec2
            .describe_volumes()
            .volume_ids(volume)
            .send()
            .await
            .unwrap()
            .volumes()[0]
            .attachments()
            .iter()
            .map(|a| {
                (
                    a.instance_id().unwrap_or_default().to_string(),
                    a.state()
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default(),
                )
            })
            .collect()
    }

    /// A restore point of `source`: one completed snapshot per disk, tagged as slipway-aws
    /// tags them. Returns the snapshot ids by disk.
    pub async fn restore_point(
        &self,
        source: &str,
        rp: &str,
        created_ms: u64,
        disks: &[&str],
    ) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for disk in disks {
            let vol = self
                .ec2
                .create_volume()
                .availability_zone(ZONE)
                .size(10)
                .send()
                .await
                .unwrap()
                .volume_id()
                .unwrap()
                .to_string();
            let created = created_ms.to_string();
            let tags = [
                (slipway_aws::tags::SOURCE_ID, source),
                (slipway_aws::tags::DISK_ID, *disk),
                (slipway_aws::tags::RESTORE_POINT, rp),
                (slipway_aws::tags::MARKER, "7"),
                (slipway_aws::tags::CREATED_MS, created.as_str()),
                (slipway_aws::tags::TRIGGER, "scheduled"),
                (slipway_aws::tags::SERVER, "wave1-0"),
            ];
            let snap = self
                .ec2
                .create_snapshot()
                .volume_id(vol)
                .tag_specifications(spec(ResourceType::Snapshot, &tags))
                .send()
                .await
                .unwrap()
                .snapshot_id()
                .unwrap()
                .to_string();
            out.insert(disk.to_string(), snap);
        }
        out
    }
}

pub fn spec(resource: ResourceType, tags: &[(&str, &str)]) -> TagSpecification {
    let mut b = TagSpecification::builder().resource_type(resource);
    for (k, v) in tags {
        b = b.tags(Tag::builder().key(*k).value(*v).build());
    }
    b.build()
}

pub fn tags_of(i: &aws_sdk_ec2::types::Instance) -> BTreeMap<String, String> {
    i.tags()
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_string(),
                t.value().unwrap_or_default().to_string(),
            )
        })
        .collect()
}
