//! wick's CPU f32 convolutions (NCHW, weights packed at compile time, the
//! epilogue applied while the output is in cache), one module per
//! algorithm family, and what they share: the conv they compute
//! ([`ConvSpec`]) and the one check of a call's operands ([`ConvSpec::check`]).
//!
//! Which algorithm runs a node is decided in [`super::conv_algorithm`].

pub(crate) mod depthwise;
pub(crate) mod direct;
pub(crate) mod gemv;
pub(crate) mod grouped;
pub(crate) mod planes;
pub(crate) mod pointwise;
pub(crate) mod pointwise_lanes;
pub(crate) mod pointwise_split;
pub(crate) mod stem;
pub(crate) mod stem_tile;
pub(crate) mod winograd;

use super::epilogue::Epilogue;
use super::pool::MaxPool;
use super::ConvAlgorithm;
use crate::cpu::gemm::Layout;
use crate::machine::Machine;
use candle_core::{bail, Device, Tensor};
use depthwise::DepthwiseConv;
use direct::DirectConv;
use gemv::GemvConv;
use grouped::GroupedConv;
use pointwise::PointwiseConv;
use pointwise_lanes::PointwiseLanes;
use pointwise_split::PointwiseSplit;
use stem::StemConv;
use wick_ir::{Conv2dAttrs, MaxPool2dAttrs};
use winograd::{WinogradF2, WinogradF4};

/// The convolution a kernel computes, fixed at compile time by its weights
/// and attributes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvSpec {
    /// Input channels of the whole conv (all groups).
    pub(crate) in_channels: usize,
    /// Output channels.
    pub(crate) out_channels: usize,
    /// Kernel `[height, width]`.
    pub(crate) kernel: [usize; 2],
    /// Stride, padding, dilation, groups.
    pub(crate) attrs: Conv2dAttrs,
}

impl ConvSpec {
    /// The spec of `weight` (`[O, C/g, kh, kw]`) with `attrs`.
    pub(crate) fn of(weight: &Tensor, attrs: Conv2dAttrs) -> candle_core::Result<Self> {
        let (out_channels, group_channels, kh, kw) = weight.dims4()?;
        let Some(in_channels) = group_channels.checked_mul(attrs.groups) else {
            bail!("{group_channels} channels × {} groups overflow", attrs.groups)
        };
        Ok(Self {
            in_channels,
            out_channels,
            kernel: [kh, kw],
            attrs,
        })
    }

    /// The shapes of a call on an input `[N, C, H, W]` (`dims`): `C` this
    /// conv's input channels, the window fitting `H × W`, the output length
    /// fitting `usize`.
    pub(crate) fn shape(&self, dims: [usize; 4]) -> candle_core::Result<ConvShape> {
        let [batch, channels, height, width] = dims;
        if channels != self.in_channels {
            bail!("conv expects {} input channels, got {channels}", self.in_channels)
        }
        let Some([out_height, out_width]) = self.attrs.output_size(self.kernel, [height, width]) else {
            bail!("kernel {:?} does not fit input {:?}", self.kernel, dims)
        };
        let shape = ConvShape {
            batch,
            channels,
            height,
            width,
            out_channels: self.out_channels,
            out_height,
            out_width,
        };
        if shape
            .out_dims()
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .is_none()
        {
            bail!(
                "conv output {:?} has more elements than fit in memory",
                shape.out_dims()
            )
        }
        Ok(shape)
    }

    /// The one check every CPU conv makes on its operands: `x` is `[N, C,
    /// H, W]` f32 with `C` this conv's input channels and the window fitting
    /// `H × W`; `residual`, if any, has the conv output's shape; the output
    /// length fits `usize`. Returns both operands contiguous, with the shapes.
    pub(crate) fn check(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<ConvCall> {
        let x = x.contiguous()?;
        let &[batch, channels, height, width] = x.dims() else {
            bail!("conv input must be NCHW, got {:?}", x.dims())
        };
        let shape = self.shape([batch, channels, height, width])?;
        let residual = residual.map(|r| r.contiguous()).transpose()?;
        if residual.as_ref().is_some_and(|r| r.dims() != shape.out_dims()) {
            bail!(
                "the residual of a conv must have the output's shape {:?}",
                shape.out_dims()
            )
        }
        Ok(ConvCall { x, residual, shape })
    }
}

/// The shapes of one conv call (see [`ConvSpec::check`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvShape {
    /// N.
    pub(crate) batch: usize,
    /// C, the input's channels.
    pub(crate) channels: usize,
    /// H.
    pub(crate) height: usize,
    /// W.
    pub(crate) width: usize,
    /// O, the output's channels.
    pub(crate) out_channels: usize,
    /// OH.
    pub(crate) out_height: usize,
    /// OW.
    pub(crate) out_width: usize,
}

impl ConvShape {
    /// `[N, O, OH, OW]`.
    pub(crate) fn out_dims(&self) -> [usize; 4] {
        [self.batch, self.out_channels, self.out_height, self.out_width]
    }

    /// `N·O·OH·OW` (checked to fit by [`ConvSpec::check`]).
    pub(crate) fn out_len(&self) -> usize {
        self.out_dims().iter().product()
    }

    /// `H·W`.
    pub(crate) fn in_plane(&self) -> usize {
        self.height * self.width
    }

    /// `OH·OW`.
    pub(crate) fn out_plane(&self) -> usize {
        self.out_height * self.out_width
    }
}

/// A checked call: contiguous operands and their shapes.
pub(crate) struct ConvCall {
    /// The input, contiguous.
    pub(crate) x: Tensor,
    /// The residual, contiguous, of the conv output's shape.
    pub(crate) residual: Option<Tensor>,
    /// The shapes.
    pub(crate) shape: ConvShape,
}

/// An output tensor from a buffer of `dims`' elements.
pub(crate) fn output(values: Vec<f32>, dims: [usize; 4]) -> candle_core::Result<Tensor> {
    Tensor::from_vec(values, dims.to_vec(), &Device::Cpu)
}

/// A CPU conv with its weights packed for one algorithm.
#[derive(Debug)]
pub(crate) enum CpuConv {
    /// Winograd F(4×4, 3×3).
    WinogradF4(WinogradF4),
    /// Winograd F(2×2, 3×3).
    WinogradF2(WinogradF2),
    /// Blocked implicit GEMM (one group), optionally with a fused max pool.
    Direct(DirectConv),
    /// Per-group im2col + `gemm`, then the fused max pool, if any, as a pass of its own.
    Grouped(GroupedConv, Option<MaxPool>),
    /// One filter per channel, then the fused max pool, if any, as a pass of its own.
    Depthwise(DepthwiseConv, Option<MaxPool>),
    /// A 1×1 conv as a GEMM on the NCHW planes in place.
    Pointwise(PointwiseConv),
    /// A 1×1 conv on small planes, output channels on the vector lanes.
    PointwiseLanes(PointwiseLanes),
    /// A 1×1 conv as two half-depth GEMMs in parallel and their sum
    /// (boxed: two 1×1 convs, the enum's largest variant by far).
    PointwiseSplit(Box<PointwiseSplit>),
    /// A 1×1 conv on 1×1 planes as dot products.
    Gemv(GemvConv),
    /// A conv of few input channels with a fused max pool, output channels
    /// on the vector lanes.
    Stem(StemConv),
}

impl CpuConv {
    /// Packs `weight` and `bias` for `algorithm` (from [`super::conv_algorithm`])
    /// on `machine`'s path, with blocks sized from its caches.
    pub(crate) fn new(
        algorithm: ConvAlgorithm,
        weight: &Tensor,
        bias: Option<&Tensor>,
        attrs: Conv2dAttrs,
        activation: Option<wick_ir::Activation>,
        pool: Option<MaxPool2dAttrs>,
        machine: Machine,
    ) -> candle_core::Result<Self> {
        let spec = ConvSpec::of(weight, attrs)?;
        let epilogue = Epilogue::new(bias, spec.out_channels, activation)?.on(machine.isa);
        // A pool the conv leaves to a pass of its own, on the machine's path.
        let unfused_pool = |pool: Option<MaxPool2dAttrs>| {
            pool.map(|attrs| MaxPool {
                attrs,
                isa: machine.isa,
            })
        };
        let pool_unfused = |algorithm: &str| match pool {
            Some(_) => bail!("{algorithm} takes no fused pool"),
            None => Ok(()),
        };
        Ok(match algorithm {
            ConvAlgorithm::WinogradF4 => {
                pool_unfused("winograd")?;
                CpuConv::WinogradF4(WinogradF4::new(spec, weight, epilogue, machine)?)
            }
            ConvAlgorithm::WinogradF2 => {
                pool_unfused("winograd")?;
                CpuConv::WinogradF2(WinogradF2::new(spec, weight, epilogue, machine)?)
            }
            ConvAlgorithm::DirectPanels => {
                CpuConv::Direct(DirectConv::new(spec, weight, epilogue, pool, Layout::Panels, machine)?)
            }
            ConvAlgorithm::DirectLanes => {
                CpuConv::Direct(DirectConv::new(spec, weight, epilogue, pool, Layout::Lanes, machine)?)
            }
            ConvAlgorithm::Grouped => CpuConv::Grouped(GroupedConv::new(spec, weight, epilogue)?, unfused_pool(pool)),
            ConvAlgorithm::Depthwise => {
                CpuConv::Depthwise(DepthwiseConv::new(spec, weight, epilogue, machine)?, unfused_pool(pool))
            }
            ConvAlgorithm::Pointwise => {
                pool_unfused("pointwise")?;
                CpuConv::Pointwise(PointwiseConv::new(spec, weight, epilogue, machine)?)
            }
            ConvAlgorithm::PointwiseLanes => {
                pool_unfused("pointwise")?;
                CpuConv::PointwiseLanes(PointwiseLanes::new(spec, weight, epilogue, machine)?)
            }
            ConvAlgorithm::PointwiseSplit => {
                pool_unfused("pointwise")?;
                CpuConv::PointwiseSplit(Box::new(PointwiseSplit::new(spec, weight, epilogue, machine)?))
            }
            ConvAlgorithm::Gemv => {
                pool_unfused("gemv")?;
                CpuConv::Gemv(GemvConv::new(spec, weight, epilogue, machine.isa)?)
            }
            ConvAlgorithm::Stem => {
                let Some(pool) = pool else {
                    bail!("the stem conv runs with a fused max pool")
                };
                CpuConv::Stem(StemConv::new(spec, weight, epilogue, pool, machine)?)
            }
        })
    }

    /// The algorithm, as logged at compile time (and checked by tests).
    pub(crate) fn algorithm(&self) -> ConvAlgorithm {
        match self {
            CpuConv::WinogradF4(_) => ConvAlgorithm::WinogradF4,
            CpuConv::WinogradF2(_) => ConvAlgorithm::WinogradF2,
            CpuConv::Direct(conv) => match conv.layout() {
                Layout::Panels => ConvAlgorithm::DirectPanels,
                Layout::Lanes => ConvAlgorithm::DirectLanes,
            },
            CpuConv::Grouped(..) => ConvAlgorithm::Grouped,
            CpuConv::Depthwise(..) => ConvAlgorithm::Depthwise,
            CpuConv::Pointwise(_) => ConvAlgorithm::Pointwise,
            CpuConv::PointwiseLanes(_) => ConvAlgorithm::PointwiseLanes,
            CpuConv::PointwiseSplit(_) => ConvAlgorithm::PointwiseSplit,
            CpuConv::Gemv(_) => ConvAlgorithm::Gemv,
            CpuConv::Stem(_) => ConvAlgorithm::Stem,
        }
    }

    /// Which form of its algorithm runs a node whose output is `out_width`
    /// wide, where the algorithm has more than one (the debug log's
    /// `form`; not stated behind a fused pool, whose input is wider).
    pub(crate) fn form(&self, out_width: usize) -> &'static str {
        match self {
            CpuConv::Depthwise(conv, None) => conv.form(out_width),
            CpuConv::Direct(conv) => conv.form(),
            _ => "",
        }
    }

    /// [`Self::run`] on `x · scale` when a `scale` (`[N, C, 1, 1]`) is
    /// given: the in-place 1×1 conv folds it into its weights per image
    /// where that is cheaper (and so do its depth halves); the others (the
    /// lane-form 1×1 conv too) run
    /// on the input scaled on `isa`'s path.
    pub(crate) fn run_scaled(
        &self,
        isa: crate::cpu::gemm::Isa,
        x: &Tensor,
        residual: Option<&Tensor>,
        scale: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        match (self, scale) {
            (_, None) => self.run(x, residual),
            (CpuConv::Pointwise(conv), scale) => conv.run_scaled(x, residual, scale),
            (CpuConv::PointwiseSplit(conv), scale) => conv.run_scaled(x, residual, scale),
            (_, Some(scale)) => super::plane::on_channel_scaled(isa, x, scale, |x| self.run(x, residual)),
        }
    }

    /// Runs a depthwise conv (without a fused pool) on the output of the
    /// 1×1 conv `expand` applied to `x`, computing it band by band
    /// ([`DepthwiseConv::run_expanded`]); an error for any other conv.
    pub(crate) fn run_expanded(&self, expand: &depthwise::ExpandWeights, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            CpuConv::Depthwise(conv, None) => conv.run_expanded(expand, x),
            _ => bail!("only a depthwise conv without a fused pool runs a 1×1 conv in front"),
        }
    }

    /// A depthwise conv (or, with `expand`, [`Self::run_expanded`]) with
    /// the in-place 1×1 conv `projection` run on its output too, plus
    /// `residual` ([`DepthwiseConv::run_projected`], or the convs in turn
    /// where it declines); an error for any other pair of convs.
    pub(crate) fn run_projected(
        &self,
        expand: Option<&depthwise::ExpandWeights>,
        x: &Tensor,
        projection: &CpuConv,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        match (self, projection) {
            (CpuConv::Depthwise(conv, None), CpuConv::Pointwise(p)) => {
                if let Some(out) = conv.run_projected(expand, x, p.projection(), residual)? {
                    return Ok(out);
                }
                // The steps in turn; the value between them back to the pool.
                let depthwise = match expand {
                    Some(expand) => conv.run_expanded(expand, x)?,
                    None => conv.run(x, None)?,
                };
                let out = p.run(&depthwise, residual);
                crate::cpu::recycle::reclaim(depthwise);
                out
            }
            _ => bail!("only a depthwise conv without a fused pool runs an in-place 1×1 conv after it"),
        }
    }

    /// Runs on a CPU f32 tensor `[N, C, H, W]`, adding `residual` (the
    /// conv's output shape) before the optional ReLU, then the fused pool.
    pub(crate) fn run(&self, x: &Tensor, residual: Option<&Tensor>) -> candle_core::Result<Tensor> {
        match self {
            CpuConv::WinogradF4(conv) => conv.run(x, residual),
            CpuConv::WinogradF2(conv) => conv.run(x, residual),
            CpuConv::Direct(conv) => conv.run(x, residual),
            CpuConv::Grouped(conv, None) => conv.run(x, residual),
            CpuConv::Grouped(conv, Some(pool)) => pool.run(&conv.run(x, residual)?),
            CpuConv::Depthwise(conv, None) => conv.run(x, residual),
            CpuConv::Depthwise(conv, Some(pool)) => pool.run(&conv.run(x, residual)?),
            CpuConv::Pointwise(conv) => conv.run(x, residual),
            CpuConv::PointwiseLanes(conv) => conv.run(x, residual),
            CpuConv::PointwiseSplit(conv) => conv.run_scaled(x, residual, None),
            CpuConv::Gemv(conv) => conv.run(x, residual),
            CpuConv::Stem(conv) => conv.run(x, residual),
        }
    }
}

#[cfg(test)]
mod tests;
