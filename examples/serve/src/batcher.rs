//! Dynamic batching with backpressure: requests for the model wait in one
//! bounded queue; worker threads take the oldest, coalesce whatever else
//! arrives within a short delay into one forward of up to `max_batch` rows
//! (as Triton's dynamic batcher does), run it, and hand each caller its
//! own rows. A full queue is refused at once ([`SubmitError::Full`], 503),
//! so memory is bounded by the queue, not by the load; a caller that gave
//! up (deadline passed, connection closed) is skipped before its forward.

use crate::metrics::Metrics;
use candle_core::Tensor;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use wick_engine::BatchedModel;

/// How requests are queued and coalesced.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most rows one forward takes (requests larger than this run alone).
    pub max_batch: usize,
    /// How long the oldest request waits for others to join its forward.
    pub max_delay: Duration,
    /// Most requests waiting; one more is refused with 503.
    pub max_queue: usize,
    /// Forwards in flight at once (worker threads); each forward already
    /// uses every core through the kernels' thread pool. 0 starts none:
    /// nothing is ever run (for tests of the queue alone).
    pub workers: usize,
}

impl BatchConfig {
    /// The most requests a service in front of this batcher should hold at
    /// once: a full queue plus a full forward per worker. Admitting more
    /// only holds bodies and tensors in memory to be refused at the queue.
    pub fn max_admitted(&self) -> usize {
        self.max_queue
            .saturating_add(self.max_batch.saturating_mul(self.workers))
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch: 8,
            max_delay: Duration::from_millis(2),
            max_queue: 16,
            workers: 1,
        }
    }
}

/// Why a queued request got no rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Its deadline passed before its forward started (504).
    Deadline(String),
    /// The model refuses the request's inputs (400).
    Refused(String),
    /// The forward failed (500).
    Failed(String),
}

impl Failure {
    fn of(error: wick_engine::EngineError) -> Self {
        use wick_engine::EngineError::*;
        match error {
            InputMismatch { .. } | InputCount { .. } | BatchNotAllowed { .. } | TooLarge { .. } => {
                Failure::Refused(error.to_string())
            }
            other => Failure::Failed(other.to_string()),
        }
    }
}

/// What a caller gets back: its rows of every output, or why not.
pub type Reply = Result<Vec<Tensor>, Failure>;

/// One request waiting for a forward.
struct Job {
    inputs: Vec<Tensor>,
    rows: usize,
    queued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Reply>,
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full: try again later (503 with `Retry-After`).
    Full,
    /// The inputs have no batch dimension or disagree on it.
    BadInputs(String),
}

/// The waiting requests, oldest first, and the signal workers wait on.
#[derive(Default)]
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    arrived: Condvar,
    /// Set when the batcher is dropped: workers finish and exit.
    closed: AtomicBool,
}

/// The queue and its workers for one model.
pub struct Batcher {
    model: Arc<BatchedModel>,
    queue: Arc<Queue>,
    config: BatchConfig,
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Relaxed);
        self.queue.arrived.notify_all();
    }
}

impl Batcher {
    /// Starts `config.workers` worker threads running `model`, recording
    /// queue waits, forwards and rows in `metrics`.
    pub fn new(model: Arc<BatchedModel>, config: BatchConfig, metrics: Arc<Metrics>) -> Self {
        let queue = Arc::new(Queue::default());
        for index in 0..config.workers {
            let (model, queue, metrics) = (Arc::clone(&model), Arc::clone(&queue), Arc::clone(&metrics));
            std::thread::Builder::new()
                .name(format!("wick-batcher-{index}"))
                .spawn(move || work(&model, &queue, config, &metrics))
                .expect("a worker thread");
        }
        Self { model, queue, config }
    }

    /// The model behind the queue.
    pub fn model(&self) -> &BatchedModel {
        &self.model
    }

    /// The configuration.
    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// Requests waiting for a forward now.
    pub fn queue_depth(&self) -> usize {
        self.queue.jobs.lock().map(|jobs| jobs.len()).unwrap_or(0)
    }

    /// Queues `inputs` (each `[rows, ...]`, the same `rows`) for a forward
    /// that must start before `deadline`; the reply arrives on the
    /// receiver. A full queue first drops the requests whose callers have
    /// gone (closed connection, deadline passed), so they free their
    /// places at once.
    pub fn submit(&self, inputs: Vec<Tensor>, deadline: Instant) -> Result<oneshot::Receiver<Reply>, SubmitError> {
        let rows = match inputs.first().map(|t| t.dims().first().copied()) {
            Some(Some(rows)) if rows > 0 && inputs.iter().all(|t| t.dims().first() == Some(&rows)) => rows,
            _ => {
                return Err(SubmitError::BadInputs(
                    "every input needs the same non-zero batch dimension".into(),
                ))
            }
        };
        let (reply, receiver) = oneshot::channel();
        let mut jobs = self.queue.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if jobs.len() >= self.config.max_queue {
            jobs.retain(|job| !job.reply.is_closed());
        }
        if jobs.len() >= self.config.max_queue {
            return Err(SubmitError::Full);
        }
        jobs.push_back(Job {
            inputs,
            rows,
            queued: Instant::now(),
            deadline,
            reply,
        });
        drop(jobs);
        self.queue.arrived.notify_one();
        Ok(receiver)
    }
}

/// A worker: take the oldest job, gather more for up to `max_delay`, run.
fn work(model: &BatchedModel, queue: &Queue, config: BatchConfig, metrics: &Metrics) {
    loop {
        let batch = {
            let mut jobs = queue.jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let first = loop {
                if queue.closed.load(Ordering::Relaxed) {
                    return;
                }
                match jobs.pop_front() {
                    Some(job) => break job,
                    None => {
                        jobs = queue
                            .arrived
                            .wait(jobs)
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                    }
                }
            };
            let mut rows = first.rows;
            let mut batch = vec![first];
            let until = Instant::now() + config.max_delay;
            while rows < config.max_batch {
                match jobs.front() {
                    // Too big to join: it starts the next forward.
                    Some(next) if rows + next.rows > config.max_batch => break,
                    Some(_) => {
                        let next = jobs.pop_front().expect("front exists");
                        rows += next.rows;
                        batch.push(next);
                    }
                    None => {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        jobs = queue
                            .arrived
                            .wait_timeout(jobs, left)
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .0;
                    }
                }
            }
            // With an allow-list, the longest prefix of an allowed size
            // runs; the rest goes back to the front of the queue.
            if let Some(allowed) = model.allowed_batches() {
                let mut total = 0;
                let fits = batch
                    .iter()
                    .enumerate()
                    .filter_map(|(i, job)| {
                        total += job.rows;
                        allowed.binary_search(&total).is_ok().then_some(i + 1)
                    })
                    .last()
                    .unwrap_or(1);
                for job in batch.drain(fits..).rev() {
                    jobs.push_front(job);
                }
            }
            batch
        };
        run(model, batch, metrics);
    }
}

/// One forward for every live job of `batch`, each answered with its rows.
fn run(model: &BatchedModel, batch: Vec<Job>, metrics: &Metrics) {
    let now = Instant::now();
    let (live, gone): (Vec<Job>, Vec<Job>) = batch
        .into_iter()
        .partition(|job| !job.reply.is_closed() && job.deadline > now);
    for job in gone {
        // Deadline passed or caller gone: no forward for it.
        let _ = job.reply.send(Err(Failure::Deadline(
            "the request's deadline passed while it was queued".into(),
        )));
    }
    if live.is_empty() {
        return;
    }
    let rows = live.iter().map(|j| j.rows).sum::<usize>();
    tracing::debug!(requests = live.len(), rows, "forward");
    for job in &live {
        metrics.queued(now.saturating_duration_since(job.queued));
    }
    let result = {
        let _in_flight = metrics.forward(rows);
        forward(model, &live)
    };
    match result {
        Ok(outputs) => {
            let mut offset = 0;
            for job in live {
                let rows: Reply = outputs
                    .iter()
                    .map(|y| {
                        y.narrow(0, offset, job.rows)
                            .map_err(|e| Failure::Failed(e.to_string()))
                    })
                    .collect();
                offset += job.rows;
                let _ = job.reply.send(rows);
            }
        }
        Err(failure) => {
            for job in live {
                let _ = job.reply.send(Err(failure.clone()));
            }
        }
    }
}

fn forward(model: &BatchedModel, jobs: &[Job]) -> Result<Vec<Tensor>, Failure> {
    if let [job] = jobs {
        return model.run(&job.inputs).map_err(Failure::of);
    }
    let inputs = (0..jobs[0].inputs.len())
        .map(|i| {
            let parts: Vec<&Tensor> = jobs.iter().map(|job| &job.inputs[i]).collect();
            // Inputs that disagree beyond the batch are the callers' fault.
            Tensor::cat(&parts, 0).map_err(|e| Failure::Refused(wick_ir::plain_candle_message(e)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    model.run(&inputs).map_err(Failure::of)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use wick_engine::Engine;
    use wick_ir::{Graph, Op, TensorFact};

    /// `y = relu(x)` over `[N, 3]`, any batch.
    fn model() -> Arc<BatchedModel> {
        let mut graph = Graph::new("g");
        let x = graph.add_input("x", TensorFact::new(DType::F32, [1usize, 3])).unwrap();
        let y = graph.add_node("y", Op::Relu, &[x]).unwrap();
        graph.set_outputs(vec![y]);
        Arc::new(BatchedModel::new(Engine::cpu(), graph, 8).unwrap())
    }

    fn rows(values: &[[f32; 3]]) -> Tensor {
        let flat: Vec<f32> = values.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (values.len(), 3), &Device::Cpu).unwrap()
    }

    /// Concurrent requests are coalesced into fewer forwards, and each
    /// caller gets exactly its own rows back.
    #[test]
    fn coalesces_and_returns_each_callers_rows() {
        let model = model();
        let config = BatchConfig {
            max_batch: 8,
            max_delay: Duration::from_millis(200),
            max_queue: 16,
            workers: 1,
        };
        let batcher = Batcher::new(Arc::clone(&model), config, Arc::default());
        let deadline = Instant::now() + Duration::from_secs(30);
        let receivers: Vec<_> = (0..4)
            .map(|i| {
                let v = i as f32;
                batcher.submit(vec![rows(&[[v, -v, v + 0.5]])], deadline).unwrap()
            })
            .collect();
        for (i, receiver) in receivers.into_iter().enumerate() {
            let y = receiver.blocking_recv().unwrap().unwrap();
            let v = i as f32;
            assert_eq!(y[0].to_vec2::<f32>().unwrap(), [[v, 0.0, v + 0.5]]);
        }
        // One forward at batch 4: one compile, of batch size 4.
        let stats = model.stats();
        assert_eq!((stats.misses, stats.entries), (1, 1), "{stats:?}");
        model.compiled(4).unwrap();
        assert_eq!(model.stats().hits, stats.hits + 1, "batch 4 was the one compiled");
    }

    /// With an allow-list, only allowed sizes are formed: three one-row
    /// requests under [1, 2, 4] run as 2 + 1, all answered, none refused.
    #[test]
    fn allowed_sizes_only() {
        let graph = {
            let mut graph = Graph::new("g");
            let x = graph.add_input("x", TensorFact::new(DType::F32, [1usize, 3])).unwrap();
            let y = graph.add_node("y", Op::Relu, &[x]).unwrap();
            graph.set_outputs(vec![y]);
            graph
        };
        let model = BatchedModel::new(Engine::cpu(), graph, 1)
            .unwrap()
            .with_allowed_batches(&[1, 2, 4])
            .unwrap();
        let model = Arc::new(model);
        let config = BatchConfig {
            max_batch: 8,
            max_delay: Duration::from_millis(200),
            ..BatchConfig::default()
        };
        let batcher = Batcher::new(Arc::clone(&model), config, Arc::default());
        let deadline = Instant::now() + Duration::from_secs(30);
        let receivers: Vec<_> = (0..3)
            .map(|i| batcher.submit(vec![rows(&[[i as f32, 0.0, 0.0]])], deadline).unwrap())
            .collect();
        for (i, receiver) in receivers.into_iter().enumerate() {
            let y = receiver.blocking_recv().unwrap().unwrap();
            assert_eq!(y[0].to_vec2::<f32>().unwrap(), [[i as f32, 0.0, 0.0]]);
        }
        let stats = model.stats();
        assert_eq!(
            stats.compiles, 3,
            "only the allowed sizes, compiled up front: {stats:?}"
        );
    }

    /// A full queue refuses at once; a passed deadline is answered without
    /// a forward; inputs without a batch dimension are refused.
    #[test]
    fn full_queue_and_deadline() {
        let far = Instant::now() + Duration::from_secs(30);
        let idle = Batcher::new(
            model(),
            BatchConfig {
                max_queue: 2,
                workers: 0,
                ..BatchConfig::default()
            },
            Arc::default(),
        );
        let first = idle.submit(vec![rows(&[[1.0, 2.0, 3.0]])], far).unwrap();
        let _second = idle.submit(vec![rows(&[[1.0, 2.0, 3.0]])], far).unwrap();
        assert_eq!(idle.queue_depth(), 2);
        assert_eq!(
            idle.submit(vec![rows(&[[1.0, 2.0, 3.0]])], far).unwrap_err(),
            SubmitError::Full
        );
        assert_eq!(idle.queue_depth(), 2);
        // A caller that gives up frees its place for the next request.
        drop(first);
        let _third = idle.submit(vec![rows(&[[1.0, 2.0, 3.0]])], far).unwrap();
        assert_eq!(idle.queue_depth(), 2);

        let batcher = Batcher::new(model(), BatchConfig::default(), Arc::default());
        let past = Instant::now();
        let reply = batcher.submit(vec![rows(&[[1.0, 2.0, 3.0]])], past).unwrap();
        let err = reply.blocking_recv().unwrap().unwrap_err();
        assert!(matches!(err, Failure::Deadline(_)), "{err:?}");
        let scalar = Tensor::new(1f32, &Device::Cpu).unwrap();
        assert!(matches!(
            batcher.submit(vec![scalar], far),
            Err(SubmitError::BadInputs(_))
        ));
    }
}
