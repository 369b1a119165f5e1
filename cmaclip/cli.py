"""The `cmaclip` console script: picks a subcommand and hands it the rest of the command line.

Each subcommand lives in its own module with a `main(argv)` that owns its arguments, so this file
stays a table and importing it is cheap (torch, DALI and DeepSpeed load only for the command run).
"""
import importlib
import sys

COMMANDS = {
    "shards": ("cmaclip.data.shards", "turn a product catalogue (JSONL/CSV) into WebDataset shards"),
    "train": ("cmaclip.train", "train a model from a YAML config (also: accelerate launch -m cmaclip.train)"),
    "pretrain": ("cmaclip.pretrain", "contrastive image-title pretraining of the CLIP backbone (exports a CLIP folder)"),
    "eval": ("cmaclip.evaluate", "evaluate a checkpoint on a split of a shards folder"),
    "predict": ("cmaclip.predict", "predict attributes for products in a JSONL/CSV file or a shards folder"),
    "calibrate": ("cmaclip.calibrate", "fit auto-fill thresholds at a target precision (calibration.json)"),
    "explain": ("cmaclip.explain", "draw attention-map pictures (the paper's Figure 2)"),
    "ablate": ("cmaclip.ablate", "train and evaluate the five fusion variants (the paper's Table 6)"),
}


def usage() -> str:
    lines = ["usage: cmaclip COMMAND [args]  (cmaclip COMMAND --help for its arguments)", "", "commands:"]
    lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"cmaclip: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name][0])
    module.main(rest)


if __name__ == "__main__":
    main()
