"""Contrastive pretraining of the CLIP backbone on the catalogue's image–title pairs:
`cmaclip pretrain --config FILE.yaml [key.sub=value ...]`, or the same code under
`accelerate launch [flags] -m cmaclip.pretrain --config FILE.yaml [key.sub=value ...]`.

The loop, loaders, checkpoints, resume, DeepSpeed and launchers are `cmaclip train`'s (train.py):
this file only supplies the objective. Labels are ignored: every training row with both an image
and a title is a pair. The loss (`pretrain.loss`: CLIP's InfoNCE or SigLIP's sigmoid, in
cmaclip/model/contrastive.py) takes the whole global batch as negatives, gathered across ranks.
Evaluation is retrieval on the validation split: image->title and title->image recall@1/5 among
all its pairs. The export, output_dir/model/, is a Hugging Face CLIPModel folder that
`model.pretrained=<folder>` loads for CMA-CLIP fine-tuning.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from cmaclip.distributed import gather_with_grad
from cmaclip.errors import command
from cmaclip.train import Objective, command_line

DESCRIPTION = ("Pretrain the CLIP backbone contrastively on the shards' image-title pairs (labels ignored); "
               "the same command runs under `accelerate launch -m cmaclip.pretrain` on any number of processes "
               "and nodes. Exports a Hugging Face CLIP folder for `model.pretrained=`.")
RECALL_AT = (1, 5)


def build_model(config, dataset):
    from cmaclip.model.contrastive import ContrastiveCLIP

    return ContrastiveCLIP(config.model, config.pretrain)


def pair_mask(batch: dict) -> torch.Tensor:
    """The batch's modality_mask with the loader's padding rows (index -1) marked empty: a padding
    row repeats a real sample, which would be its own false negative."""
    return batch["modality_mask"] & (batch["index"] >= 0)[:, None]


def contrastive_loss(model, batch):
    output = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], pair_mask(batch),
                   gather=gather_with_grad)
    return output.loss, [1.0 / output.logit_scale]


@dataclass
class RetrievalResult:
    num_pairs: int
    recalls: dict[str, float]  # e.g. image_to_title_recall@1 -> fraction

    def summary(self) -> str:
        values = ", ".join(f"{name} {value:.3f}" for name, value in self.recalls.items())
        return f"retrieval ({self.num_pairs} pairs, chance recall@1 {1 / max(self.num_pairs, 1):.3f}): {values}"


def recall_at(similarity: torch.Tensor, k: int) -> float:
    """Fraction of rows whose own column (the diagonal) is among their k highest scores."""
    own = similarity.diagonal()[:, None]
    rank = (similarity > own).sum(-1)  # ties count in the row's favour
    return (rank < k).float().mean().item()


@torch.no_grad()
def evaluate_retrieval(model, loader, accelerator) -> RetrievalResult:
    """Every validation pair against every other: features from all ranks, padding rows dropped.
    Call it on EVERY rank (collectives inside; ZeRO-3 needs every rank's forward)."""
    was_training = model.training
    model.eval()
    images, titles = [], []
    for batch in loader:
        mask = pair_mask(batch)
        output = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], mask)
        keep = accelerator.gather(mask.all(-1).int()).bool()
        images.append(accelerator.gather(output.image_features.float())[keep])
        titles.append(accelerator.gather(output.text_features.float())[keep])
    model.train(was_training)
    image, title = torch.cat(images), torch.cat(titles)
    similarity = image @ title.T
    recalls = {f"{direction}_recall@{k}": recall_at(scores, k)
               for direction, scores in (("image_to_title", similarity), ("title_to_image", similarity.T))
               for k in RECALL_AT}
    return RetrievalResult(len(image), recalls)


def log_retrieval(writer, result: RetrievalResult, step: int) -> None:
    """TensorBoard: eval/<image_to_title|title_to_image>_recall@<1|5>. None (ranks > 0): nothing."""
    if writer is None:
        return
    for name, value in result.recalls.items():
        writer.add_scalar(f"eval/{name}", value, step)


PRETRAIN = Objective(build_model=build_model, loss=contrastive_loss, stat_names=lambda model: ["temperature"],
                     evaluate=evaluate_retrieval, log_evaluation=log_retrieval)


@command("cmaclip pretrain")
def main(argv=None) -> None:
    command_line(sys.argv[1:] if argv is None else argv, "cmaclip pretrain", DESCRIPTION, PRETRAIN)


if __name__ == "__main__":
    main()
