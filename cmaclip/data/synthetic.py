"""A synthetic photo-and-title product catalogue, for tests and benchmarks of multimodal fusion.

Each product is a drawn shape on a noisy background (the photo) and a noisy title. The tasks are
built so that each modality carries some of them alone:

    task       carried by   photo                             title
    colour     photo only   fill colour of the product        never named (a random, WRONG colour
                                                              word in some titles: noise)
    pattern    photo only   solid / stripes / dots / checks   never named
    category   both         the product's silhouette          named in most titles (or a synonym)
    material   title only   -                                 always named (or a synonym)
    audience   title only   -                                 named in most titles

so a text-only model is at chance on colour and pattern, an image-only model is at chance on
material and audience, and only a model that uses both can get every task right. Titles carry
brand names, filler words and random word order; a few products have no photo or no title.

It writes `catalog.jsonl` + `images/<id>.jpg` in the format `cmaclip shards` reads:

    python -m cmaclip.data.synthetic --out DIR [--products 1500] [--seed 0]
    cmaclip shards --input DIR/catalog.jsonl --tasks colour,pattern,category,material,audience \
        --val-fraction 0.2 --out DIR/shards
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TASKS = ("colour", "pattern", "category", "material", "audience")
COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200),
           "yellow": (230, 200, 40), "purple": (140, 50, 170), "orange": (240, 130, 30)}
PATTERNS = ("solid", "striped", "dotted", "checked")
CATEGORIES = {"shirt": ("shirt", "tee", "top"), "bag": ("bag", "tote", "handbag"),
              "hat": ("hat", "cap", "beanie"), "shoe": ("shoe", "sneaker", "trainer")}
MATERIALS = {"cotton": ("cotton", "organic cotton"), "leather": ("leather", "faux leather"),
             "wool": ("wool", "merino"), "denim": ("denim", "jean"), "silk": ("silk", "satin")}
AUDIENCES = {"men": ("men", "mens"), "women": ("women", "womens"), "kids": ("kids", "junior")}
BRANDS = ("Aster", "Bolt", "Cirro", "Dune", "Elm", "Fable", "Gale", "Hush", "Iris", "Juno", "Kite",
          "Lumen", "Moss", "Nova", "Orca", "Pike", "Quill", "Rune", "Sage", "Tide")
FILLERS = ("new", "classic", "premium", "essential", "everyday", "limited", "edition", "2024",
           "collection", "sale", "original", "slim", "casual", "basic")
GENERIC_ITEM = ("item", "piece", "product")
CATEGORY_NAMED = 0.7        # share of titles that name the category
AUDIENCE_NAMED = 0.85       # share of titles that name the audience
WRONG_COLOUR_WORD = 0.2     # share of titles with a colour word that is not the product's colour
NO_IMAGE = NO_TITLE = 0.02  # share of products without a photo / without a title
IMAGE_SIZE = 96


def draw_product(rng: np.random.Generator, colour: str, pattern: str, category: str) -> Image.Image:
    """The photo: the category's silhouette filled with the colour and the pattern, jittered in
    place and size, on a light noisy background."""
    size = IMAGE_SIZE
    background = rng.integers(200, 250, 3)
    pixels = np.clip(background + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    fill = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, 3), 0, 255)
    # the pattern: a texture in the fill colour, masked by the silhouette
    texture = Image.new("RGB", (size, size), tuple(int(c) for c in fill))
    ink = tuple(int(c) for c in fill // 3)
    drawer = ImageDraw.Draw(texture)
    period = int(rng.integers(9, 13))
    if pattern == "striped":
        for x in range(0, size, period):
            drawer.rectangle([x, 0, x + period // 2 - 1, size], fill=ink)
    elif pattern == "dotted":
        for x in range(period // 2, size, period):
            for y in range(period // 2, size, period):
                drawer.ellipse([x - 2, y - 2, x + 2, y + 2], fill=ink)
    elif pattern == "checked":
        for x in range(0, size, period):
            for y in range(0, size, period):
                if (x // period + y // period) % 2:
                    drawer.rectangle([x, y, x + period - 1, y + period - 1], fill=ink)
    mask = Image.new("L", (size, size), 0)
    outline = ImageDraw.Draw(mask)
    half = size * rng.uniform(0.3, 0.4)
    cx, cy = size / 2 + rng.uniform(-8, 8), size / 2 + rng.uniform(-8, 8)
    if category == "shirt":  # a T: body and sleeves
        outline.rectangle([cx - half * 0.6, cy - half * 0.6, cx + half * 0.6, cy + half], fill=255)
        outline.rectangle([cx - half, cy - half * 0.6, cx + half, cy - half * 0.1], fill=255)
    elif category == "bag":  # a disc with a handle
        outline.ellipse([cx - half, cy - half * 0.6, cx + half, cy + half], fill=255)
        outline.arc([cx - half * 0.5, cy - half * 1.2, cx + half * 0.5, cy], 180, 360, fill=255, width=4)
    elif category == "hat":  # a triangle on a brim
        outline.polygon([(cx - half * 0.7, cy + half * 0.5), (cx + half * 0.7, cy + half * 0.5), (cx, cy - half)],
                        fill=255)
        outline.rectangle([cx - half, cy + half * 0.5, cx + half, cy + half * 0.75], fill=255)
    else:  # shoe: a low wide L
        outline.rectangle([cx - half, cy, cx + half, cy + half * 0.5], fill=255)
        outline.rectangle([cx - half, cy - half * 0.6, cx - half * 0.2, cy], fill=255)
    image.paste(texture, (0, 0), mask)
    return image


def make_title(rng: np.random.Generator, colour: str, category: str, material: str, audience: str) -> str:
    """Brand, material, maybe audience and category, fillers, sometimes a wrong colour word; the
    words after the brand in random order."""
    pick = lambda options: str(options[rng.integers(len(options))])  # noqa: E731
    words = [pick(MATERIALS[material])]
    words.append(pick(CATEGORIES[category]) if rng.random() < CATEGORY_NAMED else pick(GENERIC_ITEM))
    if rng.random() < AUDIENCE_NAMED:
        words.append(pick(AUDIENCES[audience]))
    if rng.random() < WRONG_COLOUR_WORD:
        words.append(pick([c for c in COLOURS if c != colour]))
    words += [pick(FILLERS) for _ in range(rng.integers(0, 4))]
    order = rng.permutation(len(words))
    return " ".join([pick(BRANDS)] + [words[i] for i in order])


def make_product(rng: np.random.Generator, index: int) -> tuple[dict, Image.Image | None]:
    """One catalogue row (JSONL fields) and its photo (None: a product without one)."""
    pick = lambda options: str(list(options)[rng.integers(len(options))])  # noqa: E731
    labels = {"colour": pick(COLOURS), "pattern": pick(PATTERNS), "category": pick(CATEGORIES),
              "material": pick(MATERIALS), "audience": pick(AUDIENCES)}
    title = make_title(rng, labels["colour"], labels["category"], labels["material"], labels["audience"])
    photo = draw_product(rng, labels["colour"], labels["pattern"], labels["category"])
    missing = rng.random()
    if missing < NO_IMAGE:
        photo = None
    elif missing < NO_IMAGE + NO_TITLE:
        title = ""
    row = {"id": f"p{index:06d}", "text": title, "labels": labels}
    if photo is not None:
        row["image"] = f"images/p{index:06d}.jpg"
    return row, photo


def write_catalog(out_dir: str | Path, products: int = 1500, seed: int = 0) -> Path:
    """Write out_dir/catalog.jsonl and out_dir/images/; returns the catalogue's path. The same
    seed and count give the same catalogue."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    path = out_dir / "catalog.jsonl"
    with open(path, "w") as catalog:
        for index in range(products):
            row, photo = make_product(rng, index)
            if photo is not None:
                photo.save(out_dir / row["image"], quality=90)
            catalog.write(json.dumps(row) + "\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cmaclip.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for catalog.jsonl and images/")
    parser.add_argument("--products", type=int, default=1500, help="number of products (default 1500)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.products < 1:
        parser.error(f"--products must be >= 1, got {args.products}")
    path = write_catalog(args.out, args.products, args.seed)
    print(f"wrote {path} ({args.products} products); tasks: {','.join(TASKS)}")


if __name__ == "__main__":
    main()
