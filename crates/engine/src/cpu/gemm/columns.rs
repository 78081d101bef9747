//! A few columns of a panel product, one column at a time: `M = U · V` for
//! `U` packed in 8-row panels ([`super::pack_panels`]) and columns `cols`
//! of a strided `V`, with a panel's 8 rows in one vector. For the columns
//! a whole micro-tile would run past (the last `H·W mod 16` of a 1×1
//! conv's plane): a micro-tile computes 16 columns whatever the count, so
//! a 7×7 plane's last column cost a third of its 48 others. Zen 4, one
//! thread, the last column of a 7×7 plane: 160 x 960 weights 47 us as a
//! tile through scratch, 8.7 us here; 1280 x 320 114 / 26.5 us.

use super::{Isa, Strided, PANEL_ROWS};
use std::ops::Range;

/// `m[r][c - cols.start] = Σ_d U[r][d] · v[d][c]` for every row of the
/// `panels` panels of `u` (`panels · depth · 8` values) and each column `c`
/// of `cols`; `m` is `[panels · 8, cols.len()]`, row-major.
pub(crate) fn panel_columns(
    isa: Isa,
    u: &[f32],
    panels: usize,
    depth: usize,
    v: Strided,
    cols: Range<usize>,
    m: &mut [f32],
) {
    let n = cols.len();
    let rows = panels * PANEL_ROWS;
    // Checked: the kernels index within these spans only.
    let v_span = depth
        .checked_sub(1)
        .map_or(Some(0), |d| d.checked_mul(v.stride)?.checked_add(cols.end));
    assert!(
        rows.checked_mul(depth).is_some_and(|len| u.len() >= len)
            && v_span.is_some_and(|span| v.data.len() >= span)
            && rows.checked_mul(n).is_some_and(|len| m.len() >= len)
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the spans were checked above; every SIMD path has AVX2
        // and FMA (`Isa::available` checks them for AVX-512 too).
        Isa::Avx512 | Isa::Avx2Fma => unsafe { x86::columns_avx2(u, panels, depth, v, cols, m) },
        _ => {
            for (k, c) in cols.enumerate() {
                for (row, out) in m.chunks_exact_mut(n).take(rows).enumerate() {
                    let (panel, r) = (row / PANEL_ROWS, row % PANEL_ROWS);
                    let weights = &u[panel * depth * PANEL_ROWS..][..depth * PANEL_ROWS];
                    out[k] = (0..depth)
                        .map(|d| weights[d * PANEL_ROWS + r] * v.data[d * v.stride + c])
                        .sum();
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Strided, PANEL_ROWS};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Panels whose sums run at once: independent accumulators that share
    /// each broadcast of `v`.
    const GROUP: usize = 4;

    /// # Safety
    /// The CPU has AVX2 and FMA; `u` has `panels · depth · 8` values, `v`
    /// reaches `(depth - 1) · stride + cols.end`, `m` has `panels · 8 ·
    /// cols.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn columns_avx2(
        u: &[f32],
        panels: usize,
        depth: usize,
        v: Strided,
        cols: Range<usize>,
        m: &mut [f32],
    ) {
        let n = cols.len();
        // SAFETY: within the spans of the contract above.
        unsafe {
            let (up, mp) = (u.as_ptr(), m.as_mut_ptr());
            for (k, c) in cols.enumerate() {
                let x = v.data.as_ptr().add(c);
                let mut panel = 0;
                while panel < panels {
                    let group = GROUP.min(panels - panel);
                    let mut acc = [_mm256_setzero_ps(); GROUP];
                    let first = up.add(panel * depth * PANEL_ROWS);
                    if group == GROUP {
                        for d in 0..depth {
                            let b = _mm256_broadcast_ss(&*x.add(d * v.stride));
                            for (q, acc) in acc.iter_mut().enumerate() {
                                let w = _mm256_loadu_ps(first.add((q * depth + d) * PANEL_ROWS));
                                *acc = _mm256_fmadd_ps(w, b, *acc);
                            }
                        }
                    } else {
                        for (q, acc) in acc.iter_mut().enumerate().take(group) {
                            for d in 0..depth {
                                let b = _mm256_broadcast_ss(&*x.add(d * v.stride));
                                let w = _mm256_loadu_ps(first.add((q * depth + d) * PANEL_ROWS));
                                *acc = _mm256_fmadd_ps(w, b, *acc);
                            }
                        }
                    }
                    for (q, &acc) in acc.iter().enumerate().take(group) {
                        let mut sums = [0f32; PANEL_ROWS];
                        _mm256_storeu_ps(sums.as_mut_ptr(), acc);
                        for (r, &s) in sums.iter().enumerate() {
                            *mp.add(((panel + q) * PANEL_ROWS + r) * n + k) = s;
                        }
                    }
                    panel += group;
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

        /// Every path equals a plain f64 product: panel counts off the
        /// group of 4, depths from 0, column ranges inside a strided `v`.
        #[test]
        fn paths_match_plain_product(
            rows in 1usize..60,
            depth in 0usize..70,
            [start, count, pad] in [0usize..20, 1usize..17, 0usize..5],
            seed in any::<u64>(),
        ) {
            let mut next = crate::test_util::uniform(seed);
            let panels = rows.div_ceil(PANEL_ROWS);
            let plain: Vec<f32> = (0..rows * depth).map(|_| next()).collect();
            let mut u = vec![0.0; panels * PANEL_ROWS * depth];
            pack_panels(&plain, rows, depth, &mut u);
            let stride = start + count + pad;
            let data: Vec<f32> = (0..depth.max(1) * stride).map(|_| next()).collect();
            let v = Strided { data: &data, stride };
            let cols = start..start + count;
            for isa in Isa::available() {
                let mut m = vec![f32::NAN; panels * PANEL_ROWS * count];
                panel_columns(isa, &u, panels, depth, v, cols.clone(), &mut m);
                for r in 0..panels * PANEL_ROWS {
                    for (k, c) in cols.clone().enumerate() {
                        let want: f64 = match r < rows {
                            true => (0..depth).map(|d| f64::from(plain[r * depth + d]) * f64::from(data[d * stride + c])).sum(),
                            false => 0.0,
                        };
                        let got = f64::from(m[r * count + k]);
                        prop_assert!((got - want).abs() <= 1e-5 * (depth as f64 + 1.0), "{:?} [{}][{}]: {} vs {}", isa, r, c, got, want);
                    }
                }
            }
        }
    }
}
