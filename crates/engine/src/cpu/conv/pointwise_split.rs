//! The 1×1 CPU convolution split along its depth: the in-place GEMM
//! ([`super::pointwise`]) run twice, on the first half of the input
//! channels into the output and on the second half into scratch, in
//! parallel, then the two sums added and the epilogue applied. For a
//! projection (many more input channels than output channels) on a small
//! plane at batch 1, where the usual split (column shares or runs of
//! output channels) has every task read the whole depth of its columns:
//! here each task reads half the input channels and half the weights,
//! and what crosses between the tasks is the second half's sums (`O·P`
//! values, against `C·P/2` of input).
//!
//! Where it is chosen ([`crate::cpu::conv_algorithm`]) and what it
//! measured: [`crate::cpu::SPLIT_MIN_DEPTH_RATIO`].

use super::pointwise::{with_optional_f32, PointwiseConv, Task};
use super::{output, ConvSpec};
use crate::cpu::data::{with_cpu_f32, with_scratch, with_shared_scratch, SharedOut};
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::SharedRows;
use crate::cpu::output::Output;
use crate::cpu::parallel::try_for_each;
use crate::machine::Machine;
use candle_core::{bail, Tensor};
use std::ops::Range;

/// A 1×1 convolution (stride 1, no padding, one group) as two half-depth
/// in-place GEMMs and an epilogue over their sum.
#[derive(Debug)]
pub(crate) struct PointwiseSplit {
    spec: ConvSpec,
    /// The conv on input channels `0..split` and on `split..C`, each with
    /// its own packed weights and no bias or activation.
    halves: [PointwiseConv; 2],
    /// Where the second half's input channels start.
    split: usize,
    epilogue: Epilogue,
}

impl PointwiseSplit {
    /// Packs `weight` (`[O, C, 1, 1]`, f32) for `spec` on `machine`'s path
    /// in two halves of the input channels; an error for any conv other
    /// than a 1×1 one with stride 1, no padding and one group, or with
    /// fewer than two input channels.
    pub(crate) fn new(
        spec: ConvSpec,
        weight: &Tensor,
        epilogue: Epilogue,
        machine: Machine,
    ) -> candle_core::Result<Self> {
        // The kernel's check first: it names what a 1×1 conv needs.
        PointwiseConv::plain_weights(&spec, weight)?;
        let depth = spec.in_channels;
        if depth < 2 {
            bail!("a depth-split 1x1 conv needs at least 2 input channels, got {depth}")
        }
        let split = depth / 2;
        let half = |channels: Range<usize>| {
            let weight = weight.narrow(1, channels.start, channels.len())?.contiguous()?;
            let spec = ConvSpec {
                in_channels: channels.len(),
                ..spec
            };
            let sums = Epilogue::new(None, spec.out_channels, None)?.on(machine.isa);
            PointwiseConv::new(spec, &weight, sums, machine)
        };
        Ok(Self {
            spec,
            halves: [half(0..split)?, half(split..depth)?],
            split,
            epilogue,
        })
    }

    /// Runs on a CPU f32 tensor `[N, C, H, W]` times `scale` (`[N, C, 1,
    /// 1]`, squeeze-and-excitation's factors, if given), adding `residual`
    /// (the output's shape) before the activation. Image by image: the two
    /// halves in parallel (each in column shares where there are more than
    /// two threads), then their sum with the epilogue, row by row.
    pub(crate) fn run_scaled(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        scale: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let call = self.spec.check(x, residual)?;
        let shape = call.shape;
        let (plane, outs, depth) = (shape.out_plane(), shape.out_channels, shape.channels);
        let out_len = shape.out_len();
        let scale = match scale {
            Some(s) if s.dims() != [shape.batch, depth, 1, 1] => bail!(
                "the scale of a {:?} conv input must be [{}, {depth}, 1, 1], got {:?}",
                call.x.dims(),
                shape.batch,
                s.dims()
            ),
            Some(s) => Some(s.contiguous()?),
            None => None,
        };
        if out_len == 0 {
            return output(Vec::new(), shape.out_dims());
        }
        // One image's output: at most the whole output, whose size is checked.
        let image_out = outs * plane;
        let mut out = Output::new(out_len, "conv output")?;
        let dst = out.shared(out_len);
        let parts = (rayon::current_num_threads() / 2).max(1);
        let halves = [0..self.split, self.split..depth];
        with_cpu_f32("pointwise conv", &call.x, call.residual.as_ref(), |input, residual| {
            with_optional_f32("pointwise conv's input scale", scale.as_ref(), |scale| {
                with_shared_scratch(image_out, |partial| {
                    let sums = SharedOut::over(partial);
                    for image in 0..shape.batch {
                        let x = &input[image * depth * plane..][..depth * plane];
                        let scale = scale.map(|s| &s[image * depth..][..depth]);
                        try_for_each(0..2 * parts, |task| {
                            let (half, part) = (task / parts, task % parts);
                            let channels = halves[half].clone();
                            // The first half's sums go to the output, the second's to scratch.
                            let out = match half {
                                0 => SharedRows {
                                    out: dst,
                                    start: image * image_out,
                                    stride: plane,
                                },
                                _ => SharedRows {
                                    out: sums,
                                    start: 0,
                                    stride: plane,
                                },
                            };
                            self.halves[half].task(Task {
                                input: &x[channels.start * plane..channels.end * plane],
                                residual: None,
                                out,
                                rows: 0..outs,
                                part: (part, parts),
                                stream: false,
                                scale: scale.map(|s| &s[channels]),
                                packed: None,
                            })
                        })?;
                        // SAFETY: the tasks are done; only this thread uses
                        // the image's output and the scratch from here on.
                        let (out, partial) =
                            unsafe { (dst.slice(image * image_out, image_out), sums.slice(0, image_out)) };
                        with_scratch(plane, |row| {
                            for (o, (out, partial)) in
                                out.chunks_exact_mut(plane).zip(partial.chunks_exact(plane)).enumerate()
                            {
                                for ((sum, a), b) in row.iter_mut().zip(&*out).zip(partial) {
                                    *sum = a + b;
                                }
                                let at = image * image_out + o * plane;
                                let residual = residual.map(|r| &r[at..][..plane]);
                                self.epilogue.write(o, out, row, residual);
                            }
                        })?;
                    }
                    Ok(())
                })?
            })
        })?;
        // SAFETY: every image's channels were written above, all `P` values each.
        unsafe { out.assume_written(out_len) };
        out.into_tensor(&shape.out_dims())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::tests::{random_case, RandomCase};
    use crate::cpu::gemm::Isa;
    use candle_core::Device;
    use proptest::prelude::*;
    use wick_ir::Conv2dAttrs;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

        /// Every path equals candle's conv + bias + residual + activation on
        /// the (optionally scaled) input: odd depths (halves of unequal
        /// size), output channels off the panel size, planes off the
        /// micro-tile width, batches of 1..3 (image by image), on one
        /// thread (the halves one after the other), two (one each) and
        /// five (each half in two column shares).
        #[test]
        fn matches_candle(
            batch in 1usize..4,
            channels in 2usize..90,
            out_channels in 1usize..30,
            [height, width] in [1usize..16, 1usize..20],
            residual in any::<bool>(),
            activation in proptest::option::of(0usize..6),
            scaled in any::<bool>(),
            threads in prop_oneof![Just(1usize), Just(2), Just(5)],
        ) {
            let attrs = Conv2dAttrs::default();
            let dims = [batch, channels, height, width];
            let case = random_case(dims, [out_channels, channels, 1, 1], attrs, activation, residual);
            let RandomCase { x, w, b, residual: r, activation, .. } = &case;
            // Scaled: candle's answer on the scaled input.
            let s = Tensor::randn(0f32, 1.0, (batch, channels, 1, 1), &Device::Cpu).unwrap();
            let scale = scaled.then_some(&s);
            let want = case.want_scaled(attrs, scale);
            let spec = ConvSpec::of(w, attrs).unwrap();
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for isa in Isa::available() {
                let epilogue = Epilogue::new(Some(b), out_channels, *activation).unwrap().on(isa);
                let conv = PointwiseSplit::new(spec, w, epilogue, Machine::with_isa(isa)).unwrap();
                let got = pool.install(|| conv.run_scaled(x, r.as_ref(), scale)).unwrap();
                prop_assert_eq!(got.dims(), want.dims());
                let diff = crate::test_util::max_abs_diff(&got, &want);
                prop_assert!(diff <= 1e-5 * channels as f64 * 4.0, "{:?}: diff {}", isa, diff);
            }
        }
    }

    /// Convs it does not compute are refused at construction (a 3×3
    /// kernel, a single input channel), and operands of the wrong shape at
    /// run time (the input's channels, the scale's), with errors that say
    /// what was expected.
    #[test]
    fn refuses_what_it_does_not_compute() {
        let d = Device::Cpu;
        let isa = Isa::detect();
        let machine = Machine::with_isa(isa);
        let epilogue = |o| Epilogue::new(None, o, None).unwrap().on(isa);
        let w3 = Tensor::zeros((4, 2, 3, 3), candle_core::DType::F32, &d).unwrap();
        let spec3 = ConvSpec::of(&w3, Conv2dAttrs::default()).unwrap();
        let err = PointwiseSplit::new(spec3, &w3, epilogue(4), machine).unwrap_err();
        assert!(err.to_string().contains("1x1 kernel"), "{err}");
        let w1 = Tensor::zeros((4, 1, 1, 1), candle_core::DType::F32, &d).unwrap();
        let spec1 = ConvSpec::of(&w1, Conv2dAttrs::default()).unwrap();
        let err = PointwiseSplit::new(spec1, &w1, epilogue(4), machine).unwrap_err();
        assert!(err.to_string().contains("at least 2 input channels"), "{err}");

        let w = Tensor::zeros((4, 6, 1, 1), candle_core::DType::F32, &d).unwrap();
        let spec = ConvSpec::of(&w, Conv2dAttrs::default()).unwrap();
        let conv = PointwiseSplit::new(spec, &w, epilogue(4), machine).unwrap();
        let x = Tensor::zeros((1, 5, 3, 3), candle_core::DType::F32, &d).unwrap();
        assert!(conv.run_scaled(&x, None, None).is_err());
        let x = Tensor::zeros((1, 6, 3, 3), candle_core::DType::F32, &d).unwrap();
        let s = Tensor::zeros((1, 5, 1, 1), candle_core::DType::F32, &d).unwrap();
        let err = conv.run_scaled(&x, None, Some(&s)).unwrap_err();
        assert!(err.to_string().contains("[1, 6, 1, 1]"), "{err}");
    }
}
