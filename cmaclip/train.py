"""Training: `cmaclip train --config FILE.yaml [key.sub=value ...]`, or the same code under
`accelerate launch [flags] -m cmaclip.train --config FILE.yaml [key.sub=value ...]`.

One loop for every launcher: a single process, DDP over gloo (CPU) or NCCL (GPU), DeepSpeed
ZeRO-1/2/3 (the accelerate config names the ds_config; its "auto" values come from our config).
Each step: `grad_accum_steps` micro-batches from the rank's own loader shard, AdamW with one
learning rate for the CLIP backbone and one for the new layers, warmup + cosine. Around it:
TensorBoard and a progress bar on rank 0, periodic evaluation, atomic checkpoints every
`train.save_every` steps, a clean stop on SIGUSR1 or SIGTERM, and the export of the final model.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from cmaclip import checkpoint, resume, runlock, runlog
from cmaclip.config import ConfigError, OptimConfig, RunConfig, keys_reference, load_config, to_dict, to_yaml
from cmaclip.data.batch import model_inputs
from cmaclip.data.loader import backend_reason, build_loader
from cmaclip.distributed import (StopRequest, adamw_implementation, die_with_launcher, fill_deepspeed_config,
                                 make_accelerator, quiet_libraries, shutdown, uses_deepspeed)
from cmaclip.errors import command
from cmaclip.guard import NonFiniteGuard
from cmaclip.telemetry import Telemetry

# Parameters of these modules never get weight decay (nor do biases, other 1-d parameters, and
# learned vectors named *embedding: position, class and modality embeddings).
NO_DECAY_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.Embedding, nn.modules.batchnorm._BatchNorm)


# ---- optimizer and schedule ------------------------------------------------------------------------

def parameter_groups(model, optim: OptimConfig) -> list[dict]:
    """AdamW groups: backbone / new layers x decay / no decay (empty groups left out)."""
    backbone = {id(p) for p in model.backbone.parameters()}
    no_decay = {id(p) for module in model.modules() if isinstance(module, NO_DECAY_MODULES)
                for p in module.parameters(recurse=False)}
    groups: dict[tuple[str, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "backbone" if id(parameter) in backbone else "new"
        decay = not (parameter.ndim < 2 or id(parameter) in no_decay or name.endswith("embedding"))
        groups.setdefault((part, decay), []).append(parameter)
    return [
        {"params": params, "name": f"{part}{'' if decay else '_no_decay'}", "part": part,
         "lr": optim.backbone_lr if part == "backbone" else optim.lr,
         "weight_decay": optim.weight_decay if decay else 0.0}
        for (part, decay), params in sorted(groups.items())
    ]


def build_optimizer(model, optim: OptimConfig, **implementation) -> torch.optim.AdamW:
    """implementation: AdamW's fused / foreach flags (distributed.adamw_implementation)."""
    return torch.optim.AdamW(parameter_groups(model, optim), betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             **implementation)


def lr_factor(step: int, start: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for the update of (0-based) optimizer step `step`:
    0 before `start`, then a linear warmup over `warmup` steps, then a cosine down to `min_ratio`
    at `total`."""
    if step < start:
        return 0.0
    step -= start
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - start - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, optim: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The backbone's schedule starts after `freeze_backbone_steps` (its lr is 0 until then)."""
    def factor_for(group):
        start = optim.freeze_backbone_steps if group["part"] == "backbone" else 0
        return lambda step: lr_factor(step, start, optim.warmup_steps, max_steps, optim.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor_for(group) for group in optimizer.param_groups])


# ---- what the loop trains ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Objective:
    """What the shared loop trains: `cmaclip train` (FINE_TUNE) and `cmaclip pretrain`
    (cmaclip/pretrain.py) differ only in these. A model has `.backbone` (CLIPBackbone, for the
    learning rates and DeepSpeed's bucket sizes), `.config.image_size` and `save_pretrained`."""

    build_model: Callable  # (config: RunConfig, dataset: DatasetInfo) -> model
    loss: Callable  # (model, batch) -> (loss, [per-rank scalars named by stat_names]), all 0-dim tensors
    stat_names: Callable  # (model) -> names of the loss's extra scalars (train/<name> in TensorBoard)
    evaluate: Callable  # (model, eval loader, accelerator) -> result with .summary(); every rank calls it
    log_evaluation: Callable  # (writer or None, result, step)


def _build_cmaclip(config: RunConfig, dataset):
    from cmaclip.model import CMAClip

    return CMAClip(config.model, dataset.tasks)


def _supervised_loss(model, batch):
    output = model(**model_inputs(batch, with_labels=True, with_host_facts=True))
    return output.loss, list(output.task_losses.values())


def _evaluate_cmaclip(model, loader, accelerator):
    from cmaclip.evaluate import evaluate_model

    return evaluate_model(model, loader, accelerator)


def _log_cmaclip_evaluation(writer, result, step):
    from cmaclip.evaluate import log_evaluation

    log_evaluation(writer, result, step)


FINE_TUNE = Objective(build_model=_build_cmaclip, loss=_supervised_loss,
                      stat_names=lambda model: [f"loss_{task}" for task in model.task_names],
                      evaluate=_evaluate_cmaclip, log_evaluation=_log_cmaclip_evaluation)


# ---- one step ----------------------------------------------------------------------------------------

def endless(loader):
    """Batches across epoch boundaries (each `iter` is the rest of the loader's current epoch)."""
    while True:
        yield from loader


class StepStats:
    """Sums since the last log, per rank; `reduce` averages them over steps and ranks."""

    def __init__(self, names: list[str]):
        self.names = names  # the per-step scalars besides the loss
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.loss = 0.0
        self.task_losses = [0.0] * len(self.names)
        self.data_wait = 0.0
        self.step_time = 0.0
        self.started = time.perf_counter()

    def add(self, loss: float, task_losses: list[float], data_wait: float, step_time: float) -> None:
        self.steps += 1
        self.loss += loss
        self.task_losses = [total + value for total, value in zip(self.task_losses, task_losses)]
        self.data_wait += data_wait
        self.step_time += step_time

    def reduce(self, accelerator) -> dict[str, float]:
        """Every rank calls it at the same step (a collective). Means over steps and ranks."""
        local = torch.tensor([self.loss, *self.task_losses, self.data_wait, self.step_time],
                             dtype=torch.float64, device=accelerator.device)
        total = accelerator.reduce(local, reduction="sum") / (self.steps * accelerator.num_processes)
        values = total.tolist()
        k = len(self.names)
        return {"loss": values[0], **{name: values[1 + i] for i, name in enumerate(self.names)},
                "data_wait_fraction": values[k + 1] / max(values[k + 2], 1e-12)}


def train_step(model, optimizer, scheduler, batches, accelerator, config: RunConfig, guard: NonFiniteGuard,
               objective: Objective = FINE_TUNE):
    """One optimizer step over `grad_accum_steps` micro-batches (skipped by `guard` if non-finite).
    -> (mean loss, mean task losses, seconds waiting for data), all of this rank."""
    sums, data_wait = 0.0, 0.0  # sums: [loss, *task losses] in float64 on the device
    accumulation = config.train.grad_accum_steps
    for _ in range(accumulation):
        waited = time.perf_counter()
        # The loader's randomness is its own (seeded, restored from its state_dict); whatever it
        # draws from torch's global generator (a DataLoader takes a base seed from it) must not
        # shift the model's dropout, or a resumed run would differ from an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            batch = next(batches)
        data_wait += time.perf_counter() - waited
        with accelerator.accumulate(model):
            loss, extras = objective.loss(model, batch)
            # DeepSpeed steps in here (clipping per gradient_clipping in the ds_config)
            accelerator.backward(loss)
        # summed on the device and read once per step: one host sync, not one per task and micro-batch
        sums = sums + torch.stack([loss.detach(), *extras]).double()
    applied, (loss, *task_losses) = guard.step(model, optimizer, accelerator, config.optim.grad_clip,
                                               sums / accumulation, deepspeed=uses_deepspeed(accelerator))
    if applied:
        scheduler.step()
    return loss, task_losses, data_wait


# ---- the run -------------------------------------------------------------------------------------------

class Monitor:
    """Rank 0's outputs: TensorBoard scalars, progress (a bar in a terminal, a line per logging
    step in a log file, where a bar's redraws pile up on one line), one line per evaluation."""

    def __init__(self, config: RunConfig, accelerator, start_step: int):
        self.enabled = accelerator.is_main_process
        self.writer = self.bar = None
        self.max_steps = config.train.max_steps
        show_progress = self.enabled and config.logging.progress_bar
        self.step_lines = show_progress and not sys.stderr.isatty()
        if self.enabled and config.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides what a preempted run logged after its last checkpoint
            self.writer = SummaryWriter(str(Path(config.output_dir) / checkpoint.TENSORBOARD_DIR),
                                        purge_step=start_step + 1 if start_step else None)
        if show_progress and not self.step_lines:
            from tqdm import tqdm

            self.bar = tqdm(total=config.train.max_steps, initial=start_step, desc="train", dynamic_ncols=True,
                            unit="step")

    def log_step(self, values: dict[str, float], step: int, efficiency: str = "") -> None:
        """A logging step's values (means over its window and all ranks); `efficiency` ends its line."""
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"train/{name}", value, step)
        if self.step_lines:
            print(f"step {step}/{self.max_steps}: loss {values['loss']:.4f}, "
                  f"{values['samples_per_second']:.1f} samples/s, lr {values['lr']:.2e}, "
                  f"waiting for data {values['data_wait_fraction']:.0%}{efficiency}", flush=True)

    def progress(self, loss: float, samples_per_second: float | None) -> None:
        """samples_per_second: the latest measurement (None until the first log step)."""
        if self.bar is not None:
            postfix = {"loss": f"{loss:.4f}"}
            if samples_per_second is not None:
                postfix["samples/s"] = f"{samples_per_second:.1f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def line(self, text: str) -> None:
        """A notice: on the terminal, and in train.log."""
        if not self.enabled:
            return
        runlog.log.info(text)
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def build_loaders(config: RunConfig, accelerator, dataset, image_size: int):
    """The train loader and (if the split exists and is not empty) the eval loader, both sharded
    by rank here: they are never passed to accelerator.prepare, which would shard them again."""

    common = dict(config=config.data, batch_size=config.train.batch_size, image_size=image_size,
                  rank=accelerator.process_index, world_size=accelerator.num_processes,
                  seed=config.train.seed, device=accelerator.device)
    train_loader = build_loader(config.data.shards, config.data.train_split, train=True, **common)
    eval_loader = None
    split = dataset.splits.get(config.data.eval_split)
    if split is not None and split.samples > 0:
        eval_loader = build_loader(config.data.shards, config.data.eval_split, train=False, **common)
    return train_loader, eval_loader


def fit(config: RunConfig, objective: Objective = FINE_TUNE) -> int:
    """Run (or continue) the training `config` describes, start to end: set up, train to
    train.max_steps (or a stop signal), finish. Returns the step it stopped at."""
    quiet_libraries()
    die_with_launcher()
    accelerator = make_accelerator(config)
    finished = False
    try:
        with runlock.held(config.output_dir, accelerator.is_main_process), \
                runlog.writing(config.output_dir, accelerator.is_main_process):
            run = _setup(config, accelerator, objective)
            if _train_steps(run):
                _finish(run)
        finished = True
        return run.step
    finally:
        shutdown(accelerator, wait=finished)


@dataclass
class _Run:
    """One run's live state between _setup and _finish (what it saves: checkpoint.RunState)."""

    config: RunConfig
    accelerator: object
    objective: Objective
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: object
    eval_loader: object | None
    telemetry: Telemetry
    monitor: Monitor
    step: int
    saved_step: int | None  # the step of the newest checkpoint this run has (saved or resumed from)
    saved: Path | None

    def evaluate(self) -> None:
        # evaluation never shifts the training's random stream: a run with and without periodic
        # evaluation trains identically
        with torch.random.fork_rng(devices=[]):
            result = self.objective.evaluate(self.model, self.eval_loader, self.accelerator)
        self.objective.log_evaluation(self.monitor.writer, result, self.step)
        self.monitor.line(f"step {self.step}: {result.summary()}")

    def save(self) -> Path:
        state = checkpoint.RunState(step=self.step, world_size=self.accelerator.num_processes,
                                    config=to_dict(self.config), loader=self.train_loader.state_dict())
        self.saved_step, self.saved = self.step, checkpoint.save_checkpoint(
            self.accelerator, self.config.output_dir, state, self.config.train.keep_last)
        return self.saved


def _setup(config: RunConfig, accelerator, objective: Objective) -> _Run:
    """Model, loaders, optimizer and schedule, prepared by Accelerate; the checkpoint resumed; the
    run's opening lines."""
    from accelerate.utils import set_seed

    from cmaclip.data.format import load_dataset_info

    output_dir = Path(config.output_dir)
    runlog.log.info(f"start: {accelerator.num_processes} process(es), output_dir {output_dir}, "
                    f"train.resume={config.train.resume!r}, train.max_steps={config.train.max_steps}")
    resume_from = checkpoint.resolve_resume(config.train.resume, output_dir)
    set_seed(config.train.seed)  # the same initial weights on every rank
    dataset = load_dataset_info(config.data.shards)
    with accelerator.main_process_first():  # fills the hub cache once (model.pretrained), then the rest read it
        model = objective.build_model(config, dataset)
    train_loader, eval_loader = build_loaders(config, accelerator, dataset, model.config.image_size)
    telemetry = Telemetry(model, config, accelerator)  # counts on the plain model: before prepare
    optimizer = build_optimizer(model, config.optim, **adamw_implementation(accelerator))
    scheduler = build_scheduler(optimizer, config.optim, config.train.max_steps)
    runlog.log.info(optimizer_groups_line(optimizer))
    if uses_deepspeed(accelerator):
        clip = model.backbone.clip_config
        fill_deepspeed_config(accelerator, config,
                              hidden_size=max(clip.text_config.hidden_size, clip.vision_config.hidden_size))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    step, notes = 0, []
    if resume_from is not None:
        resume_from, resumed = resume.load(accelerator, config, resume_from, train_loader, log=notes.append)
        step = resumed.step
    if accelerator.is_main_process:
        resume.record_config(output_dir, config)
        (output_dir / checkpoint.PREEMPTED_MARKER).unlink(missing_ok=True)
    monitor = Monitor(config, accelerator, step)
    for note in notes:
        monitor.line(note)
    if resume_from is not None:
        monitor.line(f"resumed from {resume_from} at step {step}")
    monitor.line(f"training on {accelerator.num_processes} process(es) ({accelerator.distributed_type}), "
                 f"precision {accelerator.mixed_precision}, {len(train_loader)} batches per epoch per rank")
    monitor.line(f"loader: {train_loader.backend} ({backend_reason(config.data.loader)})")
    monitor.line(telemetry.opening_line())
    telemetry.log_start(monitor.writer, step)
    return _Run(config=config, accelerator=accelerator, objective=objective, model=model, optimizer=optimizer,
                scheduler=scheduler, train_loader=train_loader, eval_loader=eval_loader, telemetry=telemetry,
                monitor=monitor, step=step, saved_step=step if resume_from is not None else None,
                saved=resume_from)


def optimizer_groups_line(optimizer) -> str:
    """The parameter count, peak learning rate and weight decay of each AdamW group, for train.log."""
    groups = [f"{group['name']} {sum(p.numel() for p in group['params']):,} "
              f"(lr {group['initial_lr']:.2e}, weight decay {group['weight_decay']})"
              for group in optimizer.param_groups]
    return "parameters per optimizer group: " + ", ".join(groups)


def _train_steps(run: _Run) -> bool:
    """Train up to train.max_steps, evaluating and saving on the way. -> False when a stop signal
    ended it first (a checkpoint of the step it stopped at is saved), True otherwise."""
    config, accelerator, monitor = run.config, run.accelerator, run.monitor
    samples_per_step = config.train.batch_size * config.train.grad_accum_steps * accelerator.num_processes
    stop = StopRequest()
    guard = NonFiniteGuard(config.train.max_nonfinite_steps)
    stats = StepStats(run.objective.stat_names(accelerator.unwrap_model(run.model)))
    batches = endless(run.train_loader)
    samples_per_second = None
    run.model.train()
    while run.step < config.train.max_steps:
        started, skipped = time.perf_counter(), guard.skipped
        loss, task_losses, data_wait = train_step(run.model, run.optimizer, run.scheduler, batches, accelerator,
                                                  config, guard, run.objective)
        run.step += 1
        step = run.step
        if guard.skipped > skipped:
            runlog.log.warning(f"step {step}: non-finite loss or gradient norm, update skipped "
                               f"({guard.in_a_row} in a row, {guard.skipped} in this run)")
        stats.add(loss, task_losses, data_wait, time.perf_counter() - started)
        if step % config.logging.log_every == 0 or step == config.train.max_steps:
            values = stats.reduce(accelerator)
            elapsed = time.perf_counter() - stats.started
            samples_per_second = samples_per_step * stats.steps / elapsed
            learning_rates = {group["part"]: group["lr"] for group in run.optimizer.param_groups}
            values.update(lr=learning_rates["new"], lr_backbone=learning_rates["backbone"],
                          samples_per_second=samples_per_second, nonfinite_steps=guard.skipped)
            values.update(run.telemetry.window(values, elapsed))
            monitor.log_step(values, step, run.telemetry.step_text(values))
            stats.reset()
        monitor.progress(loss, samples_per_second)
        last_step = step == config.train.max_steps
        if run.eval_loader is not None and config.train.eval_every and step % config.train.eval_every == 0 \
                and not last_step:
            run.evaluate()
            stats.reset()
        if config.train.save_every and step % config.train.save_every == 0 and not last_step:
            run.save()
            stats.reset()
        # agreeing is an all-reduce and a host sync: at logging steps only (Slurm warns 120 s early)
        if not last_step and step % config.logging.log_every == 0 and stop.agreed(accelerator):
            if run.saved_step != step:
                run.save()
            if accelerator.is_main_process:
                (Path(config.output_dir) / checkpoint.PREEMPTED_MARKER).write_text(f"{step}\n")
            monitor.line(f"stopped on SIGUSR1/SIGTERM at step {step}; checkpoint saved, resume with train.resume=auto")
            monitor.close()
            return False
    return True


def _finish(run: _Run) -> None:
    """The final evaluation, checkpoint and model export; the closing line."""
    if run.eval_loader is not None:
        run.evaluate()
    if run.saved_step != run.step:
        run.save()
    if run.config.train.export:
        exported = checkpoint.export_model(run.accelerator, run.model, run.saved, run.config.output_dir)
        run.monitor.line(f"exported the model to {exported}")
    run.monitor.line(run.telemetry.closing_line())
    run.telemetry.log_end(run.monitor.writer, run.step)
    run.monitor.close()


# ---- command line --------------------------------------------------------------------------------------

DESCRIPTION = ("Train CMA-CLIP from a YAML recipe; the same command runs under `accelerate launch "
               "-m cmaclip.train` on any number of processes and nodes.")


def parse_args(argv, prog: str = "cmaclip train", description: str = DESCRIPTION):
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="overrides: key.sub=value pairs after the options, typed by the config field. "
               "`--keys` lists every key with its default and meaning.",
    )
    parser.add_argument("--config", help="YAML recipe (e.g. configs/cpu-demo.yaml); without it, the defaults")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--keys", action="store_true", help="list every config key with its default and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return parser.parse_intermixed_args(argv)


@command("cmaclip train")
def main(argv=None) -> None:
    command_line(sys.argv[1:] if argv is None else argv, "cmaclip train", DESCRIPTION, FINE_TUNE)


def command_line(argv, prog: str, description: str, objective: Objective) -> None:
    """The shared command line of `cmaclip train` and `cmaclip pretrain`."""
    args = parse_args(argv, prog, description)
    if args.keys:
        print(keys_reference())
        return
    try:
        config = load_config(args.config, args.overrides)
        if not args.print_config:
            checkpoint.resolve_resume(config.train.resume, config.output_dir)
    except ConfigError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        sys.exit(2)
    if args.print_config:
        print(to_yaml(config), end="")
        return
    fit(config, objective)


if __name__ == "__main__":
    main()
