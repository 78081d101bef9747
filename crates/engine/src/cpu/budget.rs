//! The packed-weight budget: which Winograd F(4×4) convs of a graph step
//! down to a smaller packing so that the graph's packed conv weights stay
//! within a multiple of its conv weights.
//!
//! F(4×4) holds 36 floats per 3×3 kernel (4× the weights), F(2×2) 16 (1.8×),
//! the direct convs about the weights themselves. The policy
//! ([`super::conv_algorithm`]) picks each conv's fastest algorithm on its
//! own; this module looks at the graph as a whole. Over budget, F(4×4)
//! convs step down in order of their tiles per forward, fewest first: an
//! F(4×4) conv's time saved over F(2×2) is proportional to its tiles, the
//! bytes it costs are not, so the convs with the fewest tiles buy the least
//! speed per byte (ResNet34's layer4 at batch 10: 40 tiles, 36 MiB of
//! packed weights per conv, 1.1–1.3× faster than F(2×2) there).

use super::conv::ConvSpec;
use super::{conv_algorithm_without_f4, ConvAlgorithm};
use crate::machine::Machine;
use crate::EngineError;
use std::str::FromStr;

/// Packed conv weights may take this many times the graph's conv weights
/// by default ([`WeightBudget::default`]). ONNX Runtime holds about two
/// copies of each weight (the initializer and its prepacked copy: its peak
/// RSS grows ~1.9 MiB per MiB of weights across ResNet18/34/50), wick after
/// `compile_owned` only the packed one, in a process ~50 MiB smaller. At
/// 2.5×, ResNet34 (81 MiB of conv weights) packs 200 MiB at batch 1 and 10
/// (3.8× at batch 10 before its five layer4 convs and one of layer3 step
/// down, 2.5× at batch 1 before one of layer3 does): peak RSS 256 / 271
/// MiB against ONNX Runtime's 289 / 336 (Zen 4). ResNet18 at batch 10
/// (3.5× → 2.1×: layer4's three) and ResNet50 (2.1× at most) follow.
/// The default adds [`DEFAULT_WEIGHT_ALLOWANCE_MIB`].
pub const DEFAULT_WEIGHT_BUDGET: f32 = 2.5;

/// MiB of packed weights the default budget allows on top of
/// [`DEFAULT_WEIGHT_BUDGET`] times the conv weights. ONNX Runtime's peak RSS
/// has a large fixed part besides its ~1.9 copies of the weights (288 MiB
/// for ResNet18 at batch 10, 45 MiB of weights), which a bare multiple
/// ignores: it held ResNet18 at batch 10 to F(2×2) in layer4, the slower
/// choice (on Zen 3, alternating runs: its three convs 11.8-13.3 ms as
/// F(2×2), 9.8-10.2 as F(4×4); peak RSS 225 MiB with all F(4×4) against
/// ONNX Runtime's 288). With it ResNet18 keeps every F(4×4) at batch 10, and
/// ResNet34 at batch 10 packs 250 MiB instead of 203 (peak RSS 320 MiB
/// against ONNX Runtime's 336 and OpenVINO's 326, Zen 3).
pub const DEFAULT_WEIGHT_ALLOWANCE_MIB: f32 = 48.0;

/// The environment variable that sets the weight budget: a factor of at
/// least 1, or `unlimited`.
pub const WEIGHT_BUDGET_ENV: &str = "WICK_WEIGHT_BUDGET";

/// How much memory a compiled graph's packed conv weights may take: a
/// multiple of the graph's conv weights, plus a fixed allowance in the
/// default (see [`crate::Engine::with_weight_budget`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightBudget {
    factor: f32,
    allowance_mib: f32,
}

impl Default for WeightBudget {
    /// [`DEFAULT_WEIGHT_BUDGET`] times the conv weights plus
    /// [`DEFAULT_WEIGHT_ALLOWANCE_MIB`].
    fn default() -> Self {
        Self {
            factor: DEFAULT_WEIGHT_BUDGET,
            allowance_mib: DEFAULT_WEIGHT_ALLOWANCE_MIB,
        }
    }
}

impl WeightBudget {
    /// No budget: every conv takes its fastest algorithm.
    pub fn unlimited() -> Self {
        Self::bare(f32::INFINITY)
    }

    /// `factor` times the conv weights, no allowance.
    fn bare(factor: f32) -> Self {
        Self {
            factor,
            allowance_mib: 0.0,
        }
    }

    /// Packed conv weights at most `factor` times the graph's conv weights,
    /// no allowance; `None` unless `factor` is at least 1 (infinity is
    /// [`Self::unlimited`]).
    pub fn factor(factor: f32) -> Option<Self> {
        (factor >= 1.0).then_some(Self::bare(factor))
    }

    /// The multiple (infinite when unlimited).
    pub fn get(&self) -> f32 {
        self.factor
    }

    /// The MiB allowed on top of the multiple (0 but for the default).
    pub fn allowance_mib(&self) -> f32 {
        self.allowance_mib
    }

    /// The budget `WICK_WEIGHT_BUDGET` sets, if it is set.
    pub fn from_env() -> Result<Option<WeightBudget>, EngineError> {
        crate::machine::parse_env(WEIGHT_BUDGET_ENV)
    }
}

impl FromStr for WeightBudget {
    type Err = EngineError;

    /// A factor of at least 1 (`2.5`, without the default's allowance), or
    /// `unlimited`.
    fn from_str(given: &str) -> Result<Self, EngineError> {
        let invalid = || EngineError::InvalidWeightBudget { given: given.into() };
        match given.trim() {
            "unlimited" => Ok(Self::unlimited()),
            text => text.parse().ok().and_then(Self::factor).ok_or_else(invalid),
        }
    }
}

/// One CPU conv of a graph as the budget sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PlannedConv {
    /// The conv.
    pub(crate) spec: ConvSpec,
    /// Its output at the compiled shape, `[N, O, OH, OW]`.
    pub(crate) out_shape: [usize; 4],
    /// The algorithm chosen.
    pub(crate) algorithm: ConvAlgorithm,
}

impl PlannedConv {
    /// Floats of the conv's weights, `O · C/g · kh · kw`.
    fn weight_floats(&self) -> f64 {
        let spec = &self.spec;
        let group_channels = spec.in_channels / spec.attrs.groups.max(1);
        [spec.out_channels, group_channels, spec.kernel[0], spec.kernel[1]]
            .iter()
            .map(|&d| d as f64)
            .product()
    }

    /// Floats its packed weights take with `algorithm` (before padding to
    /// the micro-kernel's rows, a few percent at most).
    fn packed_floats(&self, algorithm: ConvAlgorithm) -> f64 {
        let per_kernel = match algorithm {
            ConvAlgorithm::WinogradF4 => 36.0 / 9.0,
            ConvAlgorithm::WinogradF2 => 16.0 / 9.0,
            _ => 1.0,
        };
        self.weight_floats() * per_kernel
    }

    /// F(4×4) tiles per forward.
    fn f4_tiles(&self) -> usize {
        let [batch, _, height, width] = self.out_shape;
        batch
            .saturating_mul(height.div_ceil(4))
            .saturating_mul(width.div_ceil(4))
    }
}

/// Steps `convs`' F(4×4) convs down, fewest tiles first (the larger one
/// first among equals), until their packed weights fit `budget`; returns
/// how many stepped down. Each steps down to what the policy would choose
/// without F(4×4), at any size (F(2×2) where it has the channels; on few
/// pixels with wide FMAs the direct conv, [`conv_algorithm_without_f4`]).
pub(crate) fn fit(convs: &mut [PlannedConv], budget: WeightBudget, machine: &Machine) -> usize {
    let weights: f64 = convs.iter().map(PlannedConv::weight_floats).sum();
    let allowance = f64::from(budget.allowance_mib()) * f64::from(1 << 20) / 4.0;
    let allowed = weights * f64::from(budget.get()) + allowance;
    let mut packed: f64 = convs.iter().map(|c| c.packed_floats(c.algorithm)).sum();
    let mut order: Vec<usize> = (0..convs.len())
        .filter(|&i| convs[i].algorithm == ConvAlgorithm::WinogradF4)
        .collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&convs[a], &convs[b]);
        a.f4_tiles()
            .cmp(&b.f4_tiles())
            .then(b.weight_floats().total_cmp(&a.weight_floats()))
    });
    let mut stepped = 0;
    for i in order {
        if packed <= allowed {
            break;
        }
        let conv = &mut convs[i];
        let down = conv_algorithm_without_f4(&conv.spec, conv.out_shape, machine);
        packed += conv.packed_floats(down) - conv.packed_floats(conv.algorithm);
        conv.algorithm = down;
        stepped += 1;
    }
    tracing::debug!(
        conv_weights_mib = weights * 4.0 / f64::from(1 << 20),
        packed_mib = packed * 4.0 / f64::from(1 << 20),
        budget = budget.get(),
        allowance_mib = budget.allowance_mib(),
        stepped_down = stepped,
        "packed conv weights"
    );
    stepped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemm::Isa;
    use wick_ir::Conv2dAttrs;

    /// A path without wide FMAs (the scalar one).
    fn narrow() -> Machine {
        Machine::with_fma(Isa::Scalar, false)
    }

    fn conv3x3(channels: usize, out_shape: [usize; 4]) -> PlannedConv {
        let spec = ConvSpec {
            in_channels: channels,
            out_channels: channels,
            kernel: [3, 3],
            attrs: Conv2dAttrs {
                stride: [1, 1],
                padding: [1, 1],
                ..Default::default()
            },
        };
        let algorithm = super::super::conv_algorithm(&spec, false, out_shape, &narrow());
        PlannedConv {
            spec,
            out_shape,
            algorithm,
        }
    }

    /// Over budget, the F(4×4) convs with the fewest tiles step down to
    /// F(2×2), only as many as the budget needs; within it, none do.
    #[test]
    fn fewest_tiles_step_down_first() {
        // 40 tiles (7×7, batch 10) and 160 tiles (14×14, batch 10).
        let plan = || {
            vec![
                conv3x3(256, [10, 256, 14, 14]),
                conv3x3(512, [10, 512, 7, 7]),
                conv3x3(512, [10, 512, 7, 7]),
            ]
        };
        for conv in plan() {
            assert_eq!(conv.algorithm, ConvAlgorithm::WinogradF4);
            assert!(crate::cpu::conv::winograd::applies(&conv.spec));
        }
        let mut convs = plan();
        assert_eq!(fit(&mut convs, WeightBudget::unlimited(), &narrow()), 0);
        assert_eq!(fit(&mut convs, WeightBudget::factor(4.0).unwrap(), &narrow()), 0);
        // Weights 1 + 4 + 4 (units of 256²·9 floats): F(4×4) everywhere is
        // 36; one 512 conv down is 36 - 4·(4 - 16/9) = 27.1 (3.0×), both 18.2
        // (2.0×), and then the 256 conv 15.9 (1.8×).
        let algorithms = |budget: f32| {
            let mut convs = plan();
            fit(&mut convs, WeightBudget::factor(budget).unwrap(), &narrow());
            convs.iter().map(|c| c.algorithm).collect::<Vec<_>>()
        };
        use ConvAlgorithm::{WinogradF2 as F2, WinogradF4 as F4};
        assert_eq!(algorithms(3.5), [F4, F2, F4]);
        assert_eq!(algorithms(2.5), [F4, F2, F2]);
        assert_eq!(algorithms(1.9), [F2, F2, F2]);
        // Nothing left to step down: as far as it goes.
        assert_eq!(algorithms(1.0), [F2, F2, F2]);
    }

    /// Convs too narrow for F(2×2) step down to a direct conv.
    #[test]
    fn narrow_convs_step_down_to_direct() {
        let mut convs = vec![conv3x3(16, [10, 16, 56, 56])];
        assert_eq!(convs[0].algorithm, ConvAlgorithm::WinogradF4);
        assert_eq!(fit(&mut convs, WeightBudget::factor(1.0).unwrap(), &narrow()), 1);
        assert_eq!(convs[0].algorithm, ConvAlgorithm::DirectPanels);
    }

    /// With wide FMAs, an F(4×4) conv on few pixels steps down to the
    /// direct conv (F(2×2) without them); on many, to F(2×2) either way.
    #[test]
    fn wide_fma_steps_few_pixels_down_to_direct() {
        let step = |out_shape, wide_fma| {
            let mut convs = vec![conv3x3(256, out_shape)];
            assert_eq!(convs[0].algorithm, ConvAlgorithm::WinogradF4);
            let machine = Machine::with_fma(Isa::Avx512, wide_fma);
            assert_eq!(fit(&mut convs, WeightBudget::factor(1.0).unwrap(), &machine), 1);
            convs[0].algorithm
        };
        assert_eq!(step([1, 256, 16, 16], true), ConvAlgorithm::DirectLanes);
        assert_eq!(step([1, 256, 16, 16], false), ConvAlgorithm::WinogradF2);
        assert_eq!(step([10, 256, 7, 7], true), ConvAlgorithm::WinogradF2);
    }

    /// Factors below 1 (and NaN) are refused, in code and in text.
    #[test]
    fn factors_below_one_are_refused() {
        assert!(WeightBudget::factor(0.99).is_none());
        assert!(WeightBudget::factor(f32::NAN).is_none());
        assert_eq!(WeightBudget::factor(f32::INFINITY), Some(WeightBudget::unlimited()));
        assert_eq!(WeightBudget::factor(1.0).map(|b| b.get()), Some(1.0));
        assert_eq!("2.5".parse::<WeightBudget>().ok(), WeightBudget::factor(2.5));
        assert_eq!(
            " unlimited".parse::<WeightBudget>().ok(),
            Some(WeightBudget::unlimited())
        );
        for bad in ["0.5", "NaN", "-3", "", "lots"] {
            let error = bad.parse::<WeightBudget>().unwrap_err();
            assert!(
                matches!(&error, EngineError::InvalidWeightBudget { given } if given == bad),
                "{bad}: {error}"
            );
        }
    }

    /// The default budget adds its allowance to the multiple: three
    /// 512-channel F(4×4) convs (108 MiB packed, 27 MiB of weights) fit
    /// 2.5× + 48 MiB, not a bare 2.5×.
    #[test]
    fn default_allowance_keeps_f4() {
        let plan = || vec![conv3x3(512, [10, 512, 7, 7]); 3];
        assert_eq!(fit(&mut plan(), WeightBudget::default(), &narrow()), 0);
        assert_eq!(
            fit(
                &mut plan(),
                WeightBudget::factor(DEFAULT_WEIGHT_BUDGET).unwrap(),
                &narrow()
            ),
            3
        );
        assert_eq!(WeightBudget::default().allowance_mib(), DEFAULT_WEIGHT_ALLOWANCE_MIB);
        assert_eq!("2.5".parse::<WeightBudget>().unwrap().allowance_mib(), 0.0);
    }
}
