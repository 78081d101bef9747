//! A compiled model shared by 8 threads gives each thread the same output as a serial run.

use candle_core::{Device, Tensor};
use std::sync::Arc;
use wick_engine::Engine;
use wick_models::{random_input, ModelName};
use wick_passes::PassManager;
use wick_tests::{max_abs_diff, random_model};

/// 8 threads call one `CompiledModel` (Arc-shared, no lock) on different
/// inputs at once; every output equals the serial output for that input.
#[test]
fn eight_threads_match_serial_runs() {
    let shape = [1, 3, 64, 64];
    let mut graph = random_model(ModelName::Resnet18, 2).trace(&shape).unwrap();
    PassManager::default_pipeline().run(&mut graph).unwrap();
    let model = Arc::new(Engine::cpu().compile(&graph).unwrap());
    let inputs: Vec<Tensor> = (0..8)
        .map(|i| random_input(100 + i, &shape, &Device::Cpu).unwrap())
        .collect();
    let serial: Vec<Tensor> = inputs
        .iter()
        .map(|x| model.run(std::slice::from_ref(x)).unwrap().remove(0))
        .collect();
    let handles: Vec<_> = inputs
        .into_iter()
        .map(|x| {
            let model = Arc::clone(&model);
            std::thread::spawn(move || {
                (0..3)
                    .map(|_| model.run(std::slice::from_ref(&x)).unwrap().remove(0))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for (thread, handle) in handles.into_iter().enumerate() {
        for output in handle.join().unwrap() {
            assert_eq!(max_abs_diff(&output, &serial[thread]), 0.0, "thread {thread}");
        }
    }
}
