//! A band's scratch: its padding zeroed, the input planes copied in with
//! the channels in the vector lanes, the sums copied back into planes.

#[cfg(target_arch = "x86_64")]
use super::simd;
use super::Geometry;
use crate::cpu::gemm::Isa;

/// Zeroes the padding of the band of output rows `first_row..first_row +
/// rows` in its scratch and returns which input rows its interior takes
/// and the scratch row the first of them goes to.
pub(super) fn pad(g: &Geometry, padded: &mut [f32], first_row: usize, rows: usize) -> (std::ops::Range<usize>, usize) {
    let [height, width] = g.size;
    let used = g.band_input_rows(rows);
    // Scratch row r holds padded row top + r: scratch rows `r0..r1` hold
    // input rows `y0..`, the rest (if any) is padding.
    let top = first_row * g.stride[0];
    let r0 = g.padding[0].saturating_sub(top).min(used);
    let r1 = (g.padding[0] + height).saturating_sub(top).clamp(r0, used);
    let y0 = (top + r0).saturating_sub(g.padding[0]);
    // The padding only: the interior is written by the caller (a whole
    // fill was 1% of MobileNetV2's batch-1 forward).
    let row = g.padded_width * g.lanes;
    let interior = r1 * row;
    assert!(used * row <= g.input_len.min(padded.len()));
    padded[..r0 * row].fill(0.0);
    padded[interior..used * row].fill(0.0);
    let (left, right) = (g.padding[1] * g.lanes, (g.padding[1] + width) * g.lanes);
    for r in padded[r0 * row..interior].chunks_exact_mut(row.max(1)) {
        r[..left].fill(0.0);
        r[right..].fill(0.0);
    }
    (y0..y0 + (r1 - r0), r0)
}

/// Copies input rows `rows` of `count` planes `[H, W]` into the band's
/// scratch rows from `r0` on, channel `c` in lane `c`, the lanes past
/// `count` zero ([`pad`] wrote the rest). On the SIMD paths a lane's worth
/// of positions at a time, transposed in registers; the positions past the
/// last whole group (and the portable path) one at a time.
pub(super) fn pack(
    isa: Isa,
    g: &Geometry,
    planes: &[f32],
    count: usize,
    padded: &mut [f32],
    rows: std::ops::Range<usize>,
    r0: usize,
) {
    let [height, width] = g.size;
    let positions = height * width;
    let y0 = rows.start;
    assert!(
        count <= g.lanes
            && planes.len() >= count * positions
            && (rows.is_empty() || (rows.end <= height && g.at(r0 + rows.len() - 1, width) <= padded.len()))
    );
    let span = rows.start * width..rows.end * width;
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: 16 lanes only on `Isa::Avx512`; the lengths were checked
        // above and every position's destination is inside the band.
        Isa::Avx512 if g.lanes == 16 => unsafe { simd::pack_avx512(g, planes, count, padded, span.clone(), r0) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, 8 lanes on `Isa::Avx2Fma`.
        Isa::Avx2Fma if g.lanes == 8 => unsafe { simd::pack_avx2(g, planes, count, padded, span.clone(), r0) },
        _ => 0,
    };
    for q in span.start + done..span.end {
        let at = g.at(q / width - y0 + r0, q % width);
        for (c, lane) in padded[at..at + g.lanes].iter_mut().enumerate() {
            *lane = if c < count { planes[c * positions + q] } else { 0.0 };
        }
    }
}

/// Copies a band's sums `[rows][out_width][lanes]` into `outs` (the
/// band's `rows · OW` values of each of the block's planes), writing each
/// value; transposed in registers on the SIMD paths as [`pack`].
pub(super) fn unpack(isa: Isa, g: &Geometry, sums: &[f32], outs: &mut [&mut [f32]], rows: usize) {
    let width = g.out[1];
    let len = rows * width;
    assert!(
        outs.len() <= g.lanes
            && outs.iter().all(|o| o.len() == len)
            && rows <= g.band_rows
            && sums.len() >= g.output_len
    );
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `pack`; every position's sums are inside the band's.
        Isa::Avx512 if g.lanes == 16 => unsafe { simd::unpack_avx512(g, sums, outs, len) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2Fma if g.lanes == 8 => unsafe { simd::unpack_avx2(g, sums, outs, len) },
        _ => 0,
    };
    for (c, out) in outs.iter_mut().enumerate() {
        for (q, o) in out.iter_mut().enumerate().skip(done) {
            *o = sums[((q / width) * g.out_width + q % width) * g.lanes + c];
        }
    }
}
