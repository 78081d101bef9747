//! Winograd convolutions for 3×3, stride-1, one-group convs: each input
//! tile of side `m + 2` becomes `(m + 2)²` "frequency" components, the
//! convolution becomes that many independent matrix products `M[ξ] = U[ξ] ·
//! V[ξ]` (`U` = transformed weights, packed once at compile time), and each
//! `m × m` output tile is recovered from its products with the epilogue
//! applied on the way out.
//!
//! - [`f4`]: F(4×4, 3×3), 36 multiplies per 16 outputs instead of 144, on
//!   the panel micro-kernel, for maps with enough tiles;
//! - [`f2`]: F(2×2, 3×3), 16/9 of the weights instead of 36/9, on the lane
//!   micro-kernel, for few-pixel maps (batch 1 at 7×7).
//!
//! What they share lives here: when a conv qualifies ([`applies`]), the
//! weights' transform and packing ([`Packed`]) and where the tiles
//! are ([`Tiles`]). Their fp32 error is bounded in `tests.rs` against f64.

pub(crate) mod f2;
mod f2_transform;
pub(crate) mod f4;
mod f4_transform;

pub(crate) use f2::WinogradF2;
pub(crate) use f4::WinogradF4;

use super::{ConvShape, ConvSpec};
use crate::cpu::data::{with_cpu_f32, SCRATCH_MAX_VALUES};
use crate::cpu::epilogue::Epilogue;
use crate::cpu::gemm::{Isa, Layout};
use crate::cpu::weight_buffer::WeightBuffer;
use crate::machine::Machine;
use candle_core::{bail, Tensor};
use wick_ir::Conv2dAttrs;

/// Floats (one cache line) added between consecutive ξ matrices of a
/// block's `V` and `M`: their sizes are multiples of 4 KiB for ResNet's
/// layers, which would put a transform's accesses per tile chunk (36 or 16)
/// in one 8-way L1 set, evicting each other.
const SKEW: usize = 16;

/// Tiles per block of a Winograd conv over `total` tiles: `cache_block`
/// (what keeps a block's `V` and `M` in cache), or all of them at once
/// where their `V` and `M` (`per_tile` bytes a tile) take no more than the
/// packed weights `u_bytes`. Every block streams all of `U`, from memory
/// where `U` outgrows the caches; past that size, one block's `V` and `M`
/// spilling from the L2 cost less than `U` again. ResNet18's layer4
/// F(4×4) convs at batch 10 (40 tiles, 5.9 MB of `V` and `M` against 38 MB
/// of `U`) took 0.88-0.90× the time in one block as in two (blocks of 32
/// tiles), the whole forward 0.98-0.99× (Intel Xeon VM, AVX-512, 2
/// threads, alternating forwards). Never more than half the scratch a
/// thread may take ([`SCRATCH_MAX_VALUES`]): a conv whose weights are that
/// large still runs in cache-sized blocks rather than fail.
fn tiles_per_block(cache_block: usize, total: usize, per_tile: usize, u_bytes: usize) -> usize {
    let most = u_bytes.min(SCRATCH_MAX_VALUES / 2 * std::mem::size_of::<f32>());
    match per_tile.checked_mul(total).is_some_and(|bytes| bytes <= most) {
        true => total.max(cache_block),
        false => cache_block,
    }
}

/// Whether a Winograd conv can compute `spec`: a 3×3 kernel, stride 1,
/// dilation 1, one group, padding at most 2 on each axis.
pub(crate) fn applies(spec: &ConvSpec) -> bool {
    let Conv2dAttrs {
        stride,
        padding,
        dilation,
        groups,
    } = spec.attrs;
    spec.kernel == [3, 3] && stride == [1, 1] && dilation == [1, 1] && groups == 1 && padding.iter().all(|&p| p <= 2)
}

/// An error unless [`applies`].
fn check_applies(spec: &ConvSpec) -> candle_core::Result<()> {
    if !applies(spec) {
        bail!(
            "winograd conv takes 3x3 stride-1 one-group kernels with padding <= 2, got {:?} {:?}",
            spec.kernel,
            spec.attrs
        )
    }
    Ok(())
}

/// What both Winograd convs hold: the conv, its weights in the Winograd
/// domain packed for one micro-kernel, the epilogue and the path.
#[derive(Debug)]
pub(crate) struct Packed {
    /// The conv.
    spec: ConvSpec,
    /// Output channels padded for the layout.
    padded_out: usize,
    /// `U[ξ]` (`[O, C]`) for each ξ, one after the other, packed for the layout.
    u: WeightBuffer,
    epilogue: Epilogue,
    isa: Isa,
}

impl Packed {
    /// `weight` (`[O, C, 3, 3]`) with each 3×3 kernel through `transform`
    /// (computed in f64, stored f32), each value written straight to its
    /// place in the `N` ξ matrices packed for `layout`'s micro-kernel, in a
    /// huge-page weight buffer (no other copy of the weights is made: the
    /// packed weights of ResNet34's layer4 take 36 MB per conv).
    fn new<const N: usize>(
        spec: ConvSpec,
        weight: &Tensor,
        transform: fn(&[f32]) -> [f64; N],
        layout: Layout,
        epilogue: Epilogue,
        machine: Machine,
    ) -> candle_core::Result<Self> {
        check_applies(&spec)?;
        let (rows, depth) = (spec.out_channels, spec.in_channels);
        if weight.dims() != [rows, depth, 3, 3] {
            bail!(
                "winograd weight {:?} does not match {rows} x {depth} x 3 x 3",
                weight.dims()
            )
        }
        let padded_out = layout.padded_rows(rows);
        let matrix = padded_out * depth;
        let mut u = WeightBuffer::zeroed(N * matrix, "packed weights")?;
        with_cpu_f32("winograd conv's weight", &weight.contiguous()?, None, |w, _| {
            for (kernel, w) in w.chunks_exact(9).enumerate() {
                let (o, c) = (kernel / depth, kernel % depth);
                let at = layout.index(padded_out, depth, o, c);
                for (xi, value) in transform(w).iter().enumerate() {
                    u[xi * matrix + at] = *value as f32;
                }
            }
            Ok(())
        })?;
        Ok(Self {
            spec,
            padded_out,
            u,
            epilogue,
            isa: machine.isa,
        })
    }
}

/// Where a call's output tiles of side `m` are: tile `t` (numbered over the
/// batch) is image `t / per_image`, tile row `(t % per_image) / across`,
/// tile column `(t % per_image) % across`.
#[derive(Debug, Clone, Copy)]
struct Tiles {
    shape: ConvShape,
    /// Tiles per output row.
    across: usize,
    /// Tiles per image.
    per_image: usize,
    /// Tiles over the batch.
    total: usize,
}

impl Tiles {
    /// The tiles of side `m` covering `shape`'s output.
    fn new(shape: ConvShape, m: usize) -> Self {
        let across = shape.out_width.div_ceil(m);
        let per_image = shape.out_height.div_ceil(m) * across;
        Self {
            shape,
            across,
            per_image,
            total: shape.batch * per_image,
        }
    }

    /// Image, tile row and tile column of tile `t`.
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        let (image, within) = (t / self.per_image, t % self.per_image);
        (image, within / self.across, within % self.across)
    }
}

#[cfg(test)]
mod tests;
