//! The panel product against an f64 product on every path the machine has.

use super::*;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// Every available path equals a plain triple loop (f64 accumulation)
    /// within an f32 rounding bound, with `v` and `m` inside wider
    /// matrices (strides past `cols`; the gaps of `m` stay untouched),
    /// from an empty product (zeros) to deep ones.
    #[test]
    fn paths_match_plain_product(
        // Up to 5 panels: AVX-512's 12-row tiles from a panel's start
        // and from its middle, and the 8-row ones after them; up to 7
        // granules: one or two 48-column slices and the 16 or 32
        // columns after them.
        panels in 1usize..6,
        depth in 0usize..300,
        granules in 1usize..8,
        [v_pad, m_pad] in [0usize..20, 0usize..20],
        seed in any::<u64>(),
    ) {
        let (rows, cols) = (panels * PANEL_ROWS, granules * PANEL_GRANULE);
        let (vs, ms) = (cols + v_pad, cols + m_pad);
        let mut next = crate::test_util::uniform(seed);
        let plain: Vec<f32> = (0..rows * depth).map(|_| next()).collect();
        // The last row is `cols` long: the span a strided operand needs.
        let v: Vec<f32> = (0..depth.saturating_sub(1) * vs + cols).map(|_| next()).collect();
        let mut packed = vec![0f32; rows * depth];
        pack_panels(&plain, rows, depth, &mut packed);
        for isa in Isa::available() {
            let mut m = vec![f32::NAN; (rows - 1) * ms + cols];
            panel_gemm_strided(isa, &packed, Strided { data: &v, stride: vs }, &mut m, ms, [rows, depth, cols], None);
            for r in 0..rows {
                for c in 0..cols {
                    let terms = (0..depth).map(|d| f64::from(plain[r * depth + d]) * f64::from(v[d * vs + c]));
                    let want: f64 = terms.clone().sum();
                    // Any f32 summation order: |error| <= n·ε·Σ|aᵢbᵢ| (to first order).
                    let bound = 1.01 * depth as f64 * f64::from(f32::EPSILON) * terms.map(f64::abs).sum::<f64>();
                    let got = f64::from(m[r * ms + c]);
                    prop_assert!((got - want).abs() <= bound, "{isa:?} r={r} c={c}: {got} vs {want}");
                }
                if r + 1 < rows {
                    prop_assert!(m[r * ms + cols..(r + 1) * ms].iter().all(|x| x.is_nan()), "{isa:?} wrote a gap");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// A product in depth chunks ([`DepthChunks`]: any chunk depth,
    /// blocks of 1-4 panels) equals the f64 product on every path, into
    /// an exclusive output or into shared rows with the epilogue (bias,
    /// residual, ReLU: applied once, after the last chunk), the gaps
    /// between `m`'s rows untouched.
    #[test]
    fn chunked_products_match_plain_product(
        panels in 1usize..6,
        depth in 1usize..300,
        granules in 1usize..8,
        chunk in 1usize..80,
        block_panels in 1usize..5,
        shared in any::<bool>(),
    ) {
        let case = super::super::test_case::Case::new(panels, depth, granules * PANEL_GRANULE);
        let (rows, cols, ms) = (case.rows, case.cols, case.ms);
        let chunks = Some(DepthChunks { depth: chunk, rows: block_panels * PANEL_ROWS });
        for isa in Isa::available() {
            let mut m = vec![f32::NAN; case.len()];
            let epilogue = shared.then(|| case.epilogue());
            match shared {
                true => {
                    let rows_of = SharedRows { out: SharedOut::over(&mut m), start: 0, stride: ms };
                    // SAFETY: `m` outlives the call, which alone accesses it.
                    unsafe { panel_gemm_shared(isa, &case.packed, case.v(), rows_of, case.size(), epilogue, chunks) };
                }
                false => {
                    // The exclusive form takes `v` and `m` `cols` wide.
                    let v: Vec<f32> = (0..depth).flat_map(|d| case.v[d * case.stride..][..cols].to_vec()).collect();
                    let mut dense = vec![f32::NAN; rows * cols];
                    panel_gemm_chunked(isa, &case.packed, &v, &mut dense, case.size(), chunks);
                    for r in 0..rows {
                        m[r * ms..][..cols].copy_from_slice(&dense[r * cols..][..cols]);
                    }
                }
            }
            for r in 0..rows {
                for c in 0..cols {
                    let terms = (0..depth)
                        .map(|d| f64::from(case.plain[r * depth + d]) * f64::from(case.v[d * case.stride + c]));
                    let sum: f64 = terms.clone().sum();
                    let want = match shared {
                        true => (sum + f64::from(case.bias[r]) + f64::from(case.residual[r * ms + c])).max(0.0),
                        false => sum,
                    };
                    let bound = 1.01 * (depth + 2) as f64 * f64::from(f32::EPSILON)
                        * (terms.map(f64::abs).sum::<f64>() + 2.0);
                    let got = f64::from(m[r * ms + c]);
                    prop_assert!((got - want).abs() <= bound, "{isa:?} r={r} c={c}: {got} vs {want}");
                }
                if r + 1 < rows {
                    prop_assert!(m[r * ms + cols..(r + 1) * ms].iter().all(|x| x.is_nan()), "{isa:?} wrote a gap");
                }
            }
        }
    }
}

/// Packing the operand as the product goes gives the product of the
/// operand packed first, bit for bit (the same sums in the same
/// order), with the epilogue (bias, residual, ReLU), on every path:
/// one and two 8 × 48 slices, the 12- and 8-row tiles of a 32- or
/// 16-column rest, `m` and the residual inside wider rows (the gaps
/// untouched), shallow and deep operands.
#[test]
fn packing_as_it_goes_equals_packing_first() {
    for (panels, depth, cols) in [
        (1, 3, 16),
        (3, 64, 48),
        (5, 300, 96),
        (4, 700, 80),
        (2, 1100, 32),
        (2, 1, 32),
    ] {
        let case = super::super::test_case::Case::new(panels, depth, cols);
        let (size, v) = (case.size(), case.v());
        for isa in Isa::available() {
            let mut tiles = vec![f32::NAN; depth * cols];
            let first = pack_tiles(isa, v, [depth, cols], &mut tiles, None);
            let mut want = vec![f32::NAN; case.len()];
            panel_gemm_strided(
                isa,
                &case.packed,
                first,
                &mut want,
                case.ms,
                size,
                Some(case.epilogue()),
            );
            let got = case.packing_as_it_goes(isa);
            assert!(
                want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?} {size:?}"
            );
        }
    }
}

/// Products deeper than the AVX2 path's chunk (several depth chunks and
/// row blocks) equal the f64 product, with the epilogue (bias,
/// residual, ReLU) applied once, after the last chunk, on every path.
#[test]
fn deep_products_with_epilogue() {
    let (rows, cols) = (17 * PANEL_ROWS, 3 * PANEL_GRANULE);
    for depth in [513, 700, 1100, 2304] {
        let mut next = crate::test_util::uniform(depth as u64);
        let plain: Vec<f32> = (0..rows * depth).map(|_| next()).collect();
        let v: Vec<f32> = (0..depth * cols).map(|_| next()).collect();
        let bias: Vec<f32> = (0..rows).map(|_| next()).collect();
        let residual: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
        let mut packed = vec![0f32; rows * depth];
        pack_panels(&plain, rows, depth, &mut packed);
        // Row-major (chunked past 512 on AVX2) and packed in tiles
        // (chunked past 1024).
        let layouts = Isa::available().into_iter().flat_map(|isa| [(isa, false), (isa, true)]);
        for (isa, tiled) in layouts {
            let mut m = vec![f32::NAN; rows * cols];
            let epilogue = StoreEpilogue {
                bias: &bias,
                residual: Some(Strided {
                    data: &residual,
                    stride: cols,
                }),
                activation: Some(Activation::Relu),
                stream: false,
            };
            let v = Strided { data: &v, stride: cols };
            let mut tiles = vec![f32::NAN; depth * cols];
            let right = match tiled {
                true => pack_tiles(isa, v, [depth, cols], &mut tiles, None),
                false => Right::Rows(v),
            };
            panel_gemm_strided(isa, &packed, right, &mut m, cols, [rows, depth, cols], Some(epilogue));
            for r in 0..rows {
                for c in 0..cols {
                    let terms = (0..depth).map(|d| f64::from(plain[r * depth + d]) * f64::from(v.data[d * cols + c]));
                    let sum: f64 = terms.clone().sum();
                    let want = (sum + f64::from(bias[r]) + f64::from(residual[r * cols + c])).max(0.0);
                    let bound =
                        1.01 * (depth + 2) as f64 * f64::from(f32::EPSILON) * (terms.map(f64::abs).sum::<f64>() + 2.0);
                    let got = f64::from(m[r * cols + c]);
                    assert!(
                        (got - want).abs() <= bound,
                        "{isa:?} tiled {tiled} depth {depth} r={r} c={c}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

/// AVX-512's and AVX2's tile heights cover every whole number of
/// panels exactly, each tile within its rows.
#[cfg(target_arch = "x86_64")]
#[test]
fn tile_heights_cover_whole_panels() {
    for panels in 1..=64 {
        for height in [x86::avx512_tile_rows, x86::avx2_tile_rows] {
            let (mut row, rows) = (0, panels * PANEL_ROWS);
            while row < rows {
                let h = height(rows - row);
                assert!(h > 0 && row + h <= rows, "{panels} panels: a tile of {h} at row {row}");
                row += h;
            }
        }
    }
}
