//! The gathered lane product against a plain f64 loop over the gathered
//! values on every path, and a tile past the data refused.

use super::*;
use crate::cpu::gemm::pack_lanes;
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Every available path equals a plain loop (f64 sums) over the
    /// gathered values within an f32 rounding bound, across chunk
    /// boundaries, partial lane groups, every tile shape the path
    /// takes (runs of pixels side by side and down the rows).
    #[test]
    fn paths_match_plain_product(
        out_rows in 1usize..70,
        depth in 0usize..(2 * LANE_CHUNK + 9),
        width in 1usize..=AVX512_TILE,
        runs in 1usize..=AVX2_TILE,
        step in 1usize..=MAX_STEP,
        col_step in 1usize..3,
        seed in any::<u64>(),
    ) {
        let mut next = crate::test_util::uniform(seed);
        let (pitch, data_len) = (23, 700);
        let data: Vec<f32> = (0..data_len).map(|_| next()).collect();
        let table: Vec<usize> = (0..depth).map(|d| (d * 37 + 11) % 500).collect();
        let plain: Vec<f32> = (0..out_rows * depth).map(|_| next()).collect();
        let padded = out_rows.div_ceil(LANES) * LANES;
        let mut packed = vec![f32::NAN; padded * depth];
        pack_lanes(&plain, out_rows, depth, &mut packed);
        for isa in Isa::available() {
            let max = max_tile(isa);
            let rows = runs.min(max_runs(isa));
            let tile_width = width.min(max / rows);
            // Two tiles: one from value 3, one from value 40 (run 2
            // `pitch` on), their pixels `step` values apart. In the
            // product, with `col_step` 1 the first tile's pixels from 0
            // and the second's after them; with 2 interleaved (the
            // first's the even pixels, the second's the odd).
            let (second, col_pitch) = match col_step {
                1 => (rows * tile_width, tile_width),
                _ => (1, 2 * tile_width),
            };
            let tile = |start, col| LaneTile { start, pitch, step, col, col_pitch, col_step, width: tile_width, rows };
            let tiles = [tile(3, 0), tile(40, second)];
            let pixels = 2 * rows * tile_width;
            let at = |t: &LaneTile, p: usize| t.start + p / t.width * t.pitch + p % t.width * t.step;
            let mut m = vec![f32::NAN; padded * pixels];
            let (first, rest) = m.split_at_mut(pixels * LANES);
            let sources = [Source { v: Gathered { data: &data, table: &table }, tiles: tiles.to_vec() }];
            lane_gemm_gathered(isa, (&packed, padded), &sources, (first, pixels), 0..1);
            lane_gemm_gathered(isa, (&packed, padded), &sources, (rest, pixels), 1..padded / LANES);
            for tile in &tiles {
                for p in 0..tile.rows * tile.width {
                    let pixel = tile.col + p / tile.width * tile.col_pitch + p % tile.width * tile.col_step;
                    for r in 0..padded {
                        let got = f64::from(m[(r / LANES * pixels + pixel) * LANES + r % LANES]);
                        if r >= out_rows {
                            prop_assert_eq!(got, 0.0, "{:?} padding row {}", isa, r);
                            continue;
                        }
                        let terms = (0..depth).map(|d| f64::from(plain[r * depth + d]) * f64::from(data[table[d] + at(tile, p)]));
                        let want: f64 = terms.clone().sum();
                        let bound = 1.01 * depth as f64 * f64::from(f32::EPSILON) * terms.map(f64::abs).sum::<f64>();
                        prop_assert!((got - want).abs() <= bound, "{:?} r={} pixel={}: {} vs {}", isa, r, pixel, got, want);
                    }
                }
            }
        }
    }
}

/// A tile reaching past the data is refused, not read.
#[test]
#[should_panic(expected = "past its operands")]
fn tile_past_the_data_panics() {
    let (data, table, w) = (vec![0f32; 10], vec![0usize, 5], vec![0f32; 2 * LANES]);
    let tile = LaneTile {
        start: 0,
        pitch: 0,
        step: 1,
        col: 0,
        col_pitch: 0,
        col_step: 1,
        width: 6,
        rows: 1,
    };
    let mut m = vec![0f32; 6 * LANES];
    let v = Gathered {
        data: &data,
        table: &table,
    };
    lane_gemm_gathered(
        Isa::Scalar,
        (&w, LANES),
        &[Source { v, tiles: vec![tile] }],
        (&mut m, 6),
        0..1,
    );
}
