//! Which 1×1 convs and stems fuse into a depthwise conv's step, and which
//! stay steps of their own.

use crate::cpu::gemm::Isa;
use crate::cpu::CpuKernel;
use crate::kernel::Kernel;
use crate::{CompiledModel, Engine};
use candle_core::{Device, Tensor};
use wick_ir::Graph;

/// A 1×1 conv (8 → 32 channels) and a 3×3 depthwise conv on `width`²
/// planes; `tail` adds lines before the `return` of `returns`.
fn graph(width: usize, tail: &str, returns: &str) -> Graph {
    let text = format!(
        "graph g(%x: f32[2,8,{width},{width}]) {{
  @we = constant : f32[32,8,1,1]
  @be = constant : f32[32]
  @wd = constant : f32[32,1,3,3]
  @bd = constant : f32[32]
  %e = conv2d[stride=[1,1], padding=[0,0], dilation=[1,1], groups=1](%x, @we, @be) : f32[2,32,{width},{width}]
  %d = conv2d[stride=[1,1], padding=[1,1], dilation=[1,1], groups=32](%e, @wd, @bd) : f32[2,32,{width},{width}]
{tail}  return {returns}
}}"
    );
    let mut graph = Graph::parse(&text).unwrap();
    let d = Device::Cpu;
    for (name, dims) in [
        ("we", vec![32, 8, 1, 1]),
        ("be", vec![32]),
        ("wd", vec![32, 1, 3, 3]),
        ("bd", vec![32]),
    ] {
        graph
            .set_constant_data(name, Tensor::randn(0f32, 1.0, dims, &d).unwrap())
            .unwrap();
    }
    graph
}

fn fused_steps(model: &CompiledModel) -> Vec<String> {
    model
        .plan()
        .steps
        .iter()
        .filter(|s| {
            matches!(
                s.kernel,
                Kernel::Cpu(CpuKernel::ExpandedDepthwise { .. } | CpuKernel::ProjectedDepthwise { .. })
            )
        })
        .map(|s| s.name.clone())
        .collect()
}

/// The largest difference between the outputs of `fused` and `unfused`
/// on `x`, both run inside `pool` where one is given (its threads decide
/// how a fused step's bands are shared).
fn outputs_differ_by(
    fused: &CompiledModel,
    unfused: &CompiledModel,
    x: &Tensor,
    pool: Option<&rayon::ThreadPool>,
) -> f64 {
    let run = || {
        (
            fused.run(std::slice::from_ref(x)).unwrap(),
            unfused.run(std::slice::from_ref(x)).unwrap(),
        )
    };
    let (a, b) = match pool {
        Some(pool) => pool.install(run),
        None => run(),
    };
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(a, b)| crate::test_util::max_abs_diff(a, b))
        .fold(0.0, f64::max)
}

/// A MobileNetV2 block on `[batch, 16, size, size]`: a 16 → `mid` 1×1
/// conv and ReLU (none when `mid` is 0: the depthwise conv then has
/// 16 channels), a 3×3 depthwise conv at `stride` and ReLU, a `mid` →
/// `out` 1×1 conv and the block's input added (`residual`), through the
/// default passes (which fuse the epilogues).
fn block(batch: usize, size: usize, [mid, out, stride]: [usize; 3], residual: bool) -> Graph {
    let o = (size - 1) / stride + 1;
    let (expand, dw_in, mid) = match mid {
        0 => (String::new(), "%x", 16),
        mid => (
            format!(
                "  %e = conv2d[stride=[1,1], padding=[0,0], dilation=[1,1], groups=1](%x, @we, @be) : f32[{batch},{mid},{size},{size}]
  %re = relu(%e) : f32[{batch},{mid},{size},{size}]
"
            ),
            "%re",
            mid,
        ),
    };
    let tail = match residual {
        true => format!("  %s = add(%p, %x) : f32[{batch},{out},{o},{o}]\n  return %s\n"),
        false => "  return %p\n".to_string(),
    };
    let text = format!(
        "graph g(%x: f32[{batch},16,{size},{size}]) {{
  @we = constant : f32[{mid},16,1,1]
  @be = constant : f32[{mid}]
  @wd = constant : f32[{mid},1,3,3]
  @bd = constant : f32[{mid}]
  @wp = constant : f32[{out},{mid},1,1]
  @bp = constant : f32[{out}]
{expand}  %d = conv2d[stride=[{stride},{stride}], padding=[1,1], dilation=[1,1], groups={mid}]({dw_in}, @wd, @bd) : f32[{batch},{mid},{o},{o}]
  %rd = relu(%d) : f32[{batch},{mid},{o},{o}]
  %p = conv2d[stride=[1,1], padding=[0,0], dilation=[1,1], groups=1](%rd, @wp, @bp) : f32[{batch},{out},{o},{o}]
{tail}}}"
    );
    let mut graph = Graph::parse(&text).unwrap();
    let d = Device::Cpu;
    for (name, dims) in [
        ("we", vec![mid, 16, 1, 1]),
        ("be", vec![mid]),
        ("wd", vec![mid, 1, 3, 3]),
        ("bd", vec![mid]),
        ("wp", vec![out, mid, 1, 1]),
        ("bp", vec![out]),
    ] {
        graph
            .set_constant_data(name, Tensor::randn(0f32, 1.0, dims, &d).unwrap())
            .unwrap();
    }
    wick_passes::PassManager::default_pipeline().run(&mut graph).unwrap();
    graph
}

/// A projection whose residual is the depthwise output it reads (the
/// fused add of `p + d`) does not run inside the depthwise conv, whose
/// output is then needed on its own: the plan keeps both steps and
/// runs to the unfused output.
#[test]
fn projection_reading_its_input_twice_stays_a_step() {
    let text = "graph g(%x: f32[10,16,14,14]) {
  @wd = constant : f32[16,1,3,3]
  @bd = constant : f32[16]
  @wp = constant : f32[16,16,1,1]
  @bp = constant : f32[16]
  %d = conv2d[stride=[1,1], padding=[1,1], dilation=[1,1], groups=16](%x, @wd, @bd) : f32[10,16,14,14]
  %p = conv2d[stride=[1,1], padding=[0,0], dilation=[1,1], groups=1](%d, @wp, @bp) : f32[10,16,14,14]
  %s = add(%p, %d) : f32[10,16,14,14]
  return %s
}";
    let mut graph = Graph::parse(text).unwrap();
    for (name, dims) in [
        ("wd", vec![16, 1, 3, 3]),
        ("bd", vec![16]),
        ("wp", vec![16, 16, 1, 1]),
        ("bp", vec![16]),
    ] {
        let data = Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap();
        graph.set_constant_data(name, data).unwrap();
    }
    wick_passes::PassManager::default_pipeline().run(&mut graph).unwrap();
    for isa in Isa::available() {
        let engine = Engine::cpu().with_cpu_path(isa.path()).unwrap();
        let fused = engine.clone().compile(&graph).unwrap();
        let unfused = engine.clone().with_expansion_fusion(false).compile(&graph).unwrap();
        assert!(fused_steps(&fused).is_empty(), "{isa:?}: {:?}", fused_steps(&fused));
        let x = Tensor::randn(0f32, 1.0, (10, 16, 14, 14), &Device::Cpu).unwrap();
        assert!(outputs_differ_by(&fused, &unfused, &x, None) < 1e-4, "{isa:?}");
    }
}

/// A block's expansion, depthwise conv and projection run as one step
/// on the channel-blocked paths (and so do a depthwise conv and
/// projection without an expansion), to the unfused output within f32
/// rounding: with and without a residual, at strides 1 and 2, with
/// channels that leave a partial lane block (40) and a partial panel
/// of outputs (12); in one band (batch 10) or several per image, the
/// last shorter (30 rows at batch 2: bands of 8); with fewer images
/// than threads (batch 1) in bands of one image at stride 1 (56 rows:
/// bands of 14), and as its two steps in turn at stride 2 or where the
/// halos decline (14 rows). Two threads, as the cut counts them; then
/// one and three, whose runs of bands span two images (one thread) or
/// start inside an image (three), so that a band takes its first rows
/// from the band before only within an image and a run.
#[test]
fn projection_runs_inside_the_block() {
    let cases = [
        (10, 14, [64, 16, 1], true),
        (10, 14, [40, 12, 2], false),
        (2, 30, [48, 16, 1], true),
        (2, 30, [40, 12, 2], false),
        (1, 14, [24, 16, 1], true),
        (1, 56, [24, 16, 1], true),
        (1, 56, [32, 24, 2], false),
        (10, 14, [0, 16, 1], true),
        (2, 30, [0, 24, 2], false),
    ];
    for threads in [2, 1, 3] {
        projection_cases(&cases, threads);
    }
}

/// [`projection_runs_inside_the_block`]'s cases on a pool of `threads`.
fn projection_cases(cases: &[(usize, usize, [usize; 3], bool)], threads: usize) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    for isa in Isa::available() {
        let blocked = matches!(isa, Isa::Avx512 | Isa::Avx2Fma);
        let engine = Engine::cpu().with_cpu_path(isa.path()).unwrap();
        for &(batch, size, channels, residual) in cases {
            let g = block(batch, size, channels, residual);
            let fused = engine.clone().compile(&g).unwrap();
            let unfused = engine.clone().with_expansion_fusion(false).compile(&g).unwrap();
            let steps = fused_steps(&fused);
            let case = format!("{isa:?} {threads} threads batch {batch} size {size} {channels:?} residual {residual}");
            match blocked {
                // Named after all the fused nodes (`e+relu+d+relu+p+add`).
                true => assert!(
                    steps.len() == 1
                        && steps[0].starts_with(if channels[0] > 0 { "e+" } else { "d+" })
                        && steps[0].contains("d+")
                        && steps[0].contains("+p"),
                    "{case}: {steps:?}"
                ),
                false => assert!(steps.is_empty(), "{case}: {steps:?}"),
            }
            let x = Tensor::randn(0f32, 1.0, (batch, 16, size, size), &Device::Cpu).unwrap();
            let diff = outputs_differ_by(&fused, &unfused, &x, Some(&pool));
            assert!(diff < 1e-3, "{case}: {diff}");
        }
    }
}

/// On the paths with the channel-blocked depthwise conv, the pair runs
/// as one step named after both, to the unfused output within f32
/// rounding; it stays two steps when the 1×1 conv has another reader,
/// is a graph output, or the depthwise output is too wide for the
/// blocked form, and on the portable path; and always when fusion is off.
#[test]
fn fuses_only_a_sole_reader_on_the_blocked_form() {
    let cases = [
        (14, "", "%d", true),
        (56, "", "%d", true),
        (14, "  %s = add(%e, %d) : f32[2,32,14,14]\n", "%s", false),
        (14, "", "%d, %e", false),
        (60, "", "%d", true),
        (116, "", "%d", false),
    ];
    for isa in Isa::available() {
        let blocked = matches!(isa, Isa::Avx512 | Isa::Avx2Fma);
        let engine = Engine::cpu().with_cpu_path(isa.path()).unwrap();
        for (width, tail, returns, fuses) in cases {
            let g = graph(width, tail, returns);
            let fused = engine.clone().compile(&g).unwrap();
            let unfused = engine.clone().with_expansion_fusion(false).compile(&g).unwrap();
            let want: Vec<String> = match fuses && blocked {
                true => vec!["e+d".into()],
                false => vec![],
            };
            assert_eq!(fused_steps(&fused), want, "{isa:?} {width} {tail:?} {returns}");
            assert!(fused_steps(&unfused).is_empty());
            let x = Tensor::randn(0f32, 1.0, (2, 8, width, width), &Device::Cpu).unwrap();
            let diff = outputs_differ_by(&fused, &unfused, &x, None);
            assert!(diff < 1e-4, "{isa:?} {width} {returns}: {diff}");
        }
    }
}

/// A stem (a conv of a small window on few channels) whose only reader
/// is a depthwise conv runs inside it on the channel-blocked paths, with
/// the projection after it too, to the unfused output within f32
/// rounding: strides 1 and 2, padding 0 to 2, dilation 2, 3×3 and 5×5
/// windows, an activation or none, a band's halo past the input's
/// edge, one image or several; a window of more than
/// [`super::MAX_WINDOW_DEPTH`] values (8 channels, 3×3) stays a step.
#[test]
fn stem_runs_inside_the_depthwise_conv() {
    // (batch, input channels, size, kernel, stride, padding, dilation, activation, fuses)
    let cases = [
        (1, 3, 64, 3, 2, 1, 1, "relu6", true),
        (2, 3, 57, 3, 2, 1, 1, "silu", true),
        (10, 3, 30, 3, 2, 0, 1, "", true),
        (1, 2, 40, 5, 1, 2, 1, "relu", true),
        (2, 3, 33, 3, 1, 2, 2, "hardswish", true),
        (1, 8, 32, 3, 2, 1, 1, "relu6", false),
    ];
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for isa in Isa::available() {
        let blocked = matches!(isa, Isa::Avx512 | Isa::Avx2Fma);
        let engine = Engine::cpu().with_cpu_path(isa.path()).unwrap();
        for (batch, cin, size, k, stride, pad, dil, act, fuses) in cases {
            let o = (size + 2 * pad - dil * (k - 1) - 1) / stride + 1;
            let (act_line, dw_in) = match act {
                "" => (String::new(), "%s"),
                act => (format!("  %a = {act}(%s) : f32[{batch},24,{o},{o}]\n"), "%a"),
            };
            let text = format!(
                "graph g(%x: f32[{batch},{cin},{size},{size}]) {{
  @ws = constant : f32[24,{cin},{k},{k}]
  @bs = constant : f32[24]
  @wd = constant : f32[24,1,3,3]
  @bd = constant : f32[24]
  @wp = constant : f32[16,24,1,1]
  %s = conv2d[stride=[{stride},{stride}], padding=[{pad},{pad}], dilation=[{dil},{dil}], groups=1](%x, @ws, @bs) : f32[{batch},24,{o},{o}]
{act_line}  %d = conv2d[stride=[1,1], padding=[1,1], dilation=[1,1], groups=24]({dw_in}, @wd, @bd) : f32[{batch},24,{o},{o}]
  %r = relu(%d) : f32[{batch},24,{o},{o}]
  %p = conv2d[stride=[1,1], padding=[0,0], dilation=[1,1], groups=1](%r, @wp) : f32[{batch},16,{o},{o}]
  return %p
}}"
            );
            let mut g = Graph::parse(&text).unwrap();
            for (name, dims) in [
                ("ws", vec![24, cin, k, k]),
                ("bs", vec![24]),
                ("wd", vec![24, 1, 3, 3]),
                ("bd", vec![24]),
                ("wp", vec![16, 24, 1, 1]),
            ] {
                g.set_constant_data(name, Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap())
                    .unwrap();
            }
            wick_passes::PassManager::default_pipeline().run(&mut g).unwrap();
            let fused = engine.clone().compile(&g).unwrap();
            let unfused = engine.clone().with_expansion_fusion(false).compile(&g).unwrap();
            let steps = fused_steps(&fused);
            let case = format!("{isa:?} batch {batch} {cin}×{size}² {k}×{k} /{stride} pad {pad} dil {dil} {act}");
            // Named after the stem first (`s+a+d+r`, then `+p` where projected).
            let stem_fused = steps.iter().any(|s| s.starts_with("s+"));
            assert_eq!(stem_fused, fuses && blocked, "{case}: {steps:?}");
            let x = Tensor::randn(0f32, 1.0, (batch, cin, size, size), &Device::Cpu).unwrap();
            let diff = outputs_differ_by(&fused, &unfused, &x, Some(&pool));
            assert!(diff < 1e-3, "{case}: {diff}");
        }
    }
}

/// A chain of depthwise and 1×1 convs (MobileNetV1's: each 1×1 conv both
/// a possible projection of the depthwise conv before it and the only
/// input of the one after): each 1×1 conv runs once, as the expansion of
/// the depthwise conv after it (`p1+relu+d2+p2`; `d1` a step of its own,
/// not also running `p1` after it), to the unfused output. Before, `p1`
/// took both roles and `d1+p1` never ran: the forward failed with a value
/// "freed before its last use" (the `graph_diff` fuzz target's find).
#[test]
fn a_1x1_conv_between_two_depthwise_convs_runs_once() {
    for batch in [1, 2] {
        let text = format!(
            "graph g(%x: f32[{batch},16,14,14]) {{
  @w1 = constant : f32[16,1,3,3]
  @v1 = constant : f32[32,16,1,1]
  @w2 = constant : f32[32,1,3,3]
  @v2 = constant : f32[24,32,1,1]
  %d1 = conv2d[stride=[1,1], padding=[1,1], dilation=[1,1], groups=16](%x, @w1) : f32[{batch},16,14,14]
  %p1 = conv2d[stride=[1,1], padding=[0,0], dilation=[1,1], groups=1](%d1, @v1) : f32[{batch},32,14,14]
  %r1 = relu(%p1) : f32[{batch},32,14,14]
  %d2 = conv2d[stride=[1,1], padding=[1,1], dilation=[1,1], groups=32](%r1, @w2) : f32[{batch},32,14,14]
  %p2 = conv2d[stride=[1,1], padding=[0,0], dilation=[1,1], groups=1](%d2, @v2) : f32[{batch},24,14,14]
  return %p2
}}"
        );
        let mut graph = Graph::parse(&text).unwrap();
        for (name, dims) in [
            ("w1", vec![16, 1, 3, 3]),
            ("v1", vec![32, 16, 1, 1]),
            ("w2", vec![32, 1, 3, 3]),
            ("v2", vec![24, 32, 1, 1]),
        ] {
            let data = Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap();
            graph.set_constant_data(name, data).unwrap();
        }
        wick_passes::PassManager::default_pipeline().run(&mut graph).unwrap();
        for isa in Isa::available() {
            let blocked = matches!(isa, Isa::Avx512 | Isa::Avx2Fma);
            let engine = Engine::cpu().with_cpu_path(isa.path()).unwrap();
            let fused = engine.clone().compile(&graph).unwrap();
            let unfused = engine.clone().with_expansion_fusion(false).compile(&graph).unwrap();
            let want: Vec<String> = match blocked {
                true => vec!["p1+relu+d2+p2".into()],
                false => vec![],
            };
            assert_eq!(fused_steps(&fused), want, "{isa:?} batch {batch}");
            let x = Tensor::randn(0f32, 1.0, (batch, 16, 14, 14), &Device::Cpu).unwrap();
            let diff = outputs_differ_by(&fused, &unfused, &x, None);
            assert!(diff < 1e-3, "{isa:?} batch {batch}: {diff}");
        }
    }
}
