"""Products of a JSONL/CSV file (the catalogue format of `cmaclip shards`, labels not needed) as
model inputs, and the command-line frame of the commands that read them (predict, explain).

A product with a usable title or image is kept; a missing one is simply absent for the model
(modality weight 0). Each problem is a `Problem` naming the line and the field: an image that is
given but cannot be read leaves the product without it; a row with no id, malformed JSON/CSV or
neither a usable title nor image is skipped.
"""
from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from cmaclip.config import MIXED_PRECISIONS
from cmaclip.data.catalog import BadRow, CatalogError, id_text, prepare_image, read_records
from cmaclip.data.format import attention_mask_from_tokens
from cmaclip.data.pil import preprocess_image


@dataclass
class Product:
    line: int
    id: str
    title: str
    """"" when the product has no (usable) title."""
    image: Image.Image | None
    """None when the product has no (usable) image."""
    missing: list[str] = field(default_factory=list)


@dataclass
class Problem:
    line: int
    id: str | None
    field: str
    reason: str
    skipped: bool
    """True: the row was not predicted; False: predicted without the named field."""

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (id {self.id})" if self.id else "")
        outcome = "row skipped" if self.skipped else f"predicted without the {self.field}"
        return f"{where}: {self.field}: {self.reason}; {outcome}"


def open_image(path: Path) -> Image.Image:
    """The photo, fully decoded and upright; BadRow (with the reason) when it cannot be used."""
    data, _ = prepare_image(path, max_side=0)  # validates the whole file, bakes in EXIF rotation
    return Image.open(io.BytesIO(data)).convert("RGB")


def read_products(path: str | Path, image_root: str | Path | None = None,
                  text_column: str = "text") -> Iterator[Product | Problem]:
    """The file's products, in order, and a Problem for each thing that went wrong (the rows are
    parsed by the catalogue reader of `cmaclip shards`)."""
    path = Path(path)
    image_root = Path(image_root) if image_root is not None else path.parent
    if not path.is_file():
        raise FileNotFoundError(f"{path}: input file not found")
    for line, raw_id, fields in read_records(path, [], text_column):
        if isinstance(fields, BadRow):
            yield Problem(line, raw_id, "row", str(fields), skipped=True)
            continue
        product_id = id_text(fields["id"])
        if product_id is None:
            yield Problem(line, None, "id", "missing or not a string/integer", skipped=True)
            continue
        problems = []
        title = fields["text"]
        if title is None:
            title = ""
        elif not isinstance(title, str):
            problems.append(Problem(line, product_id, text_column, f"expected a string, got {type(title).__name__}",
                                    skipped=False))
            title = ""
        image, image_name = None, fields["image"]
        if image_name is not None and not isinstance(image_name, str):
            problems.append(Problem(line, product_id, "image",
                                    f"expected a path string, got {type(image_name).__name__}", skipped=False))
        elif image_name and image_name.strip():
            try:
                image = open_image(image_root / image_name.strip())
            except BadRow as error:
                problems.append(Problem(line, product_id, "image", str(error), skipped=False))
        if not title.strip() and image is None:
            for problem in problems:
                problem.skipped = True
            yield from problems or [Problem(line, product_id, "row", "neither a title nor an image", skipped=True)]
            continue
        yield from problems
        missing = [name for name, absent in (("text", not title.strip()), ("image", image is None)) if absent]
        yield Product(line, product_id, title, image, missing)


def encode_products(products: list[Product], tokenizer, image_size: int, device) -> dict:
    """The model inputs of a list of products (the eval transform of the training data)."""
    tokens = tokenizer.encode([p.title if p.title.strip() else "" for p in products])
    input_ids = torch.from_numpy(tokens).long()
    pixel_values = torch.stack([preprocess_image(p.image, image_size) if p.image is not None
                                else torch.zeros(3, image_size, image_size) for p in products])
    modality_mask = torch.tensor([[bool(p.title.strip()), p.image is not None] for p in products])
    attention_mask = torch.from_numpy(attention_mask_from_tokens(tokens))
    return {"pixel_values": pixel_values.to(device), "input_ids": input_ids.to(device),
            "attention_mask": attention_mask.to(device), "modality_mask": modality_mask.to(device)}


def batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def reported(items: Iterator[Product | Problem], report, counts: dict | None = None) -> Iterator[Product]:
    """The products of `items`; each Problem goes to `report` (and is counted as skipped or
    incomplete in `counts`)."""
    for item in items:
        if isinstance(item, Problem):
            report(item)
            if counts is not None:
                counts["skipped" if item.skipped else "incomplete"] += 1
        else:
            yield item


def product_input_parser(command: str, description: str, out_help: str) -> argparse.ArgumentParser:
    """The arguments of the commands that read a model and a product file (predict, explain)."""
    parser = argparse.ArgumentParser(prog=f"cmaclip {command}", description=description)
    parser.add_argument("--checkpoint", required=True, help="a training output_dir or its model/ folder")
    parser.add_argument("--input", required=True, help="products: .jsonl or .csv (the `cmaclip shards` format)")
    parser.add_argument("--image-root", default=None, help="folder relative image paths start from (default: "
                                                            "the input file's folder)")
    parser.add_argument("--text-column", default="text", help="the title field/column")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda[:N]")
    parser.add_argument("--mixed-precision", default="auto", choices=MIXED_PRECISIONS,
                        help="bf16 autocast: auto = on GPUs that compute bf16 natively (train.mixed_precision)")
    return parser


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_with_model(command: str, args, work):
    """predict's and explain's frame: load the checkpoint on the chosen device, return
    work(model, device); a bad input file, checkpoint or request is one line on stderr, exit 2."""
    from cmaclip.checkpoint import load_model
    from cmaclip.distributed import resolve_mixed_precision

    device = resolve_device(args.device)
    bf16 = resolve_mixed_precision(args.mixed_precision, device.type) == "bf16"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return work(load_model(args.checkpoint, device), device)
    except (FileNotFoundError, CatalogError, ValueError) as error:
        print(f"cmaclip {command}: {error}", file=sys.stderr)
        sys.exit(2)
