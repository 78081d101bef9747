//! The 1×1 CPU convolution on small planes (7×7 and the like: ResNet50's
//! layer4, the MobileNets' and EfficientNet's last stage) on the lane
//! micro-kernel: output channels on the vector lanes, pixels broadcast
//! straight from the NCHW input planes. On such planes the in-place GEMM
//! ([`super::pointwise`]) pads every 49-pixel row to 64 columns and packs
//! its input into column slices before the product reads it; here each
//! pixel is one broadcast from its channel's row, so nothing is padded or
//! packed, and the weights pass through L1 a depth chunk at a time
//! ([`crate::cpu::gemm::lane`]). The products come out per lane group,
//! pixel by pixel (`[groups][pixels][32]`); the output channels' rows are
//! gathered from them eight at a time ([`columns_to_block8`]) and stored
//! with the epilogue. An input scale
//! (squeeze-and-excitation's) is applied to the input first, as for the
//! other convs ([`super::CpuConv::run_scaled`]).
//!
//! Where it is chosen ([`crate::cpu::conv_algorithm`]) and what it
//! measured: [`crate::cpu::POINTWISE_LANES_MAX_PLANE`].

use super::{output, ConvSpec};
use crate::cpu::data::{with_cpu_f32, with_scratch};
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::{lane_gemm_lanes, lane_groups, pack_lanes, split_unit, Isa, LaneProduct, LANES};
use crate::cpu::output::Output;
use crate::cpu::parallel::try_for_each;
use crate::cpu::transpose::columns_to_block8;
use crate::cpu::weight_buffer::WeightBuffer;
use crate::machine::Machine;
use candle_core::{bail, Tensor};

/// A 1×1 convolution (stride 1, no padding, one group) with its weights
/// packed for the lane micro-kernel.
#[derive(Debug)]
pub(crate) struct PointwiseLanes {
    spec: ConvSpec,
    /// Output channels rounded up to a whole lane group.
    padded_out: usize,
    /// [`pack_lanes`]'s layout: `[depth chunk][lane group][chunk depth][LANES]`.
    packed: WeightBuffer,
    epilogue: Epilogue,
    isa: Isa,
}

impl PointwiseLanes {
    /// Packs `weight` (`[O, C, 1, 1]`, f32) for `spec` on `machine`'s path;
    /// an error for any conv other than a 1×1 one with stride 1, no
    /// padding and one group.
    pub(crate) fn new(
        spec: ConvSpec,
        weight: &Tensor,
        epilogue: Epilogue,
        machine: Machine,
    ) -> candle_core::Result<Self> {
        let (rows, depth) = (spec.out_channels, spec.in_channels);
        let plain = super::pointwise::PointwiseConv::plain_weights(&spec, weight)?;
        let padded_out = rows.div_ceil(LANES) * LANES;
        let Some(len) = padded_out.checked_mul(depth) else {
            bail!("pointwise conv weight of {rows} x {depth} values is too large")
        };
        let mut packed = WeightBuffer::zeroed(len, "packed weights")?;
        pack_lanes(&plain, rows, depth, &mut packed);
        Ok(Self {
            spec,
            padded_out,
            packed,
            epilogue,
            isa: machine.isa,
        })
    }

    /// Runs on a CPU f32 tensor `[N, C, H, W]`, adding `residual` (the
    /// output's shape) before the activation.
    ///
    /// Tasks are (image, run of output channels), one per thread where the
    /// images are fewer than the threads; each reads its image's whole
    /// input (small planes: `C` rows of a few dozen pixels) and its
    /// groups' weights, and writes its channels of the image's output.
    /// These products take 30-100 us at batch 1, and more tasks than
    /// threads cost more than they balance: alone on the Intel Xeon VM
    /// (AVX-512, 2 threads, spinners as in a forward), 960 -> 160 on 7×7
    /// (5 lane groups) took 97 us in three runs (two per thread, as
    /// before), 99 in five, 61 in two, 93 on one thread; 576 -> 160 72 /
    /// 64 / 37 / 57 us. Whole forwards at batch 1, alternating in one
    /// process: MobileNetV2 0.974-0.978× the time, MobileNetV3-Large
    /// 0.957×, EfficientNet-B0 0.944×, ResNet50 level; AVX2 forced
    /// MobileNetV2 0.96×, EfficientNet-B0 0.95×. Runs are whole lane
    /// groups, but half groups on AVX2 (its micro-tile's width, so no
    /// work is added): 160 channels (5 groups, 3:2 on two threads) split
    /// 5:5 halves. AVX2 forced on Zen 4, per-node profiles of alternating
    /// builds at batch 1: MobileNetV2's 960 -> 160 projections on 7×7
    /// 0.81-0.89× the time, 576 -> 160 0.79-0.98×; MobileNetV3-Large's
    /// 960 -> 160 0.86-0.93×, 672 -> 160 0.86-0.90×; whole forwards
    /// (`scripts/ab_builds.py`) MobileNetV3-Large 0.982×, MobileNetV2
    /// 0.992-1.004×, EfficientNet-B0 0.986× (noisy minutes).
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let call = self.spec.check(x, residual)?;
        let shape = call.shape;
        let (plane, outs, depth) = (shape.out_plane(), shape.out_channels, shape.channels);
        let out_len = shape.out_len();
        if out_len == 0 {
            return output(Vec::new(), shape.out_dims());
        }
        let mut out = Output::new(out_len, "conv output")?;
        let dst = out.shared(out_len);
        // Tasks own runs of output channels in units of the path's tile:
        // half a lane group on AVX2, so that 5 groups (160 channels) split
        // 5:5 halves on two threads rather than 3:2 groups.
        let unit = split_unit(self.isa);
        let units = self.padded_out / unit;
        let threads = rayon::current_num_threads();
        let per_run = units.div_ceil(threads.div_ceil(shape.batch).clamp(1, units));
        let runs = units.div_ceil(per_run);
        // Lane groups a run touches (one more where half-group runs start mid-group).
        let run_groups = (per_run * unit).div_ceil(LANES) + usize::from(unit < LANES);
        // Products of one run (`[groups][plane][LANES]`), then eight gathered rows.
        let Some(scratch_len) = (run_groups * LANES + 8).checked_mul(plane) else {
            bail!("pointwise conv on {:?}: products too large", call.x.dims())
        };
        let size = LaneProduct {
            rows: self.padded_out,
            depth,
            cols: plane,
            pixels: plane,
        };
        with_cpu_f32("pointwise conv", &call.x, call.residual.as_ref(), |input, residual| {
            try_for_each(0..shape.batch * runs, |task| {
                let (image, run) = (task / runs, task % runs);
                let lanes = run * per_run * unit..units.min((run + 1) * per_run) * unit;
                let groups = lane_groups(&lanes);
                let x = &input[image * depth * plane..][..depth * plane];
                with_scratch(scratch_len, |scratch| {
                    let (m, rows) = scratch.split_at_mut(groups.len() * LANES * plane);
                    let rows = &mut rows[..8 * plane];
                    lane_gemm_lanes(self.isa, size, &self.packed, x, m, lanes.clone(), 0..depth);
                    let channels = lanes.start..lanes.end.min(outs);
                    let mut o = channels.start;
                    while o < channels.end {
                        let (group, lane) = (o / LANES - groups.start, o % LANES);
                        let products = &m[group * plane * LANES..][..plane * LANES];
                        // Eight channels' rows at a time where eight are
                        // left in the group (runs start on a multiple of
                        // 16), else one.
                        let count = match o + 8 <= channels.end && lane + 8 <= LANES {
                            true => {
                                columns_to_block8(self.isa, products, LANES, lane, rows, (plane, plane));
                                8
                            }
                            false => {
                                for (value, pixel) in rows.iter_mut().zip(products.chunks_exact(LANES)) {
                                    *value = pixel[lane];
                                }
                                1
                            }
                        };
                        for (k, row) in rows.chunks_exact(plane).take(count).enumerate() {
                            let at = (image * outs + o + k) * plane;
                            // SAFETY: channel `o + k` of image `image`, which
                            // only this task writes (runs own disjoint channels).
                            let out = unsafe { dst.slice(at, plane) };
                            let residual = residual.map(|r| &r[at..][..plane]);
                            self.epilogue.write(o + k, out, row, residual);
                        }
                        o += count;
                    }
                })
            })
        })?;
        // SAFETY: the tasks cover every image and every output channel, and
        // each writes all `P` values of its real channels.
        unsafe { out.assume_written(out_len) };
        out.into_tensor(&shape.out_dims())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::tests::{random_case, RandomCase};
    use candle_core::Device;
    use proptest::prelude::*;
    use wick_ir::Conv2dAttrs;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

        /// Every path equals candle's conv + bias + residual + activation:
        /// output channels off the lane group (a partial last group),
        /// depths across the kernel's chunks, planes of a few pixels to a
        /// few dozen, batches of 1..4 (one run or several per image), on
        /// one thread and on three.
        #[test]
        fn matches_candle(
            batch in 1usize..4,
            channels in 1usize..300,
            out_channels in 1usize..80,
            [height, width] in [1usize..9, 1usize..9],
            residual in any::<bool>(),
            activation in proptest::option::of(0usize..6),
            threads in prop_oneof![Just(1usize), Just(3)],
        ) {
            let attrs = Conv2dAttrs::default();
            let dims = [batch, channels, height, width];
            let RandomCase { x, w, b, residual: r, activation, want } =
                random_case(dims, [out_channels, channels, 1, 1], attrs, activation, residual);
            let spec = ConvSpec::of(&w, attrs).unwrap();
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for isa in Isa::available() {
                let epilogue = Epilogue::new(Some(&b), out_channels, activation).unwrap().on(isa);
                let conv = PointwiseLanes::new(spec, &w, epilogue, Machine::with_isa(isa)).unwrap();
                let got = pool.install(|| conv.run(&x, r.as_ref())).unwrap();
                prop_assert_eq!(got.dims(), want.dims());
                let diff = crate::test_util::max_abs_diff(&got, &want);
                prop_assert!(diff <= 1e-5 * channels as f64 * 4.0, "{:?}: diff {}", isa, diff);
            }
        }
    }

    /// Convs it does not compute (a 3×3 kernel, a stride) are refused at
    /// construction, and an input of the wrong channel count at run time,
    /// with errors that say what was expected.
    #[test]
    fn refuses_what_it_does_not_compute() {
        let d = Device::Cpu;
        let isa = Isa::detect();
        let epilogue = |o| Epilogue::new(None, o, None).unwrap().on(isa);
        let w3 = Tensor::zeros((4, 2, 3, 3), candle_core::DType::F32, &d).unwrap();
        let spec3 = ConvSpec::of(&w3, Conv2dAttrs::default()).unwrap();
        let err = PointwiseLanes::new(spec3, &w3, epilogue(4), Machine::with_isa(isa)).unwrap_err();
        assert!(err.to_string().contains("1x1 kernel"), "{err}");
        let w1 = Tensor::zeros((4, 2, 1, 1), candle_core::DType::F32, &d).unwrap();
        let strided = Conv2dAttrs {
            stride: [2, 2],
            ..Conv2dAttrs::default()
        };
        let spec_s = ConvSpec::of(&w1, strided).unwrap();
        assert!(PointwiseLanes::new(spec_s, &w1, epilogue(4), Machine::with_isa(isa)).is_err());
        let spec = ConvSpec::of(&w1, Conv2dAttrs::default()).unwrap();
        let conv = PointwiseLanes::new(spec, &w1, epilogue(4), Machine::with_isa(isa)).unwrap();
        let x = Tensor::zeros((1, 3, 7, 7), candle_core::DType::F32, &d).unwrap();
        assert!(conv.run(&x, None).is_err());
    }
}
