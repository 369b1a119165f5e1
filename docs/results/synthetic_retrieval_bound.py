"""The best retrieval recall@k any model can reach on the synthetic catalogue's val pairs
(docs/RESULTS.md, contrastive pretraining). A photo and its title share only what
cmaclip/data/synthetic.py puts in both: the category (when the title names it) and the title's
colour word (never the product's colour). A model that reads all of it off both sides can only
rank the candidates consistent with it first, in random order; its expected recall@k is
min(1, k / consistent candidates), averaged over the pairs.

    python docs/results/synthetic_retrieval_bound.py runs/synth/catalog.jsonl [VAL_FRACTION]
"""
import json
import sys

from cmaclip.data.shards import assign_split
from cmaclip.data.synthetic import CATEGORIES, COLOURS

path, val_fraction = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 0.2
with open(path) as f:
    rows = [json.loads(line) for line in f]
pairs = [row for row in rows if assign_split(row["id"], val_fraction, 0.0) == "val" and row["text"] and row.get("image")]
synonym = {word: category for category, words in CATEGORIES.items() for word in words}


def shared(row):
    """(category, colour) of the photo; (category named or None, colour words) of the title."""
    words = row["text"].lower().split()
    named = next((synonym[word] for word in words if word in synonym), None)
    return row["labels"]["category"], row["labels"]["colour"], named, {word for word in words if word in COLOURS}


facts = [shared(row) for row in pairs]


def consistent(photo, title) -> bool:
    return title[2] in (None, photo[0]) and photo[1] not in title[3]


for k in (1, 5):
    image_to_title = sum(min(1, k / sum(consistent(a, b) for b in facts)) for a in facts) / len(facts)
    title_to_image = sum(min(1, k / sum(consistent(a, b) for a in facts)) for b in facts) / len(facts)
    print(f"{len(facts)} val pairs: chance recall@{k} {100 * k / len(facts):.2f}%, best possible "
          f"image->title {100 * image_to_title:.2f}%, title->image {100 * title_to_image:.2f}%")
