//! The ops' attribute structs, with the output sizes their windows give
//! (checked: `None` where a size does not fit).

/// Attributes of a 2-D convolution (PyTorch semantics, NCHW, OIHW weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Conv2dAttrs {
    /// Stride per spatial axis `[h, w]`, each >= 1.
    pub stride: [usize; 2],
    /// Zero padding added on both sides of each spatial axis `[h, w]`.
    pub padding: [usize; 2],
    /// Dilation per spatial axis `[h, w]`, each >= 1.
    pub dilation: [usize; 2],
    /// Number of groups; input and output channels must both divide by it.
    pub groups: usize,
}

impl Default for Conv2dAttrs {
    fn default() -> Self {
        Self {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        }
    }
}

/// Attributes of a convolution with a fused epilogue.
///
/// Inputs are `(x, weight, bias[, residual][, scale])`; the output is
/// `conv(x · scale) + bias [+ residual]`, then the activation when one is
/// set, then a max pool when `pool` is set (the output fact is the pooled
/// one; a residual has the convolution's shape). `scale`, present when
/// `input_scale` is set, is `[N, C, 1, 1]`: one factor per image and input
/// channel (squeeze-and-excitation's), which a conv can fold into its
/// weights per image instead of rescaling its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FusedConv2dAttrs {
    /// The convolution's own attributes.
    pub conv: Conv2dAttrs,
    /// The activation applied after the bias (and residual), if any.
    pub activation: Option<crate::Activation>,
    /// A max pool applied last, if any.
    pub pool: Option<MaxPool2dAttrs>,
    /// Whether the last input scales the conv's input channels per image.
    pub input_scale: bool,
}

/// A fused conv's inputs by role (see [`FusedConv2dAttrs`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FusedConvInputs<T> {
    /// The conv's input.
    pub x: T,
    /// `[O, C/groups, kh, kw]`.
    pub weight: T,
    /// `[O]`.
    pub bias: T,
    /// Added before the activation, of the conv output's shape.
    pub residual: Option<T>,
    /// `[N, C, 1, 1]`, multiplying `x` per image and channel.
    pub scale: Option<T>,
}

impl FusedConv2dAttrs {
    /// `inputs` by role, or `None` when their number does not fit these
    /// attributes (3 or 4, one more with `input_scale`).
    pub fn inputs<T: Copy>(&self, inputs: &[T]) -> Option<FusedConvInputs<T>> {
        let (scale, rest) = match self.input_scale {
            true => inputs.split_last().map(|(s, rest)| (Some(*s), rest))?,
            false => (None, inputs),
        };
        match *rest {
            [x, weight, bias] => Some(FusedConvInputs {
                x,
                weight,
                bias,
                residual: None,
                scale,
            }),
            [x, weight, bias, residual] => Some(FusedConvInputs {
                x,
                weight,
                bias,
                residual: Some(residual),
                scale,
            }),
            _ => None,
        }
    }
}

/// Attributes of an inference-mode batch norm over channel axis 1.
///
/// Inputs are `(x, running_mean, running_var)` or, with affine parameters,
/// `(x, running_mean, running_var, weight, bias)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormAttrs {
    /// Added to the running variance before the square root; must be >= 0.
    pub eps: f64,
}

/// Attributes of a 2-D max pool as torchvision uses it (dilation 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MaxPool2dAttrs {
    /// Window size `[h, w]`.
    pub kernel: [usize; 2],
    /// Stride `[h, w]`.
    pub stride: [usize; 2],
    /// Implicit negative-infinity padding `[h, w]`, at most half the window.
    pub padding: [usize; 2],
    /// Round the output size up (PyTorch's `ceil_mode`, SqueezeNet's
    /// pools): a last window that starts inside the input (or its left
    /// padding) and runs past its end counts, clipped.
    pub ceil_mode: bool,
}

/// Attributes of a 2-D average pool without padding (floor mode): the
/// transitions of torchvision's DenseNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AvgPool2dAttrs {
    /// Window size `[h, w]`.
    pub kernel: [usize; 2],
    /// Stride `[h, w]`.
    pub stride: [usize; 2],
}

/// Attributes of a zero padding of an NCHW value's spatial axes, each side
/// on its own (what a symmetric conv padding cannot express: ONNX's
/// asymmetric `pads` and `SAME_*` auto-padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PadAttrs {
    /// Zeros added `[top, left, bottom, right]`.
    pub pads: [usize; 4],
}

/// Attributes of a concatenation of values along one axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConcatAttrs {
    /// The axis the values are joined along; every other dimension agrees.
    pub axis: usize,
}

/// Attributes of a flatten: dimensions `start_dim..` are merged into one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlattenAttrs {
    /// First dimension merged.
    pub start_dim: usize,
}

/// Length of a sliding-window output along one axis (convolution or pool,
/// floor mode): `(len + 2·padding − dilation·(kernel − 1) − 1) / stride + 1`.
/// `None` when the dilated window does not fit the padded input, when
/// `kernel` or `stride` is 0, or when a step of the formula overflows or
/// the padded extent exceeds `isize::MAX` (kernels index it with signed
/// offsets).
pub fn windowed_len(len: usize, kernel: usize, stride: usize, padding: usize, dilation: usize) -> Option<usize> {
    let span = dilation.checked_mul(kernel.checked_sub(1)?)?.checked_add(1)?;
    let padded = padding.checked_mul(2)?.checked_add(len)?;
    if padded > isize::MAX as usize {
        return None;
    }
    Some(padded.checked_sub(span)?.checked_div(stride)? + 1)
}

impl Conv2dAttrs {
    /// Output `[height, width]` of this convolution with a `kernel` window
    /// on an `[height, width]` input; `None` when it does not fit (see [`windowed_len`]).
    pub fn output_size(&self, kernel: [usize; 2], [height, width]: [usize; 2]) -> Option<[usize; 2]> {
        let axis =
            |len: usize, i: usize| windowed_len(len, kernel[i], self.stride[i], self.padding[i], self.dilation[i]);
        Some([axis(height, 0)?, axis(width, 1)?])
    }
}

impl MaxPool2dAttrs {
    /// Output `[height, width]` of this pool on an `[height, width]` input;
    /// `None` when the window does not fit (see [`windowed_len`]). In ceil
    /// mode, PyTorch's rule: one more window when the floor leaves input
    /// uncovered, unless it would start past the input and left padding.
    pub fn output_size(&self, [height, width]: [usize; 2]) -> Option<[usize; 2]> {
        let axis = |len: usize, i: usize| {
            let (kernel, stride, padding) = (self.kernel[i], self.stride[i], self.padding[i]);
            let floor = windowed_len(len, kernel, stride, padding, 1)?;
            let covered = (floor - 1).checked_mul(stride)?.checked_add(kernel)?;
            let padded = len.checked_add(padding.checked_mul(2)?)?;
            let extra = self.ceil_mode && covered < padded && floor.checked_mul(stride)? < len.checked_add(padding)?;
            Some(floor + usize::from(extra))
        };
        Some([axis(height, 0)?, axis(width, 1)?])
    }
}
