//! The PIT policy driving the real snapshot store over simulated weeks: a fake clock, a disk
//! image that changes between restore points, pruning exactly as the scheduler does it. After
//! every prune, each surviving restore point must verify and export to the image it was taken
//! from — pruning must never break a survivor.

use std::collections::HashMap;

use rand::{Rng, RngCore, SeedableRng};
use slipway_pit::{PitPolicy, RestorePoint, Tier};
use slipway_store::changes::ChangeMap;
use slipway_store::snapshot::{DiskShape, Manifest, SnapshotStore};

const BLOCK: u64 = 512 * 1024;

#[test]
fn pruning_over_simulated_weeks_never_breaks_a_survivor() {
    let d = tempfile::tempdir().unwrap();
    let store = SnapshotStore::new(d.path());
    let size = 24 * BLOCK;
    let policy = PitPolicy::new(vec![
        Tier::new(std::time::Duration::from_secs(600), 6),
        Tier::new(std::time::Duration::from_secs(3600), 24),
        Tier::new(std::time::Duration::from_secs(86400), 7),
    ])
    .unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let mut image = vec![0u8; size as usize];
    rng.fill_bytes(&mut image);
    let mut changes = ChangeMap::untrusted(size);
    let mut images: HashMap<String, Vec<u8>> = HashMap::new();
    let mut now: u64 = 1_700_000_000;
    let end = now + 9 * 86400;
    let (mut taken, mut pruned, mut checks) = (0, 0, 0);
    while now < end {
        let points: Vec<RestorePoint> = store
            .list(Some("s"))
            .unwrap()
            .iter()
            .map(|m| RestorePoint {
                id: m.id.clone(),
                taken_at: m.created_unix_ms / 1000,
                scheduled: true,
            })
            .collect();
        if policy.due(now, &points) {
            // The workload changed a few blocks since the last restore point.
            for _ in 0..rng.gen_range(0..4) {
                let b = rng.gen_range(0..size / BLOCK);
                let off = (b * BLOCK) as usize;
                rng.fill_bytes(&mut image[off..off + 4096]);
                changes.mark(b * BLOCK, 4096);
            }
            let parent = store.newest("s").unwrap();
            let id = format!("rp-{now}");
            let usable = changes.usable_against(parent.as_ref().map(|p| p.id.as_str()));
            let img = image.clone();
            let dm = store
                .build_disk(
                    "s",
                    DiskShape {
                        id: "d",
                        size,
                        block_size: 4096,
                    },
                    if usable {
                        parent.as_ref().and_then(|p| p.disk("d"))
                    } else {
                        None
                    },
                    |b| changes.is_changed(b),
                    |b| Ok(img[(b * BLOCK) as usize..((b + 1) * BLOCK) as usize].to_vec()),
                )
                .unwrap();
            let m = Manifest {
                format: 1,
                id: id.clone(),
                source: "s".into(),
                created_unix_ms: now * 1000,
                marker_id: now,
                trigger: "scheduled".into(),
                parent: parent.map(|p| p.id),
                size_bytes: dm.stored_bytes,
                disks: vec![dm],
                pause_ms: 0,
                remote: vec![],
                duration_ms: 0,
                consistency: None,
            };
            store.commit(&m).unwrap();
            changes = ChangeMap::new(size, Some(id.clone()));
            images.insert(id, image.clone());
            taken += 1;
        }
        let points: Vec<RestorePoint> = store
            .list(Some("s"))
            .unwrap()
            .iter()
            .map(|m| RestorePoint {
                id: m.id.clone(),
                taken_at: m.created_unix_ms / 1000,
                scheduled: true,
            })
            .collect();
        let doomed = policy.plan_prune(now, &points);
        for id in &doomed {
            store.delete(id).unwrap();
            images.remove(id);
            pruned += 1;
        }
        // Check the survivors after each prune (every survivor every simulated 6 hours, the
        // newest after every prune) — exports are the expensive part.
        if !doomed.is_empty() {
            let list = store.list(Some("s")).unwrap();
            let check: Vec<&Manifest> = if now % (6 * 3600) < 600 {
                list.iter().collect()
            } else {
                list.iter().rev().take(1).collect()
            };
            for m in check {
                let r = store.verify(m);
                assert!(r.problems.is_empty(), "{}: {:?}", m.id, r.problems);
                let out = d.path().join("export.img");
                store.export(m, "d", &out).unwrap();
                assert!(
                    std::fs::read(&out).unwrap() == images[&m.id],
                    "{} exports its image",
                    m.id
                );
                checks += 1;
            }
        }
        now = policy.next_due(now + 1, &points).max(now + 1);
    }
    let survivors = store.list(Some("s")).unwrap();
    assert!(
        taken > 1000 && pruned > 1000,
        "taken {taken}, pruned {pruned}"
    );
    assert!(
        survivors.len() <= 6 + 24 + 7 + 1,
        "{} survivors",
        survivors.len()
    );
    assert!(checks > 50, "{checks}");
    for m in &survivors {
        let out = d.path().join("export.img");
        store.export(m, "d", &out).unwrap();
        assert!(std::fs::read(&out).unwrap() == images[&m.id]);
    }
    // Nothing but what survivors reference is stored.
    assert_eq!(store.sweep("s").unwrap(), 0);
}
