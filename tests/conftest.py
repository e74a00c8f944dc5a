"""Shared fixtures: an isolated cache, and a tiny fine-tuned teacher built once per session."""

import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session", autouse=True)
def _kdqat_cache(tmp_path_factory):
    # Tokenisation cache and tiny models go to a per-session folder, never the user's home.
    if "KDQAT_CACHE" not in os.environ:
        os.environ["KDQAT_CACHE"] = str(tmp_path_factory.mktemp("kdqat_cache"))
    yield


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, _kdqat_cache) -> Path:
    """A tiny BERT fine-tuned on the built-in task for a few steps: <out>/model."""
    from kdqat_dist.config import load_config
    from kdqat_dist.engine.loop import run

    out = tmp_path_factory.mktemp("tiny_teacher")
    cfg = load_config("tiny_debug", [f"train.output_dir={out}", "train.max_steps=8", "train.eval_every=8"])
    run(cfg, "finetune")
    return out / "model"


@pytest.fixture(scope="session")
def make_tiny_student():
    """Builds a tiny student folder: ``make_tiny_student(root, quant, ...)`` (see :func:`_tiny_student`)."""
    return _tiny_student


def _tiny_student(
    root: Path,
    quant,
    name: str = "student",
    auto_class=None,
    id2label: dict[int, str] | None = None,
    task: str = "demo",
    overrides: tuple[str, ...] = (),
) -> Path:
    """A tiny fake-quant student folder ``root/name/student`` of ``auto_class`` (default: a two-label sentence
    classifier), untrained (deploying and serving do not care), with the run's config.yaml (tiny_debug with
    ``overrides``) beside it."""
    import torch

    from kdqat_dist.config import load_config, save_config
    from kdqat_dist.export.artifact import probe_batches
    from kdqat_dist.models.encoders import AUTO_CLASSES, load_classifier, load_tokenizer
    from kdqat_dist.models.tiny import make_tiny_checkpoint
    from kdqat_dist.quant.api import calibrate_activations, prepare
    from kdqat_dist.quant.student import save_student

    base = root / "base"
    if not base.exists():
        make_tiny_checkpoint(base)
    id2label = id2label or {0: "negative", 1: "positive"}
    torch.manual_seed(0)
    cls = auto_class or AUTO_CLASSES["ForSequenceClassification"]
    model = prepare(load_classifier(str(base), len(id2label), id2label=id2label, auto_class=cls), quant)
    model.config.architectures = [type(model).__name__]  # the base is a sentence classifier; a run's head
    with torch.no_grad():  # learned steps off their init, as training leaves them
        for m in model.modules():
            if hasattr(m, "step") and m.step.requires_grad:
                m.step.mul_(0.8)
    calibrate_activations(model, probe_batches(model.config)[0])
    run = root / name
    save_student(model, run / "student", quant, load_tokenizer(str(base)), extra={"task": task, "metrics": {}})
    cfg = load_config("tiny_debug", [f"data.cache_dir={root / 'tok'}", "data.demo_size=120", *overrides])
    save_config(cfg, run / "config.yaml")
    return run / "student"


def shared_sst2() -> Path | None:
    """../shared/data/sst2/train.tsv beside the checkout (CI and dev machines), if present."""
    env = os.environ.get("KDQAT_SHARED_DATA")
    cands = [Path(env)] if env else []
    here = Path(__file__).resolve()
    cands += [
        here.parents[2] / "shared" / "data" / "sst2" / "train.tsv",
        here.parents[1] / "shared" / "data" / "sst2" / "train.tsv",
    ]
    return next((c for c in cands if c.is_file()), None)


@pytest.fixture
def assert_finite_analysis():
    """Checks a `kdqat analyze` analysis.json: ``assert_finite_analysis(doc, student_name)``."""
    return _finite_analysis


def _finite_analysis(doc: dict, student: str) -> None:
    """Distances and the teacher's and student's Hessian eigenvalues are finite numbers; so are the norms,
    but for the key-token classes the sample has no token of (null)."""

    def flat(x):
        return [v for item in x for v in flat(item)] if isinstance(x, list) else [x]

    def finite(values, empty_ok=False) -> bool:
        ok = [v for v in flat(values) if not (empty_ok and v is None)]
        return bool(ok) and all(isinstance(v, float | int) and math.isfinite(v) for v in ok)

    assert finite(doc["distance"][student]["kl"]["mean"])
    assert finite(doc["norms"][student]["f_norm"], empty_ok=True)
    assert finite(doc["hessian"]["teacher"]["eigenvalues"]) and finite(doc["hessian"][student]["eigenvalues"])
