//! The shared output's checks, the gathers against plain loops on every
//! path, and refused allocations.

use super::SharedOut;

/// Slices inside the buffer are handed out; one reaching past its end,
/// or whose end overflows, panics before any write.
#[test]
fn shared_out_checks_every_slice() {
    let mut buffer = vec![0f32; 8];
    let out = SharedOut::new(&mut buffer, 8);
    // SAFETY: one slice at a time, within the buffer, which outlives it.
    unsafe { out.slice(6, 2) }.fill(1.0);
    out.check(0, 8);
    assert_eq!(buffer[6..], [1.0, 1.0]);
    let out = SharedOut::new(&mut buffer, 8);
    for (start, len) in [(7, 2), (9, 0), (usize::MAX, 2)] {
        // SAFETY: as above; these requests must panic before a slice exists.
        let caught = std::panic::catch_unwind(|| unsafe { out.slice(start, len) }.len());
        assert!(caught.is_err(), "{start}+{len}");
    }
    assert!(std::panic::catch_unwind(|| out.check(4, 9)).is_err());
}

/// A buffer cannot claim more elements than its allocation holds.
#[test]
#[should_panic(expected = "in a buffer of")]
fn shared_out_needs_the_capacity() {
    let mut buffer = Vec::<f32>::with_capacity(4);
    let too_many = buffer.capacity() + 1;
    let _ = SharedOut::new(&mut buffer, too_many);
}

/// Every path's gather equals the plain one, for every length from
/// none to past two vectors, at every stride, with `src` holding just
/// the values read (the masked loads must not reach past it), and
/// leaves the values past `out` alone.
#[test]
fn gather_on_every_path_matches_plain() {
    use crate::cpu::gemm::Isa;
    for isa in Isa::available() {
        for stride in 0..4 {
            for n in 0..40usize {
                let len = n.saturating_sub(1) * stride + usize::from(n > 0);
                let src: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 3.0).collect();
                let mut want = vec![f32::NAN; n + 3];
                let mut got = want.clone();
                super::gather_strided(&src, stride, &mut want[..n]);
                super::gather_strided_on(isa, &src, stride, &mut got[..n]);
                assert_eq!(want[..n], got[..n], "{isa:?} stride {stride}, {n} values");
                assert!(got[n..].iter().all(|x| x.is_nan()), "{isa:?} wrote past {n} values");
            }
        }
    }
}

/// The three taps of a 3-wide stride-2 kernel row equal the values the
/// padded line holds at `start + 2i + k` (zero outside it), on every
/// path, for lines of 0 to 70 values, starts before, inside and past
/// the line and 0 to 40 outputs: the line sits between NaNs (a read
/// outside it would show), the values past the outputs stay untouched.
#[test]
fn stride2_taps_match_the_padded_line() {
    use crate::cpu::gemm::Isa;
    for isa in Isa::available() {
        for len in [0usize, 1, 2, 5, 16, 17, 31, 32, 33, 56, 70] {
            let mut buf = vec![f32::NAN; len + 80];
            for (i, x) in buf[40..40 + len].iter_mut().enumerate() {
                *x = i as f32 * 0.25 - 2.0;
            }
            let line = &buf[40..40 + len];
            for start in -3..len as isize + 3 {
                for n in 0..40usize {
                    let mut got = [vec![f32::NAN; n + 2], vec![f32::NAN; n + 2], vec![f32::NAN; n + 2]];
                    let [a, b, c] = &mut got;
                    super::gather_stride2_taps3(isa, line, start, [&mut a[..n], &mut b[..n], &mut c[..n]]);
                    for (k, got) in got.iter().enumerate() {
                        for (i, &value) in got[..n].iter().enumerate() {
                            let at = start + 2 * i as isize + k as isize;
                            let want = if at >= 0 && (at as usize) < len {
                                line[at as usize]
                            } else {
                                0.0
                            };
                            assert_eq!(
                                value.to_bits(),
                                want.to_bits(),
                                "{isa:?} len {len} start {start} tap {k} i {i}"
                            );
                        }
                        assert!(got[n..].iter().all(|x| x.is_nan()), "{isa:?} wrote past {n} values");
                    }
                }
            }
        }
    }
}

/// A buffer too large to allocate is an error naming it, not an abort.
#[test]
fn refused_allocations_are_errors() {
    let err = super::zeroed(usize::MAX / 2, "test output").unwrap_err();
    assert!(err.to_string().contains("test output"), "{err}");
    assert_eq!(super::zeroed(3, "x").unwrap(), [0.0; 3]);
}
