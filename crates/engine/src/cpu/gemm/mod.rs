//! The matrix products wick's CPU convolutions run on, and the instruction
//! set they run with: [`Isa`] is chosen once at compile time of a model
//! (the best path the CPU has), and [`Isa::run`] is the one place that
//! enables a path's target features for generic code.
//!
//! - [`panel`]: `M = U · V` with `U` packed in 8-row panels (pixels on the
//!   vector lanes); the Winograd F(4×4) products and the direct conv.
//! - [`lane`]: output channels on the vector lanes, weights streamed once
//!   (few pixels: batch 1 at 7×7); Winograd F(2×2) and the direct conv's
//!   lane layout.
//! - [`lane_gathered`]: the lane product with the pixels read through a
//!   table of offsets (the direct conv's lane layout without im2col).
//! - [`gathered`]: the panel product with `V`'s rows read through a
//!   table of offsets (the direct conv without im2col).
//! - [`right`]: the panel product's right operand, row-major in place or
//!   packed in the micro-tiles' column slices.
//! - [`columns`]: a few columns of a panel product, one at a time (the
//!   1×1 conv's columns off the micro-tile width).

pub(crate) mod columns;
pub(crate) mod gathered;
pub(crate) mod lane;
pub(crate) mod lane_gathered;
pub(crate) mod panel;
pub(crate) mod right;
#[cfg(target_arch = "x86_64")]
mod row_sweep;
#[cfg(test)]
pub(crate) mod test_case;

pub(crate) use columns::panel_columns;
pub(crate) use gathered::{panel_gemm_gathered, Gathered};
pub(crate) use lane::{
    lane_gemm, lane_gemm_lanes, lane_gemm_part, lane_groups, lane_index, pack_lanes, split_unit, LaneProduct, LANES,
    LANE_CHUNK,
};
pub(crate) use lane_gathered::{lane_gemm_gathered, LaneTile, Source};
pub(crate) use panel::{
    chunks_depth, pack_panels, panel_gemm, panel_gemm_chunked, panel_gemm_shared, panel_gemm_shared_packing,
    panel_gemm_strided, panel_index, DepthChunks, SharedRows, StoreEpilogue, Strided, PANEL_GRANULE, PANEL_ROWS,
    PANEL_TILES, WIDE_TILE,
};
pub(crate) use right::{pack_tiles, pack_tiles_parallel, scale_rows, Right};

/// Which micro-kernel a left operand (the weights) is packed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// [`pack_panels`] for [`panel_gemm`]: pixels on the vector lanes.
    Panels,
    /// [`pack_lanes`] for [`lane_gemm`]: output channels on the vector
    /// lanes, weights streamed once (few pixels).
    Lanes,
}

impl Layout {
    /// `rows` rounded up to whole panels or lane groups.
    pub(crate) fn padded_rows(self, rows: usize) -> usize {
        match self {
            Layout::Panels => rows.div_ceil(PANEL_ROWS) * PANEL_ROWS,
            Layout::Lanes => rows.div_ceil(LANES) * LANES,
        }
    }

    /// Packs row-major `plain` `[rows, depth]` into `packed`
    /// (`padded_rows(rows) · depth` values; the padding rows are zeros).
    pub(crate) fn pack(self, plain: &[f32], rows: usize, depth: usize, packed: &mut [f32]) {
        match self {
            Layout::Panels => pack_panels(plain, rows, depth, packed),
            Layout::Lanes => pack_lanes(plain, rows, depth, packed),
        }
    }

    /// Where [`Layout::pack`] puts element (`row`, `d`) of a matrix `depth`
    /// deep whose rows pad to `padded` (`padded_rows` of its rows).
    pub(crate) fn index(self, padded: usize, depth: usize, row: usize, d: usize) -> usize {
        match self {
            Layout::Panels => panel_index(depth, row, d),
            Layout::Lanes => lane_index(padded, depth, row, d),
        }
    }
}

/// An instruction-set path. Only [`Isa::available`] (and [`Isa::detect`])
/// hand out a path other than [`Isa::Scalar`]: the kernels' `unsafe`
/// dispatch relies on the CPU having the features of every path it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F (x86-64).
    Avx512,
    /// AVX2 and FMA (x86-64).
    Avx2Fma,
    /// Portable Rust, any CPU.
    Scalar,
}

impl Isa {
    /// The best path this CPU supports.
    pub(crate) fn detect() -> Isa {
        Isa::available()[0]
    }

    /// Every path this CPU supports, best first (scalar always).
    pub(crate) fn available() -> Vec<Isa> {
        let mut isas = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            // Every AVX-512F CPU also has AVX2 and FMA; checked all the same,
            // as the AVX-512 path's generic code is compiled with all three.
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                isas.push(Isa::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2Fma);
            }
        }
        isas.push(Isa::Scalar);
        isas
    }

    /// The user-facing name of this path.
    pub(crate) fn path(self) -> crate::CpuPath {
        match self {
            Isa::Avx512 => crate::CpuPath::Avx512,
            Isa::Avx2Fma => crate::CpuPath::Avx2,
            Isa::Scalar => crate::CpuPath::Scalar,
        }
    }

    /// Runs `body` compiled for this path: its [`IsaBody::run`] (marked
    /// `#[inline(always)]`) is inlined into a `#[target_feature]` function
    /// of the path, so its plain loops vectorise for the path's registers.
    #[inline(always)]
    pub(crate) fn run<B: IsaBody>(self, body: B) -> B::Output {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::Avx512` is only handed out by `Isa::available`,
            // which checked that the CPU has AVX-512F, AVX2 and FMA.
            Isa::Avx512 => unsafe { x86::avx512(body) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above, for AVX2 + FMA.
            Isa::Avx2Fma => unsafe { x86::avx2_fma(body) },
            _ => body.run(),
        }
    }
}

/// A piece of generic (non-intrinsic) kernel code that [`Isa::run`]
/// compiles once per path. Implementations mark `run` `#[inline(always)]`:
/// otherwise it may stay a call, compiled without the path's features.
pub(crate) trait IsaBody {
    /// What the body returns.
    type Output;
    /// The body itself.
    fn run(self) -> Self::Output;
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::IsaBody;

    /// # Safety
    /// The CPU has AVX-512F, AVX2 and FMA.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn avx512<B: IsaBody>(body: B) -> B::Output {
        body.run()
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2_fma<B: IsaBody>(body: B) -> B::Output {
        body.run()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_machine_has_a_simd_path() {
        // The bench machine class (Zen 3 / Zen 4) has AVX2 at least; a plain x86-64 CI box too.
        #[cfg(target_arch = "x86_64")]
        assert!(Isa::available().len() >= 2, "{:?}", Isa::available());
    }

    struct Sum<'a>(&'a [f32]);

    impl IsaBody for Sum<'_> {
        type Output = f32;
        #[inline(always)]
        fn run(self) -> f32 {
            self.0.iter().sum()
        }
    }

    /// Every path runs the same body to the same result.
    #[test]
    fn run_gives_one_answer_on_every_path() {
        let values: Vec<f32> = (0..100).map(|i| i as f32).collect();
        for isa in Isa::available() {
            assert_eq!(isa.run(Sum(&values)), 4950.0, "{isa:?}");
        }
    }
}
