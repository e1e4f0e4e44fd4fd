//! The launch lifecycle against the emulator: the state walk, `terminate` (images
//! deregistered, converted snapshots deleted, a restore point's own snapshots kept), `finalize`
//! (refused before a cutover, keeps the chosen restore points, idempotent) and per-source
//! launch settings.
//!
//! What moto cannot judge: it launches an instance from a deregistered image without a word
//! (EC2 refuses), so the tests check which images are still registered rather than relying on
//! a failed RunInstances. Deleting a snapshot that a registered image maps is refused, as on
//! EC2, by the tests' launcher (`crates/aws/tests/moto_server.py`), so an image deregistered
//! after its snapshots' deletion fails the tests as it would on a real account.

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_sdk_ec2::types::{BlockDeviceMapping, EbsBlockDevice, Filter, ResourceType};
use slipway_fleet::{
    Conversion, ConvertOn, FinalizeRequest, FleetError, LaunchMode, LaunchRequest, LifecycleState,
    TerminateRequest,
};

use crate::support::{aws_support, spec, tags_of, Env};

fn req(source: &str, mode: LaunchMode, rp: Option<&str>) -> LaunchRequest {
    LaunchRequest {
        source: source.into(),
        mode,
        restore_point: rp.map(str::to_string),
        // The emulator's snapshots hold no disk to convert: see `converted_image` for the
        // converted case.
        conversion: Conversion::Skip,
    }
}

fn terminate(source: &str) -> TerminateRequest {
    TerminateRequest {
        source: source.into(),
        instance: None,
        cutover: false,
    }
}

fn finalize(source: &str, keep: &[&str]) -> FinalizeRequest {
    FinalizeRequest {
        source: source.into(),
        keep: keep.iter().map(|s| s.to_string()).collect(),
    }
}

async fn state(env: &Env, t: &slipway_fleet::Template, source: &str) -> LifecycleState {
    let s = env.fleet.lifecycle(t, Some(source)).await.unwrap();
    assert_eq!(s.sources.len(), 1);
    s.sources[0].state
}

/// Whether `image` is registered (not deregistered).
async fn registered(env: &Env, image: &str) -> bool {
    env.ec2
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("image-id").values(image).build())
        .send()
        .await
        .unwrap()
        .images()
        .iter()
        .any(|i| i.state().map(|s| s.as_str()) != Some("deregistered"))
}

/// The tags of each snapshot that still exists, by id.
async fn snapshots(env: &Env) -> BTreeMap<String, BTreeMap<String, String>> {
    env.ec2
        .describe_snapshots()
        .owner_ids("self")
        .send()
        .await
        .unwrap()
        .snapshots()
        .iter()
        .map(|s| {
            (
                s.snapshot_id().unwrap().to_string(),
                aws_support::tag_map(s.tags()),
            )
        })
        .collect()
}

async fn volume_tags(env: &Env, volume: &str) -> BTreeMap<String, String> {
    let out = env
        .ec2
        .describe_volumes()
        .volume_ids(volume)
        .send()
        .await
        .unwrap();
    aws_support::tag_map(out.volumes()[0].tags())
}

async fn instance_state(env: &Env, id: &str) -> String {
    env.instances()
        .await
        .into_iter()
        .find(|i| i.instance_id() == Some(id))
        .and_then(|i| {
            i.state()
                .and_then(|s| s.name())
                .map(|n| n.as_str().to_string())
        })
        .unwrap()
}

/// What a converted launch of `rp` leaves behind, made by hand (the emulator's snapshots hold
/// no disk to convert): one converted snapshot per disk, tagged as `convert.rs` tags them, and
/// the image registered from them under the converted name with the tags a launch puts on
/// it. A launch with conversion then finds it again by name and reuses it, as a second launch
/// of a restore point does. Returns (image, converted snapshots).
async fn converted_image(
    env: &Env,
    source: &str,
    rp: &str,
    rp_snaps: &BTreeMap<String, String>,
) -> (String, Vec<String>) {
    let mut converted = Vec::new();
    let mut mappings = Vec::new();
    let mut devices = ["/dev/sda1", "/dev/sdf", "/dev/sdg"].into_iter();
    for (disk, from) in rp_snaps {
        let vol = env
            .ec2
            .create_volume()
            .availability_zone(crate::support::ZONE)
            .size(10)
            .send()
            .await
            .unwrap()
            .volume_id()
            .unwrap()
            .to_string();
        let tags = [
            ("slipway:role", "converted"),
            ("slipway:source-id", source),
            ("slipway:disk-id", disk.as_str()),
            ("slipway:restore-point", rp),
            ("slipway:template", "wave1"),
            ("slipway:converted-from", from.as_str()),
        ];
        let snap = env
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
        mappings.push(
            BlockDeviceMapping::builder()
                .device_name(devices.next().unwrap())
                .ebs(
                    EbsBlockDevice::builder()
                        .snapshot_id(&snap)
                        .volume_size(10)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        );
        converted.push(snap);
    }
    let image = env
        .ec2
        .register_image()
        .name(format!("slipway-wave1-{source}-{rp}-converted"))
        .root_device_name("/dev/sda1")
        .architecture(aws_sdk_ec2::types::ArchitectureValues::X8664)
        .virtualization_type("hvm")
        .set_block_device_mappings(Some(mappings))
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_string();
    env.ec2
        .create_tags()
        .resources(&image)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("slipway:template")
                .value("wave1")
                .build(),
        )
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("slipway:source-id")
                .value(source)
                .build(),
        )
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("slipway:restore-point")
                .value(rp)
                .build(),
        )
        .send()
        .await
        .unwrap();
    (image, converted)
}

/// A launch that reuses the converted image (its `ConvertOn` is never used).
fn converted_req(env: &Env, source: &str, mode: LaunchMode, rp: &str) -> LaunchRequest {
    LaunchRequest {
        conversion: Conversion::On(ConvertOn {
            instance_id: None,
            devices: Arc::new(slipway_aws::FileMap {
                dir: env.device_dir.clone(),
            }),
            interrupt: None,
        }),
        ..req(source, mode, Some(rp))
    }
}

/// The walk of one source through MGN's states, each read back by `lifecycle`, with what each
/// command leaves in EC2.
#[tokio::test]
async fn a_source_walks_from_not_ready_to_cutover_complete() {
    let env = Env::start().await;
    let t = env.template(2, "");
    let vol = env.replica_volume("src-00", "disk0").await;

    assert_eq!(state(&env, &t, "src-00").await, LifecycleState::NotReady);
    let rp1 = env.restore_point("src-00", "rp-1", 1_000, &["disk0"]).await;
    env.restore_point("src-00", "rp-2", 2_000, &["disk0"]).await;
    let status = env.fleet.lifecycle(&t, None).await.unwrap();
    let s0 = &status.sources[0];
    assert_eq!(
        (s0.source.as_str(), s0.state),
        ("src-00", LifecycleState::ReadyForTesting)
    );
    assert_eq!(s0.newest_restore_point.as_deref(), Some("rp-2"));
    // The other source has no restore point.
    assert_eq!(status.sources[1].state, LifecycleState::NotReady);

    // Finalize is refused before a cutover, saying the state.
    let e = env
        .fleet
        .finalize(&t, &finalize("src-00", &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            FleetError::WrongState {
                state: LifecycleState::ReadyForTesting,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().starts_with("source src-00 is ready-for-testing: only a source with a live cutover instance can be finalized"), "{e}");

    let test = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Test, Some("rp-1")))
        .await
        .unwrap();
    let s = env.fleet.lifecycle(&t, Some("src-00")).await.unwrap();
    assert_eq!(s.sources[0].state, LifecycleState::TestInProgress);
    assert_eq!(s.sources[0].live_launches.len(), 1);
    assert_eq!(s.sources[0].live_launches[0].instance_id, test.instance_id);
    assert_eq!(s.sources[0].live_launches[0].image_id, test.image_id);
    assert!(s.to_string().contains(&test.instance_id), "{s}");
    let e = env
        .fleet
        .finalize(&t, &finalize("src-00", &[]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is test-in-progress"), "{e}");

    let r = env
        .fleet
        .terminate_launches(&t, &terminate("src-00"))
        .await
        .unwrap();
    assert_eq!(r.terminated, std::slice::from_ref(&test.instance_id));
    assert_eq!(r.images.deregistered, std::slice::from_ref(&test.image_id));
    assert_eq!(r.recorded_on, std::slice::from_ref(&vol));
    assert_eq!(r.state, LifecycleState::ReadyForCutover);
    assert_eq!(instance_state(&env, &test.instance_id).await, "terminated");
    assert!(!registered(&env, &test.image_id).await);
    assert_eq!(
        volume_tags(&env, &vol).await["slipway:lifecycle"],
        "ready-for-cutover"
    );
    assert_eq!(
        state(&env, &t, "src-00").await,
        LifecycleState::ReadyForCutover
    );
    let e = env
        .fleet
        .finalize(&t, &finalize("src-00", &[]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is ready-for-cutover"), "{e}");

    let cut = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Cutover, Some("rp-1")))
        .await
        .unwrap();
    assert_eq!(
        state(&env, &t, "src-00").await,
        LifecycleState::CutoverInProgress
    );
    // A plain terminate does not end a cutover.
    let e = env
        .fleet
        .terminate_launches(&t, &terminate("src-00"))
        .await
        .unwrap_err();
    assert!(matches!(e, FleetError::CutoverInstance { .. }), "{e}");
    let e = env
        .fleet
        .terminate_launches(
            &t,
            &TerminateRequest {
                instance: Some(cut.instance_id.clone()),
                ..terminate("src-00")
            },
        )
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("is the cutover instance of source src-00"),
        "{e}"
    );
    assert_eq!(instance_state(&env, &cut.instance_id).await, "running");

    let f = env
        .fleet
        .finalize(&t, &finalize("src-00", &[]))
        .await
        .unwrap();
    assert!(!f.already_finalized);
    assert_eq!(f.kept, ["rp-1"]);
    assert_eq!(f.snapshots_tagged, [rp1["disk0"].clone()]);
    assert_eq!(f.recorded_on, std::slice::from_ref(&vol));
    assert_eq!(f.images.deregistered, std::slice::from_ref(&cut.image_id));
    assert_eq!(
        f.cutover_instance.as_deref(),
        Some(cut.instance_id.as_str())
    );
    assert_eq!(
        state(&env, &t, "src-00").await,
        LifecycleState::CutoverComplete
    );
    assert_eq!(instance_state(&env, &cut.instance_id).await, "running");
    assert!(!registered(&env, &cut.image_id).await);
    let snaps = snapshots(&env).await;
    assert_eq!(snaps[&rp1["disk0"]]["slipway:keep"], "cutover-finalized");
    assert_eq!(
        volume_tags(&env, &vol).await["slipway:lifecycle"],
        "cutover-complete"
    );
    // The restore point not kept is not tagged.
    let rp2 = env.fleet.restore_points("src-00").await.unwrap();
    assert_eq!(
        rp2.iter()
            .map(|r| (r.id.as_str(), r.keep.as_deref()))
            .collect::<Vec<_>>(),
        [("rp-1", Some("cutover-finalized")), ("rp-2", None)]
    );

    // Idempotent: a second run says so and changes nothing.
    let again = env
        .fleet
        .finalize(&t, &finalize("src-00", &[]))
        .await
        .unwrap();
    assert!(again.already_finalized && !again.changed(), "{again:?}");
    assert!(
        again
            .to_string()
            .contains("src-00 is already finalized (kept: rp-1); nothing to do"),
        "{again}"
    );
    assert_eq!(snapshots(&env).await, snaps);
    // A finalized source is launched no more, and its instances are not Slipway's to end.
    let e = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Test, None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is cutover-complete"), "{e}");
    let e = env
        .fleet
        .terminate_launches(
            &t,
            &TerminateRequest {
                cutover: true,
                ..terminate("src-00")
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("is cutover-complete"), "{e}");
    assert_eq!(instance_state(&env, &cut.instance_id).await, "running");
}

/// Terminate deregisters both kinds of image a launch makes and deletes the converted
/// snapshots, but never a restore point's own snapshots (an unconverted image maps them).
#[tokio::test]
async fn terminate_deletes_converted_snapshots_but_never_a_restore_points() {
    let env = Env::start().await;
    let t = env.template(1, "");
    env.replica_volume("src-00", "disk0").await;
    let rp1 = env
        .restore_point("src-00", "rp-1", 1_000, &["disk0", "disk1"])
        .await;
    let rp2 = env
        .restore_point("src-00", "rp-2", 2_000, &["disk0", "disk1"])
        .await;
    let (conv_image, conv_snaps) = converted_image(&env, "src-00", "rp-2", &rp2).await;

    let plain = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Test, Some("rp-1")))
        .await
        .unwrap();
    let conv = env
        .fleet
        .launch(&t, &converted_req(&env, "src-00", LaunchMode::Test, "rp-2"))
        .await
        .unwrap();
    assert!(conv.reused_image && conv.converted);
    assert_eq!(conv.image_id, conv_image);

    let r = env
        .fleet
        .terminate_launches(&t, &terminate("src-00"))
        .await
        .unwrap();
    let mut terminated = r.terminated.clone();
    terminated.sort();
    let mut want = vec![plain.instance_id.clone(), conv.instance_id.clone()];
    want.sort();
    assert_eq!(terminated, want);
    let mut deregistered = r.images.deregistered.clone();
    deregistered.sort();
    let mut want = vec![plain.image_id.clone(), conv_image.clone()];
    want.sort();
    assert_eq!(deregistered, want);
    assert!(!registered(&env, &plain.image_id).await);
    assert!(!registered(&env, &conv_image).await);

    let left = snapshots(&env).await;
    for s in &conv_snaps {
        assert!(
            !left.contains_key(s),
            "converted snapshot {s} left: {left:?}"
        );
    }
    let mut deleted = r.images.snapshots_deleted.clone();
    deleted.sort();
    let mut want = conv_snaps.clone();
    want.sort();
    assert_eq!(deleted, want);
    for s in rp1.values().chain(rp2.values()) {
        assert!(left.contains_key(s), "restore point snapshot {s} deleted");
    }
    let rps = env.fleet.restore_points("src-00").await.unwrap();
    assert!(rps.iter().all(|r| r.completed() && r.disks.len() == 2));
    // Run again: nothing live, nothing registered; it only records the state again.
    let again = env
        .fleet
        .terminate_launches(&t, &terminate("src-00"))
        .await
        .unwrap();
    assert!(again.terminated.is_empty() && again.images.deregistered.is_empty());
    assert_eq!(again.state, LifecycleState::ReadyForCutover);
}

/// An image stays registered while a live instance boots from it: two tests of one restore
/// point share an image; ending one keeps it, ending the other deregisters it. A cutover of
/// the restore point a test used reuses the test's image, which its termination of the test
/// must not deregister; a cutover of another restore point deregisters the test's image.
#[tokio::test]
async fn an_image_in_use_is_kept() {
    let env = Env::start().await;
    let t = env.template(2, "");
    let vol = env.replica_volume("src-00", "disk0").await;
    env.restore_point("src-00", "rp-1", 1_000, &["disk0"]).await;
    env.restore_point("src-01", "rp-a", 1_000, &["disk0"]).await;
    let rp_b = env.restore_point("src-01", "rp-b", 2_000, &["disk0"]).await;

    let a = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Test, Some("rp-1")))
        .await
        .unwrap();
    let b = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Test, Some("rp-1")))
        .await
        .unwrap();
    assert_eq!(a.image_id, b.image_id);
    let r = env
        .fleet
        .terminate_launches(
            &t,
            &TerminateRequest {
                instance: Some(a.instance_id.clone()),
                ..terminate("src-00")
            },
        )
        .await
        .unwrap();
    assert_eq!(r.terminated, std::slice::from_ref(&a.instance_id));
    assert!(r.images.deregistered.is_empty(), "{r:?}");
    assert!(r.images.kept[0].reason.contains(&b.instance_id), "{r:?}");
    assert!(registered(&env, &a.image_id).await);
    // Still testing: the other test instance is live, and nothing is recorded yet.
    assert_eq!(r.state, LifecycleState::TestInProgress);
    assert_eq!(r.still_live, std::slice::from_ref(&b.instance_id));
    assert!(r.recorded_on.is_empty());
    assert!(!volume_tags(&env, &vol)
        .await
        .contains_key("slipway:lifecycle"));

    // The cutover of rp-1 boots from the image the test used.
    let cut = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Cutover, Some("rp-1")))
        .await
        .unwrap();
    assert_eq!(cut.terminated, std::slice::from_ref(&b.instance_id));
    assert_eq!(cut.image_id, b.image_id);
    assert!(registered(&env, &cut.image_id).await);
    assert_eq!(instance_state(&env, &b.instance_id).await, "terminated");

    // Another source: its cutover is of a newer restore point than its test.
    let test = env
        .fleet
        .launch(&t, &req("src-01", LaunchMode::Test, Some("rp-a")))
        .await
        .unwrap();
    let cut = env
        .fleet
        .launch(&t, &req("src-01", LaunchMode::Cutover, Some("rp-b")))
        .await
        .unwrap();
    assert_eq!(cut.terminated, std::slice::from_ref(&test.instance_id));
    assert_ne!(cut.image_id, test.image_id);
    assert!(!registered(&env, &test.image_id).await);
    assert!(registered(&env, &cut.image_id).await);
    // The cutover's restore point is kept out of the server's policy while it runs.
    let snaps = snapshots(&env).await;
    for s in rp_b.values() {
        assert_eq!(
            snaps[s].get("slipway:keep").map(String::as_str),
            Some("cutover"),
            "{s}"
        );
    }

    // Rolling the cutover back deregisters its image and leaves the source ready for cutover.
    let r = env
        .fleet
        .terminate_launches(
            &t,
            &TerminateRequest {
                cutover: true,
                ..terminate("src-01")
            },
        )
        .await
        .unwrap();
    assert_eq!(r.terminated, std::slice::from_ref(&cut.instance_id));
    assert!(!registered(&env, &cut.image_id).await);
    // ...and gives its restore point back to the policy.
    let snaps = snapshots(&env).await;
    for s in rp_b.values() {
        assert!(!snaps[s].contains_key("slipway:keep"), "{s}");
    }
}

/// `--keep` adds restore points to the one the cutover was launched from; each must exist; a
/// finalize whose run was cut short after the keep tags completes on the next run.
#[tokio::test]
async fn finalize_keeps_the_chosen_restore_points() {
    let env = Env::start().await;
    let t = env.template(1, "");
    let vol = env.replica_volume("src-00", "disk0").await;
    let rp1 = env
        .restore_point("src-00", "rp-1", 1_000, &["disk0", "disk1"])
        .await;
    let rp2 = env
        .restore_point("src-00", "rp-2", 2_000, &["disk0", "disk1"])
        .await;
    let rp3 = env
        .restore_point("src-00", "rp-3", 3_000, &["disk0", "disk1"])
        .await;
    let (image, conv_snaps) = converted_image(&env, "src-00", "rp-2", &rp2).await;
    let cut = env
        .fleet
        .launch(
            &t,
            &converted_req(&env, "src-00", LaunchMode::Cutover, "rp-2"),
        )
        .await
        .unwrap();
    assert_eq!(cut.image_id, image);

    // A test launched beside the cutover would be stranded by a finalize: refused until it
    // is terminated.
    let extra = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Test, Some("rp-3")))
        .await
        .unwrap();
    let e = env
        .fleet
        .finalize(&t, &finalize("src-00", &[]))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains(&extra.instance_id) && e.to_string().contains("still live"),
        "{e}"
    );
    env.fleet
        .terminate_launches(&t, &terminate("src-00"))
        .await
        .unwrap();

    let e = env
        .fleet
        .finalize(&t, &finalize("src-00", &["rp-nope"]))
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "no restore point rp-nope of source src-00 to keep"
    );
    // Nothing was tagged by the refused run (the cutover's restore point is kept as the
    // cutover's since its launch).
    assert!(snapshots(&env).await.iter().all(|(id, t)| {
        let want = rp2.values().any(|s| s == id).then_some("cutover");
        t.get("slipway:keep").map(String::as_str) == want
    }));

    let f = env
        .fleet
        .finalize(&t, &finalize("src-00", &["rp-1"]))
        .await
        .unwrap();
    assert_eq!(f.kept, ["rp-2", "rp-1"]);
    let snaps = snapshots(&env).await;
    for s in rp1.values().chain(rp2.values()) {
        assert_eq!(
            snaps[s].get("slipway:keep").map(String::as_str),
            Some("cutover-finalized"),
            "{s}"
        );
    }
    for s in rp3.values() {
        assert!(!snaps[s].contains_key("slipway:keep"), "{s}");
    }
    // The cutover's image and its converted snapshots are gone; its instance runs on.
    assert!(!registered(&env, &image).await);
    for s in &conv_snaps {
        assert!(!snaps.contains_key(s), "{s}");
    }
    assert_eq!(instance_state(&env, &cut.instance_id).await, "running");
    let s = env.fleet.lifecycle(&t, Some("src-00")).await.unwrap();
    assert_eq!(s.sources[0].kept_restore_points, ["rp-1", "rp-2"]);
    assert!(s.to_string().contains("cutover-complete"), "{s}");

    // A run cut short after the keep tags: the volume record is missing. The next run
    // completes it and says the source was already finalized.
    env.ec2
        .delete_tags()
        .resources(&vol)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("slipway:lifecycle")
                .build(),
        )
        .send()
        .await
        .unwrap();
    let again = env
        .fleet
        .finalize(&t, &finalize("src-00", &[]))
        .await
        .unwrap();
    assert!(again.already_finalized && again.changed());
    assert_eq!(again.recorded_on, std::slice::from_ref(&vol));
    assert_eq!(
        volume_tags(&env, &vol).await["slipway:lifecycle"],
        "cutover-complete"
    );
    let third = env
        .fleet
        .finalize(&t, &finalize("src-00", &["rp-1"]))
        .await
        .unwrap();
    assert!(!third.changed());
    let e = env
        .fleet
        .finalize(&t, &finalize("src-00", &["rp-3"]))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("already finalized, keeping rp-1, rp-2"),
        "{e}"
    );
}

/// `[launch.sources.<id>]` overrides the defaults for that source only; its tags are merged
/// over `[launch] tags`.
#[tokio::test]
async fn a_sources_launch_settings_override_the_template_defaults() {
    let env = Env::start().await;
    let t = env.template_with_launch(
        2,
        &format!(
            "[launch.sources.src-01]\ninstance_type = \"c5.large\"\nsubnet = \"{}\"\n\
             tags = {{ Environment = \"db\", Tier = \"data\" }}\nprivate_ip = \"10.0.1.77\"\n",
            env.subnet
        ),
    );
    env.restore_point("src-00", "rp-1", 1_000, &["disk0"]).await;
    env.restore_point("src-01", "rp-9", 1_000, &["disk0"]).await;
    let a = env
        .fleet
        .launch(&t, &req("src-00", LaunchMode::Test, None))
        .await
        .unwrap();
    let b = env
        .fleet
        .launch(&t, &req("src-01", LaunchMode::Test, None))
        .await
        .unwrap();
    let by_id: BTreeMap<String, aws_sdk_ec2::types::Instance> = env
        .instances()
        .await
        .into_iter()
        .map(|i| (i.instance_id().unwrap().to_string(), i))
        .collect();
    let (ia, ib) = (&by_id[&a.instance_id], &by_id[&b.instance_id]);
    assert_eq!(ia.instance_type().unwrap().as_str(), "m5.xlarge");
    assert_eq!(ia.subnet_id(), Some(env.target_subnet.as_str()));
    assert_eq!(tags_of(ia)["Environment"], "migrated");
    assert_eq!(ib.instance_type().unwrap().as_str(), "c5.large");
    assert_eq!(ib.subnet_id(), Some(env.subnet.as_str()));
    assert_eq!(ib.private_ip_address(), Some("10.0.1.77"));
    let tb = tags_of(ib);
    assert_eq!(
        (tb["Environment"].as_str(), tb["Tier"].as_str()),
        ("db", "data")
    );
    assert_eq!(tb["slipway:source-id"], "src-01");
}
