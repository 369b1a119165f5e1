"""`cmaclip predict`: attribute predictions for the products of a JSONL/CSV file.

    cmaclip predict --checkpoint runs/x --input products.jsonl --out preds.jsonl

Input: the catalogue format of `cmaclip shards` (docs/INTERFACE.md), labels not needed. Every
product that has a usable title or image is predicted; a missing one is simply absent for the
model (modality weight 0). Problems are reported on stderr naming the line and the field:
- an image that is given but cannot be read (not found, corrupt): predicted from the title alone,
  and the line says so (`"missing": ["image"]` in the output too);
- a row with no id, malformed JSON/CSV, or neither a usable title nor image: skipped.
The output is written to a temporary file next to --out and renamed at the end, so an existing
preds.jsonl is never left half-written.

One output line per product:
  {"id": str, "line": int, "missing": [modality...],
   "predictions": {task: {"label": str, "confidence": f, "top_k": [{"label", "confidence"}...],
                          "modality_weights": {"text": f, "image": f}}}}
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from cmaclip.data.format import IMAGE, MODALITIES, TEXT
from cmaclip.errors import command


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


def read_rows(path: Path, text_column: str):
    """(line, id, fields | error) per record, parsed by the catalogue reader of `cmaclip shards`."""
    from cmaclip.data.catalog import CatalogError, read_csv_records, read_jsonl_records

    if not path.is_file():
        raise FileNotFoundError(f"{path}: input file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl_records(path, [], text_column)
    if suffix in (".csv", ".tsv"):
        return read_csv_records(path, [], text_column, delimiter="\t" if suffix == ".tsv" else ",")
    raise CatalogError(f"{path}: unknown input type {suffix!r} (expected .jsonl or .csv)")


def open_image(path: Path) -> Image.Image:
    """The photo, fully decoded and upright; BadRow (with the reason) when it cannot be used."""
    from cmaclip.data.catalog import prepare_image

    data, _ = prepare_image(path, max_side=0)  # validates the whole file, bakes in EXIF rotation
    return Image.open(io.BytesIO(data)).convert("RGB")


def read_products(path: str | Path, image_root: str | Path | None = None,
                  text_column: str = "text") -> Iterator[Product | Problem]:
    """The file's products, in order, and a Problem for each thing that went wrong."""
    from cmaclip.data.catalog import BadRow, id_text

    path = Path(path)
    image_root = Path(image_root) if image_root is not None else path.parent
    for line, raw_id, fields in read_rows(path, text_column):
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
    from cmaclip.data.loader import attention_mask
    from cmaclip.data.pil import preprocess_image

    input_ids = torch.from_numpy(tokenizer.encode([p.title if p.title.strip() else "" for p in products])).long()
    pixel_values = torch.stack([preprocess_image(p.image, image_size) if p.image is not None
                                else torch.zeros(3, image_size, image_size) for p in products])
    modality_mask = torch.tensor([[bool(p.title.strip()), p.image is not None] for p in products])
    return {"pixel_values": pixel_values.to(device), "input_ids": input_ids.to(device),
            "attention_mask": attention_mask(input_ids).to(device), "modality_mask": modality_mask.to(device)}


def batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def prediction_lines(model, products: list[Product], output, top_k: int) -> list[dict]:
    tasks = model.tasks
    lines = [{"id": p.id, "line": p.line, "missing": p.missing, "predictions": {}} for p in products]
    for k, (task, classes) in enumerate(tasks.items()):
        probabilities = output.logits[task].float().softmax(dim=-1).cpu()
        top = probabilities.topk(min(top_k, len(classes)), dim=-1)
        weights = output.modality_weights[:, k].float().cpu()
        for row, line in enumerate(lines):
            ranked = [{"label": classes[c], "confidence": round(float(p), 6)}
                      for p, c in zip(top.values[row], top.indices[row])]
            line["predictions"][task] = {
                "label": ranked[0]["label"], "confidence": ranked[0]["confidence"], "top_k": ranked,
                "modality_weights": {MODALITIES[m]: round(float(weights[row, m]), 6) for m in (TEXT, IMAGE)},
            }
    return lines


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


@torch.no_grad()
def predict_file(model, input_path, out_path, *, image_root=None, text_column: str = "text", batch_size: int = 32,
                 top_k: int = 3, device="cpu", report=lambda problem: print(problem, file=sys.stderr)) -> dict:
    """Predict every product of `input_path` into `out_path` (JSONL, atomic). -> counts."""
    from cmaclip.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model.config.context_length)
    counts = {"predicted": 0, "skipped": 0, "incomplete": 0}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=out_path.name + ".", suffix=".tmp", dir=out_path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            products = reported(read_products(input_path, image_root, text_column), report, counts)
            for products in batched(products, batch_size):
                output = model(**encode_products(products, tokenizer, model.config.image_size, device))
                for line in prediction_lines(model, products, output, top_k):
                    out.write(json.dumps(line, ensure_ascii=False) + "\n")
                counts["predicted"] += len(products)
        os.replace(temporary, out_path)
    except BaseException:
        os.unlink(temporary)
        raise
    return counts


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
    parser.add_argument("--mixed-precision", default="auto", choices=("auto", "bf16", "no"),
                        help="bf16 autocast: auto = on GPUs that compute bf16 natively (train.mixed_precision)")
    return parser


def parse_args(argv):
    parser = product_input_parser("predict", __doc__.split("\n")[0], "predictions, JSONL")
    parser.epilog = ("With --shards DIR instead of --input: a split of a shards folder on any number of ranks, "
                     "into Parquet parts (cmaclip predict --shards DIR --help)")
    parser.add_argument("--top-k", type=int, default=3, help="classes listed per task")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser.error("--top-k and --batch-size must be >= 1")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_with_model(command: str, args, work):
    """predict's and explain's frame: load the checkpoint on the chosen device, return
    work(model, device); a bad input file, checkpoint or request is one line on stderr, exit 2."""
    from cmaclip.checkpoint import load_model
    from cmaclip.data.catalog import CatalogError

    from cmaclip.distributed import resolve_mixed_precision

    device = resolve_device(args.device)
    bf16 = resolve_mixed_precision(args.mixed_precision, device.type) == "bf16"
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return work(load_model(args.checkpoint, device), device)
    except (FileNotFoundError, CatalogError, ValueError) as error:
        print(f"cmaclip {command}: {error}", file=sys.stderr)
        sys.exit(2)


@command("cmaclip predict")
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg == "--shards" or arg.startswith("--shards=") for arg in argv):
        from cmaclip import batch_predict  # a split of a shards folder, on any number of ranks

        return batch_predict.main(argv)
    args = parse_args(argv)
    counts = run_with_model("predict", args, lambda model, device: predict_file(
        model, args.input, args.out, image_root=args.image_root, text_column=args.text_column,
        batch_size=args.batch_size, top_k=args.top_k, device=device))
    notes = [f"{counts['incomplete']} with a problem field (listed above)"] if counts["incomplete"] else []
    notes += [f"{counts['skipped']} rows skipped (listed above)"] if counts["skipped"] else []
    print(f"predicted {counts['predicted']} products -> {args.out}" + (f"; {', '.join(notes)}" if notes else ""))


if __name__ == "__main__":
    main()
