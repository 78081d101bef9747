//! Tensor facts: the dtype and static shape of a value, known at build time.

use candle_core::DType;
use std::fmt;

/// The product of `shape` with each zero-sized axis counted as one, `None`
/// where it overflows `usize`: how far a tensor's strides reach (candle
/// multiplies out the trailing dimensions, zero or not). A shape read from
/// outside is made into a tensor only where this is `Some`: `[0, 2^40,
/// 2^40]` holds no value, yet its strides overflow.
pub fn shape_extent(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d.max(1)))
}

/// Dtype and static shape of one IR value, printed as `f32[5,1,1,1]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorFact {
    /// Element type.
    pub dtype: DType,
    /// Static dimensions, outermost first (NCHW for images).
    pub shape: Vec<usize>,
}

impl TensorFact {
    /// A fact from a dtype and dimensions.
    pub fn new(dtype: DType, shape: impl Into<Vec<usize>>) -> Self {
        Self {
            dtype,
            shape: shape.into(),
        }
    }

    /// The fact of an existing candle tensor.
    pub fn of(tensor: &candle_core::Tensor) -> Self {
        Self::new(tensor.dtype(), tensor.dims())
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements, saturating at `usize::MAX` (exact for every fact
    /// that passed [`crate::Limits::check`]).
    pub fn elem_count(&self) -> usize {
        self.checked_elem_count().unwrap_or(usize::MAX)
    }

    /// Number of elements, `None` when the product overflows `usize`.
    pub fn checked_elem_count(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    /// Size in bytes of a dense tensor with this fact, saturating at
    /// `usize::MAX` (exact for every fact that passed [`crate::Limits::check`]).
    pub fn size_in_bytes(&self) -> usize {
        self.checked_size_in_bytes().unwrap_or(usize::MAX)
    }

    /// Size in bytes, `None` when it exceeds `isize::MAX` (the most one
    /// allocation can hold) or the product overflows.
    pub fn checked_size_in_bytes(&self) -> Option<usize> {
        let bytes = self.checked_elem_count()?.checked_mul(self.dtype.size_in_bytes())?;
        (bytes <= isize::MAX as usize).then_some(bytes)
    }
}

impl fmt::Display for TensorFact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype.as_str())?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}
