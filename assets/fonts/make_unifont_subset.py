#!/usr/bin/env python3
"""Builds assets/fonts/unifont-subset.bin.z from GNU Unifont's unifont.hex.

Usage: python3 make_unifont_subset.py /usr/share/unifont/unifont.hex unifont-subset.bin.z

unifont.hex comes with Debian's `unifont` package (version 1:15.0.01-2 was used; the
glyphs are GNU Unifont 15.0.01). Only the standard library is needed, and the output is a
pure function of the input, so anyone can regenerate the committed file and compare bytes.

Format (all integers little-endian), zlib-compressed as a whole (level 9):
  b"UNIFSUB1"                      magic
  u32 run_count
  run_count x { u32 first, u32 last, u32 width }   consecutive code points of one width
  glyph bitmaps, run by run, code point by code point:
    width 8:  16 bytes, one per row, top first, bit 7 = leftmost pixel
    width 16: 32 bytes, two per row (left byte first), top first
The renderer (src/text/font.rs) reads this format.
"""
import struct
import sys
import zlib

# What the pipeline's prompts, scene ids and labels need: Latin with accents, Greek and
# Cyrillic (names), general and CJK punctuation, kana, every CJK Unified Ideograph of the
# basic block (simplified and traditional Chinese, Japanese kanji: story names often use
# characters outside GB 2312), and the fullwidth forms.
BLOCKS = [
    (0x0020, 0x007E),  # ASCII
    (0x00A0, 0x017F),  # Latin-1 Supplement, Latin Extended-A
    (0x0370, 0x03FF),  # Greek
    (0x0400, 0x045F),  # Cyrillic (basic)
    (0x2010, 0x205E),  # General Punctuation (dashes, quotes, ellipsis)
    (0x2190, 0x2199),  # arrows
    (0x3000, 0x303F),  # CJK Symbols and Punctuation
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xFF01, 0xFF60),  # Fullwidth ASCII variants
    (0xFFE0, 0xFFE6),  # Fullwidth signs
]


def main(hex_path, out_path):
    glyphs = {}
    with open(hex_path, encoding="ascii") as source:
        for line in source:
            code, bitmap = line.strip().split(":")
            glyphs[int(code, 16)] = bytes.fromhex(bitmap)

    runs = []  # [first, last, width]
    for first, last in BLOCKS:
        for code in range(first, last + 1):
            bitmap = glyphs.get(code)
            if bitmap is None:
                continue
            width = 8 if len(bitmap) == 16 else 16
            assert len(bitmap) in (16, 32), hex(code)
            if runs and runs[-1][1] == code - 1 and runs[-1][2] == width:
                runs[-1][1] = code
            else:
                runs.append([code, code, width])

    body = bytearray(b"UNIFSUB1")
    body += struct.pack("<I", len(runs))
    for first, last, width in runs:
        body += struct.pack("<III", first, last, width)
    count = 0
    for first, last, _ in runs:
        for code in range(first, last + 1):
            body += glyphs[code]
            count += 1
    with open(out_path, "wb") as out:
        out.write(zlib.compress(bytes(body), 9))
    print(f"{count} glyphs in {len(runs)} runs, {len(body)} bytes raw", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
