//! Size limits on tensors: what a graph from outside may declare or infer
//! before anything is allocated for it.
//!
//! Every size the IR derives from input (a declared fact, an inferred one, a
//! constant's data) is computed with checked arithmetic and compared with a
//! [`Limits`] before the engine allocates or writes anything for it. The
//! verifier ([`crate::Graph::verify_with`]) applies the limits to every
//! node; [`crate::Graph::verify`] applies [`Limits::default`].

use crate::TensorFact;

/// Default largest number of elements in one tensor: 2^30 (4 GiB of f32).
///
/// Sized for the machines wick is built and served on (2–16 cores, 16–128
/// GiB): ResNet50 at batch 256 peaks at about 2^28 elements per activation,
/// a quarter of this. Raise it with [`Limits::with_max_elements`] or the
/// `WICK_MAX_ELEMENTS` environment variable ([`Limits::from_env`]).
pub const DEFAULT_MAX_ELEMENTS: usize = 1 << 30;

/// Environment variable read by [`Limits::from_env`].
pub const MAX_ELEMENTS_ENV: &str = "WICK_MAX_ELEMENTS";

/// Bounds applied to every tensor of a graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    max_elements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_elements: DEFAULT_MAX_ELEMENTS,
        }
    }
}

impl Limits {
    /// No element limit: only representable sizes and no zero-sized
    /// dimension. For checks of structure rather than admission (the pass
    /// manager's verification after each pass, tracing a model written in
    /// code), where whoever admits the graph applies its own limits.
    pub fn unbounded() -> Self {
        Self {
            max_elements: usize::MAX,
        }
    }

    /// These limits with at most `max_elements` elements per tensor.
    pub fn with_max_elements(self, max_elements: usize) -> Self {
        Self { max_elements }
    }

    /// The largest number of elements a tensor may have.
    pub fn max_elements(&self) -> usize {
        self.max_elements
    }

    /// The default limits, with `WICK_MAX_ELEMENTS` (a positive integer)
    /// replacing the element limit when it is set.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(MAX_ELEMENTS_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(Self::default()),
            Err(std::env::VarError::NotUnicode(_)) => Err(format!("{MAX_ELEMENTS_ENV} is not valid text")),
            Ok(text) => match text.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(Self::default().with_max_elements(n)),
                _ => Err(format!("{MAX_ELEMENTS_ENV} must be a positive integer, got `{text}`")),
            },
        }
    }

    /// Checks one fact: no zero-sized dimension (wick does not run empty
    /// tensors; they are rejected by name rather than half supported), and
    /// an element count and byte size that are representable and within
    /// the limit. The message names the fact and what was expected.
    pub fn check(&self, fact: &TensorFact) -> Result<(), String> {
        if let Some(axis) = fact.shape.iter().position(|&d| d == 0) {
            return Err(format!(
                "{fact} has a zero-sized dimension (axis {axis}); empty tensors are not supported"
            ));
        }
        match fact.checked_elem_count() {
            Some(n) if n <= self.max_elements && fact.checked_size_in_bytes().is_some() => Ok(()),
            Some(n) => Err(format!(
                "{fact} has {n} elements, more than the limit of {} ({MAX_ELEMENTS_ENV})",
                self.max_elements
            )),
            None => Err(format!(
                "{fact} has more elements than this machine can address (limit {}, {MAX_ELEMENTS_ENV})",
                self.max_elements
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn f(shape: &[usize]) -> TensorFact {
        TensorFact::new(DType::F32, shape)
    }

    /// The element limit is inclusive; zero-sized and overflowing shapes are
    /// refused by name.
    #[test]
    fn checks_count_zero_and_overflow() {
        let limits = Limits::default().with_max_elements(24);
        assert!(limits.check(&f(&[2, 3, 4])).is_ok());
        assert!(limits.check(&f(&[])).is_ok(), "a scalar has one element");
        let err = limits.check(&f(&[5, 5])).unwrap_err();
        assert!(err.contains("25 elements") && err.contains("limit of 24"), "{err}");
        let err = limits.check(&f(&[1, 0, 3])).unwrap_err();
        assert!(err.contains("zero-sized dimension (axis 1)"), "{err}");
        let err = Limits::default().check(&f(&[1 << 32, 1 << 32])).unwrap_err();
        assert!(err.contains("more elements than this machine can address"), "{err}");
        // An element count that fits but whose byte size does not.
        let big = Limits::default().with_max_elements(usize::MAX);
        assert!(big.check(&f(&[usize::MAX / 2])).is_err());
    }

    /// The extent counts a zero-sized axis as one and overflows by name.
    #[test]
    fn extents() {
        use crate::shape_extent;
        assert_eq!(shape_extent(&[2, 3, 4]), Some(24));
        assert_eq!(shape_extent(&[]), Some(1));
        assert_eq!(shape_extent(&[0, 5]), Some(5));
        assert_eq!(shape_extent(&[0, 1 << 40, 1 << 40]), None);
    }
}
