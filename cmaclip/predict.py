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

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from cmaclip.data.format import IMAGE, MODALITIES, TEXT
from cmaclip.errors import command
from cmaclip.products import (Product, batched, encode_products, product_input_parser, read_products, reported,
                              run_with_model)


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
