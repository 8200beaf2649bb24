//! `tollgate-proxy policy test DIR`: runs every `test_*` rule in `*_test.rego` files (like
//! `opa test`) and the YAML scenario bank under `DIR/scenarios/` (input → expected decision
//! and reasons), with line coverage of the policy modules.

mod rego_tests;
mod scenarios;

use std::fmt;
use std::path::{Path, PathBuf};

/// One test result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaseResult {
    /// `file: rule` or `scenario file: name`.
    pub name: String,
    /// Passed?
    pub passed: bool,
    /// Why it failed.
    pub message: String,
}

/// Line coverage of one policy file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileCoverage {
    /// File.
    pub path: String,
    /// Lines evaluated.
    pub covered: usize,
    /// Lines never evaluated.
    pub not_covered: usize,
}

/// The whole run.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Results in order.
    pub cases: Vec<CaseResult>,
    /// Coverage per non-test module.
    pub coverage: Vec<FileCoverage>,
}

impl Report {
    /// Count of passed cases.
    pub fn passed(&self) -> usize {
        self.cases.iter().filter(|c| c.passed).count()
    }
    /// Count of failed cases.
    pub fn failed(&self) -> usize {
        self.cases.len() - self.passed()
    }
    /// Overall line coverage in percent.
    pub fn coverage_percent(&self) -> f64 {
        let (c, n) = self
            .coverage
            .iter()
            .fold((0, 0), |(c, n), f| (c + f.covered, n + f.not_covered));
        if c + n == 0 {
            100.0
        } else {
            c as f64 * 100.0 / (c + n) as f64
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.cases {
            if c.passed {
                writeln!(f, "PASS {}", c.name)?;
            } else {
                writeln!(f, "FAIL {}: {}", c.name, c.message)?;
            }
        }
        writeln!(f, "coverage:")?;
        for cov in &self.coverage {
            let total = cov.covered + cov.not_covered;
            let pct = if total == 0 {
                100.0
            } else {
                cov.covered as f64 * 100.0 / total as f64
            };
            writeln!(
                f,
                "  {:<40} {:>5.1}% ({} of {} lines)",
                cov.path, pct, cov.covered, total
            )?;
        }
        writeln!(f, "total coverage {:.1}%", self.coverage_percent())?;
        writeln!(f, "{} passed, {} failed", self.passed(), self.failed())
    }
}

/// The policy and test files of a directory (recursive, sorted).
pub fn collect(dir: &Path) -> std::io::Result<(Vec<PathBuf>, Vec<PathBuf>, Vec<PathBuf>)> {
    let (mut modules, mut tests, mut scenarios) = (Vec::new(), Vec::new(), Vec::new());
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if p.is_dir() {
                stack.push(p);
            } else if name.ends_with("_test.rego") {
                tests.push(p);
            } else if name.ends_with(".rego") {
                modules.push(p);
            } else if (name.ends_with(".yaml") || name.ends_with(".yml"))
                && p.parent()
                    .and_then(|x| x.file_name())
                    .is_some_and(|x| x == "scenarios")
            {
                scenarios.push(p);
            }
        }
    }
    modules.sort();
    tests.sort();
    scenarios.sort();
    Ok((modules, tests, scenarios))
}

/// Run all tests and scenarios in `dir`.
pub fn run(dir: &Path) -> anyhow::Result<Report> {
    let (modules, tests, scenarios) = collect(dir)?;
    if modules.is_empty() {
        anyhow::bail!("no .rego policy modules under {}", dir.display());
    }
    let read = |p: &PathBuf| -> anyhow::Result<(String, String)> {
        Ok((p.display().to_string(), std::fs::read_to_string(p)?))
    };
    let modules: Vec<(String, String)> = modules.iter().map(read).collect::<anyhow::Result<_>>()?;
    let tests: Vec<(String, String)> = tests.iter().map(read).collect::<anyhow::Result<_>>()?;
    let mut report = Report::default();
    let coverage = rego_tests::run(&modules, &tests, &mut report.cases)?;
    for s in &scenarios {
        scenarios::run(s, &modules, &mut report.cases)?;
    }
    report.coverage = coverage;
    Ok(report)
}

#[cfg(test)]
mod tests;
