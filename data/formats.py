"""The image formats DALI decodes, told apart by their first bytes, and whether an encoded image is complete.

`fn.decoders.image` (DALI 2.4, through nvImageCodec) decodes JPEG, PNG, WebP, BMP, TIFF, PNM (PBM, PGM, PPM)
and JPEG 2000 (WebP with alpha or animation too: its first frame), whatever the file's name; anything else (a
GIF, a web page saved as .jpg) stops the pipeline. So does an image of any of these formats cut short, even by
one byte: the decoder raises instead of returning a partial image. The index
(data/index.py for folders, data/shards.py for tar shards) therefore keeps an image only if its header names
one of these formats and, where the format says where it ends, that end is present. Only the first
HEAD_BYTES and the last END_MARKER_SEARCH_BYTES of an image are read (a few more for a TIFF directory); nothing
is decoded. Per format:
- JPEG (FF D8 FF): the end-of-image marker FF D9 near the end;
- PNG (89 'PNG' 0D 0A 1A 0A): the whole IEND chunk near the end;
- WebP ('RIFF' size 'WEBP'): the RIFF header states the bytes that follow it, 8 + size <= the image's length;
- BMP ('BM' file-size, a DIB header of a known length): the stated file size <= the image's length;
- TIFF ('II*\\0' or 'MM\\0*'): the first image directory, the values it keeps elsewhere and the strips or
  tiles it points to lie inside;
- binary PNM (P4, P5, P6): width x height x samples after the header, as the header states them;
  the ASCII variants (P1, P2, P3) state no length, so only their header is checked;
- JPEG 2000 (a JP2 signature box, or the codestream's FF 4F FF 51): the end-of-codestream marker FF D9 near
  the end.
An end marker is looked for in the last END_MARKER_SEARCH_BYTES, not just the last bytes, because encoders and
cameras may append padding or trailers after it, which DALI decodes fine.

What these checks cannot see (a JPEG garbled inside but ending in FF D9, a corrupt WebP chunk) reaches the
decoder; data/pipelines.py says what happens then.
"""
import math
import struct

HEAD_BYTES = 512  # enough for every signature and for a PNM header with a comment line
END_MARKER_SEARCH_BYTES = 4096
JP2_SIGNATURE_BOX = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
BMP_DIB_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}  # BITMAPCOREHEADER ... BITMAPV5HEADER
TIFF_DATA_TAGS = ((273, 279), (324, 325))  # (StripOffsets, StripByteCounts), (TileOffsets, TileByteCounts)
TIFF_VALUE_CODES = {3: "H", 4: "I"}  # SHORT, LONG: the types offsets and byte counts are stored in
TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}  # bytes per value
PNM_SAMPLES = {b"P4": 1, b"P5": 1, b"P6": 3}

# The file-name extensions of these formats: what marks a tar member as an image (data/shards.py).
IMAGE_EXTENSIONS = {"jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "dib", "tif", "tiff", "pbm", "pgm", "ppm",
                    "pnm", "jp2", "j2k", "j2c", "jpx", "jpf"}


def image_format(head):
    """The format name of an image starting with the bytes `head`, or None when DALI does not decode it."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:2] == b"BM" and len(head) >= 18 and struct.unpack("<I", head[14:18])[0] in BMP_DIB_HEADER_SIZES:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "PNM"
    if head.startswith(JP2_SIGNATURE_BOX) or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG 2000"
    return None


def image_problem(file, start, size):
    """None if the `size` bytes at offset `start` of the open binary `file` hold a complete image of a format
    DALI decodes, by the checks above; else why not, in a few words."""
    if size == 0:
        return "empty file"
    head = read_at(file, start, min(size, HEAD_BYTES))
    kind = image_format(head)
    if kind is None:
        return f"not an image DALI decodes (starts with {head[:4].hex(' ')})"
    missing = COMPLETENESS[kind](file, start, size, head)
    return f"truncated {kind} ({missing})" if missing else None


def read_at(file, offset, count):
    file.seek(offset)
    return file.read(count)


def end_marker(marker, name):
    """A check that `marker` occurs in the last END_MARKER_SEARCH_BYTES of the image."""
    def check(file, start, size, head):
        tail_size = min(size, END_MARKER_SEARCH_BYTES)
        return None if marker in read_at(file, start + size - tail_size, tail_size) else f"no {name}"
    return check


def stated_length(stated, size, stating="the header"):
    return None if stated <= size else f"{stating} states {stated} bytes, {size} present"


def webp_complete(file, start, size, head):
    return stated_length(8 + struct.unpack("<I", head[4:8])[0], size)  # the RIFF size excludes 'RIFF' and itself


def bmp_complete(file, start, size, head):
    return stated_length(struct.unpack("<I", head[2:6])[0], size)


def tiff_complete(file, start, size, head):
    """The first image directory, the values it keeps outside itself and the strips or tiles it points to, all
    inside the image."""
    order = "<" if head[:2] == b"II" else ">"
    directory = struct.unpack(order + "I", head[4:8])[0]
    count_bytes = read_at(file, start + directory, 2) if directory + 2 <= size else b""
    if len(count_bytes) < 2:
        return "its image directory lies past the end"
    entries = struct.unpack(order + "H", count_bytes)[0]
    end = directory + 2 + 12 * entries + 4  # the entries and the offset of the next directory
    if end > size:
        return "its image directory lies past the end"
    table = read_at(file, start + directory + 2, 12 * entries)
    values = {}
    for number in range(entries):
        tag, value_type, count, inline = struct.unpack(order + "HHI4s", table[12 * number: 12 * number + 12])
        length = count * TIFF_TYPE_SIZES.get(value_type, 1)
        where = struct.unpack(order + "I", inline)[0] if length > 4 else None
        if where is not None:
            end = max(end, where + length)
        if any(tag in pair for pair in TIFF_DATA_TAGS) and value_type in TIFF_VALUE_CODES:
            if where is not None and where + length > size:
                continue  # `end` says so already
            data = inline[:length] if where is None else read_at(file, start + where, length)
            values[tag] = struct.unpack(order + TIFF_VALUE_CODES[value_type] * count, data)
    for offsets, byte_counts in TIFF_DATA_TAGS:
        if offsets in values and byte_counts in values:
            end = max(end, max(o + n for o, n in zip(values[offsets], values[byte_counts])))
    return stated_length(end, size, "its image directory")


def pnm_complete(file, start, size, head):
    """Binary PNM: header tokens (magic, width, height and, but for P4, the maximum value), '#' comments, one
    white-space byte, then the samples."""
    magic = head[:2]
    if magic not in PNM_SAMPLES:
        return None  # ASCII PNM states no length
    tokens, position, wanted = [], 2, 2 if magic == b"P4" else 3
    while len(tokens) < wanted and position < len(head):
        character = head[position:position + 1]
        if character == b"#":
            position = head.find(b"\n", position)
            if position < 0:
                break
        elif character.isspace():
            position += 1
        else:
            end = position
            while end < len(head) and head[end:end + 1].isdigit():
                end += 1
            if end == position:
                return "its header is not numbers"
            tokens.append(int(head[position:end]))
            position = end
    if len(tokens) < wanted or position >= len(head):
        return f"no complete header in its first {HEAD_BYTES} bytes"
    width, height = tokens[:2]
    if magic == b"P4":
        pixel_bytes = math.ceil(width / 8) * height
    else:
        pixel_bytes = width * height * PNM_SAMPLES[magic] * (1 if tokens[2] < 256 else 2)
    return stated_length(position + 1 + pixel_bytes, size)


COMPLETENESS = {
    "JPEG": end_marker(b"\xff\xd9", "end-of-image marker"),
    "PNG": end_marker(b"IEND\xaeB`\x82", "IEND chunk"),  # IEND's CRC is the same in every PNG
    "WebP": webp_complete,
    "BMP": bmp_complete,
    "TIFF": tiff_complete,
    "PNM": pnm_complete,
    "JPEG 2000": end_marker(b"\xff\xd9", "end-of-codestream marker"),
}
