//! The AIGC implicit label (GB 45438-2025), written into the PNG without touching its pixels.
//!
//! GB 45438-2025, mandatory since 2025-09-01, asks that AI-generated images carry an implicit
//! label in their file metadata (docs/design.md §3). The TC260 practice guide for images
//! (TC260-PG-20259A) puts it in XMP, and that is what detection tools read: an XMP packet
//! whose `rdf:Description` declares the namespace `http://www.tc260.org.cn/ns/AIGC/1.0/`
//! and holds `<TC260:AIGC>` with the JSON object `{"Label":"1","ContentProducer",
//! "ProduceID","ReservedCode1","ContentPropagator","PropagateID","ReservedCode2"}`, fields in
//! that order, XML-escaped (docs/design.md §2). The same description carries IPTC's
//! `Iptc4xmpExt:DigitalSourceType` = `trainedAlgorithmicMedia`, the marker Google, Meta and
//! Adobe read. A PNG carries XMP in one uncompressed `iTXt` chunk with the keyword
//! `XML:com.adobe.xmp` ([`XMP_KEYWORD`]), which Pillow's `getxmp()` and exiftool both read.
//!
//! The label is a chunk, so adding it is a copy of the file with one chunk spliced in right
//! after `IHDR` (an `iTXt` may sit anywhere between `IHDR` and `IEND`; first is where a
//! reader that stops early still finds it). The image data is not re-encoded: the pixels
//! are exactly the ones that were checked, and the cost is a memory copy.
//!
//! The chunk allowlist ([`super::chunks`]) drops every text chunk a provider sends, its own
//! XMP and any fake label included; the label is added after that pass, so it is ours.
//! Adding it to a PNG that already has one replaces it — the XMP packet, or the bare `AIGC`
//! text chunk this service wrote before it followed the guide — so a file carries exactly
//! one label.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::chunks::{chunks, write_chunk, Chunk, Chunks, PNG_SIGNATURE};
use super::invalid;
use crate::error::Result;

/// The `iTXt` keyword under which a PNG carries its XMP packet.
pub(crate) const XMP_KEYWORD: &[u8] = b"XML:com.adobe.xmp";
/// The keyword of the label's earlier, non-standard form: a bare `AIGC` text chunk. Still
/// recognised, to replace it.
pub(crate) const LEGACY_AIGC_KEYWORD: &[u8] = b"AIGC";
/// The TC260 namespace of the implicit label.
pub(crate) const TC260_NAMESPACE: &str = "http://www.tc260.org.cn/ns/AIGC/1.0/";
/// IPTC's digital source type for media made by a trained model.
pub(crate) const TRAINED_ALGORITHMIC_MEDIA: &str =
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

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
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The XMP packet carrying the label: the TC260 element and IPTC's digital source
    /// type in one `rdf:Description`.
    pub(crate) fn to_xmp(&self) -> String {
        format!(
            "<?xpacket begin=\"\u{feff}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\n\
             <x:xmpmeta xmlns:x=\"adobe:ns:meta/\">\n\
             \x20<rdf:RDF xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\">\n\
             \x20 <rdf:Description rdf:about=\"\"\n\
             \x20   xmlns:TC260=\"{TC260_NAMESPACE}\"\n\
             \x20   xmlns:Iptc4xmpExt=\"http://iptc.org/std/Iptc4xmpExt/2008-02-29/\"\n\
             \x20   Iptc4xmpExt:DigitalSourceType=\"{TRAINED_ALGORITHMIC_MEDIA}\">\n\
             \x20  <TC260:AIGC>{}</TC260:AIGC>\n\
             \x20 </rdf:Description>\n\
             \x20</rdf:RDF>\n\
             </x:xmpmeta>\n\
             <?xpacket end=\"r\"?>",
            xml_escape(&self.to_json())
        )
    }

    /// The data of the `iTXt` chunk: keyword, NUL, compression flag 0, method 0, empty
    /// language tag, NUL, empty translated keyword, NUL, then the UTF-8 XMP packet.
    fn itxt_data(&self) -> Vec<u8> {
        let xmp = self.to_xmp();
        let mut data = Vec::with_capacity(XMP_KEYWORD.len() + 5 + xmp.len());
        data.extend_from_slice(XMP_KEYWORD);
        data.extend_from_slice(&[0, 0, 0, 0, 0]);
        data.extend_from_slice(xmp.as_bytes());
        data
    }
}

/// `text` safe as XML character data and attribute values.
fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 4);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// The text of XML character data, its five predefined entities and numeric references
/// resolved. `None` for a reference it cannot resolve.
fn xml_unescape(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let end = after.find(';')?;
        let entity = &after[..end];
        let c = match entity {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = match entity
                    .strip_prefix("#x")
                    .or_else(|| entity.strip_prefix("#X"))
                {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => entity.strip_prefix('#')?.parse().ok()?,
                };
                char::from_u32(code)?
            }
        };
        out.push(c);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// `png` with `label` as its one implicit label, an XMP `iTXt` chunk right after `IHDR`;
/// any earlier label (XMP or the legacy `AIGC` chunk) is dropped, everything else is copied
/// unchanged. Bytes after `IEND` are not copied.
pub fn insert_aigc_label(png: &[u8], label: &AigcLabel) -> Result<Bytes> {
    let itxt = label.itxt_data();
    let mut out = Vec::with_capacity(png.len() + itxt.len() + 12);
    out.extend_from_slice(PNG_SIGNATURE);
    for (i, chunk) in png_chunks(png)?.enumerate() {
        let chunk = chunk?;
        if is_label(&chunk) {
            continue;
        }
        out.extend_from_slice(chunk.raw(png));
        if i == 0 {
            write_chunk(&mut out, b"iTXt", &itxt)?;
        }
    }
    Ok(Bytes::from(out))
}

/// [`insert_aigc_label`] of a PNG handed over: the same bytes, but spliced within the PNG's
/// own buffer when it is not shared and has the room (it usually has: the image was decoded
/// into the answer's buffer, a third larger as base64), so the image is not copied into a
/// fresh one. Only for a PNG with no label and nothing after `IEND` — then the splice is
/// all the copy would change; any other goes to [`insert_aigc_label`].
pub(crate) fn insert_aigc_label_owned(png: Bytes, label: &AigcLabel) -> Result<Bytes> {
    let Some(at) = splice_point(&png) else {
        return insert_aigc_label(&png, label);
    };
    let mut chunk = Vec::new();
    write_chunk(&mut chunk, b"iTXt", &label.itxt_data())?;
    let mut buffer = match png.try_into_mut() {
        Ok(buffer) if buffer.capacity() - buffer.len() >= chunk.len() => buffer,
        Ok(buffer) => return insert_aigc_label(&buffer, label),
        Err(shared) => return insert_aigc_label(&shared, label),
    };
    let len = buffer.len();
    buffer.resize(len + chunk.len(), 0);
    buffer.copy_within(at..len, at + chunk.len());
    buffer[at..at + chunk.len()].copy_from_slice(&chunk);
    Ok(buffer.freeze())
}

/// Where [`insert_aigc_label`] puts the label (just past the first chunk, `IHDR`), if the
/// PNG is well formed, has no label chunk, and ends at `IEND`.
fn splice_point(png: &[u8]) -> Option<usize> {
    let mut first_end = None;
    let mut end = 0;
    for chunk in png_chunks(png).ok()? {
        let chunk = chunk.ok()?;
        if is_label(&chunk) {
            return None;
        }
        first_end.get_or_insert(chunk.end);
        end = chunk.end;
    }
    first_end.filter(|_| end == png.len())
}

/// `png` without any label, XMP or legacy (for `STAGE3_AIGC_LABEL=off`, to relabel, or to
/// compare pixels).
pub fn strip_aigc_label(png: &[u8]) -> Result<Bytes> {
    let mut out = Vec::with_capacity(png.len());
    out.extend_from_slice(PNG_SIGNATURE);
    for chunk in png_chunks(png)? {
        let chunk = chunk?;
        if !is_label(&chunk) {
            out.extend_from_slice(chunk.raw(png));
        }
    }
    Ok(Bytes::from(out))
}

/// The label the PNG carries in its XMP: the `TC260:AIGC` element (or attribute) of the
/// first uncompressed XMP `iTXt` chunk, a JSON object of the standard's fields. `None` if
/// there is none or it is not valid.
pub fn read_aigc_label(png: &[u8]) -> Option<AigcLabel> {
    png_chunks(png)
        .ok()?
        .map_while(Result::ok)
        .filter(|c| &c.kind == b"iTXt")
        .find_map(|c| {
            let xmp = std::str::from_utf8(itxt_text(c.data, XMP_KEYWORD)?).ok()?;
            serde_json::from_str(&xml_unescape(tc260_value(xmp)?)?).ok()
        })
}

/// The raw (still escaped) value of `TC260:AIGC` in an XMP packet, written as an element
/// (`<TC260:AIGC>…</TC260:AIGC>`, as this service and Doubao write it) or as an attribute
/// (`TC260:AIGC="…"`, as others do).
fn tc260_value(xmp: &str) -> Option<&str> {
    if !xmp.contains(TC260_NAMESPACE) {
        return None;
    }
    if let Some((_, rest)) = xmp.split_once("<TC260:AIGC>") {
        return rest.split_once("</TC260:AIGC>").map(|(value, _)| value);
    }
    let (_, rest) = xmp.split_once("TC260:AIGC=")?;
    let quote = rest.chars().next().filter(|q| matches!(q, '"' | '\''))?;
    rest.get(1..)?.split_once(quote).map(|(value, _)| value)
}

/// How many labels (XMP packets or legacy `AIGC` text chunks) the PNG carries.
pub fn count_aigc_labels(png: &[u8]) -> usize {
    png_chunks(png).map_or(0, |list| {
        list.map_while(Result::ok).filter(|c| is_label(c)).count()
    })
}

fn png_chunks(png: &[u8]) -> Result<Chunks<'_>> {
    if !png.starts_with(PNG_SIGNATURE) {
        return Err(invalid("cannot label the image: it is not a PNG"));
    }
    Ok(chunks(png))
}

/// A text chunk (`tEXt`, `zTXt` or `iTXt`) holding a label: keyword `XML:com.adobe.xmp`
/// (a file keeps one XMP packet, and ours is it) or the legacy `AIGC`.
fn is_label(chunk: &Chunk<'_>) -> bool {
    matches!(&chunk.kind, b"tEXt" | b"zTXt" | b"iTXt")
        && [XMP_KEYWORD, LEGACY_AIGC_KEYWORD].iter().any(|keyword| {
            chunk.data.len() > keyword.len()
                && chunk.data.starts_with(keyword)
                && chunk.data.get(keyword.len()) == Some(&0)
        })
}

/// The text of an uncompressed `iTXt` chunk with `keyword`.
fn itxt_text<'a>(data: &'a [u8], keyword: &[u8]) -> Option<&'a [u8]> {
    let rest = data.strip_prefix(keyword)?.strip_prefix(&[0])?;
    // Compression flag 0 (uncompressed), method 0.
    let rest = rest.strip_prefix(&[0, 0])?;
    let language_end = rest.iter().position(|&b| b == 0)?;
    let rest = rest.get(language_end + 1..)?;
    let translated_end = rest.iter().position(|&b| b == 0)?;
    rest.get(translated_end + 1..)
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

    /// `png` in a buffer with `room` spare bytes after it, as a decoded answer has.
    fn with_room(png: &[u8], room: usize) -> Bytes {
        let mut buffer = bytes::BytesMut::with_capacity(png.len() + room);
        buffer.extend_from_slice(png);
        buffer.freeze()
    }

    #[test]
    fn a_label_spliced_in_place_is_the_same_bytes_as_a_copied_one() {
        let png = noisy_png(64, 48);
        let copied = insert_aigc_label(&png, &label()).unwrap();

        let roomy = with_room(&png, 4096);
        let start = roomy.as_ptr();
        let spliced = insert_aigc_label_owned(roomy, &label()).unwrap();
        assert_eq!(spliced, copied);
        assert_eq!(
            spliced.as_ptr(),
            start,
            "spliced within the PNG's own buffer"
        );

        // No room, a shared buffer, a PNG already labelled or with bytes after `IEND`: copied,
        // to the same result.
        assert_eq!(
            insert_aigc_label_owned(with_room(&png, 10), &label()).unwrap(),
            copied
        );
        let shared = with_room(&png, 4096);
        let _other = shared.clone();
        assert_eq!(insert_aigc_label_owned(shared, &label()).unwrap(), copied);
        let relabelled = insert_aigc_label_owned(with_room(&copied, 4096), &label()).unwrap();
        assert_eq!(relabelled, copied);
        let mut trailing = png.to_vec();
        trailing.extend_from_slice(b"after the end");
        assert_eq!(
            insert_aigc_label_owned(with_room(&trailing, 4096), &label()).unwrap(),
            copied
        );
        assert!(insert_aigc_label_owned(Bytes::from_static(b"not a png"), &label()).is_err());
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
        assert_eq!(reader.info().utf8_text[0].keyword, "XML:com.adobe.xmp");
        assert!(!reader.info().utf8_text[0].compressed);
        assert!(text.contains(r#"xmlns:TC260="http://www.tc260.org.cn/ns/AIGC/1.0/""#));
        assert!(text.contains(
            r#"Iptc4xmpExt:DigitalSourceType="http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia""#
        ));
        assert!(text.contains(
            "<TC260:AIGC>{&quot;Label&quot;:&quot;1&quot;,&quot;ContentProducer&quot;:&quot;stage3&quot;"
        ));
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
    fn any_earlier_label_or_xmp_is_replaced_and_other_text_kept() {
        let png = noisy_png(64, 64);
        let mut chunks = parts(&png);
        let end = chunks.len() - 1;
        chunks.insert(end, (*b"tEXt", b"AIGC\0{\"Label\":\"0\"}".to_vec()));
        chunks.insert(1, (*b"iTXt", b"AIGC\0\0\0\0\0{\"Label\":\"0\"}".to_vec()));
        chunks.insert(
            1,
            (
                *b"iTXt",
                b"XML:com.adobe.xmp\0\0\0\0\0<x:xmpmeta/>".to_vec(),
            ),
        );
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

    #[test]
    fn the_attribute_form_and_entities_read_too() {
        let json = label().to_json();
        let xmp = format!(
            "<x:xmpmeta xmlns:x=\"adobe:ns:meta/\"><rdf:RDF><rdf:Description \
             xmlns:TC260=\"{TC260_NAMESPACE}\" TC260:AIGC='{}'/></rdf:RDF></x:xmpmeta>",
            json.replace('"', "&#34;").replace('示', "&#x793A;")
        );
        let mut data = XMP_KEYWORD.to_vec();
        data.extend_from_slice(&[0, 0, 0, 0, 0]);
        data.extend_from_slice(xmp.as_bytes());
        let png = noisy_png(64, 64);
        let mut chunks = parts(&png);
        chunks.insert(1, (*b"iTXt", data));
        assert_eq!(read_aigc_label(&assemble(&chunks)), Some(label()));
        assert_eq!(
            xml_unescape("a &amp;&lt;&gt;&quot;&apos; b").unwrap(),
            "a &<>\"' b"
        );
        assert_eq!(xml_unescape("&bogus;"), None);
        assert_eq!(xml_unescape("&amp"), None);
    }

    /// The labelled PNG opens in Pillow, and Pillow's own XMP reader (`getxmp()`, which
    /// needs defusedxml) finds the TC260 label and the IPTC digital source type.
    #[test]
    fn pillow_reads_the_tc260_label_from_the_xmp() {
        let png = noisy_png(300, 200);
        let labelled = insert_aigc_label(&png, &label()).unwrap();
        let script = r#"
import json, sys
from PIL import Image
with Image.open(sys.argv[1]) as im:
    im.load()
    xmp = im.getxmp()
    description = xmp["xmpmeta"]["RDF"]["Description"]
    label = json.loads(description["AIGC"])
    print(im.size[0], im.size[1], label["Label"], label["ProduceID"], label["ContentPropagator"],
          description["DigitalSourceType"], im.getpixel((10, 20)))
"#;
        let Some(printed) = with_pillow(&labelled, script) else {
            return;
        };
        let pixel = decode(&png).get_pixel(10, 20).0;
        assert_eq!(
            printed,
            format!(
                "300 200 1 3f2a9c0e1b7d4e5f Example Stories 示例 {TRAINED_ALGORITHMIC_MEDIA} ({}, {}, {})",
                pixel[0], pixel[1], pixel[2]
            )
        );
    }

    /// exiftool, which knows no TC260 table, reads the unknown namespace as `XMP-TC260`
    /// (tag `Aigc`) and the IPTC marker as `XMP-iptcExt:DigitalSourceType`.
    #[test]
    fn exiftool_reads_the_tc260_label_and_the_source_type() {
        let labelled = insert_aigc_label(&noisy_png(64, 64), &label()).unwrap();
        let Some(tags) = with_exiftool(&labelled) else {
            return;
        };
        let aigc = tags["XMP-TC260:Aigc"]
            .as_str()
            .expect("an XMP-TC260:Aigc tag");
        let fields: serde_json::Value = serde_json::from_str(aigc).unwrap();
        assert_eq!(fields["ProduceID"], "3f2a9c0e1b7d4e5f");
        assert_eq!(fields["ContentPropagator"], "Example Stories 示例");
        assert_eq!(
            tags["XMP-iptcExt:DigitalSourceType"],
            TRAINED_ALGORITHMIC_MEDIA
        );
    }
}
