//! Example handler crate: image thumbnails.
//!
//! Request `{"image": "<base64 PNG or JPEG>", "max_side": 64}`, reply
//! `{"width": w, "height": h, "image": "<base64 PNG>"}` with the aspect ratio kept and the
//! longest side at most `max_side` (images already small enough are not enlarged).
//!
//! Decoding and resizing are CPU-bound, so they run in `spawn_blocking`: the async runtime
//! keeps serving every other handler's I/O meanwhile. Progress replies (`decoded`, `resized`)
//! go to callers that asked for a reply.

use std::io::Cursor;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use cottontail::{HandlerError, Json, Progress, Queue};
use image::{ImageFormat, ImageReader, Limits};
use serde::{Deserialize, Serialize};

/// The queue name of the contract (`docs/contracts.md`, "Demo service").
pub const QUEUE: &str = "thumbnails";

/// Largest accepted side of a thumbnail.
pub const MAX_SIDE_LIMIT: u32 = 4096;

/// A thumbnail request.
#[derive(Debug, Deserialize, Serialize)]
pub struct Request {
    /// Base64 (standard alphabet) PNG or JPEG.
    pub image: String,
    /// Longest side of the thumbnail, in pixels.
    pub max_side: u32,
}

/// A thumbnail.
#[derive(Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Thumbnail {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Base64 PNG.
    pub image: String,
}

/// The queue settings: priorities 0–9 on a classic queue (RabbitMQ 3.10 quorum queues have no
/// priorities), two resizes at a time (this is CPU work on a small machine), prefetch equal to
/// concurrency so a backlog of low-priority work cannot sit in the prefetch window ahead of
/// urgent requests.
pub fn queue() -> Queue {
    Queue::new(QUEUE).priority(9).concurrency(2)
}

/// The handler.
pub async fn handle(
    progress: Progress,
    Json(req): Json<Request>,
) -> Result<Json<Thumbnail>, HandlerError> {
    if req.max_side == 0 || req.max_side > MAX_SIDE_LIMIT {
        return Err(HandlerError::invalid_input(format!(
            "max_side must be between 1 and {MAX_SIDE_LIMIT}, got {}",
            req.max_side
        )));
    }
    let bytes = BASE64
        .decode(req.image.trim())
        .map_err(|e| HandlerError::invalid_input(format!("image is not valid base64: {e}")))?;
    let decoded = tokio::task::spawn_blocking(move || decode(&bytes)).await??;
    progress
        .send(&serde_json::json!({"stage": "decoded", "width": decoded.width(), "height": decoded.height()}))
        .await?;
    let max_side = req.max_side;
    let thumb = tokio::task::spawn_blocking(move || render(decoded, max_side)).await??;
    progress
        .send(&serde_json::json!({"stage": "resized"}))
        .await?;
    Ok(Json(thumb))
}

/// Decodes PNG or JPEG with memory limits, so a decompression bomb is rejected, not obeyed.
pub fn decode(bytes: &[u8]) -> Result<image::DynamicImage, HandlerError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| HandlerError::invalid_input(format!("cannot read image: {e}")))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => {}
        _ => {
            return Err(HandlerError::invalid_input(
                "image is not a PNG or JPEG (unrecognised signature)",
            ))
        }
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(16_384);
    limits.max_image_height = Some(16_384);
    limits.max_alloc = Some(256 * 1024 * 1024);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| HandlerError::invalid_input(format!("cannot decode image: {e}")))
}

/// Resizes (keeping the aspect ratio, never enlarging) and encodes as base64 PNG.
pub fn render(img: image::DynamicImage, max_side: u32) -> Result<Thumbnail, HandlerError> {
    let (w, h) = (img.width(), img.height());
    let small = if w.max(h) > max_side {
        img.thumbnail(max_side, max_side)
    } else {
        img
    };
    let mut png = Vec::new();
    small
        .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
        .map_err(|e| HandlerError::transient("encode", e.to_string()))?;
    Ok(Thumbnail {
        width: small.width(),
        height: small.height(),
        image: BASE64.encode(png),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut out = Vec::new();
        image::DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn keeps_aspect_ratio_and_bounds_the_longest_side() {
        let t = render(decode(&png(200, 100)).unwrap(), 64).unwrap();
        assert_eq!((t.width, t.height), (64, 32));
        let back = decode(&BASE64.decode(&t.image).unwrap()).unwrap();
        assert_eq!((back.width(), back.height()), (64, 32));
    }

    #[test]
    fn never_enlarges() {
        let t = render(decode(&png(10, 20)).unwrap(), 64).unwrap();
        assert_eq!((t.width, t.height), (10, 20));
    }

    #[test]
    fn garbage_is_invalid_input() {
        let e = decode(b"definitely not an image").unwrap_err();
        assert_eq!(e.kind(), "invalid_input");
        let mut truncated = png(50, 50);
        truncated.truncate(40);
        assert_eq!(decode(&truncated).unwrap_err().kind(), "invalid_input");
    }
}
