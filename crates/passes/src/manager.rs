//! The pass manager: runs a pipeline, verifies after every pass, dumps IR,
//! iterates to a fixpoint on request, runs user passes at named extension
//! points, and reports what each pass did.

use crate::{
    fuse_conv_activation, fuse_conv_add, fuse_conv_add_relu, fuse_conv_batch_norm, fuse_conv_input_scale,
    fuse_conv_max_pool, fuse_conv_relu, Counters, EliminateDeadCode, Pass, PassCounters, PassError,
};
use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use wick_ir::Graph;

/// Named places in a pipeline where user passes run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtensionPoint {
    /// Before any built-in pass.
    Start,
    /// After the fusion passes, before clean-up.
    PostFusion,
    /// After everything else: the counterpart of torch.compile's
    /// `config.post_grad_custom_post_pass`.
    End,
}

impl ExtensionPoint {
    /// Kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            ExtensionPoint::Start => "start",
            ExtensionPoint::PostFusion => "post-fusion",
            ExtensionPoint::End => "end",
        }
    }
}

enum Stage {
    Pass(Box<dyn Pass>),
    Point(ExtensionPoint),
}

/// Why the manager stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The pipeline ran once (no fixpoint requested).
    SinglePass,
    /// An iteration changed nothing.
    Converged {
        /// Iterations run, the last one unchanged.
        iterations: usize,
    },
    /// The fixpoint cap was reached while passes still changed the graph.
    CapReached {
        /// The cap.
        cap: usize,
    },
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StopReason::SinglePass => f.write_str("ran once"),
            StopReason::Converged { iterations } => write!(f, "converged after {iterations} iteration(s)"),
            StopReason::CapReached { cap } => write!(f, "stopped at the cap of {cap} iteration(s), still changing"),
        }
    }
}

/// What one run of one pass did.
#[derive(Debug, Clone)]
pub struct PassRun {
    /// The pass name.
    pub name: String,
    /// 1-based pipeline iteration.
    pub iteration: usize,
    /// Whether the pass changed the graph.
    pub changed: bool,
    /// Its counters, by name.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Nodes (inputs and constants included) before the pass.
    pub nodes_before: usize,
    /// Nodes after the pass.
    pub nodes_after: usize,
    /// Wall time of the pass (verification excluded).
    pub wall: Duration,
}

/// The manager's report: every pass run, the merged counters and the stop reason.
#[derive(Debug, Clone)]
pub struct PassReport {
    /// Pass runs in execution order.
    pub runs: Vec<PassRun>,
    /// All counters, merged over runs.
    pub counters: Counters,
    /// Why the manager stopped.
    pub stop: StopReason,
}

impl PassReport {
    /// The merged count of `(pass, name)`.
    pub fn count(&self, pass: &str, name: &str) -> u64 {
        self.counters.get(pass, name)
    }
}

impl fmt::Display for PassReport {
    /// A table: pass, iteration, changed, nodes before → after, time, counters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.runs.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
        writeln!(f, "{:<width$}  iter  changed  nodes        time      counters", "pass")?;
        for run in &self.runs {
            let counters: Vec<String> = run.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
            writeln!(
                f,
                "{:<width$}  {:>4}  {:<7}  {:>4} → {:<4}  {:>7.3} ms  {}",
                run.name,
                run.iteration,
                if run.changed { "yes" } else { "no" },
                run.nodes_before,
                run.nodes_after,
                run.wall.as_secs_f64() * 1e3,
                if counters.is_empty() {
                    "-".to_string()
                } else {
                    counters.join(", ")
                }
            )?;
        }
        writeln!(f, "stop: {}", self.stop)
    }
}

/// Runs passes in order with verification after each.
pub struct PassManager {
    stages: Vec<Stage>,
    user: Vec<(ExtensionPoint, Box<dyn Pass>)>,
    dump_dir: Option<PathBuf>,
    fixpoint_cap: Option<usize>,
}

impl fmt::Debug for PassManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PassManager")
            .field("passes", &self.pass_names())
            .field("dump_dir", &self.dump_dir)
            .field("fixpoint_cap", &self.fixpoint_cap)
            .finish()
    }
}

impl Default for PassManager {
    fn default() -> Self {
        Self::new()
    }
}

impl PassManager {
    /// An empty pipeline with the `start` and `end` extension points.
    pub fn new() -> Self {
        Self {
            stages: vec![Stage::Point(ExtensionPoint::Start), Stage::Point(ExtensionPoint::End)],
            user: Vec::new(),
            dump_dir: None,
            fixpoint_cap: None,
        }
    }

    /// wick's default pipeline: `start` · fuse-conv-batch-norm ·
    /// fuse-conv-add-relu · fuse-conv-relu · fuse-conv-activation ·
    /// fuse-conv-add · fuse-conv-max-pool · fuse-conv-input-scale ·
    /// `post-fusion` · eliminate-dead-code · `end`.
    pub fn default_pipeline() -> Self {
        Self {
            stages: vec![
                Stage::Point(ExtensionPoint::Start),
                Stage::Pass(Box::new(fuse_conv_batch_norm())),
                Stage::Pass(Box::new(fuse_conv_add_relu())),
                Stage::Pass(Box::new(fuse_conv_relu())),
                Stage::Pass(Box::new(fuse_conv_activation())),
                Stage::Pass(Box::new(fuse_conv_add())),
                Stage::Pass(Box::new(fuse_conv_max_pool())),
                Stage::Pass(Box::new(fuse_conv_input_scale())),
                Stage::Point(ExtensionPoint::PostFusion),
                Stage::Pass(Box::new(EliminateDeadCode)),
                Stage::Point(ExtensionPoint::End),
            ],
            user: Vec::new(),
            dump_dir: None,
            fixpoint_cap: None,
        }
    }

    /// Appends a pass just before the `end` extension point.
    pub fn add_pass(&mut self, pass: impl Pass + 'static) -> &mut Self {
        let at = self
            .stages
            .iter()
            .position(|s| matches!(s, Stage::Point(ExtensionPoint::End)))
            .unwrap_or(self.stages.len());
        self.stages.insert(at, Stage::Pass(Box::new(pass)));
        self
    }

    /// Runs `pass` at extension point `point` (in registration order).
    pub fn register_at(&mut self, point: ExtensionPoint, pass: impl Pass + 'static) -> Result<&mut Self, PassError> {
        if !self.stages.iter().any(|s| matches!(s, Stage::Point(p) if *p == point)) {
            return Err(PassError::NoSuchPoint(point.name().into()));
        }
        self.user.push((point, Box::new(pass)));
        Ok(self)
    }

    /// Writes the IR before and after every pass into `dir`
    /// (`{step:03}-{pass}.before.ir` / `.after.ir`).
    pub fn dump_ir_to(&mut self, dir: impl Into<PathBuf>) -> &mut Self {
        self.dump_dir = Some(dir.into());
        self
    }

    /// Repeats the whole pipeline until an iteration changes nothing, at most `cap` times.
    pub fn run_to_fixpoint(&mut self, cap: usize) -> &mut Self {
        self.fixpoint_cap = Some(cap.max(1));
        self
    }

    fn sequence(&self) -> Vec<&dyn Pass> {
        let mut passes = Vec::new();
        for stage in &self.stages {
            match stage {
                Stage::Pass(pass) => passes.push(pass.as_ref()),
                Stage::Point(point) => passes.extend(
                    self.user
                        .iter()
                        .filter(|(p, _)| p == point)
                        .map(|(_, pass)| pass.as_ref()),
                ),
            }
        }
        passes
    }

    /// Names of the passes in execution order (user passes included).
    pub fn pass_names(&self) -> Vec<String> {
        self.sequence().iter().map(|p| p.name().to_string()).collect()
    }

    fn dump(&self, step: usize, pass: &str, when: &str, graph: &Graph) -> Result<(), PassError> {
        let Some(dir) = &self.dump_dir else { return Ok(()) };
        let path = dir.join(format!("{step:03}-{pass}.{when}.ir"));
        std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&path, graph.to_string()))
            .map_err(|source| PassError::Dump { path, source })
    }

    /// Runs the pipeline on `graph`. The graph is verified first and after
    /// every pass; an error names the pass after which verification failed.
    pub fn run(&self, graph: &mut Graph) -> Result<PassReport, PassError> {
        graph
            .verify_with(&wick_ir::Limits::unbounded())
            .map_err(|source| PassError::VerifyAfter {
                pass: "(input graph, before any pass)".into(),
                source,
            })?;
        let passes = self.sequence();
        let cap = self.fixpoint_cap.unwrap_or(1);
        let mut runs = Vec::new();
        let mut totals = Counters::new();
        let mut stop = StopReason::SinglePass;
        let mut step = 0;
        for iteration in 1..=cap {
            let mut any_change = false;
            for pass in &passes {
                step += 1;
                let name = pass.name();
                self.dump(step, name, "before", graph)?;
                let nodes_before = graph.len();
                let mut counters = Counters::new();
                let start = Instant::now();
                let changed = pass.run(graph, &mut PassCounters::new(&mut counters, name))?;
                let wall = start.elapsed();
                graph
                    .verify_with(&wick_ir::Limits::unbounded())
                    .map_err(|source| PassError::VerifyAfter {
                        pass: name.to_string(),
                        source,
                    })?;
                self.dump(step, name, "after", graph)?;
                tracing::debug!(
                    pass = name,
                    iteration,
                    changed,
                    nodes_before,
                    nodes_after = graph.len(),
                    "pass done"
                );
                runs.push(PassRun {
                    name: name.to_string(),
                    iteration,
                    changed,
                    counters: counters.of_pass(name),
                    nodes_before,
                    nodes_after: graph.len(),
                    wall,
                });
                totals.merge(&counters);
                any_change |= changed;
            }
            if self.fixpoint_cap.is_some() {
                if !any_change {
                    stop = StopReason::Converged { iterations: iteration };
                    break;
                }
                stop = StopReason::CapReached { cap };
            }
        }
        Ok(PassReport {
            runs,
            counters: totals,
            stop,
        })
    }
}
