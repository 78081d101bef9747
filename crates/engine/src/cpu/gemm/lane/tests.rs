//! The lane product against an f64 product on every path, in half groups
//! and in depth parts.

use super::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Every available path equals a plain triple loop (f64 accumulation)
    /// within an f32 rounding bound, across chunk boundaries (depth up
    /// to 3·KC), partial lane groups and every tile size.
    #[test]
    fn paths_match_plain_product(
        rows in 1usize..80,
        depth in 1usize..(3 * KC + 5),
        pixels in 1usize..40,
        extra_cols in 0usize..5,
        seed in any::<u64>(),
    ) {
        let cols = pixels + extra_cols;
        let mut next = crate::test_util::uniform(seed);
        let plain: Vec<f32> = (0..rows * depth).map(|_| next()).collect();
        let v: Vec<f32> = (0..depth * cols).map(|_| next()).collect();
        let padded = rows.div_ceil(LANES) * LANES;
        let mut packed = vec![f32::NAN; padded * depth];
        pack_lanes(&plain, rows, depth, &mut packed);
        for isa in Isa::available() {
            // Two calls, for the first lane group and the rest (how tasks split the work).
            let mut m = vec![f32::NAN; padded * pixels];
            let (first, rest) = m.split_at_mut(pixels * LANES);
            let size = LaneProduct { rows: padded, depth, cols, pixels };
            lane_gemm(isa, size, &packed, &v, first, 0..1);
            lane_gemm(isa, size, &packed, &v, rest, 1..padded / LANES);
            for r in 0..padded {
                for p in 0..pixels {
                    let got = f64::from(m[(r / LANES * pixels + p) * LANES + r % LANES]);
                    if r >= rows {
                        prop_assert_eq!(got, 0.0, "{:?} padding row {} pixel {}", isa, r, p);
                        continue;
                    }
                    let terms = (0..depth).map(|d| f64::from(plain[r * depth + d]) * f64::from(v[d * cols + p]));
                    let want: f64 = terms.clone().sum();
                    // Any f32 summation order: |error| <= n·ε·Σ|aᵢbᵢ| (to first order).
                    let bound = 1.01 * depth as f64 * f64::from(f32::EPSILON) * terms.map(f64::abs).sum::<f64>();
                    prop_assert!((got - want).abs() <= bound, "{:?} r={} p={}: {} vs {}", isa, r, p, got, want);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Two runs of output channels cut at any half group
    /// ([`lane_gemm_lanes`], each into its own buffer from its first
    /// group, as a task's scratch) give every channel of its run as a
    /// plain product does, on every path (AVX2 computing only the
    /// run's halves).
    #[test]
    fn half_group_runs_match_plain_product(
        groups in 1usize..5,
        cut in 0usize..10,
        depth in 1usize..(2 * KC + 5),
        pixels in 1usize..20,
        seed in any::<u64>(),
    ) {
        let (rows, cols) = (groups * LANES, pixels + 1);
        let cut = cut.min(2 * groups) * HALF;
        let mut next = crate::test_util::uniform(seed);
        let plain: Vec<f32> = (0..rows * depth).map(|_| next()).collect();
        let v: Vec<f32> = (0..depth * cols).map(|_| next()).collect();
        let mut packed = vec![f32::NAN; rows * depth];
        pack_lanes(&plain, rows, depth, &mut packed);
        let size = LaneProduct { rows, depth, cols, pixels };
        for isa in Isa::available() {
            for lanes in [0..cut, cut..rows] {
                if lanes.is_empty() {
                    continue;
                }
                let first = lane_groups(&lanes).start;
                let mut m = vec![f32::NAN; lane_groups(&lanes).len() * LANES * pixels];
                lane_gemm_lanes(isa, size, &packed, &v, &mut m, lanes.clone(), 0..depth);
                for r in lanes.clone() {
                    for p in 0..pixels {
                        let got = f64::from(m[((r / LANES - first) * pixels + p) * LANES + r % LANES]);
                        let terms = (0..depth).map(|d| f64::from(plain[r * depth + d]) * f64::from(v[d * cols + p]));
                        let want: f64 = terms.clone().sum();
                        let bound = 1.01 * depth as f64 * f64::from(f32::EPSILON) * terms.map(f64::abs).sum::<f64>();
                        prop_assert!((got - want).abs() <= bound, "{:?} {:?} r={} p={}: {} vs {}", isa, lanes, r, p, got, want);
                    }
                }
            }
        }
    }
}

/// Parts of the depth cut at a chunk ([`lane_gemm_part`], each given
/// only its rows of `v`) add up to the product on every path, and a
/// part with no depth gives zeros, whatever `m` held (NaN here).
#[test]
fn depth_parts_add_up() {
    let (rows, pixels, cols) = (2 * LANES, 13, 16);
    for depth in [KC, 2 * KC + 7, 3 * KC] {
        let mut next = crate::test_util::uniform(depth as u64);
        let plain: Vec<f32> = (0..rows * depth).map(|_| next()).collect();
        let v: Vec<f32> = (0..depth * cols).map(|_| next()).collect();
        let mut packed = vec![f32::NAN; rows * depth];
        pack_lanes(&plain, rows, depth, &mut packed);
        // At the middle chunk, or at the end (an empty second part).
        let cut = depth.div_ceil(KC) / 2 * KC;
        let cut = if cut == 0 { depth } else { cut };
        for isa in Isa::available() {
            let size = LaneProduct {
                rows,
                depth,
                cols,
                pixels,
            };
            let (mut a, mut b) = (vec![f32::NAN; rows * pixels], vec![f32::NAN; rows * pixels]);
            lane_gemm_part(isa, size, &packed, &v[..cut * cols], &mut a, 0..rows / LANES, 0..cut);
            lane_gemm_part(
                isa,
                size,
                &packed,
                &v[cut * cols..],
                &mut b,
                0..rows / LANES,
                cut..depth,
            );
            if cut == depth {
                assert!(b.iter().all(|&x| x == 0.0), "{isa:?} {depth}");
            }
            for r in 0..rows {
                for p in 0..pixels {
                    let at = (r / LANES * pixels + p) * LANES + r % LANES;
                    let got = f64::from(a[at] + b[at]);
                    let terms = (0..depth).map(|d| f64::from(plain[r * depth + d]) * f64::from(v[d * cols + p]));
                    let want: f64 = terms.clone().sum();
                    let bound = 1.01 * depth as f64 * f64::from(f32::EPSILON) * terms.map(f64::abs).sum::<f64>();
                    assert!(
                        (got - want).abs() <= bound,
                        "{isa:?} {depth} r={r} p={p}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
