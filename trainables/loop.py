"""The one fine-tuning loop, shared by ``hesstune train``, the Ray trainable and the study.

:func:`fine_tune` is a generator: it yields an :class:`EpochResult` after every epoch (metrics
plus a callable returning the checkpoint state), and the last one carries the Hessian measures.
Regularizers act only through the hooks of :class:`~trainables.regularizers.Regularizer`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainables.config import RunConfig
from trainables.data import TaskData, load_task
from trainables.models import create_model, head_names, in_head, layer_groups, predict, resolve_device
from trainables.noise import (
    corrected_accuracy,
    correction_is_stable,
    noise_entropy,
    noise_rate,
    noise_structure,
)
from trainables.records import correctness_text, labels_text
from trainables.regularizers import Regularizer, RunContext, build_regularizers
from trainables.transition import RunTransition, run_transition

__all__ = [
    "DivergedError",
    "EpochResult",
    "Run",
    "fine_tune",
    "prepare",
    "train_step",
    "train_to_end",
]


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochResult:
    epoch: int
    metrics: dict[str, float]
    final: bool
    state: Callable[[], dict[str, Any]] = field(repr=False)
    records: dict[str, str] = field(default_factory=dict)  # text results at the end (trainables.records)


@dataclass
class Run:
    """One run's live state: what :func:`prepare` builds and :func:`train_step` advances (public
    so that benchmarks time the real step)."""

    cfg: RunConfig
    data: TaskData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    regs: list[Regularizer]
    ctx: RunContext
    device: torch.device
    gradient_reg: Regularizer | None
    transition: RunTransition
    passes: list[int] = field(default_factory=lambda: [0, 0])  # forward, backward since epoch start
    steps: int = 0


def _optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params: list[Any] = [p for _, p in named]
    if o.head_lr_mult != 1:  # two parameter groups: the body at lr, the head (weights and bias) faster
        heads = head_names(model)
        params = [
            {"params": [p for n, p in named if not in_head(n, heads)]},
            {"params": [p for n, p in named if in_head(n, heads)], "lr": o.lr * o.head_lr_mult},
        ]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)


def _scheduler(cfg: RunConfig, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.optim.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.optim.step_size, gamma=cfg.optim.gamma)
    if cfg.optim.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    return None


def prepare(cfg: RunConfig, data: TaskData, log: Callable[[str], None]) -> Run:
    """The model (from its pretrained source), the run's F, the regularizers and the optimizer."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, data.num_classes, task=cfg.task).to(device)
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    transition = run_transition(cfg, model, data)  # before the regularizers: the consistent loss reads it
    regs = build_regularizers(cfg)
    gradient_regs = [r for r in regs if r.changes_gradient]
    generator = torch.Generator().manual_seed(cfg.seed)
    train = data.train
    ctx = RunContext(
        model=model,
        reference=reference,
        groups=layer_groups(model),
        labels=train.labels.clone(),
        noisy=train.labels.clone(),
        clean=train.clean if data.transition is not None else None,
        num_classes=data.num_classes,
        epochs=cfg.epochs,
        transition=transition.matrix,
        noise_rate=cfg.task.noise.rate if cfg.task.noise.kind != "none" else 0.0,
        generator=generator,
        log=log,
    )
    for reg in regs:
        reg.setup(ctx)
    opt = _optimizer(cfg, model)
    gradient_reg = gradient_regs[0] if gradient_regs else None
    return Run(cfg, data, model, opt, _scheduler(cfg, opt), regs, ctx, device, gradient_reg, transition)


# -- one step ----------------------------------------------------------------------------------
def _batch_loss(run: Run, logits: torch.Tensor, labels: torch.Tensor, epoch: int) -> torch.Tensor:
    losses = None
    for reg in run.regs:
        losses = reg.sample_loss(logits, labels) if losses is None else losses
    if losses is None:
        losses = F.cross_entropy(logits, labels, reduction="none")
    loss = None
    for reg in run.regs:
        loss = reg.reduce(losses, epoch) if loss is None else loss
    loss = losses.mean() if loss is None else loss
    for reg in run.regs:
        extra = reg.penalty()
        loss = loss if extra is None else loss + extra
    return loss


def train_step(run: Run, x: torch.Tensor, index: torch.Tensor, epoch: int) -> float:
    """One optimizer step on the batch ``x`` (training-set indices ``index``); its loss."""
    labels_ref: list[torch.Tensor] = []

    def closure(backward: bool = True) -> torch.Tensor:
        run.passes[0] += 1
        logits = run.model(x)
        if not labels_ref:  # the first pass of the step fixes the batch's labels
            for reg in run.regs:
                reg.relabel(logits, index, epoch)
            labels_ref.append(run.ctx.labels[index].to(run.device))
        loss = _batch_loss(run, logits, labels_ref[0], epoch)
        if backward:
            run.passes[1] += 1
            loss.backward()
        return loss

    run.optimizer.zero_grad(set_to_none=True)
    loss = run.gradient_reg.gradient(closure, epoch) if run.gradient_reg else None
    loss = closure() if loss is None else loss
    value = float(loss.detach())
    if not math.isfinite(value):
        raise DivergedError(f"training loss became {value} at epoch {epoch}: lower optim.lr")
    run.optimizer.step()
    for reg in run.regs:
        reg.after_step()
    run.steps += 1
    return value


def _train_epoch(run: Run, epoch: int) -> float:
    run.model.train()
    train = run.data.train
    order = torch.randperm(len(train), generator=run.ctx.generator)
    losses = [train_step(run, train.x[idx].to(run.device), idx, epoch) for idx in order.split(run.cfg.optim.batch_size)]
    if run.scheduler is not None:
        run.scheduler.step()
    return float(np.mean(losses))


# -- metrics -----------------------------------------------------------------------------------
def _split_metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    loss = F.cross_entropy(logits, labels).item()
    acc = (logits.argmax(1) == labels).float().mean().item()
    return loss, acc


def _objective_losses(run: Run, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    for reg in run.regs:
        losses = reg.sample_loss(logits, labels)
        if losses is not None:
            return losses
    return F.cross_entropy(logits, labels, reduction="none")


@torch.no_grad()
def _distances(run: Run) -> dict[str, float]:
    params = dict(run.model.named_parameters())
    ref = run.ctx.reference
    out, total = {}, 0.0
    groups = [*run.ctx.groups.groups, run.ctx.groups.head]
    for g, names in enumerate(groups):
        sq = [float((params[n] - ref[n]).pow(2).sum()) for n in names]
        total += sum(math.sqrt(s) for s in sq)
        out["dist/head" if g == len(groups) - 1 else f"dist/g{g}"] = math.sqrt(sum(sq))
    out["distance"] = total  # Σ_i ‖W_i − W_i⁽⁰⁾‖_F over constrainable weight tensors
    return out


def evaluate(run: Run, records: dict[str, str] | None = None) -> dict[str, float]:
    """Eval-mode losses/accuracies; ``gap`` uses the same loss and label distribution as training.
    With ``records``, also which validation samples the model gets right and what it predicts
    (``val_correct``, ``val_pred``, trainables.records: what ``val_band_bound``'s paired band and
    ``val_acc_clean`` compare trials on) and which noise matrix the run used (``transition``:
    true, estimated:<method> or none).

    Clean labels and the injected F enter only evaluation metrics (test_*, train_acc_clean,
    memorized, f_error); what selection reads uses the run's F (``run.ctx.transition``)."""
    data, model, transition = run.data, run.model, run.ctx.transition
    train_logits = predict(model, data.train.x)
    m: dict[str, float] = {}
    noisy = data.train.labels
    m["train_loss"] = float(_objective_losses(run, train_logits, noisy).mean())
    m["train_ce"], m["train_acc"] = _split_metrics(train_logits, noisy)
    m["train_acc_clean"] = _split_metrics(train_logits, data.train.clean)[1]
    wrong = data.train.noise_mask
    m["memorized"] = float((train_logits.argmax(1)[wrong] == noisy[wrong]).float().mean()) if wrong.any() else 0.0
    m["n_train"] = float(len(noisy))
    m["n_val"] = float(len(data.val.labels)) if data.val is not None else 0.0  # val_band_bound's band width
    if data.val is not None:
        val_logits = predict(model, data.val.x)
        m["val_loss"], m["val_acc"] = _split_metrics(val_logits, data.val.labels)
        if transition is not None:  # unbiased for the clean accuracy when F is right (docs/results.md) …
            stable = correction_is_stable(transition)  # … and only worth it when F⁻¹ is not huge
            pred, val_noisy = val_logits.argmax(1).numpy(), data.val.labels.numpy()
            m["val_acc_corr"] = corrected_accuracy(pred, val_noisy, transition) if stable else m["val_acc"]
            m["val_acc_corr_fallback"] = 0.0 if stable else 1.0
        if records is not None:
            val_pred = val_logits.argmax(1).numpy()
            records["val_correct"] = correctness_text(val_pred == data.val.labels.numpy())
            records["val_pred"] = labels_text(val_pred, data.num_classes)  # val_acc_clean's consensus
    if transition is not None:  # bound_floor's H_F (tuning.selection.add_selection_metrics) …
        m["noise_entropy"] = noise_entropy(transition)
        m["f_noise_rate"] = noise_rate(transition)  # … and the noise case the report names
        structure = noise_structure(transition)  # NaN: < 3 classes or nothing off the diagonal
        if math.isfinite(structure):
            m["f_structure"] = structure
    if run.transition.f_error is not None:  # the estimate against the injected F: evaluation only
        m["f_error"] = run.transition.f_error
    if records is not None:
        records["transition"] = run.transition.source
    test_logits = predict(model, data.test.x)
    m["test_loss"], m["test_acc"] = _split_metrics(test_logits, data.test.clean)
    m["test_loss_noisy"], m["test_acc_noisy"] = _split_metrics(test_logits, data.test_noisy)
    clean = any(r.targets_clean_labels for r in run.regs)
    m["gap"] = (m["test_loss"] if clean else m["test_loss_noisy"]) - m["train_loss"]
    m["gap_clean"] = m["test_loss"] - m["train_loss"]
    m["acc_gap"] = m["train_acc"] - m["test_acc_noisy"]
    return m


# -- checkpoints -------------------------------------------------------------------------------
def _state(run: Run, epoch: int) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "model": copy.deepcopy(run.model.state_dict()),
        "reference": {k: v.clone() for k, v in run.ctx.reference.items()},
        "optimizer": copy.deepcopy(run.optimizer.state_dict()),
        "scheduler": run.scheduler.state_dict() if run.scheduler else {},
        "regularizers": {r.name: r.state_dict() for r in run.regs},
        "labels": run.ctx.labels.clone(),
        "generator": run.ctx.generator.get_state(),
    }


def _restore(run: Run, state: dict[str, Any]) -> int:
    run.model.load_state_dict(state["model"])
    for name, value in state["reference"].items():
        run.ctx.reference[name].copy_(value)
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state["scheduler"]:
        run.scheduler.load_state_dict(state["scheduler"])
    run.ctx.labels.copy_(state["labels"])
    for reg in run.regs:
        reg.load_state_dict(state["regularizers"].get(reg.name, {}))
    run.ctx.generator.set_state(state["generator"])
    return int(state["epoch"])


# -- the loop ----------------------------------------------------------------------------------
def fine_tune(
    cfg: RunConfig,
    *,
    data: TaskData | None = None,
    resume: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    evaluate_at: Collection[int] | None = None,
) -> Iterator[EpochResult]:
    """Fine-tune per ``cfg``, yielding after every epoch; resume from a checkpoint state.

    ``evaluate_at``: the epochs whose evaluation metrics (losses, accuracies, gap, distances) are
    computed — every epoch when None, the last one always. Evaluation changes no state, so the
    other epochs' training is the same either way; the selection study evaluates its checkpoints only."""
    cfg.validate()
    data = data if data is not None else load_task(cfg.task)
    run = prepare(cfg, data, log)
    start = _restore(run, resume) + 1 if resume else 1
    for epoch in range(start, cfg.epochs + 1):
        yield _run_epoch(run, epoch, evaluate_at is None or epoch in evaluate_at)


def _run_epoch(run: Run, epoch: int, evaluated: bool = True) -> EpochResult:
    cfg = run.cfg
    run.passes[:] = [0, 0]
    steps_before = run.steps
    tic = time.perf_counter()
    train_objective = _train_epoch(run, epoch)
    seconds = time.perf_counter() - tic
    steps = max(run.steps - steps_before, 1)
    final = epoch == cfg.epochs
    records: dict[str, str] = {}
    metrics = {
        "epoch": float(epoch),
        "train_objective": train_objective,
        "epoch_s": seconds,
        "forward_passes_per_step": run.passes[0] / steps,
        "backward_passes_per_step": run.passes[1] / steps,
        "lr": float(run.optimizer.param_groups[0]["lr"]),
    }
    if evaluated or final:
        tic = time.perf_counter()
        metrics.update(evaluate(run, records if final else None))
        metrics.update(_distances(run))
        metrics["eval_s"] = time.perf_counter() - tic
    for reg in run.regs:
        metrics.update(reg.end_epoch(epoch))
    if cfg.measure.enabled and (final or (cfg.measure.every and epoch % cfg.measure.every == 0)):
        from trainables.measures import measure_model

        # between milestones only M and B (what a scheduler ranks by); trace and λ_max at the end
        mcfg = cfg if final else cfg.replace(**{"measure.trace": False, "measure.eigenvalue": False})
        metrics.update(measure_model(run.model, run.ctx.reference, run.data, mcfg, transition=_transition(run)))
    return EpochResult(epoch, metrics, final, lambda: _state(run, epoch), records)


def _transition(run: Run) -> np.ndarray | None:
    """The noise matrix the bound uses: the consistent loss's F (it may assume a symmetric rate),
    else the run's."""
    for reg in run.regs:
        matrix = getattr(reg, "transition", None)
        if isinstance(matrix, np.ndarray):
            return matrix
    return run.ctx.transition


def train_to_end(cfg: RunConfig, **kwargs: Any) -> list[EpochResult]:
    """Run :func:`fine_tune` to completion and return every epoch's result."""
    return list(fine_tune(cfg, **kwargs))
