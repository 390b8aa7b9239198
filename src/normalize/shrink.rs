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
/// every source pixel lands in exactly one output pixel; each output pixel is the mean of
/// its block. Sums are `u32`: a block holds at most 40 M pixels × 255, well within range.
pub(crate) struct Shrinker {
    height: u32,
    out_width: u32,
    out_height: u32,
    channels: usize,
    /// Output column of every source column.
    column_of: Vec<u32>,
    /// Source columns per output column.
    column_counts: Vec<u32>,
    /// Sums of the output row being gathered, `out_width * channels`.
    sums: Vec<u32>,
    rows_in_sums: u32,
    /// The output row `sums` belongs to.
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
        let column_of: Vec<u32> = (0..width)
            .map(|x| (u64::from(x) * u64::from(out_width) / u64::from(width)) as u32)
            .collect();
        let mut column_counts = vec![0u32; out_width as usize];
        for &column in &column_of {
            column_counts[column as usize] += 1;
        }
        Shrinker {
            height,
            out_width,
            out_height,
            channels,
            column_of,
            column_counts,
            sums: vec![0; out_width as usize * channels],
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
        // The channel count as a constant lets each pixel's adds compile to straight
        // code: this loop runs once per source pixel, a tenth of an image's CPU time when
        // it went through slices of unknown length.
        let (sums, column_of) = (&mut self.sums, &self.column_of);
        match self.channels {
            1 => accumulate::<1>(sums, column_of, row),
            2 => accumulate::<2>(sums, column_of, row),
            3 => accumulate::<3>(sums, column_of, row),
            4 => accumulate::<4>(sums, column_of, row),
            channels => {
                for (pixel, &column) in row.chunks_exact(channels).zip(column_of) {
                    let base = column as usize * channels;
                    for (sum, &sample) in sums[base..base + channels].iter_mut().zip(pixel) {
                        *sum += u32::from(sample);
                    }
                }
            }
        }
        self.rows_in_sums += 1;
    }

    /// Emits the gathered output row as the rounded mean of each block.
    fn flush(&mut self) {
        if self.rows_in_sums == 0 {
            return;
        }
        let channels = self.channels;
        for (column, sums) in self.sums.chunks_exact_mut(channels).enumerate() {
            let count = self.column_counts[column] * self.rows_in_sums;
            for sum in sums {
                self.pixels.push(((*sum + count / 2) / count.max(1)) as u8);
                *sum = 0;
            }
        }
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

/// Adds each pixel of `row` (`C` samples) to the sums of its output column. Pixels past
/// `column_of` (a row longer than the image) are ignored.
fn accumulate<const C: usize>(sums: &mut [u32], column_of: &[u32], row: &[u8]) {
    for (pixel, &column) in row.chunks_exact(C).zip(column_of) {
        let base = column as usize * C;
        if let (Some(sum), Ok(pixel)) = (sums.get_mut(base..base + C), <&[u8; C]>::try_from(pixel))
        {
            for (sum, &sample) in sum.iter_mut().zip(pixel) {
                *sum += u32::from(sample);
            }
        }
    }
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
