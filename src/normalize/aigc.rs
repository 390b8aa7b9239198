//! The AIGC implicit label (GB 45438-2025), written into the PNG without touching its pixels.
//!
//! GB 45438-2025, mandatory since 2025-09-01, asks that AI-generated images carry an implicit
//! label in their file metadata (docs/design.md §3). docs/design.md §2 fixes its form here:
//! one `iTXt` chunk with keyword `AIGC` whose text is the JSON object
//! `{"Label":"1","ContentProducer","ProduceID","ReservedCode1","ContentPropagator",
//! "PropagateID","ReservedCode2"}`, fields in that order.
//!
//! The label is a chunk, so adding it is a copy of the file with one chunk spliced in right
//! after `IHDR` (an `iTXt` may sit anywhere between `IHDR` and `IEND`; first is where a
//! reader that stops early still finds it). The image data is not re-encoded: the pixels
//! are exactly the ones that were checked, and the cost is a memory copy.
//!
//! The chunk allowlist ([`super::chunks`]) drops every text chunk a provider sends, a fake
//! `AIGC` label included; the label is added after that pass, so it is ours. Adding it to a
//! PNG that already has one replaces it: there is exactly one `AIGC` chunk in the output.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::chunks::{chunks, write_chunk, Chunk, Chunks, PNG_SIGNATURE};
use super::invalid;
use crate::error::Result;

/// The `iTXt` keyword of the label.
pub const AIGC_KEYWORD: &[u8] = b"AIGC";

/// The label's fields, serialised in the order the standard lists them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AigcLabel {
    /// `"1"`: the content is AI-generated.
    #[serde(rename = "Label")]
    pub label: String,
    /// Who generated the content (`STAGE3_AIGC_PRODUCER`).
    #[serde(rename = "ContentProducer", default)]
    pub content_producer: String,
    /// The producer's id for this piece of content.
    #[serde(rename = "ProduceID", default)]
    pub produce_id: String,
    #[serde(rename = "ReservedCode1", default)]
    pub reserved_code1: String,
    /// Who publishes it (`STAGE3_AIGC_PROPAGATOR`).
    #[serde(rename = "ContentPropagator", default)]
    pub content_propagator: String,
    /// The propagator's id for it.
    #[serde(rename = "PropagateID", default)]
    pub propagate_id: String,
    #[serde(rename = "ReservedCode2", default)]
    pub reserved_code2: String,
}

impl AigcLabel {
    /// A label saying "AI-generated" (`Label` `"1"`), reserved codes empty.
    pub fn new(
        producer: impl Into<String>,
        produce_id: impl Into<String>,
        propagator: impl Into<String>,
        propagate_id: impl Into<String>,
    ) -> Self {
        AigcLabel {
            label: "1".into(),
            content_producer: producer.into(),
            produce_id: produce_id.into(),
            reserved_code1: String::new(),
            content_propagator: propagator.into(),
            propagate_id: propagate_id.into(),
            reserved_code2: String::new(),
        }
    }

    /// The label as the JSON text of the chunk.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The data of the `iTXt` chunk: keyword, NUL, compression flag 0, method 0, empty
    /// language tag, NUL, empty translated keyword, NUL, then the UTF-8 JSON.
    fn itxt_data(&self) -> Vec<u8> {
        let json = self.to_json();
        let mut data = Vec::with_capacity(AIGC_KEYWORD.len() + 5 + json.len());
        data.extend_from_slice(AIGC_KEYWORD);
        data.extend_from_slice(&[0, 0, 0, 0, 0]);
        data.extend_from_slice(json.as_bytes());
        data
    }
}

/// `png` with `label` as its one `AIGC` chunk, right after `IHDR`; any earlier `AIGC` label
/// is dropped, everything else is copied unchanged. Bytes after `IEND` are not copied.
pub fn insert_aigc_label(png: &[u8], label: &AigcLabel) -> Result<Bytes> {
    let itxt = label.itxt_data();
    let mut out = Vec::with_capacity(png.len() + itxt.len() + 12);
    out.extend_from_slice(PNG_SIGNATURE);
    for (i, chunk) in png_chunks(png)?.enumerate() {
        let chunk = chunk?;
        if is_aigc_label(&chunk) {
            continue;
        }
        out.extend_from_slice(chunk.raw(png));
        if i == 0 {
            write_chunk(&mut out, b"iTXt", &itxt)?;
        }
    }
    Ok(Bytes::from(out))
}

/// `png` without any `AIGC` label (for `STAGE3_AIGC_LABEL=off`, or to compare pixels).
pub fn strip_aigc_label(png: &[u8]) -> Result<Bytes> {
    let mut out = Vec::with_capacity(png.len());
    out.extend_from_slice(PNG_SIGNATURE);
    for chunk in png_chunks(png)? {
        let chunk = chunk?;
        if !is_aigc_label(&chunk) {
            out.extend_from_slice(chunk.raw(png));
        }
    }
    Ok(Bytes::from(out))
}

/// The label the PNG carries: the first uncompressed `iTXt` chunk with keyword `AIGC` whose
/// text is a JSON object of the standard's fields. `None` if there is none or it is not valid.
pub fn read_aigc_label(png: &[u8]) -> Option<AigcLabel> {
    png_chunks(png)
        .ok()?
        .map_while(Result::ok)
        .filter(|c| &c.kind == b"iTXt")
        .find_map(|c| serde_json::from_slice(itxt_text(c.data, AIGC_KEYWORD)?).ok())
}

/// How many `AIGC` label chunks (of any text kind) the PNG carries.
pub fn count_aigc_labels(png: &[u8]) -> usize {
    png_chunks(png).map_or(0, |list| {
        list.map_while(Result::ok)
            .filter(|c| is_aigc_label(c))
            .count()
    })
}

fn png_chunks(png: &[u8]) -> Result<Chunks<'_>> {
    if !png.starts_with(PNG_SIGNATURE) {
        return Err(invalid("cannot label the image: it is not a PNG"));
    }
    Ok(chunks(png))
}

/// A text chunk (`tEXt`, `zTXt` or `iTXt`) whose keyword is `AIGC`.
fn is_aigc_label(chunk: &Chunk<'_>) -> bool {
    matches!(&chunk.kind, b"tEXt" | b"zTXt" | b"iTXt")
        && chunk.data.len() > AIGC_KEYWORD.len()
        && chunk.data.starts_with(AIGC_KEYWORD)
        && chunk.data[AIGC_KEYWORD.len()] == 0
}

/// The text of an uncompressed `iTXt` chunk with `keyword`.
fn itxt_text<'a>(data: &'a [u8], keyword: &[u8]) -> Option<&'a [u8]> {
    let rest = data.strip_prefix(keyword)?.strip_prefix(&[0])?;
    // Compression flag 0 (uncompressed), method 0.
    let rest = rest.strip_prefix(&[0, 0])?;
    let language_end = rest.iter().position(|&b| b == 0)?;
    let rest = &rest[language_end + 1..];
    let translated_end = rest.iter().position(|&b| b == 0)?;
    Some(&rest[translated_end + 1..])
}

#[cfg(test)]
mod tests {
    use super::super::test_png::*;
    use super::*;

    fn label() -> AigcLabel {
        AigcLabel::new(
            "stage3",
            "3f2a9c0e1b7d4e5f",
            "Example Stories 示例",
            "scene-0001",
        )
    }

    fn decode(png: &[u8]) -> image::RgbImage {
        image::load_from_memory_with_format(png, image::ImageFormat::Png)
            .expect("decodes with `image`")
            .to_rgb8()
    }

    #[test]
    fn the_json_lists_the_fields_in_the_standards_order() {
        assert_eq!(
            label().to_json(),
            r#"{"Label":"1","ContentProducer":"stage3","ProduceID":"3f2a9c0e1b7d4e5f","ReservedCode1":"","ContentPropagator":"Example Stories 示例","PropagateID":"scene-0001","ReservedCode2":""}"#
        );
    }

    #[test]
    fn the_label_goes_in_after_ihdr_and_the_pixels_stay_the_same() {
        let png = noisy_png(300, 200);
        let labelled = insert_aigc_label(&png, &label()).unwrap();

        let kinds: Vec<[u8; 4]> = parts(&labelled).iter().map(|(k, _)| *k).collect();
        assert_eq!(&kinds[..2], [*b"IHDR", *b"iTXt"]);
        assert_eq!(count_aigc_labels(&labelled), 1);
        assert_eq!(read_aigc_label(&labelled), Some(label()));
        assert_eq!(labelled.len(), png.len() + 12 + label().itxt_data().len());
        // Every other chunk is copied byte for byte, so the image data is untouched.
        assert_eq!(strip_aigc_label(&labelled).unwrap(), png);
        assert_eq!(decode(&labelled), decode(&png));

        // The `png` crate checks the new chunk's CRC and reads it as international text.
        let mut options = png::DecodeOptions::default();
        options.set_skip_ancillary_crc_failures(false);
        let mut reader = png::Decoder::new_with_options(std::io::Cursor::new(&labelled), options)
            .read_info()
            .unwrap();
        let text = reader.info().utf8_text[0].get_text().unwrap();
        assert_eq!(reader.info().utf8_text[0].keyword, "AIGC");
        let fields: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(fields["Label"], "1");
        assert_eq!(fields["ContentPropagator"], "Example Stories 示例");
        let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
        reader.next_frame(&mut buffer).unwrap();
        reader.finish().unwrap();
    }

    #[test]
    fn labelling_twice_leaves_one_label_the_newest() {
        let png = noisy_png(64, 64);
        let first = insert_aigc_label(&png, &label()).unwrap();
        let mut newer = label();
        newer.produce_id = "another".into();
        let second = insert_aigc_label(&first, &newer).unwrap();
        assert_eq!(count_aigc_labels(&second), 1);
        assert_eq!(read_aigc_label(&second), Some(newer));
    }

    #[test]
    fn any_earlier_aigc_text_chunk_is_replaced_and_other_text_kept() {
        let png = noisy_png(64, 64);
        let mut chunks = parts(&png);
        let end = chunks.len() - 1;
        chunks.insert(end, (*b"tEXt", b"AIGC\0{\"Label\":\"0\"}".to_vec()));
        chunks.insert(1, (*b"iTXt", b"AIGC\0\0\0\0\0{\"Label\":\"0\"}".to_vec()));
        chunks.insert(1, (*b"tEXt", b"Comment\0kept".to_vec()));
        let labelled = insert_aigc_label(&assemble(&chunks), &label()).unwrap();
        assert_eq!(count_aigc_labels(&labelled), 1);
        assert_eq!(read_aigc_label(&labelled), Some(label()));
        assert!(labelled.windows(12).any(|w| w == b"Comment\0kept"));
    }

    #[test]
    fn a_png_without_a_label_reads_as_none_and_garbage_is_refused() {
        assert_eq!(read_aigc_label(&noisy_png(64, 64)), None);
        assert!(insert_aigc_label(b"GIF89a", &label()).is_err());
        assert!(strip_aigc_label(b"").is_err());
        let png = noisy_png(64, 64);
        assert!(insert_aigc_label(&png[..png.len() - 5], &label()).is_err());
    }

    /// The labelled PNG opens in Pillow, and Pillow reads the label's text and pixels.
    #[test]
    fn pillow_opens_the_labelled_png_and_reads_the_label() {
        let png = noisy_png(300, 200);
        let labelled = insert_aigc_label(&png, &label()).unwrap();
        let script = r#"
import json, sys
from PIL import Image
with Image.open(sys.argv[1]) as im:
    im.load()
    label = json.loads(im.text["AIGC"])
    print(im.size[0], im.size[1], label["Label"], label["ProduceID"], im.getpixel((10, 20)))
"#;
        let Some(printed) = with_pillow(&labelled, script) else {
            return;
        };
        let pixel = decode(&png).get_pixel(10, 20).0;
        assert_eq!(
            printed,
            format!(
                "300 200 1 3f2a9c0e1b7d4e5f ({}, {}, {})",
                pixel[0], pixel[1], pixel[2]
            )
        );
    }
}
