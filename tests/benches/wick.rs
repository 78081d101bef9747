//! criterion benches (`cargo bench -p wick-tests`): the default pipeline's
//! compile time on ResNet18, one engine forward of each model at batch 1,
//! and the conv → batch-norm weight fold alone.

use candle_core::{DType, Device, Tensor};
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use wick_engine::Engine;
use wick_models::{random_input, Model, ModelName, WeightSource};
use wick_passes::{fold_conv_batch_norm, BatchNormParams, PassManager};

fn model(name: ModelName) -> Model {
    Model::load(name, WeightSource::Random { seed: 0 }, &Device::Cpu).expect("random weights load")
}

fn compile_resnet18(c: &mut Criterion) {
    let resnet = model(ModelName::Resnet18);
    let shape = ModelName::Resnet18.input_shape(Some(1));
    let mut group = c.benchmark_group("compile");
    group.sample_size(20);
    group.bench_function("resnet18/trace+default-pipeline+engine", |b| {
        b.iter(|| {
            let mut graph = resnet.trace(&shape).unwrap();
            PassManager::default_pipeline().run(&mut graph).unwrap();
            black_box(Engine::cpu().compile(&graph).unwrap())
        })
    });
    group.finish();
}

fn forward(c: &mut Criterion) {
    let mut group = c.benchmark_group("forward/batch1");
    for name in ModelName::ALL {
        let model = model(name);
        let shape = name.input_shape(Some(1));
        let mut graph = model.trace(&shape).unwrap();
        PassManager::default_pipeline().run(&mut graph).unwrap();
        let compiled = Engine::cpu().compile(&graph).unwrap();
        let x = random_input(1, &shape, &Device::Cpu).unwrap();
        if name == ModelName::Resnet18 {
            group.sample_size(20);
        }
        group.bench_function(name.as_str(), |b| {
            b.iter(|| black_box(compiled.run(std::slice::from_ref(&x)).unwrap()))
        });
    }
    group.finish();
}

fn fold(c: &mut Criterion) {
    let device = Device::Cpu;
    let weight = Tensor::ones((512, 512, 3, 3), DType::F32, &device).unwrap();
    let vector = |v: f64| (Tensor::ones(512, DType::F32, &device).unwrap() * v).unwrap();
    let (bias, mean, var, gamma, beta) = (vector(0.1), vector(0.2), vector(1.5), vector(0.9), vector(-0.1));
    let batch_norm = BatchNormParams {
        running_mean: &mean,
        running_var: &var,
        weight: Some(&gamma),
        bias: Some(&beta),
        eps: 1e-5,
    };
    c.bench_function("fold_conv_batch_norm/512x512x3x3", |b| {
        b.iter(|| black_box(fold_conv_batch_norm(&weight, Some(&bias), &batch_norm).unwrap()))
    });
}

criterion_group!(benches, compile_resnet18, forward, fold);
criterion_main!(benches);
