//! Random convolution shapes for property tests, shared by the engine's
//! kernel tests and the conv → batch-norm fusion properties: every
//! attribute drawn (kernel h ≠ w, stride, dilation, asymmetric padding,
//! groups incl. depthwise), sizes from below the window's minimum up, and
//! every other case C == H == W (candle's NCHW/NHWC stride ambiguity, candle
//! PR #3405).

use proptest::prelude::*;
use wick_ir::Conv2dAttrs;

/// One convolution's shapes and attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvCase {
    /// N.
    pub batch: usize,
    /// C (all groups).
    pub in_channels: usize,
    /// O, a multiple of `groups`.
    pub out_channels: usize,
    /// Groups, dividing C and O.
    pub groups: usize,
    /// `[kh, kw]`.
    pub kernel: [usize; 2],
    /// Stride, both axes.
    pub stride: usize,
    /// Dilation, both axes.
    pub dilation: usize,
    /// Padding `[h, w]`.
    pub padding: [usize; 2],
    /// Input `[H, W]` (the dilated window fits the padded input).
    pub size: [usize; 2],
}

impl ConvCase {
    /// The conv's attributes.
    pub fn attrs(&self) -> Conv2dAttrs {
        Conv2dAttrs {
            stride: [self.stride; 2],
            padding: self.padding,
            dilation: [self.dilation; 2],
            groups: self.groups,
        }
    }

    /// `[N, C, H, W]`.
    pub fn input_dims(&self) -> [usize; 4] {
        [self.batch, self.in_channels, self.size[0], self.size[1]]
    }

    /// `[O, C/g, kh, kw]`.
    pub fn weight_dims(&self) -> [usize; 4] {
        [
            self.out_channels,
            self.in_channels / self.groups,
            self.kernel[0],
            self.kernel[1],
        ]
    }

    /// Multiply-adds per output value, `C/g · kh · kw`.
    pub fn fan_in(&self) -> usize {
        self.in_channels / self.groups * self.kernel[0] * self.kernel[1]
    }
}

impl std::str::FromStr for ConvCase {
    type Err = String;

    /// A case written on one line, the way shrunk failures are kept as
    /// named tests: `n1 c4 o4 g4 k3x3 s1 d1 p1x1 4x4` (batch, in and out
    /// channels, groups, kernel, stride, dilation, padding, input size).
    fn from_str(text: &str) -> Result<Self, String> {
        let field = |prefix: &str| -> Result<&str, String> {
            let found = text.split_whitespace().find_map(|word| word.strip_prefix(prefix));
            found.ok_or_else(|| format!("`{text}` has no `{prefix}..`"))
        };
        let number = |s: &str| s.parse::<usize>().map_err(|e| format!("`{s}` in `{text}`: {e}"));
        let pair = |s: &str| -> Result<[usize; 2], String> {
            let (h, w) = s
                .split_once('x')
                .ok_or_else(|| format!("`{s}` in `{text}` is not HxW"))?;
            Ok([number(h)?, number(w)?])
        };
        let size = text.split_whitespace().last().unwrap_or_default();
        Ok(ConvCase {
            batch: number(field("n")?)?,
            in_channels: number(field("c")?)?,
            out_channels: number(field("o")?)?,
            groups: number(field("g")?)?,
            kernel: pair(field("k")?)?,
            stride: number(field("s")?)?,
            dilation: number(field("d")?)?,
            padding: pair(field("p")?)?,
            size: pair(size)?,
        })
    }
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}

/// Random [`ConvCase`]s: batch 1–3, kernels 1–3 per axis, stride and
/// dilation 1–2, padding 0–2 per axis, 1–6 channels with one group, one per
/// channel or any other divisor, 1–3 outputs per group.
pub fn arb_conv_case() -> impl Strategy<Value = ConvCase> {
    (
        (
            1usize..4,
            [1usize..4, 1usize..4],
            1usize..3,
            1usize..3,
            [0usize..3, 0usize..3],
        ),
        (
            1usize..7,
            0usize..3,
            1usize..4,
            any::<prop::sample::Index>(),
            any::<bool>(),
        ),
        [0usize..5, 0usize..5],
    )
        .prop_map(
            |(
                (batch, kernel, stride, dilation, padding),
                (channels, group_kind, per_group, group_pick, c_eq_hw),
                extra,
            )| {
                let min = |axis: usize| {
                    (dilation * (kernel[axis] - 1) + 1)
                        .saturating_sub(2 * padding[axis])
                        .max(1)
                };
                let (in_channels, size) = if c_eq_hw {
                    let n = channels.max(min(0)).max(min(1)).max(2);
                    (n, [n, n])
                } else {
                    (channels, [min(0) + extra[0], min(1) + extra[1]])
                };
                let groups = match group_kind {
                    0 => 1,
                    1 => in_channels,
                    _ => *group_pick.get(&divisors(in_channels)),
                };
                ConvCase {
                    batch,
                    in_channels,
                    out_channels: groups * per_group,
                    groups,
                    kernel,
                    stride,
                    dilation,
                    padding,
                    size,
                }
            },
        )
}

#[cfg(test)]
mod tests {
    use super::ConvCase;

    /// The one-line form reads every field; a missing or malformed one is an error naming it.
    #[test]
    fn one_line_form() {
        let case: ConvCase = "n2 c3 o6 g3 k1x3 s2 d1 p0x2 3x5".parse().unwrap();
        let want = ConvCase {
            batch: 2,
            in_channels: 3,
            out_channels: 6,
            groups: 3,
            kernel: [1, 3],
            stride: 2,
            dilation: 1,
            padding: [0, 2],
            size: [3, 5],
        };
        assert_eq!(case, want);
        assert!("n2 c3 o6 k1x3 s2 d1 p0x2 3x5"
            .parse::<ConvCase>()
            .unwrap_err()
            .contains("`g..`"));
        assert!("n2 c3 o6 g3 k1 s2 d1 p0x2 3x5"
            .parse::<ConvCase>()
            .unwrap_err()
            .contains("HxW"));
    }
}
