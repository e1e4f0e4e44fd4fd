//! Collected results and the docs/benchmarks.md they become.

use std::fmt::Write as _;

use crate::util::Stat;

/// One row of the table of targets.
pub struct TargetRow {
    pub id: String,
    pub what: String,
    pub measured: String,
    pub target: String,
    pub verdict: String,
}

/// One raw figure: median with min and max over n runs.
pub struct RawRow {
    pub id: String,
    pub what: String,
    pub stat: Option<Stat>,
    pub unit: String,
    pub prec: usize,
}

#[derive(Default)]
pub struct Report {
    pub targets: Vec<TargetRow>,
    pub raw: Vec<RawRow>,
    pub notes: Vec<(String, String)>,
    pub commands: Vec<(String, String)>,
    pub profile: Vec<String>,
    pub machine: Vec<(String, String)>,
    pub header: Vec<String>,
    /// Whole sections of their own (heading, markdown body), e.g. scenario 8's.
    pub sections: Vec<(String, String)>,
}

/// "1.23 [1.10–1.40]" or "n/a".
pub fn fmt_stat(s: Option<Stat>, prec: usize) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{:.p$} [{:.p$}–{:.p$}]", s.median, s.min, s.max, p = prec),
        Some(s) => format!("{:.p$} (1 run)", s.median, p = prec),
        None => "n/a".into(),
    }
}

impl Report {
    pub fn target(
        &mut self,
        id: &str,
        what: &str,
        measured: String,
        target: &str,
        verdict: String,
    ) {
        self.targets.push(TargetRow {
            id: id.into(),
            what: what.into(),
            measured,
            target: target.into(),
            verdict,
        });
    }

    pub fn raw(&mut self, id: &str, what: &str, stat: Option<Stat>, unit: &str, prec: usize) {
        self.raw.push(RawRow {
            id: id.into(),
            what: what.into(),
            stat,
            unit: unit.into(),
            prec,
        });
    }

    pub fn note(&mut self, id: &str, text: impl Into<String>) {
        self.notes.push((id.into(), text.into()));
    }

    /// Records a command line once per (scenario, first word + role) key.
    pub fn command(&mut self, id: &str, line: String) {
        if !self.commands.iter().any(|(i, l)| i == id && l == &line) {
            self.commands.push((id.into(), line));
        }
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "# Benchmarks\n");
        let _ = writeln!(
            s,
            "Written by `make bench` (crates/bench, binary `slipway-bench`); do not edit by hand — \
             run it again. Every figure is the median of the runs, with [min–max] beside it; a \
             ratio is computed run by run from a pair measured back to back in the same \
             invocation, then its median taken. Benchmarks are not tests: nothing here fails \
             `make test`.\n"
        );
        for h in &self.header {
            let _ = writeln!(s, "{h}");
        }
        let _ = writeln!(s, "\n## Results against the targets of issue 7\n");
        let _ = writeln!(
            s,
            "| # | what | measured: median [min–max] | target | verdict |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|");
        for r in &self.targets {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                r.id, r.what, r.measured, r.target, r.verdict
            );
        }
        let _ = writeln!(s, "\n## Raw medians\n");
        let _ = writeln!(s, "| # | what | median | min | max | runs | unit |");
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---|");
        for r in &self.raw {
            match r.stat {
                Some(st) => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | {:.p$} | {:.p$} | {:.p$} | {} | {} |",
                        r.id,
                        r.what,
                        st.median,
                        st.min,
                        st.max,
                        st.n,
                        r.unit,
                        p = r.prec
                    );
                }
                None => {
                    let _ = writeln!(s, "| {} | {} | n/a | | | 0 | {} |", r.id, r.what, r.unit);
                }
            }
        }
        if !self.profile.is_empty() {
            let _ = writeln!(s, "\n## Where the time goes (scenario 1, profiled)\n");
            for l in &self.profile {
                let _ = writeln!(s, "{l}");
            }
        }
        for (title, body) in &self.sections {
            let _ = writeln!(s, "\n## {title}\n");
            let _ = writeln!(s, "{}", body.trim_end());
        }
        if !self.notes.is_empty() {
            let _ = writeln!(s, "\n## Notes per scenario\n");
            for (id, n) in &self.notes {
                let _ = writeln!(s, "- **{id}** — {n}");
            }
        }
        let _ = writeln!(s, "\n## Machine\n");
        let _ = writeln!(s, "| | |");
        let _ = writeln!(s, "|---|---|");
        for (k, v) in &self.machine {
            let _ = writeln!(s, "| {k} | {v} |");
        }
        let _ = writeln!(s, "\n## Commands\n");
        let _ = writeln!(
            s,
            "Exactly as run (paths of the run's scratch directory; `$TOKEN`/`$FP` stand for the \
             token and certificate fingerprint of that run).\n"
        );
        let mut last = String::new();
        for (id, c) in &self.commands {
            if *id != last {
                let _ = writeln!(s, "\n{id}:\n");
                last = id.clone();
            }
            let _ = writeln!(s, "    {c}");
        }
        s
    }
}
