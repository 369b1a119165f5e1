"""A catalogue's labelled subset, for the "many pairs, few labels" measurements of docs/RESULTS.md:
every val row and a fixed fraction of the train rows (chosen by a hash of the id), each with the
split it gets in the full catalogue's shards (`cmaclip shards` hashes the id the same way), written
as an explicit `split` column / key so that the subset's val split is the full one's.

    python docs/results/labelled_subset.py CATALOGUE(.csv|.jsonl) OUT FRACTION VAL_FRACTION
    cmaclip shards --input OUT --image-root <the catalogue's folder> --vocab-from <full shards> ...
"""
import csv
import hashlib
import json
import sys

from cmaclip.data.shards import assign_split

source, out, fraction, val_fraction = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
jsonl = source.endswith(".jsonl")
with open(source, newline="") as f:
    rows = [json.loads(line) for line in f] if jsonl else list(csv.DictReader(f))
for row in rows:
    row["split"] = assign_split(str(row["id"]), val_fraction, 0.0)
train = sorted((row for row in rows if row["split"] == "train"),
               key=lambda row: hashlib.sha256(f"labelled:{row['id']}".encode()).digest())
labelled = {row["id"] for row in train[:round(fraction * len(train))]}
rows = [row for row in rows if row["split"] == "val" or row["id"] in labelled]
with open(out, "w", newline="") as f:
    if jsonl:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    else:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
print(f"{out}: {len(labelled)} labelled train rows of {len(train)}, "
      f"{sum(row['split'] == 'val' for row in rows)} val rows")
