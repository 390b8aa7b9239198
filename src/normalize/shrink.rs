//! Shrinking an image while it is decoded: the thumbnail's pixels come from the rows the
//! checks read anyway, so no image is decoded twice.
//!
//! The shrink is an area average (every source pixel counts once, so fine detail turns to
//! its average colour rather than to aliasing), gathered row by row: memory is one output
//! row of sums and the small image itself, never a full frame.

use crate::error::{Result, Stage3Error};

/// An image shrunk to thumbnail size: 8-bit samples, `channels` of them a pixel (1 grey,
/// 2 grey and alpha, 3 RGB, 4 RGBA), rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shrunk {
    pub width: u32,
    pub height: u32,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

/// The size of the thumbnail of a `width` × `height` image: the longest side at most
/// `max_side`, the aspect kept, never enlarged, never zero.
pub(crate) fn thumbnail_size(width: u32, height: u32, max_side: u32) -> (u32, u32) {
    let max_side = max_side.max(1);
    let longest = width.max(height);
    if longest <= max_side {
        return (width.max(1), height.max(1));
    }
    let scale = |side: u32| {
        let scaled =
            (u64::from(side) * u64::from(max_side) + u64::from(longest) / 2) / u64::from(longest);
        u32::try_from(scaled).unwrap_or(max_side).clamp(1, max_side)
    };
    (scale(width), scale(height))
}

/// Area-averages rows arriving top to bottom into an `out_width` × `out_height` image.
///
/// Source column `x` falls in output column `x * out_width / width` (and rows likewise), so
/// every source pixel lands in exactly one output pixel; each output pixel is the rounded
/// mean of its block. The rows of a block are first summed sample by sample at full width
/// (a straight loop the compiler vectorises), and the columns only once per output row:
/// per source pixel, the work is one vector add instead of a lookup and `channels` scalar
/// adds. Sums are `u32`: a block holds at most 125,000 pixels (40 M pixels, the longest
/// side cut to 320) × 255, well within range.
pub(crate) struct Shrinker {
    height: u32,
    out_width: u32,
    out_height: u32,
    channels: usize,
    /// Source columns per output column; the columns of one output column are adjacent.
    column_counts: Vec<u32>,
    /// Per source sample (`width * channels`), the sum of the block's rows so far.
    row_sums: Vec<u32>,
    rows_in_sums: u32,
    /// The output row `row_sums` belongs to.
    current_out_row: u32,
    next_source_row: u32,
    pixels: Vec<u8>,
}

impl Shrinker {
    pub(crate) fn new(
        width: u32,
        height: u32,
        out_width: u32,
        out_height: u32,
        channels: usize,
    ) -> Self {
        let mut column_counts = vec![0u32; out_width as usize];
        for x in 0..width {
            let column = u64::from(x) * u64::from(out_width) / u64::from(width);
            column_counts[column as usize] += 1;
        }
        Shrinker {
            height,
            out_width,
            out_height,
            channels,
            column_counts,
            row_sums: vec![0; width as usize * channels],
            rows_in_sums: 0,
            current_out_row: 0,
            next_source_row: 0,
            pixels: Vec::with_capacity(out_width as usize * out_height as usize * channels),
        }
    }

    pub(crate) fn add_row(&mut self, row: &[u8]) {
        if self.next_source_row >= self.height {
            return;
        }
        let out_row = (u64::from(self.next_source_row) * u64::from(self.out_height)
            / u64::from(self.height)) as u32;
        self.next_source_row += 1;
        if out_row != self.current_out_row {
            self.flush();
            self.current_out_row = out_row;
        }
        // Whole pixels only, and none past the image's width (a row may be longer).
        let samples = (row.len() / self.channels.max(1) * self.channels).min(self.row_sums.len());
        for (sum, &sample) in self.row_sums[..samples].iter_mut().zip(&row[..samples]) {
            *sum += u32::from(sample);
        }
        self.rows_in_sums += 1;
    }

    /// Emits the gathered output row as the rounded mean of each block.
    fn flush(&mut self) {
        if self.rows_in_sums == 0 {
            return;
        }
        let (row_sums, counts, rows) = (&self.row_sums, &self.column_counts, self.rows_in_sums);
        let pixels = &mut self.pixels;
        // The channel count as a constant turns each block's adds into straight code.
        match self.channels {
            1 => emit_row::<1>(row_sums, counts, rows, pixels),
            2 => emit_row::<2>(row_sums, counts, rows, pixels),
            3 => emit_row::<3>(row_sums, counts, rows, pixels),
            4 => emit_row::<4>(row_sums, counts, rows, pixels),
            channels => {
                let mut blocks = row_sums.chunks(channels);
                for &columns in counts {
                    let mut sums = vec![0u32; channels];
                    for pixel in blocks.by_ref().take(columns as usize) {
                        for (sum, &sample) in sums.iter_mut().zip(pixel) {
                            *sum += sample;
                        }
                    }
                    let count = columns * rows;
                    pixels.extend(sums.iter().map(|sum| mean(*sum, count)));
                }
            }
        }
        self.row_sums.fill(0);
        self.rows_in_sums = 0;
    }

    pub(crate) fn finish(mut self) -> Result<Vec<u8>> {
        self.flush();
        let expected = self.out_width as usize * self.out_height as usize * self.channels;
        if self.next_source_row != self.height || self.pixels.len() != expected {
            return Err(Stage3Error::InvalidImage(format!(
                "thumbnail: the image ended after {} of {} rows",
                self.next_source_row, self.height
            )));
        }
        Ok(self.pixels)
    }
}

/// One output row: each output column's adjacent source columns (`C` samples a pixel)
/// summed, and the rounded mean of the block pushed to `pixels`.
fn emit_row<const C: usize>(row_sums: &[u32], counts: &[u32], rows: u32, pixels: &mut Vec<u8>) {
    let mut source = row_sums.chunks_exact(C);
    for &columns in counts {
        let mut sums = [0u32; C];
        for pixel in source.by_ref().take(columns as usize) {
            for (sum, &sample) in sums.iter_mut().zip(pixel) {
                *sum += sample;
            }
        }
        let count = columns * rows;
        pixels.extend(sums.map(|sum| mean(sum, count)));
    }
}

/// The rounded mean of `count` samples summing to `sum`.
fn mean(sum: u32, count: u32) -> u8 {
    ((sum + count / 2) / count.max(1)) as u8
}

impl Shrinker {
    /// A shrinker to at most `max_side` on the longest side, for rows of `channels`
    /// samples.
    pub(crate) fn to_fit(width: u32, height: u32, max_side: u32, channels: usize) -> Self {
        let (out_width, out_height) = thumbnail_size(width, height, max_side);
        Shrinker::new(width, height, out_width, out_height, channels)
    }

    /// The shrunk image, once every source row has been added.
    pub(crate) fn into_shrunk(self) -> Result<Shrunk> {
        let (width, height, channels) = (self.out_width, self.out_height, self.channels);
        Ok(Shrunk {
            width,
            height,
            channels,
            pixels: self.finish()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The area average written the plain way: every output pixel the rounded mean of the
    /// source pixels whose scaled position falls in it.
    fn reference(
        source: &[u8],
        (width, height): (u32, u32),
        (out_width, out_height): (u32, u32),
        channels: usize,
    ) -> Vec<u8> {
        let block =
            |x: u32, size: u32, out: u32| (u64::from(x) * u64::from(out) / u64::from(size)) as u32;
        let mut pixels = Vec::new();
        for oy in 0..out_height {
            for ox in 0..out_width {
                for c in 0..channels {
                    let (mut sum, mut count) = (0u32, 0u32);
                    for y in (0..height).filter(|&y| block(y, height, out_height) == oy) {
                        for x in (0..width).filter(|&x| block(x, width, out_width) == ox) {
                            sum += u32::from(source[(y * width + x) as usize * channels + c]);
                            count += 1;
                        }
                    }
                    pixels.push(mean(sum, count));
                }
            }
        }
        pixels
    }

    #[test]
    fn the_shrink_is_the_exact_area_average_at_any_size_and_channel_count() {
        let mut state = 0x9e37_79b9_u32;
        let mut noise = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        };
        for channels in 1..=5 {
            for (width, height, out_width, out_height) in [
                (37, 23, 7, 5),
                (64, 64, 20, 20),
                (5, 41, 1, 9),
                (9, 9, 9, 9),
                (100, 3, 32, 1),
            ] {
                let source: Vec<u8> = (0..width * height * channels as u32)
                    .map(|_| noise())
                    .collect();
                let mut shrinker = Shrinker::new(width, height, out_width, out_height, channels);
                for row in source.chunks_exact(width as usize * channels) {
                    shrinker.add_row(row);
                }
                assert_eq!(
                    shrinker.finish().unwrap(),
                    reference(&source, (width, height), (out_width, out_height), channels),
                    "{width}x{height} -> {out_width}x{out_height}, {channels} channels"
                );
            }
        }
    }

    #[test]
    fn an_image_that_ends_early_is_refused() {
        let mut shrinker = Shrinker::new(4, 4, 2, 2, 3);
        shrinker.add_row(&[0; 12]);
        assert!(shrinker.finish().is_err());
    }
}
