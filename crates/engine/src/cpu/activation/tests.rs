//! The scalar `exp` against f64, and every activation on every path
//! against its reference.

use super::*;
use candle_core::Device;

/// `exp` within 2 ulp of f64's `exp` over its range, by a sweep.
#[test]
fn exp_within_two_ulp() {
    let mut x = -87.3f32;
    while x <= 88.0 {
        let want = f64::from(x).exp();
        let got = f64::from(exp(x));
        let ulp = f64::from(f32::EPSILON) * want;
        assert!((got - want).abs() <= 2.0 * ulp, "exp({x}) = {got}, want {want}");
        x += 0.0137;
    }
    assert!(exp(f32::NAN).is_nan());
    assert!(exp(-1e4) >= 0.0 && exp(-1e4) < 1e-37 && exp(1e4).is_finite());
}

/// Every activation on every path this CPU has equals the f64
/// reference within f32 rounding, over saturating values and a size
/// that is not a whole number of chunks; NaN stays NaN.
#[test]
fn matches_reference_on_every_path() {
    let values: Vec<f32> = (0..CHUNK + 1001)
        .map(|i| (i as f32 - 8000.0) / 300.0)
        .chain([-1e30, 1e30, 88.0, -88.0, 0.0, -0.0])
        .collect();
    let x = Tensor::from_vec(values.clone(), values.len(), &Device::Cpu).unwrap();
    for isa in Isa::available() {
        for act in Activation::ALL {
            let got: Vec<f32> = activation(isa, act, &x).unwrap().to_vec1().unwrap();
            for (&v, &g) in values.iter().zip(&got) {
                let want = act.reference(f64::from(v));
                let tol = 4.0 * f64::from(f32::EPSILON) * want.abs().max(1.0);
                assert!(
                    (f64::from(g) - want).abs() <= tol || (want.is_infinite() && f64::from(g) == want),
                    "{isa:?} {act:?} at {v}: {g} vs {want}"
                );
            }
        }
        let nan = Tensor::new(&[f32::NAN], &Device::Cpu).unwrap();
        for act in [Activation::Sigmoid, Activation::Silu, Activation::HardSwish] {
            assert!(activation(isa, act, &nan).unwrap().to_vec1::<f32>().unwrap()[0].is_nan());
        }
    }
}
