"""Linear probe of a CLIP backbone's frozen embeddings (docs/RESULTS.md, contrastive pretraining):
per task, a multinomial logistic regression (standardised features, L2 1e-3, L-BFGS) fitted on
the train split's title EOT / image [CLS] embeddings (eval transform) and scored on the val split.
It says how much of each label a backbone's features carry before any fine-tuning.

    python docs/results/linear_probe.py SHARDS BACKBONE        # a `cmaclip pretrain` export (its model/)
    python docs/results/linear_probe.py SHARDS random:SIZE:SEED  # the tiny preset at random init
"""
import sys

import torch
import torch.nn.functional as F

from cmaclip.data.config import DataConfig
from cmaclip.data.loader import build_loader
from cmaclip.model.backbone import CLIPBackbone, eot_positions
from cmaclip.model.config import ModelConfig, preset_clip_config


def embeddings(backbone, shards, split):
    """-> text [N, W], image [N, W], labels [N, K] of the split's real rows."""
    size = backbone.clip_config.vision_config.image_size
    loader = build_loader(shards, split, config=DataConfig(loader="pil", workers=0), batch_size=64,
                          image_size=size, train=False)
    texts, images, labels = [], [], []
    with torch.no_grad():
        for batch in loader:
            real = batch["index"] >= 0
            eot = eot_positions(batch["attention_mask"])
            texts.append(backbone.encode_text(batch["input_ids"])[torch.arange(len(eot)), eot][real])
            images.append(backbone.encode_image(batch["pixel_values"])[:, 0][real])
            labels.append(batch["labels"][real])
    return torch.cat(texts), torch.cat(images), torch.cat(labels)


def probe(train_x, train_y, val_x, val_y) -> list[float]:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    accuracies = []
    for task in range(train_y.shape[1]):
        labelled, scored = train_y[:, task] >= 0, val_y[:, task] >= 0
        classes = int(max(train_y[:, task].max(), val_y[:, task].max())) + 1
        weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
        bias = torch.zeros(classes, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(train_x[labelled] @ weight + bias, train_y[labelled, task]) + 1e-3 * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        predicted = (val_x[scored] @ weight + bias).argmax(-1)
        accuracies.append((predicted == val_y[scored, task]).float().mean().item())
    return accuracies


def main(shards: str, which: str) -> None:
    if which.startswith("random:"):
        _, size, seed = which.split(":")
        torch.manual_seed(int(seed))
        backbone = CLIPBackbone(preset_clip_config(ModelConfig(image_size=int(size))))
    else:
        backbone = CLIPBackbone.from_pretrained(which)
    backbone.eval()
    train, val = embeddings(backbone, shards, "train"), embeddings(backbone, shards, "val")
    for name, column in (("text", 0), ("image", 1)):
        accuracies = probe(train[column], train[2], val[column], val[2])
        print(f"{which} {name} probe: mean {100 * sum(accuracies) / len(accuracies):.1f} | "
              + " ".join(f"{100 * value:.1f}" for value in accuracies))


if __name__ == "__main__":
    main(*sys.argv[1:3])
