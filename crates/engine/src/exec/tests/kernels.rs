//! Which kernel runs each conv at a compiled shape, and that each kernel
//! form computes what the others do.

use super::*;

/// The CPU conv algorithm chosen for each conv step, by node name.
fn conv_kernels(model: &CompiledModel) -> Vec<(String, &'static str)> {
    model
        .plan
        .steps
        .iter()
        .filter_map(|step| match &step.kernel {
            Kernel::Cpu(CpuKernel::Conv { conv, .. }) => Some((step.name.clone(), conv.algorithm().name())),
            Kernel::Cpu(CpuKernel::ExpandedDepthwise { .. }) => Some((step.name.clone(), "expanded-depthwise")),
            Kernel::Cpu(CpuKernel::ProjectedDepthwise { .. }) => Some((step.name.clone(), "projected-depthwise")),
            _ => None,
        })
        .collect()
}

/// Kernels follow the compiled shape, on every path the machine has:
/// ResNet18 at batch 1 runs layer4's 3×3 stride-1 convs as F(2×2)
/// (direct with wide FMAs) and its few-pixel direct convs on the lane
/// GEMM; at batch 10 the 1×1 stride-2 downsamples use panels and every
/// 3×3 stride-1 conv is F(4×4), within the default weight budget (2.5×
/// the conv weights + 48 MiB) too; the 3×3 stride-2 convs (576 deep and
/// more) take lanes at both batches on the SIMD paths, panels past 256
/// pixels on the scalar one; a bare 2.5× steps layer4's three, the
/// fewest tiles, down to F(2×2) (packed weights 3.5× the conv weights
/// with them, 2.1× without), to the same output within f32 rounding.
#[test]
fn conv_kernels_follow_the_compiled_batch() {
    use crate::cpu::gemm::Isa;
    use crate::WeightBudget;
    use wick_models::{Model, ModelName, WeightSource};
    let model = Model::load(ModelName::Resnet18, WeightSource::Random { seed: 1 }, &Device::Cpu).unwrap();
    let x = wick_models::random_input(5, &ModelName::Resnet18.input_shape(Some(10)), &Device::Cpu).unwrap();
    for isa in Isa::available() {
        let compile = |batch: usize, budget: WeightBudget| {
            let mut graph = model.trace(&ModelName::Resnet18.input_shape(Some(batch))).unwrap();
            wick_passes::PassManager::default_pipeline().run(&mut graph).unwrap();
            let engine = Engine::cpu().with_cpu_path(isa.path()).unwrap();
            engine.with_weight_budget(budget).compile(&graph).unwrap()
        };
        let kernels = |batch: usize| conv_kernels(&compile(batch, WeightBudget::default()));
        let count = |ks: &[(String, &str)], kind: &str| ks.iter().filter(|(_, k)| *k == kind).count();
        let simd = isa != Isa::Scalar;
        // The 3×3 stride-2 convs past 256 pixels.
        let deep_strided = match simd {
            true => "direct-lanes",
            false => "direct-panels",
        };
        let one = kernels(1);
        assert_eq!(one.len(), 20, "{one:?}");
        // Where the AVX-512 FMAs are wide, layer4's stride-1 convs run
        // direct rather than F(2×2) (the policy's test covers both).
        let f2 = match crate::machine::Machine::resolve(Some(isa.path()), None)
            .unwrap()
            .wide_fma
        {
            true => "direct-lanes",
            false => "winograd-f2x2",
        };
        for (name, kind) in &one {
            let expected = match name.as_str() {
                n if n.starts_with("layer4.") && n.contains("conv2") => f2,
                n if n.starts_with("layer4.1.conv1") => f2,
                n if n.starts_with("layer4.")
                    || n.starts_with("layer3.0.conv1")
                    || n.starts_with("layer3.0.downsample") =>
                {
                    "direct-lanes"
                }
                n if n.starts_with("conv1") => "stem",
                n if n.starts_with("layer2.0.conv1") => deep_strided,
                n if n.contains("downsample") => "direct-panels",
                _ => "winograd-f4x4",
            };
            assert_eq!(*kind, expected, "{name} at batch 1 on {isa:?}");
        }
        let bare = WeightBudget::factor(crate::DEFAULT_WEIGHT_BUDGET).unwrap();
        let (budgeted, unlimited) = (compile(10, bare), compile(10, WeightBudget::unlimited()));
        let ten = conv_kernels(&budgeted);
        for (name, kind) in &ten {
            let expected = match name.as_str() {
                n if n.starts_with("conv1") => "stem",
                n if n.contains("downsample") => "direct-panels",
                // layer2-4's first convs have stride 2.
                n if n.contains(".0.conv1") && !n.starts_with("layer1") => deep_strided,
                n if n.starts_with("layer4.") => "winograd-f2x2",
                _ => "winograd-f4x4",
            };
            assert_eq!(*kind, expected, "{name} at batch 10 on {isa:?}");
        }
        let all_f4 = conv_kernels(&unlimited);
        let lanes = if simd { 3 } else { 0 };
        assert_eq!(count(&all_f4, "winograd-f4x4"), 13, "{all_f4:?}");
        assert_eq!(count(&all_f4, "direct-panels"), 6 - lanes, "{all_f4:?}");
        assert_eq!(count(&all_f4, "direct-lanes"), lanes, "{all_f4:?}");
        assert_eq!(count(&all_f4, "stem"), 1, "{all_f4:?}");
        assert_eq!(
            kernels(10),
            all_f4,
            "the default budget's allowance holds layer4's F(4×4) on {isa:?}"
        );
        let run = |model: &CompiledModel| model.run(std::slice::from_ref(&x)).unwrap().remove(0);
        let diff = crate::test_util::max_abs_diff(&run(&budgeted), &run(&unlimited));
        assert!(diff < 1e-4, "{isa:?}: {diff}");
    }
}

/// MobileNetV2's convs at batch 1: every 1×1 on the in-place GEMM but
/// the eleven projections on 14×14 and 7×7 planes (192 / 384 / 576 ->
/// 64 / 96 on 14×14, 576 / 960 -> 160 and 960 -> 320 on 7×7: in two
/// halves of their depth), none on the lane form, every 3×3
/// depthwise on the depthwise kernel, the stem on the direct conv; with
/// expansion fusion (the default) each block's expansion runs inside
/// its depthwise conv where that takes the channel-blocked form (all
/// 16 at 224×224 on the SIMD paths: every output up to 112 wide but
/// the first block's, which has no expansion), as one step named after
/// both, and so does the stem (a window of 27 values) inside the first
/// block's depthwise conv, and each in-place projection after such a
/// pair (features.1-6: the 112×112, 56×56 and 28×28 blocks), to the
/// same output within f32 rounding.
#[test]
fn mobilenet_convs_take_their_kernels() {
    use wick_models::ModelName;
    let name = ModelName::MobilenetV2;
    let graph = fused_graph(name, 1, &name.input_shape(Some(1)));
    let count = |kernels: &[(String, &str)], kind: &str| kernels.iter().filter(|(_, k)| *k == kind).count();
    let x = wick_models::random_input(4, &name.input_shape(Some(1)), &Device::Cpu).unwrap();
    for isa in crate::cpu::gemm::Isa::available() {
        let engine = Engine::cpu().with_cpu_path(isa.path()).unwrap();
        let (fused, unfused) = (
            engine.clone().compile(&graph).unwrap(),
            engine.with_expansion_fusion(false).compile(&graph).unwrap(),
        );
        let kernels = conv_kernels(&unfused);
        let kinds = [
            "pointwise",
            "pointwise-lanes",
            "pointwise-split",
            "depthwise",
            "direct-panels",
            "expanded-depthwise",
            "projected-depthwise",
        ];
        let counts = kinds.map(|k| count(&kernels, k));
        assert_eq!(
            [counts.as_slice(), &[kernels.len()]].concat(),
            [23, 0, 11, 17, 1, 0, 0, 52],
            "{kernels:?}"
        );
        let kernels = conv_kernels(&fused);
        let counts = kinds.map(|k| count(&kernels, k));
        let blocked = matches!(isa, crate::cpu::gemm::Isa::Avx512 | crate::cpu::gemm::Isa::Avx2Fma);
        // Blocked: the stem and the expansions run in their depthwise
        // convs, and the in-place projections after features.1-6's in
        // them too.
        let want = match blocked {
            true => [1, 0, 11, 0, 0, 11, 6, 29],
            false => [23, 0, 11, 17, 1, 0, 0, 52],
        };
        assert_eq!(
            [counts.as_slice(), &[kernels.len()]].concat(),
            want,
            "{isa:?} {kernels:?}"
        );
        if blocked {
            let pair = "features.7.conv.0.0+1+relu6+features.7.conv.1.0+1+relu6";
            assert!(kernels.contains(&(pair.into(), "expanded-depthwise")), "{kernels:?}");
            let head = "features.0.0+1+relu6+features.1.conv.0.0+1+relu6+features.1.conv.1+2";
            assert!(kernels.contains(&(head.into(), "projected-depthwise")), "{kernels:?}");
            let block = "features.3.conv.0.0+1+relu6+features.3.conv.1.0+1+relu6+features.3.conv.2+3+add";
            assert!(kernels.contains(&(block.into(), "projected-depthwise")), "{kernels:?}");
            // The expanded tensors are never made.
            assert!(fused.planned_peak_activation_bytes() < unfused.planned_peak_activation_bytes());
        }
        let run = |model: &CompiledModel| model.run(std::slice::from_ref(&x)).unwrap().remove(0);
        let (a, b) = (run(&fused), run(&unfused));
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let diff = crate::test_util::max_abs_diff(&a, &b);
        assert!(diff <= 1e-5 * scale.max(1.0), "{isa:?}: diff {diff} at scale {scale}");
    }
}

/// MobileNetV2 at batch 2 on two threads, where the projections of
/// features.1-6 run inside their blocks' steps band by band (at batch 1
/// those steps run the two convs in turn): the unfused output within
/// f32 rounding, on every path.
#[test]
fn mobilenet_projections_in_their_blocks_match() {
    use wick_models::ModelName;
    let name = ModelName::MobilenetV2;
    let shape = [2, 3, 224, 224];
    let graph = fused_graph(name, 2, &shape);
    let x = wick_models::random_input(5, &shape, &Device::Cpu).unwrap();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for isa in crate::cpu::gemm::Isa::available() {
        let engine = Engine::cpu().with_cpu_path(isa.path()).unwrap();
        let (fused, unfused) = (
            engine.clone().compile(&graph).unwrap(),
            engine.with_expansion_fusion(false).compile(&graph).unwrap(),
        );
        let run = |model: &CompiledModel| pool.install(|| model.run(std::slice::from_ref(&x)).unwrap().remove(0));
        let (a, b) = (run(&fused), run(&unfused));
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        let diff = crate::test_util::max_abs_diff(&a, &b);
        assert!(diff <= 1e-5 * scale.max(1.0), "{isa:?}: diff {diff} at scale {scale}");
    }
}

/// A fused conv's input scale on both families of kernels: wick's CPU
/// conv (f32; a 1×1 and a 3×3 one) and candle's ops (f64, and f32 with
/// a weight that is an input, not a constant) equal the conv of the
/// input multiplied by the scale.
#[test]
fn fused_conv_input_scale_on_every_kernel() {
    let d = Device::Cpu;
    for (dtype, constant_weight, kernel) in [
        (DType::F32, true, 1),
        (DType::F32, true, 3),
        (DType::F64, true, 3),
        (DType::F32, false, 1),
    ] {
        let x = Tensor::randn(0f32, 1.0, (2, 5, 6, 7), &d)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let s = Tensor::randn(0f32, 1.0, (2, 5, 1, 1), &d)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 5, kernel, kernel), &d)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let b = Tensor::randn(0f32, 1.0, 4, &d).unwrap().to_dtype(dtype).unwrap();
        let mut graph = Graph::new("scaled");
        let fact = |t: &Tensor| TensorFact::new(dtype, t.dims().to_vec());
        let xi = graph.add_input("x", fact(&x)).unwrap();
        let si = graph.add_input("s", fact(&s)).unwrap();
        let wi = match constant_weight {
            true => graph.add_constant("w", w.clone()).unwrap(),
            false => graph.add_input("w", fact(&w)).unwrap(),
        };
        let bi = graph.add_constant("b", b.clone()).unwrap();
        let attrs = wick_ir::FusedConv2dAttrs {
            conv: wick_ir::Conv2dAttrs {
                padding: [kernel / 2; 2],
                ..Default::default()
            },
            input_scale: true,
            ..Default::default()
        };
        let y = graph.add_node("y", Op::FusedConv2d(attrs), &[xi, wi, bi, si]).unwrap();
        graph.set_outputs(vec![y]);
        let mut inputs = vec![x.clone(), s.clone()];
        if !constant_weight {
            inputs.push(w.clone());
        }
        let got = Engine::cpu().compile(&graph).unwrap().run(&inputs).unwrap().remove(0);
        let want = x
            .broadcast_mul(&s)
            .unwrap()
            .conv2d(&w, kernel / 2, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, 4, 1, 1)).unwrap())
            .unwrap();
        let diff = crate::test_util::max_abs_diff(&got, &want);
        assert!(
            diff < 1e-4,
            "{dtype:?} constant weight {constant_weight} {kernel}x{kernel}: {diff}"
        );
    }
}

/// A fused conv (with residual, ReLU and pool) whose weights arrive at
/// run time takes candle's conv, the one-pass epilogue op and candle's
/// pool (the CUDA path's kernels); it equals wick's CPU conv with the
/// fused pool compiled from the same values as constants.
#[test]
fn runtime_weight_fused_conv_matches_packed() {
    let text = |params: &str, operands: &str| {
        format!(
            "graph g(%x: f32[2,3,5,5]{params}, %r: f32[2,4,5,5]) {{
{}  %y = fused_conv2d[padding=1, relu=1, pool_kernel=3, pool_stride=2, pool_padding=1](%x, {operands}, %r) : f32[2,4,3,3]
  return %y
}}",
            if params.is_empty() {
                "  @w = constant : f32[4,3,3,3]\n  @b = constant : f32[4]\n"
            } else {
                ""
            }
        )
    };
    let d = Device::Cpu;
    let (x, w, b, r) = (
        Tensor::randn(0f32, 1.0, (2, 3, 5, 5), &d).unwrap(),
        Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &d).unwrap(),
        Tensor::randn(0f32, 1.0, 4, &d).unwrap(),
        Tensor::randn(0f32, 1.0, (2, 4, 5, 5), &d).unwrap(),
    );
    let runtime = Graph::parse(&text(", %w: f32[4,3,3,3], %b: f32[4]", "%w, %b")).unwrap();
    let got = Engine::cpu()
        .compile(&runtime)
        .unwrap()
        .run(&[x.clone(), w.clone(), b.clone(), r.clone()])
        .unwrap();
    let mut constant = Graph::parse(&text("", "@w, @b")).unwrap();
    constant.set_constant_data("w", w).unwrap();
    constant.set_constant_data("b", b).unwrap();
    let want = Engine::cpu().compile(&constant).unwrap().run(&[x, r]).unwrap();
    assert!(crate::test_util::max_abs_diff(&got[0], &want[0]) < 1e-5);
}

/// Per-axis stride runs on the CPU f32 kernel; elsewhere (here f64, which
/// only candle's conv serves) it is rejected at compile time, not mid-run.
#[test]
fn unequal_stride_needs_the_packed_kernel() {
    let text = |dtype: &str| {
        format!(
            "graph g(%x: {dtype}[1,1,4,4]) {{\n  @w = constant : {dtype}[1,1,1,1]\n  %y = conv2d[stride=[1,2]](%x, @w) : {dtype}[1,1,4,2]\n  return %y\n}}"
        )
    };
    let mut graph = Graph::parse(&text("f32")).unwrap();
    graph
        .set_constant_data("w", Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let x = Tensor::arange(0f32, 16.0, &Device::Cpu)
        .unwrap()
        .reshape((1, 1, 4, 4))
        .unwrap();
    let y = Engine::cpu().compile(&graph).unwrap().run(&[x]).unwrap().remove(0);
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        [0., 2., 4., 6., 8., 10., 12., 14.]
    );
    let mut graph = Graph::parse(&text("f64")).unwrap();
    graph
        .set_constant_data("w", Tensor::ones((1, 1, 1, 1), DType::F64, &Device::Cpu).unwrap())
        .unwrap();
    let err = Engine::cpu().compile(&graph).unwrap_err();
    assert!(matches!(err, EngineError::Unsupported { .. }), "{err}");
}
