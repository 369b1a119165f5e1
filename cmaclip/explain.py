"""`cmaclip explain`: which title token looks where in the image (the paper's Figure 2), for the
products of a JSONL/CSV file: one PNG each and explanations.json. How the token and its map are
found and drawn: pictures.py.
"""
from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

import numpy as np
import torch

from cmaclip.errors import command
from cmaclip.pictures import draw_explanation, piece_at, relevant_tokens, title_pieces
from cmaclip.products import batched, encode_products, product_input_parser, read_products, reported, run_with_model


def file_name(product_id: str, taken: set[str]) -> str:
    """A safe, unique PNG name for a product id."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", product_id).strip("._") or "product"
    name, number = f"{stem}.png", 2
    while name in taken:
        name, number = f"{stem}-{number}.png", number + 1
    taken.add(name)
    return name


@torch.no_grad()
def explain_products(model, products: list, tokenizer, device) -> list[dict]:
    """One forward with explicit attention weights for a batch of products (all with an image);
    -> per product: the marked piece, its attention mass, the pieces, the patch map."""
    inputs = encode_products(products, tokenizer, model.config.image_size, device)
    output = model(**inputs, return_attentions=True)
    best, mass, maps = relevant_tokens(output.attentions[-1], inputs["attention_mask"][:, :output.text_length])
    return [{"pieces": title_pieces(tokenizer, inputs["input_ids"][row].cpu().numpy()),
             "marked": piece_at(int(best[row])),
             "mass": float(mass[row]), "map": maps[row].cpu().numpy()} for row in range(len(products))]


def explain_file(model, input_path, out_dir, *, image_root=None, text_column: str = "text", limit: int = 16,
                 batch_size: int = 8, device="cpu", report=lambda message: print(message, file=sys.stderr)) -> list[dict]:
    """Draw the first `limit` products of `input_path` that have an image into `out_dir`; writes
    PNGs and explanations.json (id, png, token, mass, patch map). -> its rows."""
    from cmaclip.data.tokenizer import load_tokenizer
    from cmaclip.files import write_json_atomic
    if model.sequence_attention is None:
        raise ValueError(f"model.fusion={model.config.fusion!r} has no sequence-wise attention to draw; "
                         "explain a cma or cma-no-modality model")
    tokenizer = load_tokenizer(model.config.context_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def with_image(products):
        for product in products:
            if product.image is None:
                report(f"line {product.line} (id {product.id}): no usable image to draw the attention on; skipped")
            else:
                yield product

    drawable = itertools.islice(with_image(reported(read_products(input_path, image_root, text_column), report)), limit)
    rows, taken = [], set()
    for products in batched(drawable, batch_size):
        for product, found in zip(products, explain_products(model, products, tokenizer, device)):
            name = file_name(product.id, taken)
            picture = draw_explanation(product.image, found["pieces"], found["marked"], found["map"], found["mass"])
            temporary = out_dir / f".{name}.tmp"
            picture.save(temporary, format="PNG")
            temporary.replace(out_dir / name)
            token = found["pieces"][found["marked"]][0] if found["marked"] >= 0 else None
            rows.append({"id": product.id, "line": product.line, "png": name, "title": product.title,
                         "token": token, "attention_on_image": round(found["mass"], 6),
                         "patch_map": np.round(found["map"], 6).tolist()})
    write_json_atomic(out_dir / "explanations.json", {"explanations": rows})
    return rows


def parse_args(argv):
    parser = product_input_parser("explain", __doc__.split("\n")[0], "folder for the PNGs and explanations.json")
    parser.add_argument("--limit", type=int, default=16, help="draw at most this many products")
    args = parser.parse_args(argv)
    if args.limit < 1:
        parser.error("--limit must be >= 1")
    return args


@command("cmaclip explain")
def main(argv=None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rows = run_with_model("explain", args, lambda model, device: explain_file(
        model, args.input, args.out, image_root=args.image_root, text_column=args.text_column,
        limit=args.limit, device=device))
    print(f"drew {len(rows)} pictures into {args.out} (index: {Path(args.out) / 'explanations.json'})")
