//! The assignment planner: which replication server each source's disks live on. A pure
//! function of the template's sources, the assignments recorded on the running servers and the
//! capacity; no AWS, no clock.
//!
//! Rules, in order:
//! 1. **Stable.** A source stays on the server it is recorded on as long as that server keeps
//!    room for it (its disks, counted in recorded order, fit `max_disks`; dedicated: it is the
//!    server's first source). A source that no longer fits (its disk count grew, or the
//!    capacity shrank) is *moved*.
//! 2. **Fill before launching.** Moved sources, then new sources in template order, go to the
//!    lowest-index server with room (first fit); only if none has room is a server added, with
//!    the lowest index no current server uses.
//! 3. **Retire only what is empty.** A current server left with no source is retired; servers
//!    are never emptied to consolidate (that would move sources that fit).
//!
//! The same inputs always give the same plan.

use std::collections::{BTreeMap, BTreeSet};

/// A source and the number of disks it replicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceDemand {
    pub id: String,
    pub disks: u32,
}

impl SourceDemand {
    pub fn new(id: impl Into<String>, disks: u32) -> Self {
        SourceDemand {
            id: id.into(),
            disks,
        }
    }
}

/// A server as it stands, with the sources recorded on it (in recorded order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentServer {
    pub index: u32,
    pub sources: Vec<SourceDemand>,
}

/// Where the sources go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Disks per shared server.
    pub max_disks: u32,
    /// One source per server.
    pub dedicated: bool,
}

/// One server of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedServer {
    pub index: u32,
    /// Sources assigned, kept ones first in their recorded order, then those added.
    pub sources: Vec<SourceDemand>,
    /// Not among the current servers: to be launched.
    pub launch: bool,
}

impl PlannedServer {
    pub fn disks(&self) -> u32 {
        self.sources.iter().map(|s| s.disks).sum()
    }
}

/// A source that changes server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub source: String,
    pub from: u32,
    pub to: u32,
}

/// The outcome: the servers after the change and what it takes to get there.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Every server that remains or is launched, by index.
    pub servers: Vec<PlannedServer>,
    /// Current servers left empty: to be terminated.
    pub retire: Vec<u32>,
    /// Sources whose volumes move between servers.
    pub moves: Vec<Move>,
    /// New sources and the server each goes to.
    pub added: Vec<(String, u32)>,
    /// Sources no longer in the template, and the server they leave.
    pub removed: Vec<(String, u32)>,
}

impl Plan {
    /// Indices of the servers to launch.
    pub fn launches(&self) -> Vec<u32> {
        self.servers
            .iter()
            .filter(|s| s.launch)
            .map(|s| s.index)
            .collect()
    }

    /// The server a source is assigned to.
    pub fn server_of(&self, source: &str) -> Option<u32> {
        self.servers
            .iter()
            .find(|s| s.sources.iter().any(|d| d.id == source))
            .map(|s| s.index)
    }

    /// Whether carrying out the plan changes nothing.
    pub fn is_noop(&self) -> bool {
        self.retire.is_empty()
            && self.moves.is_empty()
            && self.added.is_empty()
            && self.removed.is_empty()
            && self.servers.iter().all(|s| !s.launch)
    }
}

fn fits(server: &PlannedServer, disks: u32, cap: Capacity) -> bool {
    if cap.dedicated {
        server.sources.is_empty()
    } else {
        server.disks() + disks <= cap.max_disks
    }
}

/// Plans the assignment of `sources` (the template, in its order) given the `current` servers.
pub fn plan(sources: &[SourceDemand], current: &[CurrentServer], cap: Capacity) -> Plan {
    let wanted: BTreeMap<&str, u32> = sources.iter().map(|s| (s.id.as_str(), s.disks)).collect();
    let mut current: Vec<&CurrentServer> = current.iter().collect();
    current.sort_by_key(|c| c.index);

    let mut out = Plan::default();
    let mut placed: BTreeSet<String> = BTreeSet::new();
    // Sources to place, with the server they come from (a move) or none (new).
    let mut pending: Vec<(SourceDemand, Option<u32>)> = Vec::new();
    let mut servers: Vec<PlannedServer> = Vec::new();

    // 1. Keep what fits where it is.
    for c in &current {
        let mut s = PlannedServer {
            index: c.index,
            sources: Vec::new(),
            launch: false,
        };
        // Unchanged sources claim their room first, so a source whose disk count grew is the
        // one that moves, not its neighbours.
        let mut keep: Vec<(bool, SourceDemand)> = Vec::new();
        for rec in &c.sources {
            let Some(&disks) = wanted.get(rec.id.as_str()) else {
                out.removed.push((rec.id.clone(), c.index));
                continue;
            };
            if placed.contains(&rec.id) {
                // Recorded on two servers (an interrupted move): the first one keeps it.
                continue;
            }
            placed.insert(rec.id.clone());
            keep.push((disks != rec.disks, SourceDemand::new(rec.id.clone(), disks)));
        }
        let (same, changed): (Vec<_>, Vec<_>) = keep.into_iter().partition(|(c, _)| !c);
        let mut evicted = Vec::new();
        for (_, d) in same.into_iter().chain(changed) {
            if fits(&s, d.disks, cap) {
                s.sources.push(d);
            } else {
                evicted.push(d);
            }
        }
        // Keep the recorded order among those that stay.
        s.sources
            .sort_by_key(|d| c.sources.iter().position(|r| r.id == d.id));
        pending.extend(evicted.into_iter().map(|d| (d, Some(c.index))));
        servers.push(s);
    }

    // 2. Moved sources first (they already hold data), then new ones in template order.
    for src in sources {
        if !placed.contains(&src.id) {
            pending.push((src.clone(), None));
        }
    }
    let used: BTreeSet<u32> = current.iter().map(|c| c.index).collect();
    for (d, from) in pending {
        let slot = servers.iter_mut().find(|s| fits(s, d.disks, cap));
        let to = match slot {
            Some(s) => {
                s.sources.push(d.clone());
                s.index
            }
            None => {
                let index = (0..)
                    .find(|i| !used.contains(i) && !servers.iter().any(|s| s.index == *i))
                    .expect("a free index");
                servers.push(PlannedServer {
                    index,
                    sources: vec![d.clone()],
                    launch: true,
                });
                servers.sort_by_key(|s| s.index);
                index
            }
        };
        match from {
            Some(from) => out.moves.push(Move {
                source: d.id.clone(),
                from,
                to,
            }),
            None => out.added.push((d.id.clone(), to)),
        }
    }

    // 3. Retire what is left empty.
    for s in servers {
        if s.sources.is_empty() && !s.launch {
            out.retire.push(s.index);
        } else {
            out.servers.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARED: Capacity = Capacity {
        max_disks: 15,
        dedicated: false,
    };

    fn sources(n: usize, disks: u32) -> Vec<SourceDemand> {
        (0..n)
            .map(|i| SourceDemand::new(format!("src-{i:02}"), disks))
            .collect()
    }

    /// The servers as `apply` would record them after carrying out `plan`.
    fn record(plan: &Plan) -> Vec<CurrentServer> {
        plan.servers
            .iter()
            .map(|s| CurrentServer {
                index: s.index,
                sources: s.sources.clone(),
            })
            .collect()
    }

    fn loads(plan: &Plan) -> Vec<(u32, u32)> {
        plan.servers.iter().map(|s| (s.index, s.disks())).collect()
    }

    #[test]
    fn forty_single_disk_sources_need_three_servers() {
        let p = plan(&sources(40, 1), &[], SHARED);
        assert_eq!(loads(&p), [(0, 15), (1, 15), (2, 10)]);
        assert_eq!(p.launches(), [0, 1, 2]);
        assert_eq!(p.added.len(), 40);
        assert!(p.moves.is_empty() && p.retire.is_empty());
        assert_eq!(p.server_of("src-00"), Some(0));
        assert_eq!(p.server_of("src-39"), Some(2));
    }

    #[test]
    fn a_41st_source_fills_a_server_before_launching() {
        let first = plan(&sources(40, 1), &[], SHARED);
        let p = plan(&sources(41, 1), &record(&first), SHARED);
        assert!(p.launches().is_empty());
        assert_eq!(p.added, [("src-40".to_string(), 2)]);
        assert_eq!(loads(&p), [(0, 15), (1, 15), (2, 11)]);
        assert!(p.moves.is_empty());
        // Everything else stays where it was.
        for s in &first.servers {
            for d in &s.sources {
                assert_eq!(p.server_of(&d.id), Some(s.index));
            }
        }
    }

    #[test]
    fn a_second_plan_of_the_same_sources_is_a_noop() {
        let first = plan(&sources(40, 1), &[], SHARED);
        let again = plan(&sources(40, 1), &record(&first), SHARED);
        assert!(again.is_noop(), "{again:?}");
        assert_eq!(
            again.servers,
            record(&first)
                .iter()
                .map(|c| PlannedServer {
                    index: c.index,
                    sources: c.sources.clone(),
                    launch: false
                })
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn deterministic_and_first_fit_with_mixed_sizes() {
        let srcs = vec![
            SourceDemand::new("a", 10),
            SourceDemand::new("b", 10),
            SourceDemand::new("c", 5),
            SourceDemand::new("d", 3),
        ];
        let p1 = plan(&srcs, &[], SHARED);
        let p2 = plan(&srcs, &[], SHARED);
        assert_eq!(p1, p2);
        // a(10) → 0; b(10) → 1; c(5) → 0 (15); d(3) → 1 (13).
        assert_eq!(loads(&p1), [(0, 15), (1, 13)]);
        assert_eq!(p1.server_of("c"), Some(0));
        assert_eq!(p1.server_of("d"), Some(1));
    }

    #[test]
    fn dedicated_gives_each_source_its_own_server() {
        let cap = Capacity {
            max_disks: 15,
            dedicated: true,
        };
        let p = plan(&sources(3, 4), &[], cap);
        assert_eq!(loads(&p), [(0, 4), (1, 4), (2, 4)]);
        let p2 = plan(&sources(4, 4), &record(&p), cap);
        assert_eq!(p2.launches(), [3]);
        assert_eq!(p2.added, [("src-03".to_string(), 3)]);
    }

    #[test]
    fn removed_sources_free_room_that_new_ones_fill_and_empty_servers_retire() {
        let first = plan(&sources(20, 1), &[], SHARED);
        assert_eq!(loads(&first), [(0, 15), (1, 5)]);
        // Drop src-15..src-19 (all of server 1) and src-00; add two new sources.
        let mut next: Vec<SourceDemand> = sources(15, 1).into_iter().skip(1).collect();
        next.push(SourceDemand::new("new-a", 1));
        next.push(SourceDemand::new("new-b", 1));
        let p = plan(&next, &record(&first), SHARED);
        assert_eq!(p.removed.len(), 6);
        // new-a fills server 0 again; new-b goes to the (now empty) server 1, not a new one.
        assert_eq!(
            p.added,
            [("new-a".to_string(), 0), ("new-b".to_string(), 1)]
        );
        assert!(p.retire.is_empty());
        assert_eq!(loads(&p), [(0, 15), (1, 1)]);
        assert!(p.launches().is_empty());
        assert!(p.moves.is_empty());
        // Without new sources, the emptied server retires.
        let p = plan(&sources(15, 1), &record(&first), SHARED);
        assert_eq!(p.retire, [1]);
        assert_eq!(loads(&p), [(0, 15)]);
    }

    #[test]
    fn a_grown_source_moves_and_the_others_stay() {
        let first = plan(&sources(15, 1), &[], SHARED);
        let mut grown = sources(15, 1);
        grown[3].disks = 4; // server 0 would hold 18
        let p = plan(&grown, &record(&first), SHARED);
        assert_eq!(
            p.moves,
            [Move {
                source: "src-03".into(),
                from: 0,
                to: 1
            }]
        );
        assert_eq!(p.launches(), [1]);
        assert_eq!(loads(&p), [(0, 14), (1, 4)]);
    }

    #[test]
    fn new_servers_take_the_lowest_free_index() {
        // Server 1 was retired earlier: 0 and 2 remain, both full.
        let current = vec![
            CurrentServer {
                index: 0,
                sources: sources(15, 1)[..15].to_vec(),
            },
            CurrentServer {
                index: 2,
                sources: vec![SourceDemand::new("x", 15)],
            },
        ];
        let mut srcs = sources(15, 1);
        srcs.push(SourceDemand::new("x", 15));
        srcs.push(SourceDemand::new("y", 2));
        let p = plan(&srcs, &current, SHARED);
        assert_eq!(p.launches(), [1]);
        assert_eq!(p.added, [("y".to_string(), 1)]);
    }

    #[test]
    fn a_source_recorded_twice_stays_on_the_first_server() {
        let current = vec![
            CurrentServer {
                index: 0,
                sources: vec![SourceDemand::new("a", 1)],
            },
            CurrentServer {
                index: 1,
                sources: vec![SourceDemand::new("a", 1), SourceDemand::new("b", 1)],
            },
        ];
        let p = plan(
            &[SourceDemand::new("a", 1), SourceDemand::new("b", 1)],
            &current,
            SHARED,
        );
        assert_eq!(p.server_of("a"), Some(0));
        assert_eq!(p.server_of("b"), Some(1));
        assert!(p.moves.is_empty() && p.retire.is_empty());
    }
}
