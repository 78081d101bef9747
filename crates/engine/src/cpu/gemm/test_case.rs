//! Operands the panel products' tests share: seeded weights packed in
//! panels, a right operand and an output inside wider rows, and an
//! epilogue with a bias, a residual and ReLU.

use super::{pack_panels, panel_gemm_shared_packing, Isa, SharedRows, StoreEpilogue, Strided, PANEL_ROWS};
use crate::cpu::data::SharedOut;
use wick_ir::Activation;

/// A `[rows, depth, cols]` product's operands: `v` rows `stride` apart,
/// `m` and the residual rows `ms` apart (both past `cols`).
pub(crate) struct Case {
    pub(crate) rows: usize,
    pub(crate) depth: usize,
    pub(crate) cols: usize,
    pub(crate) stride: usize,
    pub(crate) ms: usize,
    /// The weights, row-major `[rows, depth]`, and packed in panels.
    pub(crate) plain: Vec<f32>,
    pub(crate) packed: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) residual: Vec<f32>,
}

impl Case {
    /// `panels` panels of weights `depth` deep (at least 1) times `cols`
    /// columns, seeded by the shape.
    pub(crate) fn new(panels: usize, depth: usize, cols: usize) -> Self {
        let (rows, stride, ms) = (panels * PANEL_ROWS, cols + 5, cols + 3);
        let mut next = crate::test_util::uniform((depth * cols) as u64);
        let plain: Vec<f32> = (0..rows * depth).map(|_| next()).collect();
        let v = (0..(depth - 1) * stride + cols).map(|_| next()).collect();
        let bias = (0..rows).map(|_| next()).collect();
        let residual = (0..(rows - 1) * ms + cols).map(|_| next()).collect();
        let mut packed = vec![0f32; rows * depth];
        pack_panels(&plain, rows, depth, &mut packed);
        Case {
            rows,
            depth,
            cols,
            stride,
            ms,
            plain,
            packed,
            v,
            bias,
            residual,
        }
    }

    /// The right operand, row-major.
    pub(crate) fn v(&self) -> Strided<'_> {
        Strided {
            data: &self.v,
            stride: self.stride,
        }
    }

    /// Bias, residual and ReLU.
    pub(crate) fn epilogue(&self) -> StoreEpilogue<'_> {
        StoreEpilogue {
            bias: &self.bias,
            residual: Some(Strided {
                data: &self.residual,
                stride: self.ms,
            }),
            activation: Some(Activation::Relu),
            stream: false,
        }
    }

    /// `[rows, depth, cols]`.
    pub(crate) fn size(&self) -> [usize; 3] {
        [self.rows, self.depth, self.cols]
    }

    /// Values of the output (`(rows − 1)·ms + cols`).
    pub(crate) fn len(&self) -> usize {
        (self.rows - 1) * self.ms + self.cols
    }

    /// The product with the epilogue on `isa`, `v` packed as it goes, into
    /// a fresh output of NaN.
    pub(crate) fn packing_as_it_goes(&self, isa: Isa) -> Vec<f32> {
        let mut got = vec![f32::NAN; self.len()];
        let mut tiles = vec![f32::NAN; self.depth * self.cols];
        let m = SharedRows {
            out: SharedOut::over(&mut got),
            start: 0,
            stride: self.ms,
        };
        let (size, epilogue) = (self.size(), Some(self.epilogue()));
        // SAFETY: `got` outlives the call, which alone accesses it.
        unsafe { panel_gemm_shared_packing(isa, &self.packed, self.v(), &mut tiles, m, size, epilogue) };
        got
    }
}
