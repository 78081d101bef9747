//! Running a compiled plan: outputs on every CPU path and cache size, the
//! buffer pool, spinning, freeing, and checked inputs.

use super::*;
use crate::cpu::CpuKernel;
use crate::kernel::Kernel;
use crate::Engine;
use candle_core::DType;
use wick_ir::{Graph, Op};

mod kernels;

/// `name` with seeded random weights, traced at `shape` and through the
/// default passes.
fn fused_graph(name: wick_models::ModelName, seed: u64, shape: &[usize]) -> Graph {
    use wick_models::{Model, WeightSource};
    let model = Model::load(name, WeightSource::Random { seed }, &Device::Cpu).unwrap();
    let mut graph = model.trace(shape).unwrap();
    wick_passes::PassManager::default_pipeline().run(&mut graph).unwrap();
    graph
}

/// Compiling an owned graph gives the same model as compiling a
/// borrowed one (bit for bit), also when constants are read at run
/// time (the unfused graph's batch norms, the linear layer) or are a
/// graph output.
#[test]
fn compile_owned_equals_compile() {
    use wick_models::{Model, ModelName, WeightSource};
    let model = Model::load(ModelName::Resnet18, WeightSource::Random { seed: 2 }, &Device::Cpu).unwrap();
    let x = wick_models::random_input(4, &[1, 3, 64, 64], &Device::Cpu).unwrap();
    let traced = model.trace(x.dims()).unwrap();
    let mut fused = traced.clone();
    wick_passes::PassManager::default_pipeline().run(&mut fused).unwrap();
    for graph in [traced, fused] {
        let want = Engine::cpu()
            .compile(&graph)
            .unwrap()
            .run(std::slice::from_ref(&x))
            .unwrap();
        let got = Engine::cpu()
            .compile_owned(graph)
            .unwrap()
            .run(std::slice::from_ref(&x))
            .unwrap();
        assert_eq!(want[0].to_vec2::<f32>().unwrap(), got[0].to_vec2::<f32>().unwrap());
    }
    let mut graph = Graph::new("constant-out");
    let input = graph.add_input("x", TensorFact::new(DType::F32, [2])).unwrap();
    let c = graph
        .add_constant("c", Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap())
        .unwrap();
    let sum = graph.add_node("sum", Op::Add, &[input, c]).unwrap();
    graph.set_outputs(vec![sum, c]);
    let x = Tensor::new(&[10f32, 20.0], &Device::Cpu).unwrap();
    let out = Engine::cpu().compile_owned(graph).unwrap().run(&[x]).unwrap();
    assert_eq!(out[0].to_vec1::<f32>().unwrap(), [11.0, 22.0]);
    assert_eq!(out[1].to_vec1::<f32>().unwrap(), [1.0, 2.0]);
}

fn assert_send_sync<T: Send + Sync>() {}

/// A compiled model can be shared across threads.
#[test]
fn compiled_model_is_send_and_sync() {
    assert_send_sync::<CompiledModel>();
}

/// Every path this CPU has compiles ResNet-like convs (Winograd, direct,
/// pooled) to the same output within f32 rounding, and reports its path.
#[test]
fn every_cpu_path_gives_the_same_output() {
    use crate::CpuPath;
    use wick_models::ModelName;
    let graph = fused_graph(ModelName::Resnet18, 3, &[1, 3, 64, 64]);
    let x = wick_models::random_input(4, &[1, 3, 64, 64], &Device::Cpu).unwrap();
    let run = |path: CpuPath| {
        let compiled = Engine::cpu().with_cpu_path(path).unwrap().compile(&graph).unwrap();
        assert_eq!(compiled.cpu_path(), Some(path));
        compiled.run(std::slice::from_ref(&x)).unwrap().remove(0)
    };
    let scalar = run(CpuPath::Scalar);
    for path in CpuPath::available() {
        let diff = crate::test_util::max_abs_diff(&run(path), &scalar);
        assert!(diff < 1e-4, "{path}: {diff}");
    }
}

/// Blocks sized for the smallest caches wick accepts, the fallback and
/// the largest give the same output within f32 rounding (ResNet18's
/// Winograd, direct and pooled convs; MobileNetV2's blocked depthwise
/// convs with their expansions), on every path; out-of-range caches are
/// a typed error before anything is compiled.
#[test]
fn every_cache_size_gives_the_same_output() {
    use crate::{CacheSizes, CpuPath};
    use wick_models::ModelName;
    let sizes = [
        CacheSizes::given(4 << 10, 64 << 10, 0).unwrap(),
        CacheSizes::FALLBACK,
        CacheSizes::given(1 << 20, 256 << 20, 16 << 30).unwrap(),
    ];
    for (name, shape) in [
        (ModelName::Resnet18, [1, 3, 64, 64]),
        (ModelName::MobilenetV2, [2, 3, 64, 64]),
    ] {
        let graph = fused_graph(name, 3, &shape);
        let x = wick_models::random_input(4, &shape, &Device::Cpu).unwrap();
        for path in CpuPath::available() {
            let run = |caches: CacheSizes| {
                let engine = Engine::cpu().with_cpu_path(path).unwrap().with_caches(caches).unwrap();
                engine
                    .compile(&graph)
                    .unwrap()
                    .run(std::slice::from_ref(&x))
                    .unwrap()
                    .remove(0)
            };
            let reference = run(CacheSizes::detect());
            for caches in sizes {
                let diff = crate::test_util::max_abs_diff(&run(caches), &reference);
                assert!(diff < 1e-4, "{name} {path} {caches:?}: {diff}");
            }
        }
    }
    let too_small = CacheSizes {
        l2: 1 << 10,
        ..CacheSizes::FALLBACK
    };
    let err = Engine::cpu().with_caches(too_small).unwrap_err();
    assert!(
        matches!(err, EngineError::InvalidCacheSize { level: "l2", .. }),
        "{err}"
    );
}

/// Buffers recycled across steps and forwards never reach the caller:
/// outputs held from one forward keep their values through the next
/// ones, and forwards on a warm pool equal those of a fresh model bit
/// for bit. Only values CPU kernels made and only CPU kernels read are
/// recycled, and no step whose output leaves the forward draws.
#[test]
fn recycled_buffers_never_reach_the_caller() {
    use crate::kernel::Kernel;
    use wick_models::ModelName;
    let name = ModelName::MobilenetV2;
    let graph = fused_graph(name, 3, &[2, 3, 64, 64]);
    let compiled = Engine::cpu().compile(&graph).unwrap();
    let plan = &compiled.plan;
    let made_by_cpu: Vec<usize> = plan
        .steps
        .iter()
        .filter(|s| matches!(s.kernel, Kernel::Cpu(_)))
        .map(|s| s.output)
        .collect();
    let read_by_candle: Vec<usize> = plan
        .steps
        .iter()
        .filter(|s| matches!(s.kernel, Kernel::Candle(_)))
        .flat_map(|s| s.kernel.reads())
        .collect();
    let recycled: Vec<usize> = plan.steps.iter().flat_map(|s| s.recycle_after.clone()).collect();
    assert!(recycled.len() > 20, "{recycled:?}");
    for slot in &recycled {
        assert!(
            made_by_cpu.contains(slot) && !read_by_candle.contains(slot) && !plan.outputs.contains(slot),
            "slot {slot}: made by {:?}",
            plan.steps.iter().find(|s| s.output == *slot).map(|s| &s.name)
        );
    }
    assert!(plan
        .steps
        .iter()
        .all(|s| !s.pooled_output || !plan.outputs.contains(&s.output)));
    let input = |seed| wick_models::random_input(seed, &[2, 3, 64, 64], &Device::Cpu).unwrap();
    let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let first = compiled.run(&[input(1)]).unwrap().remove(0);
    let kept = values(&first);
    let second = compiled.run(&[input(2)]).unwrap().remove(0);
    let again = compiled.run(&[input(1)]).unwrap().remove(0);
    assert_eq!(values(&first), kept, "a held output was overwritten");
    assert_eq!(values(&again), kept);
    let fresh = Engine::cpu().compile(&graph).unwrap();
    assert_eq!(values(&fresh.run(&[input(2)]).unwrap()[0]), values(&second));
}

/// A warm forward lends every large output from the pool and gets each
/// buffer back: none is lost to a step's intermediate. MobileNetV3-Large
/// scales the input of its squeeze-and-excitation 1×1 convs on 7×7
/// planes (run on the lane layout) into a value of its own, which used
/// to take a pooled buffer and drop it: three buffers lost a forward,
/// and at batch 10 ~1500 page faults a forward for the ones allocated
/// in their place.
#[test]
fn warm_forwards_lose_no_pooled_buffer() {
    use wick_models::ModelName;
    let name = ModelName::MobilenetV3Large;
    let shape = [2, 3, 224, 224];
    let graph = fused_graph(name, 3, &shape);
    let compiled = Engine::cpu().compile(&graph).unwrap();
    let x = wick_models::random_input(1, &shape, &Device::Cpu).unwrap();
    for _ in 0..2 {
        compiled.run(std::slice::from_ref(&x)).unwrap();
    }
    let warm = compiled.pool_misses();
    for _ in 0..2 {
        compiled.run(std::slice::from_ref(&x)).unwrap();
    }
    assert_eq!(compiled.pool_misses(), warm, "warm forwards allocated afresh");
}

/// Warm forwards give the pool back what they took and nothing more:
/// MobileNetV3-Large's squeeze convs and classifiers, whose outputs
/// came from the heap, added a buffer each to the pool every forward
/// (`recycle::MAX_BUFFERS`).
#[test]
fn warm_forwards_keep_the_pool_size() {
    use wick_models::ModelName;
    let shape = [1, 3, 224, 224];
    let graph = fused_graph(ModelName::MobilenetV3Large, 3, &shape);
    let compiled = Engine::cpu().compile(&graph).unwrap();
    let x = wick_models::random_input(1, &shape, &Device::Cpu).unwrap();
    for _ in 0..2 {
        compiled.run(std::slice::from_ref(&x)).unwrap();
    }
    let warm = compiled.pool_len();
    for _ in 0..3 {
        compiled.run(std::slice::from_ref(&x)).unwrap();
    }
    assert!(warm > 0);
    assert_eq!(compiled.pool_len(), warm, "the pool grew over warm forwards");
}

/// A small forward computes the same values with the pool's workers
/// spinning as without, also with many forwards of it at once from
/// inside the pool, each handing out spinners.
#[test]
fn spinning_changes_no_value() {
    use rayon::prelude::*;
    use wick_models::ModelName;
    let shape = [1, 3, 64, 64];
    let graph = fused_graph(ModelName::Resnet18, 5, &shape);
    let spinning = Engine::cpu().with_spinning(true).compile(&graph).unwrap();
    let still = Engine::cpu().with_spinning(false).compile(&graph).unwrap();
    assert!(spinning.run_in_pool && spinning.spinning && !still.spinning);
    let x = wick_models::random_input(2, &shape, &Device::Cpu).unwrap();
    let want = still
        .run(std::slice::from_ref(&x))
        .unwrap()
        .remove(0)
        .to_vec2::<f32>()
        .unwrap();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let outputs: Vec<_> = pool.install(|| {
        (0..6)
            .into_par_iter()
            .map(|_| spinning.run(std::slice::from_ref(&x)).unwrap().remove(0))
            .collect()
    });
    for y in outputs {
        assert_eq!(y.to_vec2::<f32>().unwrap(), want);
    }
}

/// Clones share the plan (and so the packed weights) instead of copying it.
#[test]
fn clones_share_the_plan() {
    let model = Engine::cpu().compile(&small_graph()).unwrap();
    let clone = model.clone();
    assert!(Arc::ptr_eq(&model.plan, &clone.plan));
}

fn small_graph() -> Graph {
    let mut graph = Graph::parse(
        "graph g(%x: f32[1,2,3,3]) {
  @w = constant : f32[2,2,1,1]
  %c = conv2d(%x, @w) : f32[1,2,3,3]
  %r = relu(%c) : f32[1,2,3,3]
  %a = add(%r, %c) : f32[1,2,3,3]
  return %a
}",
    )
    .unwrap();
    let w = Tensor::new(&[1f32, 0., 0., -1.], &Device::Cpu)
        .unwrap()
        .reshape((2, 2, 1, 1))
        .unwrap();
    graph.set_constant_data("w", w).unwrap();
    graph
}

/// Values are freed after their last use, never before, and outputs are kept.
#[test]
fn frees_after_last_use() {
    let model = Engine::cpu().compile(&small_graph()).unwrap();
    let frees: Vec<Vec<usize>> = model.plan.steps.iter().map(|s| s.free_after.clone()).collect();
    // slots: 0=x, 1=w, 2=c, 3=r, 4=a. x dies after conv; c and r after add; w (constant) and a (output) never.
    assert_eq!(frees, vec![vec![0], vec![], vec![2, 3]]);
    let x = Tensor::arange(0f32, 18., &Device::Cpu)
        .unwrap()
        .reshape((1, 2, 3, 3))
        .unwrap();
    let out = model.run(std::slice::from_ref(&x)).unwrap();
    // channel 0 = relu(x0) + x0 = 2*x0 (x0 >= 0); channel 1 = relu(-x1) - x1 = -x1.
    let expected = Tensor::cat(
        &[
            (x.narrow(1, 0, 1).unwrap() * 2.0).unwrap(),
            x.narrow(1, 1, 1).unwrap().neg().unwrap(),
        ],
        1,
    )
    .unwrap();
    assert_eq!(crate::test_util::max_abs_diff(&out[0], &expected), 0.0);
    // x (72 B) dies after the conv; the peak is c, r and a together at the add.
    assert_eq!(model.planned_peak_activation_bytes(), 3 * 72);
    let (profiled, steps) = model.run_profiled(std::slice::from_ref(&x)).unwrap();
    assert_eq!(
        steps.iter().map(|s| s.op).collect::<Vec<_>>(),
        ["conv2d", "relu", "add"]
    );
    assert_eq!(crate::test_util::max_abs_diff(&profiled[0], &out[0]), 0.0);
}

/// Wrong input shape, dtype or count is a typed error naming the input and both facts.
#[test]
fn inputs_are_checked() {
    let model = Engine::cpu().compile(&small_graph()).unwrap();
    let wrong_shape = Tensor::zeros((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let err = model.run(&[wrong_shape]).unwrap_err();
    assert_eq!(err.to_string(), "input `%x` must be f32[1,2,3,3], got f32[1,2,3,4]");
    let wrong_dtype = Tensor::zeros((1, 2, 3, 3), DType::F64, &Device::Cpu).unwrap();
    let err = model.run(&[wrong_dtype]).unwrap_err();
    assert_eq!(err.to_string(), "input `%x` must be f32[1,2,3,3], got f64[1,2,3,3]");
    assert!(matches!(
        model.run(&[]),
        Err(EngineError::InputCount {
            expected: 1,
            got: 0,
            ..
        })
    ));
}

/// A graph whose constants have no data cannot be compiled.
#[test]
fn missing_constant_data_is_an_error() {
    let graph =
        Graph::parse("graph g(%x: f32[2]) {\n  @b = constant : f32[2]\n  %y = add(%x, @b) : f32[2]\n  return %y\n}")
            .unwrap();
    let err = Engine::cpu().compile(&graph).unwrap_err();
    assert!(
        matches!(err, EngineError::MissingConstant { ref name } if name == "b"),
        "{err}"
    );
}
