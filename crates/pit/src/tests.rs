//! The policy driven by a fake clock: a scheduler loop over simulated weeks, checked at every
//! step against the rules restated naively, plus the edge cases (gaps, a clock stepped back,
//! on-demand points, ties, extreme values).

use std::collections::BTreeSet;
use std::time::Duration;

use super::*;

const MIN: u64 = 60;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;
const WEEK: u64 = 7 * DAY;

/// 2023-11-14 22:13:20 UTC: not aligned to any default slot.
const START: u64 = 1_700_000_000;

fn policy(tiers: &[(u64, u32)]) -> PitPolicy {
    PitPolicy::new(
        tiers
            .iter()
            .map(|&(every, keep)| Tier::new(Duration::from_secs(every), keep))
            .collect(),
    )
    .unwrap()
}

fn scheduled(t: u64) -> RestorePoint {
    RestorePoint {
        id: format!("s{t}"),
        taken_at: t,
        scheduled: true,
    }
}

fn on_demand(t: u64) -> RestorePoint {
    RestorePoint {
        id: format!("o{t}"),
        taken_at: t,
        scheduled: false,
    }
}

fn ids(points: &[u64]) -> Vec<String> {
    points.iter().map(|t| format!("s{t}")).collect()
}

/// The retention rules restated naively, over every scheduled point ever taken (`history`):
/// walk each tier's window slot by slot and look up the oldest point in it; add the newest
/// point and the points stamped after `now`.
fn wanted(policy: &PitPolicy, now: u64, history: &BTreeSet<u64>) -> BTreeSet<u64> {
    let mut wanted = BTreeSet::new();
    for tier in policy.tiers() {
        let every = tier.every.as_secs();
        let current = now / every;
        for back in 0..u64::from(tier.keep) {
            let Some(slot) = current.checked_sub(back) else {
                break;
            };
            let start = slot * every;
            let end = (start + every - 1).min(now);
            wanted.extend(history.range(start..=end).next());
        }
    }
    wanted.extend(history.last());
    if now < u64::MAX {
        wanted.extend(history.range(now + 1..));
    }
    wanted
}

/// A scheduler and its restore points under a fake clock.
struct Sim {
    policy: PitPolicy,
    now: u64,
    points: Vec<RestorePoint>,
    /// `taken_at` of every scheduled point ever taken, pruned or not.
    history: BTreeSet<u64>,
    pruned_total: usize,
}

impl Sim {
    fn new(policy: PitPolicy, start: u64) -> Sim {
        Sim {
            policy,
            now: start,
            points: Vec::new(),
            history: BTreeSet::new(),
            pruned_total: 0,
        }
    }

    fn take(&mut self) {
        let point = scheduled(self.now);
        assert!(
            !self.points.iter().any(|p| p.id == point.id),
            "two points at {}",
            self.now
        );
        self.history.insert(self.now);
        self.points.push(point);
    }

    fn take_on_demand(&mut self) {
        self.points.push(on_demand(self.now));
    }

    fn due(&self) -> bool {
        self.policy.due(self.now, &self.points)
    }

    fn scheduled_times(&self) -> BTreeSet<u64> {
        self.points
            .iter()
            .filter(|p| p.scheduled)
            .map(|p| p.taken_at)
            .collect()
    }

    fn on_demand_count(&self) -> usize {
        self.points.iter().filter(|p| !p.scheduled).count()
    }

    /// Asks for a prune plan, checks what must hold for any input, and applies it.
    fn prune(&mut self) -> Vec<String> {
        let plan = self.policy.plan_prune(self.now, &self.points);

        let mut shuffled = self.points.clone();
        shuffled.reverse();
        let third = shuffled.len() / 3;
        shuffled.rotate_left(third);
        assert_eq!(
            plan,
            self.policy.plan_prune(self.now, &shuffled),
            "input order changed the answer"
        );

        let newest = self
            .points
            .iter()
            .filter(|p| p.scheduled)
            .max_by(|a, b| (a.taken_at, &a.id).cmp(&(b.taken_at, &b.id)))
            .map(|p| p.id.clone());
        let mut previous = None;
        for id in &plan {
            let p = self
                .points
                .iter()
                .find(|p| &p.id == id)
                .expect("unknown id");
            assert!(p.scheduled, "pruned on-demand point {id}");
            assert!(p.taken_at <= self.now, "pruned future point {id}");
            assert_ne!(Some(id), newest.as_ref(), "pruned the newest point");
            assert!(previous <= Some(p.taken_at), "plan not oldest first");
            previous = Some(p.taken_at);
        }

        let on_demand_before = self.on_demand_count();
        self.points.retain(|p| !plan.contains(&p.id));
        self.pruned_total += plan.len();
        assert_eq!(self.on_demand_count(), on_demand_before);

        let bound: u64 = self.policy.tiers().iter().map(|t| u64::from(t.keep)).sum();
        let kept_past = self.scheduled_times().range(..=self.now).count() as u64;
        assert!(
            kept_past <= bound + 1,
            "{kept_past} points kept, bound {bound} + 1"
        );
        plan
    }

    /// With a clock that never goes back: the survivors are exactly what the rules ask for over
    /// the full history. So nothing the policy wants now was pruned before (pruning never
    /// regrets), and nothing it does not want survived.
    fn check_against_history(&self) {
        assert_eq!(
            self.scheduled_times(),
            wanted(&self.policy, self.now, &self.history),
            "at {}",
            self.now
        );
    }

    /// How many of `tier`'s window slots hold a scheduled point.
    fn covered(&self, tier: &Tier) -> u64 {
        let (first, current) = tier.window(self.now);
        let times = self.scheduled_times();
        let slots: BTreeSet<u64> = times
            .range(..=self.now)
            .map(|t| t / tier.every.as_secs())
            .filter(|s| (first..=current).contains(s))
            .collect();
        slots.len() as u64
    }

    /// Whether `tier`'s whole window lies at or after the slot of the first point.
    fn warmed_up(&self, tier: &Tier) -> bool {
        let first_point = *self.history.first().unwrap();
        tier.window(self.now).0 >= first_point / tier.every.as_secs()
    }

    /// Every warmed-up tier has a point in each of its `keep` window slots.
    fn check_steady(&self) -> bool {
        let mut all = true;
        for tier in self.policy.tiers() {
            if self.warmed_up(tier) {
                assert_eq!(
                    self.covered(tier),
                    u64::from(tier.keep),
                    "tier {tier:?} at {}",
                    self.now
                );
            } else {
                all = false;
            }
        }
        all
    }
}

/// The scheduler loop from the brief: sleep until `next_due`, take, prune. Three weeks of the
/// default policy, checked at every step.
#[test]
fn defaults_three_weeks_jumping_to_next_due() {
    let mut sim = Sim::new(PitPolicy::default(), START);
    let end = START + 3 * WEEK;
    let mut steps = 0u64;
    let mut steady_steps = 0;
    loop {
        let previous = sim.now;
        sim.now = sim.policy.next_due(sim.now, &sim.points);
        if sim.now > end {
            break;
        }
        assert!(sim.due());
        if steps > 0 {
            // The first 10-minute boundary after the previous point, and not due before it.
            assert_eq!(sim.now, (previous / (10 * MIN) + 1) * 10 * MIN);
            assert!(!sim.policy.due(sim.now - 1, &sim.points));
        }
        sim.take();
        let just_taken = format!("s{}", sim.now);
        assert!(!sim.due());
        if steps.is_multiple_of(97) {
            sim.now += 1;
            sim.take_on_demand();
        }
        let plan = sim.prune();
        assert!(!plan.contains(&just_taken), "pruned the point just taken");
        sim.check_against_history();
        if sim.check_steady() {
            // 6 + 24 + 7, less the current hour's first point (also one of the last six
            // ten-minute points) and the current day's first point (also one of the last 24
            // hourly points).
            assert_eq!(sim.scheduled_times().len(), 35, "at {}", sim.now);
            steady_steps += 1;
        }
        steps += 1;
    }
    assert_eq!(steps, (end - START) / (10 * MIN) + 1);
    assert!(steady_steps > 2 * WEEK / (10 * MIN), "{steady_steps}");
    assert_eq!(sim.on_demand_count() as u64, steps.div_ceil(97));
    assert!(sim.pruned_total as u64 > steps - 40);
}

/// The same scheduler woken every minute instead: points are taken exactly at the 10-minute
/// boundaries, `next_due` is stable until then, and pruning every minute changes nothing the
/// rules would not.
#[test]
fn defaults_minute_clock() {
    let mut sim = Sim::new(PitPolicy::default(), 20_000 * DAY);
    let end = sim.now + 2 * DAY;
    let mut next = sim.now;
    while sim.now <= end {
        assert_eq!(sim.policy.next_due(sim.now, &sim.points), next);
        if sim.due() {
            assert_eq!(sim.now, next);
            assert_eq!(sim.now % (10 * MIN), 0);
            sim.take();
            next = sim.now + 10 * MIN;
        }
        sim.prune();
        sim.check_against_history();
        sim.check_steady();
        sim.now += MIN;
    }
    assert_eq!(sim.history.len() as u64, 2 * DAY / (10 * MIN) + 1);
    // Two days in: the ten-minute and hourly tiers are full, the daily one has three days.
    assert_eq!(sim.covered(&sim.policy.tiers()[2]), 3);
}

#[test]
fn short_tiers_by_hand() {
    let p = policy(&[(2, 3), (10, 2)]);
    let points: Vec<RestorePoint> = (0..=36).step_by(2).map(scheduled).collect();
    // At 37: 2s slots 16, 17, 18 keep 32, 34, 36; 10s slots 2 and 3 keep 20 and 30.
    let plan = p.plan_prune(37, &points);
    let mut expected: Vec<u64> = (0..=18).step_by(2).collect();
    expected.extend([22, 24, 26, 28]);
    assert_eq!(plan, ids(&expected));
    // At 40 slot 4 opens, empty: 2s keeps 36 (slot 18), 10s keeps 30; 36 is also the newest.
    let plan = p.plan_prune(40, &points);
    assert_eq!(plan.len(), points.len() - 2);
    assert!(p.due(40, &points));
    assert!(!p.due(37, &points));
    assert_eq!(p.next_due(37, &points), 38);
}

#[test]
fn short_tiers_second_clock() {
    let mut sim = Sim::new(policy(&[(2, 3), (10, 2)]), 1_000_001);
    let mut steady = 0;
    for _ in 0..3600 {
        if sim.due() {
            sim.take();
        }
        sim.prune();
        sim.check_against_history();
        if sim.check_steady() {
            steady += 1;
            // 3 + 2 points, less the current 10 s slot's first point while it is one of the
            // last three 2 s points.
            let expected = if sim.now % 10 < 6 { 4 } else { 5 };
            assert_eq!(sim.scheduled_times().len(), expected, "at {}", sim.now);
        }
        sim.now += 1;
    }
    assert!(steady > 3500);
}

/// Random clocks, a source that is not always able to take a point, stray extra points,
/// on-demand points, long gaps and pruning that runs only now and then. After every prune the
/// survivors must be exactly what the rules ask for over the full history.
#[test]
fn randomized_schedules_follow_the_rules() {
    let configs: [&[(u64, u32)]; 5] = [
        &[(2, 3), (10, 2)],
        &[(1, 1)],
        &[(3, 2), (6, 1), (30, 4)],
        &[(5, 1), (10, 1), (20, 1)],
        &[(1, 5), (4, 3), (8, 2), (64, 3)],
    ];
    let mut rng = Rng(0x5eed);
    for tiers in configs {
        for _ in 0..8 {
            let mut sim = Sim::new(policy(tiers), rng.below(1_000_000));
            for _ in 0..400 {
                sim.now += match rng.below(20) {
                    0 => rng.below(500),
                    _ => 1 + rng.below(6),
                };
                if sim.due() && rng.below(10) < 8 {
                    sim.take();
                } else if rng.below(20) == 0 && !sim.history.contains(&sim.now) {
                    // A stray scheduled point in an already-filled slot.
                    sim.take();
                }
                if rng.below(15) == 0 {
                    sim.take_on_demand();
                }
                if rng.below(3) == 0 {
                    sim.prune();
                    sim.check_against_history();
                }
            }
            sim.prune();
            sim.check_against_history();
        }
    }
}

/// The kept set does not depend on how often pruning runs.
#[test]
fn pruning_rarely_keeps_the_same_points() {
    let mut often = Sim::new(policy(&[(2, 3), (10, 2), (60, 3)]), 7);
    let mut rarely = Sim::new(often.policy.clone(), 7);
    for step in 0..2000 {
        for sim in [&mut often, &mut rarely] {
            if sim.due() {
                sim.take();
            }
        }
        often.prune();
        if step % 500 == 499 {
            rarely.prune();
            assert_eq!(often.scheduled_times(), rarely.scheduled_times());
        }
        often.now += 1;
        rarely.now += 1;
    }
}

/// The server is down for five hours: on return a point is due at once, and pruning removes
/// the ten-minute points the gap made stale without reaching back for replacements.
#[test]
fn gap_of_five_hours() {
    let day0 = 20_000 * DAY;
    let mut sim = Sim::new(PitPolicy::default(), day0);
    let last_before = day0 + 2 * DAY + 3 * HOUR + 50 * MIN;
    while sim.now <= last_before {
        sim.now = sim.policy.next_due(sim.now, &sim.points);
        sim.take();
        sim.prune();
        sim.now += 1;
    }
    assert_eq!(*sim.history.last().unwrap(), last_before);

    sim.now = day0 + 2 * DAY + 8 * HOUR + 57 * MIN;
    assert!(sim.due());
    assert_eq!(sim.policy.next_due(sim.now, &sim.points), sim.now);

    // Pruning before the new point: the hourly points 04:00-08:00 of yesterday leave the
    // 24-hour window and the ten-minute points of 03:10-03:40 the one-hour window; 03:50 stays
    // as the newest; hourly points 09:00 yesterday .. 03:00 today (19) and the daily points of
    // day 0 and day 1 (today's is 00:00, also an hourly one) stay.
    let plan = sim.prune();
    let yesterday = day0 + DAY;
    let today = day0 + 2 * DAY + 3 * HOUR;
    let mut expected: Vec<u64> = (4..=8).map(|h| yesterday + h * HOUR).collect();
    expected.extend((1..=4).map(|m| today + m * 10 * MIN));
    assert_eq!(plan, ids(&expected));
    sim.check_against_history();
    assert_eq!(sim.scheduled_times().len(), 19 + 2 + 1);

    sim.take();
    let plan = sim.prune();
    assert_eq!(plan, ids(&[last_before]));
    sim.check_against_history();
    let [ten_minutes, hourly, daily] = [0, 1, 2].map(|i| sim.covered(&sim.policy.tiers()[i]));
    assert_eq!((ten_minutes, hourly, daily), (1, 20, 3));
    assert_eq!(sim.scheduled_times().len(), 19 + 2 + 1);

    // A day later the hourly tier is whole again, the hours of the gap having left its window.
    let end = sim.now + DAY;
    while sim.now < end {
        sim.now = sim.policy.next_due(sim.now, &sim.points);
        sim.take();
        sim.prune();
        sim.check_against_history();
    }
    assert_eq!(sim.covered(&sim.policy.tiers()[1]), 24);
}

/// The source cannot take points for ten days while the server keeps pruning: every window
/// empties, but the last restore point and the on-demand ones remain.
#[test]
fn long_outage_keeps_the_last_point() {
    let mut sim = Sim::new(PitPolicy::default(), START);
    while sim.now < START + 8 * DAY {
        sim.now = sim.policy.next_due(sim.now, &sim.points);
        sim.take();
        if sim.now % DAY < 10 * MIN {
            sim.take_on_demand();
        }
        sim.prune();
    }
    let last = *sim.history.last().unwrap();
    let on_demand = sim.on_demand_count();
    assert_eq!(on_demand, 8);
    while sim.now < last + 10 * DAY {
        sim.now += HOUR;
        sim.prune();
        sim.check_against_history();
    }
    assert_eq!(sim.scheduled_times(), BTreeSet::from([last]));
    assert_eq!(sim.on_demand_count(), on_demand);
    assert!(sim.due());
}

/// The clock steps back: future points are kept, nothing panics, points keep being taken, and
/// once the clock is past everything the steady state returns.
#[test]
fn clock_going_backwards() {
    let mut sim = Sim::new(policy(&[(2, 3), (10, 2)]), 1000);
    while sim.now <= 1100 {
        if sim.due() {
            sim.take();
        }
        sim.prune();
        sim.now += 1;
    }
    let before: BTreeSet<u64> = sim.scheduled_times();

    sim.now = 900;
    assert!(sim.prune().is_empty(), "every point is in the future");
    assert_eq!(sim.scheduled_times(), before);
    assert!(sim.due());
    sim.take();
    assert!(sim.prune().is_empty());

    while sim.now <= 1300 {
        if sim.due() {
            sim.take();
        }
        for id in sim.prune() {
            let t: u64 = id[1..].parse().unwrap();
            assert!(t <= sim.now);
        }
        sim.now += 1;
    }
    assert!(sim.check_steady());
    assert!(sim.scheduled_times().len() <= 5);
}

#[test]
fn future_points_alone() {
    let p = PitPolicy::default();
    let points = [scheduled(5000), scheduled(9000), on_demand(7000)];
    assert!(p.plan_prune(100, &points).is_empty());
    assert!(p.due(100, &points));
    assert_eq!(p.next_due(100, &points), 100);

    // Later fine slots already filled (after a step back) push `next_due` past them.
    let p = policy(&[(2, 3)]);
    let points: Vec<RestorePoint> = [999, 1000, 1002, 1004, 1008].map(scheduled).into();
    assert!(!p.due(999, &points));
    assert_eq!(p.next_due(999, &points), 1006);
}

#[test]
fn on_demand_points_are_neither_counted_nor_pruned() {
    let p = policy(&[(10, 1)]);
    // An on-demand point does not satisfy the current slot...
    let points = [scheduled(0), on_demand(101)];
    assert!(p.due(105, &points));
    assert_eq!(p.next_due(105, &points), 105);
    // ...is not the newest point: the old scheduled one survives as the last restore point...
    assert!(p.plan_prune(105, &points).is_empty());
    // ...and is never pruned however old, while an old scheduled point is.
    let points = [on_demand(0), scheduled(1), scheduled(100)];
    assert_eq!(p.plan_prune(105, &points), ids(&[1]));
    // An on-demand point does not make a slot's scheduled point any less the oldest.
    let points = [
        on_demand(100),
        scheduled(101),
        scheduled(102),
        scheduled(103),
    ];
    assert_eq!(p.plan_prune(105, &points), ids(&[102]));
}

#[test]
fn ties_and_duplicate_ids() {
    let p = policy(&[(10, 1)]);
    let named = |id: &str, t: u64, scheduled: bool| RestorePoint {
        id: id.into(),
        taken_at: t,
        scheduled,
    };
    // Same time: the smaller id is the slot's oldest; the newest is the last by (time, id).
    let points = [
        named("c", 1, true),
        named("b", 0, true),
        named("a", 0, true),
    ];
    assert_eq!(p.plan_prune(5, &points), ["b"]);
    let mut reversed = points.to_vec();
    reversed.reverse();
    assert_eq!(p.plan_prune(5, &reversed), ["b"]);

    // An id shared with a kept or on-demand point is never returned; a repeated one only once.
    let points = [
        named("x", 0, true),
        named("x", 8, true),
        named("y", 1, true),
        named("y", 2, false),
        named("z", 3, true),
        named("z", 4, true),
        named("k", 7, true),
    ];
    // At 9: slot 0's oldest is "x"@0 and the newest is "x"@8; "y"@1 shares its id with an
    // on-demand point; "z" goes once.
    assert_eq!(p.plan_prune(9, &points), ["z", "k"]);
    // At 15 slot 0 left the window: "x"@0 is no longer kept but shares its id with the newest.
    assert_eq!(p.plan_prune(15, &points), ["z", "k"]);
}

#[test]
fn empty_and_extreme_inputs() {
    let p = PitPolicy::default();
    assert!(p.due(0, &[]));
    assert_eq!(p.next_due(0, &[]), 0);
    assert!(p.plan_prune(u64::MAX, &[]).is_empty());

    let p = policy(&[(1, u32::MAX)]);
    let points = [scheduled(0), scheduled(u64::MAX)];
    assert!(!p.due(u64::MAX, &points));
    assert_eq!(p.next_due(u64::MAX, &points), u64::MAX);
    assert_eq!(p.plan_prune(u64::MAX, &points), ids(&[0]));
    assert!(p.plan_prune(0, &points).is_empty());

    let p = policy(&[(u64::MAX / 2, 1), (u64::MAX / 2 * 2, 3)]);
    let points = [scheduled(u64::MAX - 1)];
    assert!(!p.due(u64::MAX - 1, &points));
    assert_eq!(p.next_due(u64::MAX - 1, &points), u64::MAX);
    assert!(p.plan_prune(u64::MAX, &points).is_empty());
}

/// splitmix64: a tiny deterministic generator, so the randomized test needs no dependency and
/// always runs the same cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
