//! The emulator environment of the fleet tests: slipway-aws's test support (moto's server mode,
//! shared by the tests of this binary and serialized between them, each starting from a reset)
//! with a staging network, and the fleet pointed at it.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use slipway_fleet::{Fleet, Template};
use tempfile::TempDir;
use tokio::sync::MutexGuard;

#[path = "../../../aws/tests/aws/support/mod.rs"]
#[allow(dead_code, unused_imports)]
pub mod aws_support;

pub use aws_support::{REGION, ZONE};

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
    /// Every request the fleet sent, as it went on the wire.
    pub capture: aws_support::capture::CaptureProxy,
    /// The emulator's attachments: `<volume id>.img` per volume (`slipway_aws::FileMap`).
    pub device_dir: std::path::PathBuf,
    /// The SDK configuration of the test's own clients (EBS direct reads).
    pub sdk: aws_config::SdkConfig,
}

impl Env {
    /// The fleet talks to the emulator through the recording proxy (which also makes moto
    /// accept EC2's form of ModifyInstanceAttribute's user data, see `capture.rs`); the
    /// test's own client talks to it directly.
    pub async fn start() -> Env {
        let (guard, moto) = aws_support::moto::exclusive().await;
        let sdk = aws_support::test_sdk(&moto.endpoint()).await;
        let ec2 = aws_sdk_ec2::Client::new(&sdk);
        let capture = aws_support::capture::CaptureProxy::start(moto.port).await;
        let mut fleet = Fleet::new(&aws_support::test_sdk(&capture.endpoint).await);
        fleet.poll_interval = Duration::from_millis(10);
        fleet.wait_timeout = Duration::from_secs(20);
        // The emulator's instances run no server: tests that need one set a probe.
        fleet.settings_probe = None;
        let net = aws_support::staging_network(&ec2).await;
        let (staging, target, sg) = (net.staging_subnet, net.target_subnet, net.security_group);
        Env {
            _guard: guard,
            ec2,
            fleet,
            subnet: staging,
            target_subnet: target,
            sg,
            dir: tempfile::tempdir().unwrap(),
            disks: BTreeMap::new(),
            capture,
            device_dir: moto.device_dir.clone(),
            sdk,
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

    /// [`Env::template`] with `launch_extra` appended to its `[launch]` section (e.g.
    /// `[launch.sources.<id>]` tables).
    pub fn template_with_launch(&self, n: usize, launch_extra: &str) -> Template {
        let _ = self.template(n, "");
        let p = self.dir.path().join("template.toml");
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str(launch_extra);
        std::fs::write(&p, text).unwrap();
        slipway_fleet::template::load(&p).unwrap_or_else(|e| panic!("{e}"))
    }

    /// An unattached replica volume of `source`/`disk`, tagged as the server tags them.
    pub async fn replica_volume(&self, source: &str, disk: &str) -> String {
        let tags = [
            (slipway_aws::tags::SOURCE_ID, source),
            (slipway_aws::tags::DISK_ID, disk),
            (slipway_aws::tags::ROLE, slipway_aws::tags::ROLE_REPLICA),
            (slipway_aws::tags::SERVER, "wave1-0"),
        ];
        self.ec2
            .create_volume()
            .availability_zone(ZONE)
            .size(8)
            .tag_specifications(spec(ResourceType::Volume, &tags))
            .send()
            .await
            .unwrap()
            .volume_id()
            .unwrap()
            .to_string()
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

    /// A tagged replica volume of `source`/`disk` attached to `instance` at `device` (the
    /// server's identity volume took the last free name).
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

    /// Every identity volume (`slipway:role = identity`) that is not deleted.
    pub async fn identity_volumes(&self) -> Vec<aws_sdk_ec2::types::Volume> {
        self.ec2
            .describe_volumes()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("tag:slipway:role")
                    .values("identity")
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .volumes()
            .to_vec()
    }

    /// The identity volume of server `index`, with the instance it is attached to.
    pub async fn identity_of(&self, index: u32) -> (String, Option<String>) {
        let vols: Vec<_> = self
            .identity_volumes()
            .await
            .into_iter()
            .filter(|v| aws_support::tag_map(v.tags())["slipway:server-index"] == index.to_string())
            .collect();
        assert_eq!(
            vols.len(),
            1,
            "one identity volume for server {index}: {vols:?}"
        );
        (
            vols[0].volume_id().unwrap().to_string(),
            vols[0]
                .attachments()
                .first()
                .and_then(|a| a.instance_id())
                .map(str::to_string),
        )
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
    aws_support::tag_map(i.tags())
}

/// A settings probe answering what a test says each instance runs with (`None`: no answer).
#[derive(Debug, Default)]
pub struct FakeProbe {
    pub running: std::sync::Mutex<BTreeMap<String, String>>,
}

impl slipway_fleet::SettingsProbe for FakeProbe {
    fn running_settings<'a>(
        &'a self,
        _t: &'a Template,
        s: &'a slipway_fleet::ServerState,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send + 'a>> {
        let r = self.running.lock().unwrap().get(&s.instance_id).cloned();
        Box::pin(async move { r })
    }
}
