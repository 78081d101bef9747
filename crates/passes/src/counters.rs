//! Counters: named event counts keyed by `(pass, name)`, the data tests assert on.

use std::collections::BTreeMap;
use std::fmt;

/// Event counts keyed by `(pass, name)`, e.g. `("fuse-conv-batch-norm", "matched") = 20`
/// or `("fuse-conv-batch-norm", "skipped.interior_value_has_external_users") = 1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    counts: BTreeMap<(String, String), u64>,
}

impl Counters {
    /// Empty counters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `n` to `(pass, name)`.
    pub fn add(&mut self, pass: &str, name: &str, n: u64) {
        *self.counts.entry((pass.to_string(), name.to_string())).or_default() += n;
    }

    /// The count of `(pass, name)`, 0 when never counted.
    pub fn get(&self, pass: &str, name: &str) -> u64 {
        self.counts
            .get(&(pass.to_string(), name.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// All counts of one pass, by name.
    pub fn of_pass(&self, pass: &str) -> BTreeMap<String, u64> {
        self.counts
            .iter()
            .filter(|((p, _), _)| p == pass)
            .map(|((_, name), n)| (name.clone(), *n))
            .collect()
    }

    /// Every `((pass, name), count)`, sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, u64)> {
        self.counts.iter().map(|((p, n), c)| (p.as_str(), n.as_str(), *c))
    }

    /// Adds every count of `other` into `self`.
    pub fn merge(&mut self, other: &Counters) {
        for (pass, name, n) in other.iter() {
            self.add(pass, name, n);
        }
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

impl fmt::Display for Counters {
    /// One `pass.name = count` line per counter.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (pass, name, n) in self.iter() {
            writeln!(f, "{pass}.{name} = {n}")?;
        }
        Ok(())
    }
}

/// The counters of one pass: what a [`crate::Pass`] is handed to record into.
#[derive(Debug)]
pub struct PassCounters<'a> {
    counters: &'a mut Counters,
    pass: &'a str,
}

impl<'a> PassCounters<'a> {
    /// Counters scoped to `pass`.
    pub fn new(counters: &'a mut Counters, pass: &'a str) -> Self {
        Self { counters, pass }
    }

    /// Adds one to `name`.
    pub fn bump(&mut self, name: &str) {
        self.add(name, 1);
    }

    /// Adds `n` to `name`.
    pub fn add(&mut self, name: &str, n: u64) {
        tracing::debug!(pass = self.pass, counter = name, n, "count");
        self.counters.add(self.pass, name, n);
    }

    /// The current count of `name` for this pass.
    pub fn get(&self, name: &str) -> u64 {
        self.counters.get(self.pass, name)
    }
}
