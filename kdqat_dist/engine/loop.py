"""The one training loop: ``kdqat finetune`` (FP teacher) and ``kdqat train`` (KD-QAT student).

Reads top to bottom: ``setup`` (the engine, then :func:`~kdqat_dist.engine.build.build_run`: data, models,
objective, optimizer), ``train`` (steps, evaluation, best checkpoint), ``cleanup``. World size 1 is the
normal case; the engine (:class:`~kdqat_dist.engine.backend.Backend`) hides DeepSpeed or FSDP2.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdqat_dist.config import RESUMABLE, RunConfig, load_config, resume_changes, save_config
from kdqat_dist.data.sampling import micro_batches
from kdqat_dist.distill.objective import LossOutput
from kdqat_dist.engine import diagnostics
from kdqat_dist.engine.backend import Backend, gathered_student
from kdqat_dist.engine.build import build_run, make_backend, resolve_task
from kdqat_dist.engine.checkpoint import latest_checkpoint, seed_everything
from kdqat_dist.engine.evaluate import evaluate as evaluate_model
from kdqat_dist.engine.memory import memory_table
from kdqat_dist.errors import ConfigError, TrainingError
from kdqat_dist.files import check_run_folder, ordinary_permissions, run_header
from kdqat_dist.quant.size import size_report
from kdqat_dist.quant.student import save_student

CONTRIB = "kd_contribution/"  # TensorBoard prefix of each term's (and layer's) weighted share of the loss


class Trainer:
    """``mode="finetune"`` trains the FP model on labels; ``mode="train"`` runs KD-QAT from a teacher.

    ``on_eval`` is called on the main rank with every evaluation record (Ray Tune reports), ``on_finish``
    with the result once ``metrics.json`` is written (the CLI's summary table).
    """

    def __init__(
        self,
        cfg: RunConfig,
        mode: str = "train",
        resume: bool = False,
        backend: Backend | None = None,
        on_eval: Callable[[dict], None] | None = None,
        on_finish: Callable[[dict], None] | None = None,
    ):
        if mode not in ("train", "finetune"):
            raise ValueError(f"mode must be train or finetune, got {mode!r}")
        self.cfg, self.mode, self.resume = cfg, mode, resume
        self.backend: Backend | None = backend
        self.run_dir = Path(cfg.train.output_dir)
        self.history: list[dict] = []
        self.train_log: list[dict] = []  # reduced training scalars at every log step
        self.best: dict | None = None
        self.writer = None
        self.teacher_metrics: dict | None = None
        self.on_eval, self.on_finish = on_eval, on_finish

    # ------------------------------------------------------------------ setup

    def setup(self) -> Trainer:
        cfg = self.cfg
        seed_everything(cfg.train.seed)
        self.backend = self.backend or make_backend(cfg)
        self.ranks = self.backend.ranks
        self._check_run_dir()
        self.ranks.barrier()  # every rank has checked before rank 0 writes config.yaml
        resolve_task(cfg)  # fills train.batch_size from the task, which the resume check compares
        self._resume_step = self._check_resume() if self.resume else None
        self.run = run = build_run(cfg, self.backend, self.mode)  # what the run is made of (public)
        self.task, self.tokenizer, self.data, self.collate = run.task, run.tokenizer, run.data, run.collate
        self.head, self.raw = run.head, run.raw
        self.train_set, self.steps_per_epoch, self.total_steps = run.train_set, run.steps_per_epoch, run.total_steps
        self.student, self.teacher, self.objective = run.student, run.teacher, run.objective
        self.eval_every = cfg.train.eval_every or self.task.eval_every
        # the checkpoint is read before anything is written: a refused one leaves the run folder as it was
        self._start = self._maybe_resume()
        if self.ranks.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml", run_header(self.mode))
            # lazy: only the main rank writes events, and tensorboard's import costs seconds per rank
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops the events written after its checkpoint (they are logged again)
            purge = None if self._resume_step is None else self._resume_step + 1
            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)
        return self

    def _check_run_dir(self) -> None:
        # Never overwrite a finished or running run, a model it reads or a file by accident.
        check_run_folder(self.cfg, self.mode, self.resume)
        if not self.resume and (self.run_dir / "config.yaml").exists():
            raise ConfigError(
                f"train.output_dir: {self.run_dir} already holds a run; choose another "
                "output_dir or pass --resume to continue it"
            )

    def _check_resume(self) -> int | None:
        """Before anything is written: refuse a --resume that cannot continue this run as it was, or that
        asks for other settings than the checkpoint was trained with. Returns the checkpoint's step
        (None: no checkpoint yet, the run starts over)."""
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:
            if (self.run_dir / "metrics.json").exists():  # finished: starting over would overwrite it
                raise ConfigError(
                    f"--resume: {self.run_dir} holds a finished run and no checkpoint under "
                    f"{self.run_dir / 'checkpoints'} (set train.save_every to write them)"
                )
            return None
        saved_path = self.run_dir / "config.yaml"
        if saved_path.exists():
            changed = resume_changes(load_config(saved_path), self.cfg)
            if changed:
                what = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in changed[:6])
                more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
                raise ConfigError(
                    f"--resume: {self.run_dir} was trained with other settings: {what}{more}; "
                    f"resume with the run's own config.yaml (only {', '.join(RESUMABLE)} may "
                    "change), or start a new run in another output_dir"
                )
        return int(ckpt.name.removeprefix("step"))

    # ------------------------------------------------------------------ train

    def _batch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        b = self.collate([self.train_set[i] for i in idx])
        return {k: v.to(self.backend.device) for k, v in b.items()}

    def loss(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """One micro-batch's loss in the engine's precision (its backward runs outside, in the engine)."""
        with self.backend.autocast():
            if self.objective is None:  # finetune: labels only
                out = self.student(**batch)
                terms = {"ground_truth": out.loss.detach()}
                return LossOutput(total=out.loss, terms=terms, student_logits=getattr(out, "logits", None))
            return self.objective(self.student, self.teacher, batch)

    def train(self) -> dict:
        t, be = self.cfg.train, self.backend
        t_start = time.perf_counter()
        step, epoch, start, running = self._start  # zeros, or where the resumed checkpoint left off
        ranks = self.ranks
        if self.mode == "train" and self.teacher_metrics is None:
            self.teacher_metrics = self.evaluate(self.teacher)
        bar = tqdm(
            total=self.total_steps,
            initial=step,
            desc=self.mode,
            disable=not (ranks.is_main and t.progress),
            dynamic_ncols=True,
        )
        if self._diagnostics_on():  # explain the tags, keep the weight codes the first flip rate compares with
            diagnostics.describe_diagnostics(self.writer)
            diagnostics.log_flip_rate(self.writer, None, be.student_module(), gather=self._gather())
        # `running` sums since the last log step (a resumed run restores it), so a window's mean divides by
        # the steps since then: log_every, or fewer in the last window.
        last_log = step - step % t.log_every
        t_last, t_step = time.perf_counter(), step
        while step < self.total_steps:
            batches = micro_batches(
                len(self.train_set), t.batch_size, t.grad_accum, ranks.rank, ranks.world_size, t.seed, epoch, start
            )
            for _, micro in batches:
                self.student.train()
                for i, idx in enumerate(micro):
                    out = self.loss(self._batch(idx))
                    values = self._micro_scalars(out)
                    self._check_finite(values, step)
                    be.backward(out.total, sync=i == len(micro) - 1)  # gradients reduced at the last one
                    for k, v in values.items():
                        running[k] = running.get(k, 0.0) + v / len(micro)
                be.step()
                step += 1
                bar.update(1)
                if step % t.log_every == 0 or step == self.total_steps:
                    n = step - last_log
                    dt = (time.perf_counter() - t_last) / (step - t_step)
                    self._log_train(step, running, dt, n)
                    bar.set_postfix(loss=f"{running.get('loss', 0) / n:.4f}")
                    running, t_last, t_step, last_log = {}, time.perf_counter(), step, step
                if step % self.eval_every == 0 or step == self.total_steps:
                    self._evaluate_and_select(step)
                if t.save_every and step % t.save_every == 0:
                    self._save_checkpoint(step, epoch, _next_start(step, self.steps_per_epoch), running)
                if step >= self.total_steps:
                    break
            epoch, start = epoch + 1, 0
        bar.close()
        return self._finish(time.perf_counter() - t_start)

    def _micro_scalars(self, out: LossOutput) -> dict[str, float]:
        """``loss``, ``loss/<term>`` and (with diagnostics) the ``kd_contribution/...`` values of one
        micro-batch, read from the device in one copy: the one host sync a micro-batch costs, which the
        finiteness check needs before the backward anyway (on a GPU, one sync per scalar would stall the
        queue once per term)."""
        keys = ["loss", *(f"loss/{k}" for k in out.terms)]
        vals = [out.total.detach().double(), *(v.detach().double() for v in out.terms.values())]
        c_keys, c_vals = self._contributions(out)
        return dict(zip(keys + c_keys, torch.stack(vals + c_vals).tolist(), strict=True))

    def _check_finite(self, values: dict[str, float], step: int) -> None:
        """Stop on a non-finite loss, on every rank together: each rank's flags (total and every term) are
        summed over ranks, so a NaN on one rank stops all of them at the same micro-batch with the same
        message, instead of one rank raising while its peers wait in the next collective."""
        keys = ["loss", *(k for k in values if k.startswith("loss/"))]
        flags = torch.tensor([0.0 if math.isfinite(values[k]) else 1.0 for k in keys], dtype=torch.float64)
        world = self.ranks.world_size
        if world > 1:
            flags = self.ranks.all_reduce_sum(flags)
        if flags[0] == 0:
            return
        bad = [k.removeprefix("loss/") for k, f in zip(keys[1:], flags[1:].tolist(), strict=True) if f > 0]
        where = f"term '{bad[0]}'" if bad else "the total"
        what = f"is {values['loss']}" if not math.isfinite(values["loss"]) else "is not finite"
        on = f" on {int(flags[0])} of {world} ranks" if world > 1 else ""
        raise TrainingError(f"non-finite loss at step {step + 1}: {where} {what}{on}; lower train.lr or check the data")

    def _log_train(self, step: int, running: dict, dt: float, n: int) -> None:
        """Means over the ``n`` steps of the window and over ranks (one all-reduce), then TensorBoard."""
        red = self._mean_over_ranks(running, n)
        # per-layer contributions go to TensorBoard only: in metrics.json they would be layers x terms
        # numbers at every log step
        contrib = {k: red.pop(k) for k in [k for k in red if k.startswith(CONTRIB)]}
        self.train_log.append({"step": step, **red, "lr": self.backend.lr()})
        if self.writer is not None:
            for k, v in red.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            for k, v in contrib.items():
                self.writer.add_scalar(k, v, step)
            self.writer.add_scalar("train/lr", self.backend.lr(), step)
            self.writer.add_scalar("train/step_time_s", dt, step)
        if self._diagnostics_on():  # zero fraction, scale and its drift, clip rate
            diagnostics.log_diagnostics(self.writer, step, self.backend.student_module(), gather=self._gather())

    def _diagnostics_on(self) -> bool:
        # the FP fine-tune has no quantizers and no KD terms to look at
        return self.mode == "train" and self.cfg.train.diagnostics

    def _gather(self):
        # ZeRO-3: the weights are partitions outside the forward. Every rank walks the quantized modules
        # and gathers one module at a time (collectives: all must join); rank 0 writes.
        return self.backend.gathered_params if self.backend.partitioned_student() else None

    def _contributions(self, out: LossOutput) -> tuple[list[str], list[torch.Tensor]]:
        """What each term adds to ``out.total`` (weight x value), per layer where the term has layers:
        ``kd_contribution/<term>/<layer>`` and ``kd_contribution/<term>`` (logits, ground truth), which sum
        to the loss. Device scalars; :meth:`_micro_scalars` reads them with the loss."""
        if not self._diagnostics_on() or self.objective is None:
            return [], []
        w = self.objective.weights
        keys, vals = [], []
        for term, value in out.terms.items():
            layers = out.per_layer.get(term) or {None: value.detach()}
            for layer, v in layers.items():
                keys.append(CONTRIB + term + ("" if layer is None else f"/{layer:02d}"))
                vals.append(w[term] * v.double())
        return keys, vals

    def _mean_over_ranks(self, running: dict, n: int) -> dict:
        keys = sorted(running)
        t = torch.tensor([running[k] / n for k in keys], dtype=torch.float64)
        t = self.ranks.all_reduce_sum(t) / self.ranks.world_size
        return dict(zip(keys, t.tolist(), strict=True))

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        with self.backend.autocast():
            return evaluate_model(
                model,
                self.task,
                self.data,
                self.collate,
                self.cfg.train.eval_batch_size,
                self.backend.device,
                raw=self.raw,
                head=self.head,
            )

    def _evaluate_and_select(self, step: int) -> None:
        if self._diagnostics_on():  # the flip rate is measured between evaluations
            diagnostics.log_flip_rate(self.writer, step, self.backend.student_module(), gather=self._gather())
        metrics = self.evaluate(self.student)
        record = {"step": step, **metrics}
        self.history.append(record)
        improved = self.best is None or metrics["selection"] > self.best["selection"]
        if improved:
            self.best = record
            self._save_best()
        if self.on_eval is not None and self.ranks.is_main:
            teacher = {"teacher_selection": self.teacher_metrics["selection"]} if self.teacher_metrics else {}
            self.on_eval(
                {**record, "best_selection": self.best["selection"], "best_step": self.best["step"], **teacher}
            )
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(f"eval/{k}", v, step)
            if self.teacher_metrics:
                self.writer.add_scalar("eval/teacher_selection", self.teacher_metrics["selection"], step)
            teacher = f" (teacher {self.teacher_metrics['selection']:.4f})" if self.teacher_metrics else ""
            tqdm.write(
                f"step {step}: {self.task.selection_metric}={metrics['selection']:.4f}{teacher}"
                + (" *best*" if improved else "")
            )

    def _save_best(self) -> None:
        # Sharded, the whole weights exist only inside this block, on every rank; rank 0 writes them.
        with gathered_student(self.backend) as model:
            if not self.ranks.is_main:
                return
            out = self.run_dir / ("model" if self.mode == "finetune" else "student")
            if self.mode == "finetune":
                model.save_pretrained(out)
                self.tokenizer.save_pretrained(out)
                for f in out.glob("*.safetensors"):
                    ordinary_permissions(f)
                (out / "metrics.json").write_text(json.dumps(self.best, indent=2))
            else:
                save_student(
                    model, out, self.cfg.quant, self.tokenizer, extra={"task": self.task.name, "metrics": self.best}
                )

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, step: int, epoch: int, start_next: tuple[int, int], running: dict) -> None:
        ep, st = start_next
        client = {
            "step": step,
            "epoch": epoch + ep,
            "start": st,
            "best": self.best,
            "history": self.history,
            "teacher_metrics": self.teacher_metrics,
            "running": dict(running),
            "train_log": self.train_log,
        }
        self.backend.save_checkpoint(self.run_dir / "checkpoints" / f"step{step:07d}", client)

    def _maybe_resume(self) -> tuple[int, int, int, dict]:
        """(step, epoch, start step in epoch, running sums) to continue from; zeros for a fresh run."""
        if not self.resume:
            return 0, 0, 0, {}
        ckpt = latest_checkpoint(self.run_dir / "checkpoints")
        if ckpt is None:  # (a finished run without one was refused in setup)
            # Stopped before its first checkpoint (e.g. a Slurm job preempted early and requeued with
            # --resume): nothing to continue from and nothing finished to lose, so start from step 0.
            if self.ranks.is_main:
                tqdm.write(f"--resume: no checkpoint under {self.run_dir / 'checkpoints'} yet; starting from step 0")
            return 0, 0, 0, {}
        client = self.backend.load_checkpoint(ckpt)
        self.best, self.history = client["best"], client["history"]
        self.teacher_metrics = client["teacher_metrics"]
        self.train_log = list(client.get("train_log", []))
        if self.ranks.is_main:
            tqdm.write(f"resumed from {ckpt} at step {client['step']}")
        return client["step"], client["epoch"], client["start"], dict(client.get("running", {}))

    # ------------------------------------------------------------------ finish

    def _finish(self, wall_s: float) -> dict:
        """The run's result: written to ``metrics.json`` (its one writer) and returned on every rank."""
        result = {
            "task": self.task.name,
            "selection_metric": self.task.selection_metric,
            "best": self.best,
            "history": self.history,
            "total_steps": self.total_steps,
        }
        if self.teacher_metrics is not None:
            result["teacher"] = self.teacher_metrics
        result["train_log"] = self.train_log
        result["world_size"] = self.ranks.world_size
        per_rank = self.ranks.gather_objects(self.backend.memory_report())
        result["memory"], result["memory_per_rank"] = per_rank[self.ranks.rank], per_rank
        result["wall_s"] = wall_s  # train(): this process's share of the run (a resumed one: since the resume)
        if self.mode == "train":
            s = size_report(self.backend.student_module())
            result["size"] = f"{s['packed_mb']:.2f} MB ({s['ratio']:.1f}x smaller than {s['fp32_mb']:.1f})"
        if self.ranks.is_main:
            tqdm.write(memory_table(per_rank))
            (self.run_dir / "metrics.json").write_text(json.dumps(result, indent=2))
            if self.on_finish is not None:
                self.on_finish(result)
        return result

    def cleanup(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.backend is not None:
            self.backend.teardown()


def _next_start(step: int, per_epoch: int) -> tuple[int, int]:
    """(epochs to add, start step within that epoch) for the step after ``step`` (1-based count)."""
    return (1, 0) if step % per_epoch == 0 else (0, step % per_epoch)


def run(
    cfg: RunConfig,
    mode: str,
    resume: bool = False,
    on_eval: Callable[[dict], None] | None = None,
    on_finish: Callable[[dict], None] | None = None,
) -> dict:
    """Set up, train, clean up; returns the metrics dict (also written to ``<output_dir>/metrics.json``).

    ``on_eval`` / ``on_finish``: see :class:`Trainer`."""
    trainer = Trainer(cfg, mode, resume, on_eval=on_eval, on_finish=on_finish)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()


__all__ = ["Trainer", "TrainingError", "run"]
