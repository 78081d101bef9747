//! Tensor facts: the dtype and static shape of a value, known at build time.

use candle_core::DType;
use std::fmt;

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

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size in bytes of a dense tensor with this fact.
    pub fn size_in_bytes(&self) -> usize {
        self.elem_count() * self.dtype.size_in_bytes()
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
