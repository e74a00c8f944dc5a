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
