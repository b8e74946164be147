//! QR codes for linking and safety numbers: drawn in the terminal, written to and read from PNG files.

use std::path::Path;

use anyhow::{Context, anyhow};
use qrcode::{EcLevel, QrCode};

/// The code as Unicode half blocks, two modules per character cell, with a quiet zone.
pub fn render_terminal(text: &str) -> anyhow::Result<String> {
    let code = QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M)
        .context("the text does not fit in a QR code")?;
    Ok(code
        .render::<qrcode::render::unicode::Dense1x2>()
        .dark_color(qrcode::render::unicode::Dense1x2::Light)
        .light_color(qrcode::render::unicode::Dense1x2::Dark)
        .quiet_zone(true)
        .build())
}

/// Writes the code as a PNG (written to a temporary file first, so a reader never sees half of it).
pub fn write_png(text: &str, path: &Path) -> anyhow::Result<()> {
    let code = QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M)
        .context("the text does not fit in a QR code")?;
    let img = code
        .render::<image::Luma<u8>>()
        .module_dimensions(6, 6)
        .build();
    let tmp = path.with_extension("png.tmp");
    img.save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Largest PNG read (a QR code image is a few KB; a photo of one a few MB).
const MAX_PNG_BYTES: u64 = 32 * 1024 * 1024;

/// Reads the text of the first QR code found in a PNG.
pub fn read_png(path: &Path) -> anyhow::Result<String> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if size > MAX_PNG_BYTES {
        return Err(anyhow!(
            "{} is {size} bytes; a QR code image is far smaller",
            path.display()
        ));
    }
    let img = image::open(path)
        .with_context(|| format!("{} is not a readable PNG", path.display()))?
        .into_luma8();
    let mut prepared = rqrr::PreparedImage::prepare(img);
    let grids = prepared.detect_grids();
    let grid = grids
        .first()
        .ok_or_else(|| anyhow!("no QR code found in {}", path.display()))?;
    let (_, text) = grid
        .decode()
        .map_err(|e| anyhow!("the QR code in {} could not be read: {e}", path.display()))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qr.png");
        let text = format!("natter-link:{}", "A".repeat(180));
        write_png(&text, &path).unwrap();
        assert_eq!(read_png(&path).unwrap(), text);
        assert!(render_terminal(&text).unwrap().lines().count() > 10);
    }

    #[test]
    fn unreadable_images_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        std::fs::write(&path, b"not a png").unwrap();
        assert!(read_png(&path).is_err());
        assert!(read_png(&dir.path().join("missing.png")).is_err());
    }
}
