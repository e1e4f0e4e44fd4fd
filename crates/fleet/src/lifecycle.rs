//! Where a source is in its launch lifecycle, as AWS MGN shows it: `not-ready`,
//! `ready-for-testing`, `test-in-progress`, `ready-for-cutover`, `cutover-in-progress`,
//! `cutover-complete`.
//!
//! Why derived and not stored: EC2 tags are the fleet's only state, and most of the lifecycle
//! is already written there by what happened (restore points, launched instances and their
//! states, the `slipway:keep` tag the server obeys). A stored state would disagree with those
//! the moment an instance is terminated from the console. Only what leaves no other trace is
//! recorded: that the tests were *ended* (`slipway launch terminate`) is the
//! `slipway:lifecycle = ready-for-cutover` tag on the source's replica volumes, and a finalize
//! writes `cutover-complete` there too (for people reading tags; [`derive`] goes by the
//! restore points' `slipway:keep`, which is what the server goes by).
//!
//! [`derive`] is a pure function of [`Facts`], unit tested over every combination. Precedence,
//! first match wins:
//!
//! 1. **cutover-complete**: a restore point of the source carries
//!    `slipway:keep = cutover-finalized`. Finalized wins over everything: the server has stopped
//!    replicating the source, whatever instances exist (the cutover instance is the customer's
//!    now; a test instance launched later does not reopen the lifecycle).
//! 2. **cutover-in-progress**: a live cutover instance (pending, running, stopping, stopped).
//!    A live cutover beats a live test: the cutover is the step that matters, and `launch
//!    --mode cutover` terminates the test instances anyway.
//! 3. **test-in-progress**: a live test instance.
//! 4. **not-ready**: no completed restore point (nothing to launch from). After the launch
//!    rules, so a live instance whose restore points were pruned is still shown.
//! 5. **ready-for-cutover**: the replica volumes record `ready-for-cutover` (tests ended through
//!    `slipway launch terminate`, or a cutover rolled back with `--cutover`).
//! 6. **ready-for-testing**: everything else (a completed restore point, nothing launched, or
//!    test instances terminated behind Slipway's back, which proves nothing was tested).

use std::fmt;

use serde::Serialize;

/// A source's launch lifecycle state (see the module doc for how it is derived).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LifecycleState {
    NotReady,
    ReadyForTesting,
    TestInProgress,
    ReadyForCutover,
    CutoverInProgress,
    CutoverComplete,
}

impl LifecycleState {
    pub fn as_str(self) -> &'static str {
        match self {
            LifecycleState::NotReady => "not-ready",
            LifecycleState::ReadyForTesting => "ready-for-testing",
            LifecycleState::TestInProgress => "test-in-progress",
            LifecycleState::ReadyForCutover => "ready-for-cutover",
            LifecycleState::CutoverInProgress => "cutover-in-progress",
            LifecycleState::CutoverComplete => "cutover-complete",
        }
    }
}

impl fmt::Display for LifecycleState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the lifecycle commands record on the replica volumes (`slipway:lifecycle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Recorded {
    /// `slipway launch terminate` ended the tests (or rolled a cutover back).
    ReadyForCutover,
    /// `slipway cutover finalize` ran.
    CutoverComplete,
}

impl Recorded {
    /// The tag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Recorded::ReadyForCutover => "ready-for-cutover",
            Recorded::CutoverComplete => "cutover-complete",
        }
    }

    /// The record of a set of replica volumes' tag values: the furthest one (the commands tag
    /// every volume in one call, so they disagree only if that call was cut short); unknown
    /// values are ignored.
    pub fn of<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<Recorded> {
        values
            .into_iter()
            .filter_map(|v| match v {
                "ready-for-cutover" => Some(Recorded::ReadyForCutover),
                "cutover-complete" => Some(Recorded::CutoverComplete),
                _ => None,
            })
            .max()
    }
}

/// One launched instance as the lifecycle sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launched {
    pub cutover: bool,
    /// Not terminated nor shutting down ([`is_live`]).
    pub live: bool,
}

/// Whether an instance in EC2 state `state` still counts as a launch (pending, running,
/// stopping, stopped); `shutting-down` and `terminated` are on their way out.
pub fn is_live(state: &str) -> bool {
    !matches!(state, "shutting-down" | "terminated")
}

/// Everything [`derive`] looks at, read from EC2 by the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The source has a restore point whose snapshots are all completed.
    pub completed_restore_point: bool,
    /// The source's launches, any state.
    pub launches: Vec<Launched>,
    /// The replica volumes' `slipway:lifecycle`.
    pub recorded: Option<Recorded>,
    /// A restore point of the source carries `slipway:keep = cutover-finalized`.
    pub finalized: bool,
}

/// The source's state (precedence in the module doc).
pub fn derive(f: &Facts) -> LifecycleState {
    let live = |cutover: bool| f.launches.iter().any(|l| l.live && l.cutover == cutover);
    if f.finalized {
        LifecycleState::CutoverComplete
    } else if live(true) {
        LifecycleState::CutoverInProgress
    } else if live(false) {
        LifecycleState::TestInProgress
    } else if !f.completed_restore_point {
        LifecycleState::NotReady
    } else if f.recorded.is_some() {
        // `cutover-complete` on the volumes without a kept restore point: someone removed the
        // keep tag, and the server replicates the source again; it can be cut over again.
        LifecycleState::ReadyForCutover
    } else {
        LifecycleState::ReadyForTesting
    }
}

/// What to do next in `state` (the hint of status lines and refusals).
pub fn next_step(state: LifecycleState) -> &'static str {
    match state {
        LifecycleState::NotReady => {
            "wait for the source's first restore point (`slipway restore-points list`)"
        }
        LifecycleState::ReadyForTesting => "launch a test instance: `slipway launch --mode test`",
        LifecycleState::TestInProgress => {
            "check the test instance, then end the test with `slipway launch terminate`"
        }
        LifecycleState::ReadyForCutover => "launch the cutover: `slipway launch --mode cutover`",
        LifecycleState::CutoverInProgress => {
            "check the cutover instance, then `slipway cutover finalize` (or roll back with `slipway launch terminate --cutover`)"
        }
        LifecycleState::CutoverComplete => "nothing: the source is finalized",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LifecycleState as S;

    /// Every combination of the inputs: completed restore point or not, finalized or not,
    /// each record, and launch sets of up to one instance per (mode, live).
    #[test]
    fn every_combination_follows_the_documented_precedence() {
        let kinds = [
            Launched {
                cutover: false,
                live: false,
            },
            Launched {
                cutover: false,
                live: true,
            },
            Launched {
                cutover: true,
                live: false,
            },
            Launched {
                cutover: true,
                live: true,
            },
        ];
        let mut seen = std::collections::BTreeSet::new();
        for mask in 0u32..16 {
            let launches: Vec<Launched> = kinds
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << i) != 0)
                .map(|(_, l)| *l)
                .collect();
            for completed in [false, true] {
                for finalized in [false, true] {
                    for recorded in [
                        None,
                        Some(Recorded::ReadyForCutover),
                        Some(Recorded::CutoverComplete),
                    ] {
                        let f = Facts {
                            completed_restore_point: completed,
                            launches: launches.clone(),
                            recorded,
                            finalized,
                        };
                        let live_cut = launches.iter().any(|l| l.live && l.cutover);
                        let live_test = launches.iter().any(|l| l.live && !l.cutover);
                        let want = if finalized {
                            S::CutoverComplete
                        } else if live_cut {
                            S::CutoverInProgress
                        } else if live_test {
                            S::TestInProgress
                        } else if !completed {
                            S::NotReady
                        } else if recorded.is_some() {
                            S::ReadyForCutover
                        } else {
                            S::ReadyForTesting
                        };
                        assert_eq!(derive(&f), want, "{f:?}");
                        seen.insert(want);
                    }
                }
            }
        }
        assert_eq!(seen.len(), 6, "every state is reachable: {seen:?}");
    }

    #[test]
    fn the_walk_of_a_migration() {
        let test = |live| Launched {
            cutover: false,
            live,
        };
        let cut = |live| Launched {
            cutover: true,
            live,
        };
        let mut f = Facts::default();
        assert_eq!(derive(&f), S::NotReady);
        f.completed_restore_point = true;
        assert_eq!(derive(&f), S::ReadyForTesting);
        f.launches = vec![test(true)];
        assert_eq!(derive(&f), S::TestInProgress);
        // Terminated from the console: nothing says the test was ended on purpose.
        f.launches = vec![test(false)];
        assert_eq!(derive(&f), S::ReadyForTesting);
        f.recorded = Some(Recorded::ReadyForCutover);
        assert_eq!(derive(&f), S::ReadyForCutover);
        f.launches.push(cut(true));
        assert_eq!(derive(&f), S::CutoverInProgress);
        // A test launched beside the cutover does not hide it.
        f.launches.push(test(true));
        assert_eq!(derive(&f), S::CutoverInProgress);
        f.finalized = true;
        f.recorded = Some(Recorded::CutoverComplete);
        assert_eq!(derive(&f), S::CutoverComplete);
        // The cutover instance is the customer's now: terminating it changes nothing.
        f.launches = vec![cut(false)];
        assert_eq!(derive(&f), S::CutoverComplete);
    }

    #[test]
    fn the_record_is_the_furthest_known_value() {
        assert_eq!(Recorded::of([]), None);
        assert_eq!(Recorded::of(["", "bogus"]), None);
        assert_eq!(
            Recorded::of(["ready-for-cutover", ""]),
            Some(Recorded::ReadyForCutover)
        );
        assert_eq!(
            Recorded::of(["cutover-complete", "ready-for-cutover"]),
            Some(Recorded::CutoverComplete)
        );
    }

    #[test]
    fn live_means_not_on_its_way_out() {
        for s in ["pending", "running", "stopping", "stopped"] {
            assert!(is_live(s), "{s}");
        }
        for s in ["shutting-down", "terminated"] {
            assert!(!is_live(s), "{s}");
        }
    }

    #[test]
    fn names_are_mgns_and_serialise_as_shown() {
        for s in [
            S::NotReady,
            S::ReadyForTesting,
            S::TestInProgress,
            S::ReadyForCutover,
            S::CutoverInProgress,
            S::CutoverComplete,
        ] {
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert_eq!(Recorded::ReadyForCutover.as_str(), "ready-for-cutover");
    }
}
