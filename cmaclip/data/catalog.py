"""Read a product catalogue (JSONL or CSV/TSV) into checked rows, and turn one row's image into JPEG
bytes that every reader (PIL, DALI on CPU, nvJPEG on GPU) decodes to the same picture.

Two kinds of problems, two treatments:
- Structural (the file as a whole is unusable: missing, unknown extension, a required column or a
  task absent everywhere): `CatalogError`, one message naming the file and what is wrong.
- One bad row (malformed JSON, a bad field, an unreadable image, a duplicate id): the row is
  skipped and reported as {"line", "id", "reason"}; the rest of the catalogue is used.

Row policy (also in the README):
- `id`: required, a string or an integer; a later row with an id seen before is skipped.
- text (`text`, or the column/key named by text_column): optional; "" = no title.
- `image`: optional; absent or empty = a text-only product. An image that is given but missing,
  truncated, corrupt or not an image makes the row skipped: it is bad data, not a text-only product.
- labels: JSONL `labels: {task: value}`, CSV one column per task. Absent, null or "" = label
  missing. Values are strings or integers (kept as their decimal text), surrounding whitespace
  stripped; any other type (float, bool, list, dict) skips the row rather than guessing.
- `split`: optional, one of train/val/test (case-insensitive); anything else skips the row.
- A row with neither a title nor an image, or without a label for any task, is skipped.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from cmaclip.data.format import SPLITS
from cmaclip.errors import CmaclipError

JPEG_QUALITY = 92
# Frame types every JPEG decoder we target handles (nvJPEG included): baseline and progressive
# Huffman. Arithmetic-coded, lossless and hierarchical JPEGs are re-encoded.
SAFE_JPEG_FRAMES = {0xC0: "baseline", 0xC2: "progressive"}
EXIF_ORIENTATION = 0x0112
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")  # .json: JSON Lines too (one object per line)


class CatalogError(CmaclipError, ValueError):
    """The catalogue as a whole cannot be used (the message says why)."""


class BadRow(ValueError):
    """One row cannot be used; the message is the reason reported in dataset.json["skipped"]."""


@dataclass
class CatalogRow:
    line: int
    """1-based line of the row in the input file (CSV: the line its record starts on)."""
    id: str
    text: str
    """The raw title, exactly as given ("" = no title)."""
    image: Path | None
    """Resolved image path; None = no image given (a text-only product)."""
    labels: dict[str, str] = field(default_factory=dict)
    """task -> class name; a task without a label is absent."""
    split: str | None = None
    """train/val/test as given by the row; None = assign by hash."""


@dataclass
class Catalog:
    path: Path
    rows: list[CatalogRow]
    skipped: list[dict]
    """{"line": int, "id": str | None, "reason": str} per unusable row, in file order."""


def skip_record(line: int, row_id: str | None, reason: str) -> dict:
    """A `skipped` entry; text that cannot be UTF-8 (lone surrogates) is shown escaped (\\udc80)."""
    def printable(text):
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"line": line, "id": None if row_id is None else printable(row_id), "reason": printable(reason)}


def read_catalog(path: str | Path, tasks: list[str], *, text_column: str = "text",
                 image_root: str | Path | None = None, contain: bool = True,
                 require_labels: bool = True) -> Catalog:
    """contain: an image path that leaves the image root (absolute, `..`, a symlink out) skips
    its row; False reads any path the catalogue names. require_labels: a row without any label is
    skipped (False: kept, for a catalogue to predict)."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"{path}: input catalogue not found")
    image_root = Path(image_root) if image_root is not None else path.parent
    if not image_root.is_dir():
        raise CatalogError(f"{image_root}: image root is not a folder")
    records = read_records(path, tasks, text_column)
    rows, skipped, first_line_of = [], [], {}
    for line, raw_id, fields in records:
        try:
            if isinstance(fields, BadRow):
                raise fields
            row = make_row(line, fields, tasks, image_root, require_labels)
            if contain and row.image is not None:
                require_inside(row.image, image_root)
            if row.id in first_line_of:
                raise BadRow(f"duplicate id (first seen on line {first_line_of[row.id]})")
            first_line_of[row.id] = line
            rows.append(row)
        except BadRow as error:
            skipped.append(skip_record(line, raw_id, str(error)))
    if path.suffix.lower() in JSONL_SUFFIXES and require_labels:
        require_every_task_used(path, tasks, rows)
    return Catalog(path=path, rows=rows, skipped=skipped)


def read_records(path: Path, tasks: list[str], text_column: str):
    """(line, id or None, fields dict | BadRow) per record of a JSONL, CSV or TSV file; fields:
    id, image, text, split, labels {task: raw value}. Unknown file type: CatalogError."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return read_jsonl_records(path, tasks, text_column)
    if suffix in (".csv", ".tsv"):
        return read_csv_records(path, tasks, text_column, delimiter="\t" if suffix == ".tsv" else ",")
    raise CatalogError(f"{path}: unknown catalogue type {suffix!r} (expected .jsonl or .csv)")


def read_jsonl_records(path: Path, tasks: list[str], text_column: str):
    """(line, id or None, fields dict | BadRow) per non-blank line."""
    with open(path, "rb") as file:
        for line, raw in enumerate(file, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield line, None, BadRow(f"not valid UTF-8 ({error.reason} at byte {error.start})")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield line, None, BadRow(f"malformed JSON: {error.msg} (column {error.colno})")
                continue
            if not isinstance(record, dict):
                yield line, None, BadRow(f"a JSON line must be an object, got {type(record).__name__}")
                continue
            labels = record.get("labels")
            if labels is not None and not isinstance(labels, dict):
                yield line, id_text(record.get("id")), BadRow(
                    f"labels: expected an object {{task: value}}, got {type(labels).__name__}")
                continue
            fields = {"id": record.get("id"), "image": record.get("image"), "text": record.get(text_column),
                      "split": record.get("split"), "labels": {task: (labels or {}).get(task) for task in tasks}}
            yield line, id_text(fields["id"]), fields


def read_csv_records(path: Path, tasks: list[str], text_column: str, delimiter: str = ","):
    """(line, id or None, fields dict | BadRow) per record. Bytes that are not UTF-8 survive
    decoding as surrogates and make only their row bad, not the whole file."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise CatalogError(f"{path}: empty CSV (no header)") from None
    header = [name.strip() for name in header]
    missing = [name for name in ("id", "image", text_column, *tasks) if name not in header]
    if missing:
        raise CatalogError(f"{path}: column(s) {', '.join(map(repr, missing))} not in the header "
                           f"(columns: {', '.join(header)})")
    column = {name: header.index(name) for name in header}
    next_line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            yield next_line, None, BadRow(f"malformed CSV: {error}")
            next_line = reader.line_num + 1
            continue
        line, next_line = next_line, reader.line_num + 1
        if not any(cell.strip() for cell in cells):
            continue
        row_id = id_text(cells[column["id"]]) if len(cells) > column["id"] else None
        if len(cells) != len(header):
            yield line, row_id, BadRow(f"row has {len(cells)} fields, the header has {len(header)}")
            continue
        if any(is_mis_decoded(cell) for cell in cells):
            yield line, row_id, BadRow("not valid UTF-8")
            continue
        cell = {name: cells[index] for name, index in column.items()}
        yield line, row_id, {"id": cell["id"], "image": cell["image"], "text": cell[text_column],
                             "split": cell.get("split"), "labels": {task: cell[task] for task in tasks}}


def is_mis_decoded(text: str) -> bool:
    return any("\udc80" <= char <= "\udcff" for char in text)


def id_text(value) -> str | None:
    """The id as reported in `skipped` (None when there is no usable one)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value).strip()
    return text or None


def require_inside(image: Path, root: Path) -> None:
    try:
        inside = image.resolve().is_relative_to(root.resolve())
    except (OSError, ValueError):  # a NUL in the path, a symlink loop: prepare_image reports it
        return
    if not inside:
        raise BadRow(f"image path leaves the image root {root}: {image} (pass --allow-outside-image-root "
                     "to read it)")


def make_row(line: int, fields: dict, tasks: list[str], image_root: Path,
             require_labels: bool = True) -> CatalogRow:
    row_id = id_text(fields["id"])
    if row_id is None:
        raise BadRow("id: missing or empty" if fields["id"] is None or isinstance(fields["id"], str) else
                     f"id: expected a string or integer, got {type(fields['id']).__name__}")

    text = fields["text"]
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise BadRow(f"text: expected a string, got {type(text).__name__}")

    image = fields["image"]
    if image is not None and not isinstance(image, str):
        raise BadRow(f"image: expected a path string, got {type(image).__name__}")
    image_path = image_root / image.strip() if image and image.strip() else None

    if not text.strip() and image_path is None:
        raise BadRow("neither a title nor an image")

    labels = {}
    for task in tasks:
        value = fields["labels"].get(task)
        if isinstance(value, bool) or not isinstance(value, (str, int, type(None))):
            raise BadRow(f"labels.{task}: expected a string or integer, got {type(value).__name__} {value!r}"[:200])
        if value is not None and str(value).strip():
            labels[task] = str(value).strip()
    if not labels and require_labels:
        raise BadRow(f"no label for any task ({', '.join(tasks)})")

    split = fields["split"]
    if split is not None and not isinstance(split, str):
        raise BadRow(f"split: expected one of {'/'.join(SPLITS)}, got {type(split).__name__}")
    split = split.strip().lower() if split else ""
    if split and split not in SPLITS:
        raise BadRow(f"split: {fields['split']!r} is not one of {'/'.join(SPLITS)}")

    for name, value in [("id", row_id), ("text", text), *((f"labels.{t}", v) for t, v in labels.items())]:
        if is_mis_decoded(value) or not is_encodable(value):
            raise BadRow(f"{name}: not valid Unicode (a lone surrogate such as \\ud800)")
    return CatalogRow(line=line, id=row_id, text=text, image=image_path, labels=labels, split=split or None)


def is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def require_every_task_used(path: Path, tasks: list[str], rows: list[CatalogRow]) -> None:
    """JSONL has no header to check a task name against: a task no row labels is taken as a typo."""
    unused = [task for task in tasks if not any(task in row.labels for row in rows)]
    if unused and rows:
        raise CatalogError(f"{path}: task(s) {', '.join(map(repr, unused))} appear in no row's labels")


# Markers that may follow a scan's entropy-coded data (more tables, the next scan, the end).
MARKERS_BETWEEN_SCANS = {0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE, 0xD9, *range(0xE0, 0xF0)}


def jpeg_layout(data: bytes) -> tuple[int | None, str | None]:
    """(frame type, problem) of a JPEG stream, by walking its marker segments to the end marker.
    Frame type: the SOFn marker (0xC0 baseline, 0xC2 progressive, ...). Problem: None, "no end
    marker" (the scan data runs to the end of the file), or what is corrupt. PIL decodes some corrupt
    streams with only a hidden libjpeg warning (e.g. a stray marker inside the scan data ends the
    scan early and the rest of the picture is filled in); this walk catches them."""
    if data[:2] != b"\xff\xd8":
        return None, "no JPEG start marker"
    frame, position, size, in_scans = None, 2, len(data), False
    while True:
        if position >= size:
            return frame, "no end marker"
        if data[position] != 0xFF:
            return frame, f"stray bytes where a marker belongs (offset {position})"
        while position < size and data[position] == 0xFF:  # fill bytes
            position += 1
        if position >= size:
            return frame, "no end marker"
        marker = data[position]
        position += 1
        if marker == 0xD9:
            return frame, None
        if in_scans and marker not in MARKERS_BETWEEN_SCANS:
            return frame, f"invalid marker 0x{marker:02X} after scan data (offset {position - 2})"
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            continue
        length = int.from_bytes(data[position : position + 2], "big")
        if length < 2 or position + length > size:
            return frame, f"marker 0x{marker:02X} has a bad length (offset {position - 2})"
        if frame is None and 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            frame = marker
        position += length
        if marker == 0xDA:  # skip the entropy-coded data: 0xFF is followed by 0x00 (stuffing) or a restart
            in_scans = True
            while True:
                position = data.find(b"\xff", position)
                if position < 0 or position + 1 >= size:
                    return frame, "no end marker"
                following = data[position + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    position += 2
                elif following == 0xFF:
                    position += 1
                else:
                    break


def prepare_image(path: Path, max_side: int) -> tuple[bytes, str]:
    """(JPEG bytes, how they were made: "original" or "reencoded: <why>"). Raises BadRow for an image
    that is missing or does not fully decode: PIL `load()` decodes every pixel, so a truncated or
    corrupt file is caught here rather than killing a DALI pipeline during training.

    The original bytes are kept only for a plain 8-bit RGB baseline/progressive JPEG without EXIF
    rotation that fits max_side (0 = no limit). Everything else is re-encoded as RGB JPEG: other
    formats, greyscale/CMYK/alpha (alpha composited on white, the usual product background),
    oversized images (shrunk to max_side), and EXIF-rotated photos (rotated upright: DALI ignores
    EXIF, so we bake the orientation in and every reader sees what the shopper sees)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadRow(f"image not found: {path}") from None
    except (OSError, ValueError) as error:  # ValueError: a path with a NUL character
        raise BadRow(f"image unreadable: {path}: {getattr(error, 'strerror', None) or error}") from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG" and max_side and max(image.size) >= 2 * max_side:
                # It will be shrunk anyway: let libjpeg scale while decoding (DCT scaling, 2-8x
                # faster on large photos); it still decodes every coefficient, so damage is still found.
                scale = max_side / max(image.size)
                image.draft(image.mode, (round(image.width * scale), round(image.height * scale)))
            image.load()
            why = reencode_reason(image, data, max_side)
            if why is None:
                return data, "original"
            return encode_jpeg(image, max_side), f"reencoded: {why}"
    except BadRow as error:
        raise BadRow(f"{error}: {path}") from None
    except Image.DecompressionBombError as error:
        raise BadRow(f"image too large: {path}: {error}") from None
    except Exception as error:  # PIL raises many types for bad files; all mean "not a usable image"
        raise BadRow(f"image does not decode: {path}: {type(error).__name__}: {error}"[:300]) from None


def reencode_reason(image: Image.Image, data: bytes, max_side: int) -> str | None:
    """Why these (fully decoded) bytes cannot be stored as they are; None if they can."""
    if image.format != "JPEG":
        return f"{image.format or 'unknown'} image"
    frame, problem = jpeg_layout(data)
    if problem == "no end marker":  # every pixel decoded, only the marker is missing: a clean copy is safe
        return "JPEG without end marker"
    if problem is not None:
        raise BadRow(f"corrupt JPEG ({problem})")
    if image.mode != "RGB":
        return f"{image.mode} JPEG"
    if frame not in SAFE_JPEG_FRAMES:
        return "JPEG frame type " + (f"0x{frame:02X}" if frame is not None else "unknown")
    if max_side and max(image.size) > max_side:
        return f"larger than {max_side} px"
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        return "EXIF rotation"
    return None


def encode_jpeg(image: Image.Image, max_side: int) -> bytes:
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    elif image.mode != "RGB":
        image = image.convert("RGB")
    if max_side and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def placeholder_jpeg(size: int = 32) -> bytes:
    """The image of a text-only product (mod[IMAGE] = 0 tells the model to ignore it)."""
    out = io.BytesIO()
    Image.new("RGB", (size, size), (127, 127, 127)).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()
