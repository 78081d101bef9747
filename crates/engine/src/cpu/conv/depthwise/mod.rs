//! The depthwise CPU convolution (one filter per channel: groups = input =
//! output channels, MobileNets' and EfficientNets' k×k convs): each plane
//! is copied once into a zero-padded scratch with its columns split by
//! phase modulo the stride (so that every kernel tap reads a contiguous
//! run, at any stride; stride 2 by pairs, which vectorise), then the
//! output is computed in segments of 8 or 16 columns, four segments at a
//! time, with the sums in registers over all `kh·kw` taps and stored once.
//! On the SIMD paths ([`simd`]) the epilogue is applied in registers before
//! that store; the portable path runs it on the plane while it is in cache.
//! Planes (image × channel) run in parallel. Outputs up to 112 columns
//! wide (every depthwise conv of the models at 224×224) take [`blocked`]
//! on the SIMD paths instead: channels in the vector lanes, no lane idle
//! on a 7-wide row, tasks band by band.
//!
//! The grouped conv's im2col + per-group GEMM spent its time on thousands
//! of one-row products here. A first version accumulated each tap into
//! the output row (`out[..] += w · in[..]`): LLVM's 64-wide unrolled loop
//! never ran on rows of 56 or fewer columns, so nearly every value went
//! through its scalar remainder, and the stride-2 split divided per value;
//! MobileNetV2 batch 1 on Zen 4 spent 6.0 ms of ~17 in its depthwise
//! convs then, 3.0 ms with one segment at a time (add latency bound), and
//! the whole model took 7.9 -> 6.6 ms more with four segments at once,
//! the pair split and the epilogue compiled for the path, and 6.85 ->
//! 5.9 ms with the SIMD segments, the plane copy's divisions taken out of
//! its row loop and its rows copied inline (alternating runs).

use super::{output, ConvShape, ConvSpec};
use crate::cpu::data::{with_cpu_f32, SCRATCH_MAX_VALUES};
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::Isa;
use crate::cpu::output::Output;
use crate::cpu::parallel::{per_task, try_for_each};
use crate::machine::Machine;
use candle_core::{bail, Tensor};
use std::mem::MaybeUninit;

mod blocked;
mod plane;
mod simd;

pub(crate) use blocked::project::Projection;
use blocked::Source;
pub(crate) use blocked::{ExpandWeights, Window, MAX_WINDOW_DEPTH};
use plane::{units, Plane, Segments, Split, SEGMENT_SLACK, UNITS};

/// A depthwise convolution with its weights kept for the CPU.
#[derive(Debug)]
pub(crate) struct DepthwiseConv {
    spec: ConvSpec,
    /// Weights `[C, kh·kw]`.
    weight: Vec<f32>,
    epilogue: Epilogue,
    isa: Isa,
    /// The weights for narrow outputs, channels in the lanes (SIMD paths).
    blocked: Option<blocked::BlockedWeights>,
}

impl DepthwiseConv {
    /// Whether `spec` is depthwise with one filter per channel (more than one channel).
    pub(crate) fn applies(spec: &ConvSpec) -> bool {
        let groups = spec.attrs.groups;
        groups > 1 && spec.in_channels == groups && spec.out_channels == groups
    }

    /// Keeps `weight` (`[C, 1, kh, kw]`, f32) for `spec` on `machine`'s
    /// path, the blocked form's bands sized from its caches.
    pub(crate) fn new(
        spec: ConvSpec,
        weight: &Tensor,
        epilogue: Epilogue,
        machine: Machine,
    ) -> candle_core::Result<Self> {
        let isa = machine.isa;
        if !Self::applies(&spec) {
            bail!(
                "a depthwise conv needs groups = input = output channels, got {} groups, {} -> {} channels",
                spec.attrs.groups,
                spec.in_channels,
                spec.out_channels
            )
        }
        let weight = weight.flatten_all()?.to_vec1::<f32>()?;
        let blocked = blocked::BlockedWeights::new(&weight, spec.in_channels, &epilogue, machine);
        Ok(Self {
            spec,
            weight,
            epilogue,
            isa,
            blocked,
        })
    }

    /// This conv with the channel-blocked path's bands of about `bytes`
    /// (tests: several bands on small planes).
    #[cfg(test)]
    pub(crate) fn with_band_bytes(mut self, bytes: usize) -> Self {
        if let Some(b) = self.blocked.as_mut() {
            b.band_bytes = bytes;
        }
        self
    }

    /// This conv running a fused 1×1 conv `n` blocks per task (tests: the
    /// one- and two-block forms on small shapes).
    #[cfg(test)]
    pub(crate) fn with_blocks_per_task(mut self, n: usize) -> Self {
        if let Some(b) = self.blocked.as_mut() {
            b.blocks_per_task = Some(n);
        }
        self
    }

    /// The form that runs an output `out_width` wide: channels in the lanes
    /// (`blocked`) or plane-wise segments.
    pub(crate) fn form(&self, out_width: usize) -> &'static str {
        match self.blocks(out_width) {
            true => "channel-blocked",
            false => "plane segments",
        }
    }

    /// Whether an output `out_width` wide takes the blocked path.
    fn blocks(&self, out_width: usize) -> bool {
        self.blocked.is_some() && out_width <= blocked::MAX_OUT_WIDTH
    }

    /// The channels per block of the blocked form, if this conv has one
    /// (what a 1×1 conv fused in front blocks its outputs by).
    pub(crate) fn lanes(&self) -> Option<usize> {
        self.blocked.as_ref().map(|b| b.lanes)
    }

    /// The channels per block of the blocked form a depthwise conv takes
    /// on `isa` for an output `out_width` wide, if it takes that form.
    pub(crate) fn blocked_lanes(isa: Isa, out_width: usize) -> Option<usize> {
        blocked::lanes_for(isa, out_width)
    }

    /// A fused call's operand `x` (`[N, C_in, H, W]`: the input of the
    /// conv `expand` fused in front, or this conv's), contiguous, this
    /// conv's shape on it (on `expand`'s output) and its channel-blocked
    /// weights; an error when `x` is not so or its output takes the plane
    /// segments.
    fn blocked_call(
        &self,
        x: &Tensor,
        expand: Option<&ExpandWeights>,
    ) -> candle_core::Result<(Tensor, ConvShape, &blocked::BlockedWeights)> {
        let x = x.contiguous()?;
        let &[batch, in_channels, height, width] = x.dims() else {
            bail!("fused conv input must be NCHW, got {:?}", x.dims())
        };
        let channels = expand.map_or(self.spec.in_channels, |e| e.in_channels());
        if in_channels != channels {
            bail!("fused conv expects {channels} input channels, got {in_channels}")
        }
        let [height, width] = match expand {
            Some(e) => e.output_size([height, width])?,
            None => [height, width],
        };
        let shape = self.spec.shape([batch, self.spec.in_channels, height, width])?;
        let Some(weights) = self.blocked.as_ref().filter(|_| self.blocks(shape.out_width)) else {
            bail!(
                "depthwise conv: no channel-blocked form for an output {} wide",
                shape.out_width
            )
        };
        Ok((x, shape, weights))
    }

    /// Runs on the output of the conv `expand` applied to `x` (`[N,
    /// C_in, H, W]`, CPU f32) without making it: each band's input is
    /// computed from `x` (channel-blocked form only: an error when an
    /// output `out_width` wide would take the plane segments, or when
    /// `expand` is blocked otherwise or has other channels).
    pub(crate) fn run_expanded(&self, expand: &ExpandWeights, x: &Tensor) -> candle_core::Result<Tensor> {
        let (x, shape, weights) = self.blocked_call(x, Some(expand))?;
        let out_len = shape.out_len();
        let mut out = Output::new(out_len, "conv output")?;
        with_cpu_f32("depthwise conv", &x, None, |data, _| {
            let (epilogue, kernel, a) = (&self.epilogue, self.spec.kernel, self.spec.attrs);
            let source = Source::Expanded(data, expand);
            blocked::run(weights, epilogue, self.isa, shape, kernel, a, source, None, &mut out)
        })?;
        // SAFETY: `blocked::run` wrote all `out_len` values.
        unsafe { out.assume_written(out_len) };
        out.into_tensor(&shape.out_dims())
    }

    /// This conv on `x` (or, with `expand`, [`Self::run_expanded`]) with
    /// the 1×1 conv `projection` applied to its output (`[N, O, OH, OW]`,
    /// plus `residual` of that shape before the projection's activation),
    /// without making that output ([`blocked::project`]); `None` where too
    /// few bands would share the threads (the caller runs the convs in turn).
    pub(crate) fn run_projected(
        &self,
        expand: Option<&ExpandWeights>,
        x: &Tensor,
        projection: Projection<'_>,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Option<Tensor>> {
        if projection.in_channels != self.spec.out_channels {
            bail!(
                "fused 1×1 conv after the depthwise conv expects {} input channels, got {}",
                projection.in_channels,
                self.spec.out_channels
            )
        }
        let (x, shape, weights) = self.blocked_call(x, expand)?;
        let dims = [shape.batch, projection.out_channels, shape.out_height, shape.out_width];
        let out_len = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        let Some(out_len) = out_len else {
            bail!("fused 1×1 conv output {dims:?} overflows")
        };
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        if residual.as_ref().is_some_and(|r| r.dims() != dims) {
            bail!("fused 1×1 conv residual must be {dims:?}")
        }
        let out = with_cpu_f32("depthwise conv", &x, residual.as_ref(), |data, residual| {
            let source = match expand {
                Some(e) => Source::Expanded(data, e),
                None => Source::Planes(data),
            };
            let ops = blocked::project::Operands {
                source,
                projection,
                residual,
            };
            let (kernel, attrs, activation) = (self.spec.kernel, self.spec.attrs, self.epilogue.activation());
            blocked::project::run(self.isa, weights, activation, shape, (kernel, attrs), ops)
        })?;
        let Some(mut out) = out else {
            return Ok(None);
        };
        // SAFETY: `project::run` wrote all `out_len` values.
        unsafe { out.assume_written(out_len) };
        out.into_tensor(&dims).map(Some)
    }

    /// Runs on a CPU f32 tensor `[N, C, H, W]`, adding `residual` (the
    /// output's shape) before the optional ReLU.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let call = self.spec.check(x, residual)?;
        let shape = call.shape;
        let a = self.spec.attrs;
        let stride_w = a.stride[1];
        // The padded plane, its columns split by phase modulo the stride:
        // phase p holds padded columns p, p + s, p + 2s, ... so that every
        // kernel tap reads a contiguous run of its phase's row.
        let padded = [
            shape.height.checked_add(2 * a.padding[0]),
            shape.width.checked_add(2 * a.padding[1]),
        ];
        let [Some(padded_height), Some(padded_width)] = padded else {
            bail!("depthwise conv: padded input of {:?} overflows", shape)
        };
        let phase_width = padded_width.div_ceil(stride_w);
        // The phases, then `SEGMENT_SLACK` values so that a whole segment
        // read at a row's end stays inside the scratch (see [`Plane`]).
        let padded_len = match [padded_height, phase_width, stride_w]
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|n| n.checked_add(SEGMENT_SLACK))
        {
            Some(len) if len <= SCRATCH_MAX_VALUES => len,
            _ => bail!("depthwise conv: a padded plane of {padded_height} x {padded_width} exceeds the {SCRATCH_MAX_VALUES} values allowed"),
        };
        let (in_plane, out_plane) = (shape.in_plane(), shape.out_plane());
        let out_len = shape.out_len();
        if out_len == 0 {
            return output(Vec::new(), shape.out_dims());
        }
        // Not zeroed: every value is written (the segments cover each row).
        let mut out = Output::new(out_len, "conv output")?;
        if let Some(weights) = self.blocked.as_ref().filter(|_| self.blocks(shape.out_width)) {
            with_cpu_f32("depthwise conv", &call.x, call.residual.as_ref(), |data, residual| {
                let (epilogue, kernel) = (&self.epilogue, self.spec.kernel);
                blocked::run(
                    weights,
                    epilogue,
                    self.isa,
                    shape,
                    kernel,
                    a,
                    Source::Planes(data),
                    residual,
                    &mut out,
                )
            })?;
            // SAFETY: `blocked::run` wrote all `out_len` values.
            unsafe { out.assume_written(out_len) };
            return out.into_tensor(&shape.out_dims());
        }
        let [kh, kw] = self.spec.kernel;
        let phase_len = padded_height * phase_width;
        // Where tap (ky, kx) of output (0, 0) reads: padded column kx·dw is
        // phase (kx·dw) mod sw, index (kx·dw) / sw, of padded row ky·dh.
        let offsets: Vec<usize> = (0..kh)
            .flat_map(|ky| (0..kw).map(move |kx| (ky, kx)))
            .map(|(ky, kx)| {
                let column = kx * a.dilation[1];
                (column % stride_w) * phase_len + ky * a.dilation[0] * phase_width + column / stride_w
            })
            .collect();
        let taps = offsets.len();
        // Narrow rows (7×7 planes) waste less in 8-wide segments; AVX2's
        // vectors are 8 wide.
        let segment = if shape.out_width <= 8 || self.isa == Isa::Avx2Fma {
            8
        } else {
            16
        };
        let units = units(shape.out_height, shape.out_width, segment, a.stride[0] * phase_width);
        // How far any segment reads into the phases: within every plane's
        // scratch (`padded_len` values), checked once.
        let reach = units.iter().map(|u| u.read).max().unwrap_or(0) + offsets.iter().max().unwrap_or(&0) + segment;
        if reach > padded_len {
            bail!("depthwise conv: segments reach {reach} values in a padded plane of {padded_len}")
        }
        with_cpu_f32("depthwise conv", &call.x, call.residual.as_ref(), |data, residual| {
            let plane_task = |scratch: &mut Vec<f32>, plane: usize, out: &mut [MaybeUninit<f32>]| {
                if scratch.len() != padded_len {
                    scratch.clear();
                    if scratch.try_reserve_exact(padded_len).is_err() {
                        bail!("depthwise conv: cannot allocate a padded plane of {padded_len} values")
                    }
                    scratch.resize(padded_len, 0.0);
                }
                let channel = plane % shape.channels;
                let input = &data[plane * in_plane..][..in_plane];
                self.isa.run(Split {
                    input,
                    width: shape.width,
                    scratch: &mut scratch[..],
                    phase_len,
                    phase_width,
                    padding: a.padding,
                    stride: stride_w,
                });
                let residual = residual.map(|r| &r[plane * out_plane..][..out_plane]);
                if residual.is_some_and(|r| r.len() != out.len()) {
                    bail!("depthwise conv: a residual plane of another size")
                }
                let activation = self.epilogue.activation();
                let body = Plane {
                    phases: scratch,
                    offsets: &offsets,
                    units: &units,
                    weight: &self.weight[channel * taps..][..taps],
                    bias: self.epilogue.bias(channel),
                    activation,
                    residual,
                    out: &mut *out,
                };
                // Whether the segments applied the epilogue as they stored.
                let fused = match self.isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 | Isa::Avx2Fma => {
                        if segment == 16 {
                            // SAFETY: the path has AVX-512F (16-wide segments
                            // are only chosen on `Isa::Avx512`, handed out
                            // then); `reach` bounds every read and was checked
                            // against the phases above, the units lie within
                            // the plane (`units`), the residual has its length.
                            unsafe { simd::segments_avx512(body) }
                        } else {
                            // SAFETY: as above; every AVX-512 path also has
                            // AVX2 and FMA (`Isa::available` checks all three).
                            unsafe { simd::segments_avx2(body) }
                        }
                        true
                    }
                    _ => {
                        if segment == 8 {
                            self.isa.run(Segments::<8>(body));
                        } else {
                            self.isa.run(Segments::<16>(body));
                        }
                        false
                    }
                };
                // SAFETY: the segments wrote every value of this plane (their
                // units cover every column of every output row), so the
                // slice is initialised; f32 and MaybeUninit<f32> share a layout.
                let out = unsafe { &mut *(out as *mut [MaybeUninit<f32>] as *mut [f32]) };
                if !fused {
                    self.epilogue.in_place(channel, out, residual);
                }
                Ok(())
            };
            // Whole planes per task, one scratch each.
            let per = per_task(out_len / out_plane.max(1), 4);
            try_for_each(
                out.spare()[..out_len].chunks_mut(per * out_plane).enumerate(),
                |(k, outs)| {
                    let mut scratch = Vec::new();
                    for (i, out) in outs.chunks_mut(out_plane).enumerate() {
                        plane_task(&mut scratch, k * per + i, out)?;
                    }
                    Ok(())
                },
            )
        })?;
        // SAFETY: the planes cover all `out_len` values, each written above.
        unsafe { out.assume_written(out_len) };
        out.into_tensor(&shape.out_dims())
    }
}
