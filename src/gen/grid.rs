//! Comparison grids as SuperMerger draws them (supermerger.md §5): cells row-major (X
//! fastest), X values over the columns, Y values beside the rows, the merge formula as a
//! header. Text uses the public-domain 8x8 bitmap font of the `font8x8` crate at twice its
//! size, so no font file is needed; characters it lacks are drawn as `?`. Labels wrap to their
//! column (or the row-label margin), breaking after commas and spaces where they can.

use image::{Rgb, RgbImage};

use crate::error::{Error, Result};

/// Pixel size of a glyph (the 8x8 font at scale 2); half that for cells under
/// [`SMALL_CELL`] pixels wide.
const GLYPH: u32 = 16;
/// Cells narrower than this get 8-pixel text.
const SMALL_CELL: u32 = 192;
/// Space around text blocks.
const PAD: u32 = 8;
/// Widest row-label margin, in characters.
const MAX_ROW_LABEL: usize = 24;

/// What a grid shows.
#[derive(Debug, Clone)]
pub struct GridSpec<'a> {
    /// The header line(s).
    pub header: &'a str,
    /// Column labels.
    pub x_labels: &'a [String],
    /// Row labels (`[""]` for a single unlabelled row).
    pub y_labels: &'a [String],
    /// Cell images (8-bit RGB), row-major; `None` draws a grey "failed" cell.
    pub cells: &'a [Option<RgbImage>],
}

/// The glyph bitmap of a character (8 rows, bit 0 leftmost).
fn glyph(c: char) -> [u8; 8] {
    let code = c as usize;
    match code {
        0x20..=0x7e => font8x8::legacy::BASIC_LEGACY[code],
        0xa0..=0xff => font8x8::legacy::LATIN_LEGACY[code - 0xa0],
        _ => font8x8::legacy::BASIC_LEGACY[b'?' as usize],
    }
}

/// Draws `text` (one line) in `glyph`-pixel characters with its top-left corner at (x, y),
/// clipped to the image.
fn draw_text(img: &mut RgbImage, x: u32, y: u32, glyph_px: u32, text: &str) {
    let scale = glyph_px / 8;
    for (i, c) in text.chars().enumerate() {
        let rows = glyph(c);
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..8u32 {
                if bits >> col & 1 == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let px = x + i as u32 * glyph_px + col * scale + dx;
                        let py = y + r as u32 * scale + dy;
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, Rgb([0, 0, 0]));
                        }
                    }
                }
            }
        }
    }
}

/// Wraps `text` into lines of at most `width` characters, breaking after a comma or space
/// where one falls in the line, else hard; explicit newlines are kept.
pub fn wrap(text: &str, width: usize) -> Vec<String> {
    let width = width.max(1);
    let mut lines = Vec::new();
    for para in text.lines() {
        let mut rest: Vec<char> = para.chars().collect();
        while rest.len() > width {
            let cut = rest[..=width]
                .iter()
                .rposition(|c| *c == ',' || *c == ' ')
                .filter(|&i| i > 0)
                .map(|i| i + 1)
                .unwrap_or(width)
                .min(width);
            lines.push(
                rest[..cut]
                    .iter()
                    .collect::<String>()
                    .trim_end()
                    .to_string(),
            );
            rest = rest[cut..].to_vec();
            while rest.first() == Some(&' ') {
                rest.remove(0);
            }
        }
        lines.push(rest.into_iter().collect());
    }
    if lines.is_empty() {
        lines.push(String::new());
    }
    lines
}

/// Draws the grid.
pub fn compose(spec: &GridSpec) -> Result<RgbImage> {
    let (cols, rows) = (spec.x_labels.len(), spec.y_labels.len());
    if cols == 0 || rows == 0 || spec.cells.len() != cols * rows {
        return Err(Error::Invalid(format!(
            "a {cols}x{rows} grid needs {} cells, not {}",
            cols * rows,
            spec.cells.len()
        )));
    }
    let (cw, ch) = spec
        .cells
        .iter()
        .flatten()
        .fold((0, 0), |(w, h), c| (w.max(c.width()), h.max(c.height())));
    // Without any image (every cell failed), draw 64-pixel cells.
    let (cw, ch) = match (cw, ch) {
        (0, _) | (_, 0) => (64, 64),
        size => size,
    };
    let g = match cw < SMALL_CELL {
        true => GLYPH / 2,
        false => GLYPH,
    };
    let line_h = g + g / 4;
    let chars = |px: u32| ((px.saturating_sub(2 * PAD)) / g).max(1) as usize;
    let row_label_chars = spec
        .y_labels
        .iter()
        .flat_map(|l| l.lines().map(|s| s.chars().count()))
        .max()
        .unwrap_or(0)
        .min(MAX_ROW_LABEL);
    let margin = match row_label_chars {
        0 => 0,
        n => n as u32 * g + 2 * PAD,
    };
    let width = margin + cols as u32 * cw;
    let header = wrap(spec.header, chars(width));
    let x_lines: Vec<Vec<String>> = spec.x_labels.iter().map(|l| wrap(l, chars(cw))).collect();
    let y_lines: Vec<Vec<String>> = spec
        .y_labels
        .iter()
        .map(|l| wrap(l, row_label_chars.max(1)))
        .collect();
    let header_h = header.len() as u32 * line_h + 2 * PAD;
    let label_h = x_lines.iter().map(Vec::len).max().unwrap_or(1) as u32 * line_h + 2 * PAD;
    let top = header_h + label_h;
    let height = top + rows as u32 * ch;
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (i, line) in header.iter().enumerate() {
        draw_text(&mut img, PAD, PAD + i as u32 * line_h, g, line);
    }
    for (c, lines) in x_lines.iter().enumerate() {
        for (i, line) in lines.iter().enumerate() {
            let x = margin + c as u32 * cw + PAD;
            draw_text(&mut img, x, header_h + PAD + i as u32 * line_h, g, line);
        }
    }
    for (r, lines) in y_lines.iter().enumerate() {
        let block = lines.len() as u32 * line_h;
        let y0 = top + r as u32 * ch + ch.saturating_sub(block) / 2;
        for (i, line) in lines.iter().enumerate() {
            draw_text(&mut img, PAD, y0 + i as u32 * line_h, g, line);
        }
    }
    for (i, cell) in spec.cells.iter().enumerate() {
        let (x, y) = (
            margin + (i % cols) as u32 * cw,
            top + (i / cols) as u32 * ch,
        );
        match cell {
            Some(c) => image::imageops::replace(&mut img, c, x as i64, y as i64),
            None => {
                let grey = RgbImage::from_pixel(cw, ch, Rgb([200, 200, 200]));
                image::imageops::replace(&mut img, &grey, x as i64, y as i64);
                draw_text(&mut img, x + PAD, y + PAD, g, "failed");
            }
        }
    }
    Ok(img)
}

/// SuperMerger's effective-elemental check of `img` against `base` (its `effectivechecker`):
/// the inverted absolute difference per channel (`255 − |a − b|`: white where nothing
/// changed) and the share, in percent, of channel values that differ by more than 20 (over
/// width · height · 3).
pub fn difference(base: &RgbImage, img: &RgbImage) -> (RgbImage, f64) {
    let (w, h) = (
        img.width().min(base.width()),
        img.height().min(base.height()),
    );
    let mut out = RgbImage::new(w, h);
    let mut changed = 0usize;
    for y in 0..h {
        for x in 0..w {
            let (p, q) = (base.get_pixel(x, y), img.get_pixel(x, y));
            let d: [u8; 3] = std::array::from_fn(|c| p.0[c].abs_diff(q.0[c]));
            changed += d.iter().filter(|v| **v > 20).count();
            out.put_pixel(x, y, Rgb(d.map(|v| 255 - v)));
        }
    }
    let share = 100.0 * changed as f64 / (w as f64 * h as f64 * 3.0).max(1.0);
    (out, share)
}

/// Reads an RGB PNG.
pub fn read_png(path: &std::path::Path) -> Result<RgbImage> {
    let img = image::open(path)
        .map_err(|e| Error::Invalid(format!("{}: cannot read the image: {e}", path.display())))?;
    Ok(img.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn difference_counts_pixels_beyond_the_threshold() {
        let base = RgbImage::from_pixel(4, 2, Rgb([100, 100, 100]));
        let mut img = base.clone();
        img.put_pixel(0, 0, Rgb([121, 100, 100])); // 21 > 20: changed
        img.put_pixel(1, 0, Rgb([100, 80, 100])); // 20: not changed
        img.put_pixel(3, 1, Rgb([0, 0, 0]));
        let (d, share) = difference(&base, &img);
        // Channel values over 20: one at (0, 0), three at (3, 1): 4 of 4·2·3 = 24.
        assert_eq!(share, 100.0 * 4.0 / 24.0);
        assert_eq!(d.get_pixel(0, 0), &Rgb([234, 255, 255]));
        assert_eq!(d.get_pixel(1, 0), &Rgb([255, 235, 255]));
        assert_eq!(d.get_pixel(3, 1), &Rgb([155, 155, 155]));
        assert_eq!(d.get_pixel(2, 0), &Rgb([255, 255, 255]));
    }

    #[test]
    fn wrap_breaks_after_commas_and_spaces() {
        assert_eq!(wrap("alpha = 0.25", 20), ["alpha = 0.25"]);
        assert_eq!(wrap("0.1,0.2,0.3,0.4", 8), ["0.1,0.2,", "0.3,0.4"]);
        assert_eq!(wrap("abcdefghij", 4), ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("one two\nthree", 20), ["one two", "three"]);
    }

    #[test]
    fn grid_geometry_and_text() {
        let cell = |v: u8| Some(RgbImage::from_pixel(64, 48, Rgb([v, v, v])));
        let x = vec!["alpha = 0.2".to_string(), "0.4".into(), "0.6".into()];
        let y = vec!["seed = 1".to_string(), "2".into()];
        let cells = vec![cell(10), cell(20), cell(30), cell(40), cell(50), None];
        let img = compose(&GridSpec {
            header: "weight_sum A=a B=b alpha=X, seed=Y",
            x_labels: &x,
            y_labels: &y,
            cells: &cells,
        })
        .unwrap();
        // 64 px cells: 8 px text, 10 px lines. Margin: "seed = 1" is 8 characters.
        let (g, line) = (8, 10);
        let margin = 8 * g + 2 * PAD;
        assert_eq!(img.width(), margin + 3 * 64);
        // The header wraps to the width, column labels to 6 characters.
        let lines = |t: &str, px: u32| wrap(t, ((px - 2 * PAD) / g) as usize).len() as u32;
        let header = lines("weight_sum A=a B=b alpha=X, seed=Y", img.width());
        assert_eq!(wrap("alpha = 0.2", 6), ["alpha", "= 0.2"]);
        let top = header * line + 2 * PAD + 2 * line + 2 * PAD;
        assert_eq!(img.height(), top + 2 * 48);
        // Cell (1, 1) holds the fifth image, cell (2, 1) the grey "failed" box.
        assert_eq!(
            img.get_pixel(margin + 64 + 30, top + 48 + 40),
            &Rgb([50, 50, 50])
        );
        assert_eq!(
            img.get_pixel(margin + 128 + 60, top + 48 + 40),
            &Rgb([200, 200, 200])
        );
        // Some text is drawn in the header and in the row-label margin.
        let dark = |x0: u32, y0: u32, w: u32, h: u32| {
            (x0..x0 + w).any(|x| (y0..y0 + h).any(|y| img.get_pixel(x, y) == &Rgb([0, 0, 0])))
        };
        assert!(dark(PAD, PAD, 100, line));
        assert!(dark(PAD, top, margin - PAD, 48));
        assert!(!dark(margin, top, 64, 48));
    }
}
