//! The image convenience route's preprocessing: PNG or JPEG bytes to a
//! normalised `[1, 3, 224, 224]` tensor as torchvision's ImageNet eval
//! transform makes it, with every size bounded before decoding.

use axum::http::StatusCode;
use candle_core::{Device, Tensor};

/// ImageNet normalisation used by torchvision's ResNet weights.
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet standard deviations.
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Largest accepted image side, in pixels, checked from the header before
/// any pixel is decoded.
pub const MAX_IMAGE_SIDE: u32 = 8192;
/// Most memory the decoder may allocate for one image (an 8192 × 8192 RGBA8
/// image takes exactly this).
pub const MAX_DECODE_BYTES: u64 = 256 << 20;
/// Largest accepted ratio of the longer to the shorter side: the resize
/// makes the shorter side 256, so the resized image has at most
/// 256 × 256·32 pixels (6 MiB), whatever the image declares.
pub const MAX_ASPECT_RATIO: u32 = 32;

/// Why an image body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageError {
    /// Not a decodable PNG or JPEG, or an empty one (HTTP 400).
    Invalid(String),
    /// Declared dimensions or decode memory over the limits (HTTP 413).
    TooLarge(String),
}

impl std::fmt::Display for ImageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageError::Invalid(m) | ImageError::TooLarge(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ImageError {}

impl ImageError {
    /// The HTTP status this refusal is answered with.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ImageError::Invalid(_) => StatusCode::BAD_REQUEST,
            ImageError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }
}

/// torchvision's ImageNet eval transform: resize the shorter side to 256
/// (bilinear), centre-crop 224, scale to [0, 1], normalise; `[1, 3, 224, 224]`.
///
/// Memory is bounded before decoding: the header's dimensions must be at
/// most [`MAX_IMAGE_SIDE`] and the decoder may allocate at most
/// [`MAX_DECODE_BYTES`]; the aspect ratio must be at most
/// [`MAX_ASPECT_RATIO`], which bounds the resized image.
pub fn preprocess(bytes: &[u8]) -> Result<Tensor, ImageError> {
    let reader = || -> Result<_, ImageError> {
        let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| ImageError::Invalid(format!("cannot read image: {e}")))?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_IMAGE_SIDE);
        limits.max_image_height = Some(MAX_IMAGE_SIDE);
        limits.max_alloc = Some(MAX_DECODE_BYTES);
        reader.limits(limits);
        Ok(reader)
    };
    // The header's dimensions first: nothing is decoded for a refused image.
    let (w, h) = reader()?.into_dimensions().map_err(image_error)?;
    check_dimensions(w, h)?;
    let image = reader()?.decode().map_err(image_error)?.to_rgb8();
    let (w, h) = image.dimensions();
    check_dimensions(w, h)?;
    let scale = 256.0 / w.min(h) as f64;
    let (rw, rh) = (
        ((w as f64 * scale).round() as u32).max(224),
        ((h as f64 * scale).round() as u32).max(224),
    );
    let resized = image::imageops::resize(&image, rw, rh, image::imageops::FilterType::Triangle);
    let (x0, y0) = ((rw - 224) / 2, (rh - 224) / 2);
    let mut data = vec![0f32; 3 * 224 * 224];
    for y in 0..224 {
        for x in 0..224 {
            let pixel = resized.get_pixel(x0 + x, y0 + y);
            for c in 0..3 {
                data[(c * 224 + y as usize) * 224 + x as usize] = (pixel[c] as f32 / 255.0 - MEAN[c]) / STD[c];
            }
        }
    }
    Tensor::from_vec(data, (1, 3, 224, 224), &Device::Cpu)
        .map_err(|e| ImageError::Invalid(wick_ir::plain_candle_message(e)))
}

/// Refuses empty images and aspect ratios over [`MAX_ASPECT_RATIO`].
fn check_dimensions(w: u32, h: u32) -> Result<(), ImageError> {
    if w == 0 || h == 0 {
        return Err(ImageError::Invalid(format!("empty image ({w} x {h})")));
    }
    if w.max(h) > MAX_ASPECT_RATIO.saturating_mul(w.min(h)) {
        return Err(ImageError::TooLarge(format!(
            "image {w} x {h} has an aspect ratio over {MAX_ASPECT_RATIO}:1"
        )));
    }
    Ok(())
}

/// Limit errors are 413, everything else the decoder reports is 400.
fn image_error(error: image::ImageError) -> ImageError {
    match error {
        image::ImageError::Limits(e) => ImageError::TooLarge(format!(
            "image over the limits ({MAX_IMAGE_SIDE} pixels a side, {MAX_DECODE_BYTES} bytes decoded): {e}"
        )),
        e => ImageError::Invalid(format!("cannot decode image: {e}")),
    }
}

/// Test support, not API: a PNG whose header declares `width` x `height`
/// over the pixel data of a 1 x 1 image (header CRC recomputed), the
/// header of a decompression bomb. Shared by the unit and loopback tests.
#[doc(hidden)]
pub fn declared_png(width: u32, height: u32) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(1, 1, image::Rgb([10, 20, 30]))
        .write_to(&mut bytes, image::ImageFormat::Png)
        .expect("a 1 x 1 PNG encodes");
    let mut bytes = bytes.into_inner();
    // Signature (8), IHDR length (4), "IHDR" (4), then width and height.
    bytes[16..20].copy_from_slice(&width.to_be_bytes());
    bytes[20..24].copy_from_slice(&height.to_be_bytes());
    let mut crc = !0u32;
    for &byte in &bytes[12..29] {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (!(crc & 1)).wrapping_add(1));
        }
    }
    bytes[29..33].copy_from_slice(&(!crc).to_be_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A uniform image becomes the normalised constant per channel, at 224x224.
    #[test]
    fn preprocess_normalises_like_torchvision() {
        let image = image::RgbImage::from_pixel(300, 500, image::Rgb([255, 0, 128]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        let x = preprocess(&bytes.into_inner()).unwrap();
        assert_eq!(x.dims(), [1, 3, 224, 224]);
        for (c, value) in [255.0f32, 0.0, 128.0].into_iter().enumerate() {
            let plane = x
                .narrow(1, c, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = (value / 255.0 - MEAN[c]) / STD[c];
            assert!(plane.iter().all(|v| (v - want).abs() < 1e-5), "channel {c}");
        }
    }

    fn png(width: u32, height: u32) -> Vec<u8> {
        let image = image::RgbImage::from_pixel(width, height, image::Rgb([10, 20, 30]));
        let mut bytes = std::io::Cursor::new(Vec::new());
        image.write_to(&mut bytes, image::ImageFormat::Png).unwrap();
        bytes.into_inner()
    }

    /// Tall and wide images past the aspect ratio, sides past the limit
    /// and a header declaring a huge area are refused as too large before
    /// decoding; garbage is invalid; the largest accepted ratio passes.
    #[test]
    fn image_bombs_are_refused() {
        let too_large = |bytes: &[u8]| matches!(preprocess(bytes), Err(ImageError::TooLarge(_)));
        assert!(too_large(&png(1, 1_000_000)), "tall");
        assert!(too_large(&png(40_000, 1)), "wide");
        assert!(too_large(&png(330, 10)), "aspect 33:1");
        assert!(preprocess(&png(320, 10)).is_ok(), "aspect 32:1 is accepted");
        assert!(too_large(&declared_png(100_000, 100_000)), "huge declared area");
        assert!(too_large(&declared_png(8_000, 8_193)), "one side over the limit");
        assert!(matches!(preprocess(b"not an image"), Err(ImageError::Invalid(_))));
        // A header within the limits but no pixel data: invalid, not a crash.
        assert!(matches!(
            preprocess(&declared_png(4_000, 4_000)),
            Err(ImageError::Invalid(_))
        ));
    }
}
