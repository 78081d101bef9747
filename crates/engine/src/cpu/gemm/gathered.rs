//! The panel product with `V`'s rows gathered through a table of offsets:
//! `M[r][c] = Σ_d U[r][d] · data[start + table[d] + c]`. The direct conv
//! without im2col ([`crate::cpu::conv`]'s phased input) reads each of its
//! `C·kh·kw` rows from one row of the input, shifted, where im2col would
//! copy it out first; same micro-tiles, same order of sums as
//! [`super::panel_gemm`] on the copied rows, so the results are equal.

use super::{Isa, PANEL_GRANULE, PANEL_ROWS};

/// `V` as rows gathered from `data`: row `d` of the columns from `start`
/// on is `data[start + table[d]..]`.
#[derive(Clone, Copy)]
pub(crate) struct Gathered<'a> {
    pub(crate) data: &'a [f32],
    /// One offset per row of `V` (the product's depth).
    pub(crate) table: &'a [usize],
}

/// `m` (`[rows, cols]`, rows `m_stride` apart) `= u · V`, `V`'s columns
/// `start..start + cols` of `v`; `u` packed by
/// [`super::pack_panels`] (`rows` a multiple of [`PANEL_ROWS`], `depth` =
/// `v.table.len()`), `cols` a multiple of [`PANEL_GRANULE`]; `isa` one of
/// [`Isa::available`]. Panics when an operand is short (checked
/// arithmetic: no wrapped size lets one through).
pub(crate) fn panel_gemm_gathered(
    isa: Isa,
    u: &[f32],
    v: Gathered,
    start: usize,
    m: &mut [f32],
    m_stride: usize,
    [rows, cols]: [usize; 2],
) {
    let depth = v.table.len();
    assert!(rows.is_multiple_of(PANEL_ROWS) && cols.is_multiple_of(PANEL_GRANULE) && m_stride >= cols);
    assert!(rows.checked_mul(depth).is_some_and(|n| u.len() >= n));
    let reach = v
        .table
        .iter()
        .max()
        .map_or(Some(0), |&far| start.checked_add(far)?.checked_add(cols));
    assert!(
        reach.is_some_and(|reach| v.data.len() >= reach),
        "gathered rows past the data"
    );
    let span = match rows {
        0 => Some(0),
        rows => (rows - 1).checked_mul(m_stride).and_then(|n| n.checked_add(cols)),
    };
    assert!(span.is_some_and(|span| m.len() >= span), "product past its output");
    if depth == 0 || cols == 0 {
        for r in 0..rows {
            m[r * m_stride..][..cols].fill(0.0);
        }
        return;
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: every row read is `start + table[d] + c`, `c < cols`,
        // within `v.data` (checked above), `u` holds the panels and `m`
        // the span; `Isa::Avx512` is only handed out with AVX-512F.
        Isa::Avx512 => unsafe { x86::avx512(u, v, start, m.as_mut_ptr(), m_stride, [rows, cols]) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, for AVX2 + FMA.
        Isa::Avx2Fma => unsafe { x86::avx2(u, v, start, m.as_mut_ptr(), m_stride, [rows, cols]) },
        _ => scalar(u, v, start, m, m_stride, [rows, cols]),
    }
}

/// The portable product, the same sums in the same order.
fn scalar(u: &[f32], v: Gathered, start: usize, m: &mut [f32], ms: usize, [rows, cols]: [usize; 2]) {
    let depth = v.table.len();
    for panel in 0..rows / PANEL_ROWS {
        let u = &u[panel * depth * PANEL_ROWS..][..depth * PANEL_ROWS];
        for t0 in (0..cols).step_by(PANEL_GRANULE) {
            let mut acc = [[0f32; PANEL_GRANULE]; PANEL_ROWS];
            for (d, &offset) in v.table.iter().enumerate() {
                let row = &v.data[start + offset + t0..][..PANEL_GRANULE];
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = u[d * PANEL_ROWS + r];
                    for (acc, &b) in acc.iter_mut().zip(row) {
                        *acc += a * b;
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                m[(panel * PANEL_ROWS + r) * ms + t0..][..PANEL_GRANULE].copy_from_slice(acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::panel::x86::{
        avx2_leads, avx2_tile_rows, avx512_slice, avx512_slice_width, micro_avx2, micro_avx2_tall, TileColumns,
        TileWeights, AVX2_TALL_ROWS,
    };
    use super::Gathered;
    use crate::cpu::gemm::PANEL_GRANULE;

    /// The columns of tile `t0` of `v` from `start`.
    fn columns(v: Gathered, start: usize, t0: usize) -> TileColumns {
        TileColumns {
            at: v.data[start + t0..].as_ptr(),
            stride: 0,
            table: v.table.as_ptr(),
            pack: std::ptr::null_mut(),
        }
    }

    /// The AVX-512 product in the panel product's column slices and tiles
    /// (8 × 48 where whole 48-column slices reach; with 12 × 32 tiles
    /// throughout, ResNet's 7×7 stride-2 stem with its pool took 1.10× the
    /// time alone at batch 1 (0.81 against 0.73 ms) and at batch 10 (7.57
    /// against 6.86), and 8.2 against 7.5 ms in ResNet18's batch-10
    /// profile: Intel Xeon VM, 2 threads, alternating runs).
    ///
    /// # Safety
    /// AVX-512F; the operands as [`super::panel_gemm_gathered`] checks them.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn avx512(
        u: &[f32],
        v: Gathered,
        start: usize,
        m: *mut f32,
        ms: usize,
        [rows, cols]: [usize; 2],
    ) {
        let depth = v.table.len();
        // SAFETY: tiles read `start + table[d] + t0 + 0..tile width` and
        // write their rows of `m`'s span (the caller's checks); a tall
        // tile's rows past its panel read the next panel's weights, within
        // `u` (rows stay below `rows`).
        unsafe {
            // Slices as the panel product cuts them (8 × 48 tiles, then
            // 12-row tiles across panels for a rest of 32 or 16 columns).
            let mut t0 = 0;
            while t0 < cols {
                let width = avx512_slice_width(t0, cols);
                let at = [rows, depth, t0, width];
                avx512_slice::<true>(u.as_ptr(), columns(v, start, t0), m, at, ms, None, None);
                t0 += width;
            }
        }
    }

    /// # Safety
    /// AVX2 and FMA; the operands as [`super::panel_gemm_gathered`] checks
    /// them. Tiles of 6 rows (12 accumulators) running across panels where
    /// they must, the last 4 or 8 rows in tiles of 4, as
    /// [`super::super::panel`]'s AVX2 product.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(u: &[f32], v: Gathered, start: usize, m: *mut f32, ms: usize, [rows, cols]: [usize; 2]) {
        let depth = v.table.len();
        const W: usize = PANEL_GRANULE / 8;
        // SAFETY: as for `avx512`; a tall tile's rows past its panel read
        // the next panel's weights, within `u` (rows stay below `rows`).
        unsafe {
            for t0 in (0..cols).step_by(PANEL_GRANULE) {
                let vt = columns(v, start, t0);
                let mut row = 0;
                while row < rows {
                    let height = avx2_tile_rows(rows - row);
                    let up = TileWeights::from_row(u.as_ptr(), row, depth);
                    let mp = m.add(row * ms + t0);
                    // Leading as in the panel product (no `v` prefetch here).
                    match (height == AVX2_TALL_ROWS, avx2_leads(t0, false)) {
                        (true, true) => {
                            micro_avx2_tall::<W, false, false, true, false, true>(up, vt, mp, depth, ms, None, None)
                        }
                        (true, false) => {
                            micro_avx2_tall::<W, false, false, true, false, false>(up, vt, mp, depth, ms, None, None)
                        }
                        (false, true) => {
                            micro_avx2::<W, false, false, true, false, true>(up, vt, mp, depth, ms, None, None)
                        }
                        (false, false) => {
                            micro_avx2::<W, false, false, true, false, false>(up, vt, mp, depth, ms, None, None)
                        }
                    }
                    row += height;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gemm::pack_panels;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

        /// Every path equals a plain f64 product over the gathered rows
        /// (random offsets, overlapping and out of order), within an f32
        /// rounding bound; `m`'s gaps past `cols` stay untouched.
        #[test]
        fn paths_match_plain_product(
            panels in 0usize..6, depth in 0usize..40, tiles in 1usize..6, gap in 0usize..5,
            seed in any::<u64>(), start in 0usize..7,
        ) {
            let (rows, cols) = (panels * PANEL_ROWS, tiles * PANEL_GRANULE);
            let mut next = crate::test_util::uniform(seed);
            let plain: Vec<f32> = (0..rows * depth).map(|_| next()).collect();
            let data: Vec<f32> = (0..200).map(|_| next()).collect();
            let table: Vec<usize> = (0..depth).map(|_| (next().abs() * 100.0) as usize).collect();
            let mut u = vec![0f32; rows * depth];
            pack_panels(&plain, rows, depth, &mut u);
            let ms = cols + gap;
            for isa in Isa::available() {
                let mut m = vec![7f32; rows * ms];
                panel_gemm_gathered(isa, &u, Gathered { data: &data, table: &table }, start, &mut m, ms, [rows, cols]);
                for r in 0..rows {
                    for c in 0..cols {
                        let (mut want, mut scale) = (0f64, 0f64);
                        for d in 0..depth {
                            let term = f64::from(plain[r * depth + d]) * f64::from(data[start + table[d] + c]);
                            want += term;
                            scale += term.abs();
                        }
                        let got = f64::from(m[r * ms + c]);
                        prop_assert!((got - want).abs() <= 1e-5 * scale + 1e-30, "{isa:?} r{r} c{c}: {got} vs {want}");
                    }
                    prop_assert!(m[r * ms + cols..(r + 1) * ms].iter().all(|&x| x == 7.0));
                }
            }
        }
    }

    /// A table reaching past the data is refused before anything is read.
    #[test]
    fn short_data_panics() {
        for table in [[0, 25], [0, usize::MAX - 8]] {
            let caught = std::panic::catch_unwind(|| {
                let (u, data) = (vec![0f32; PANEL_ROWS * 2], vec![0f32; 40]);
                let mut m = vec![0f32; PANEL_ROWS * PANEL_GRANULE];
                let v = Gathered {
                    data: &data,
                    table: &table,
                };
                panel_gemm_gathered(
                    Isa::Scalar,
                    &u,
                    v,
                    0,
                    &mut m,
                    PANEL_GRANULE,
                    [PANEL_ROWS, PANEL_GRANULE],
                );
            });
            assert!(caught.is_err(), "{table:?}");
        }
    }
}
