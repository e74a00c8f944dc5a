"""Everything kdqat does to DeepSpeed beyond its public API, in one place.

Written for DeepSpeed 0.19 (checked with 0.19.8). Each function here reads or writes a private name of
DeepSpeed's; where that name is missing (a DeepSpeed that renamed or removed it) it raises
:class:`DeepSpeedChanged`, naming the workaround, rather than silently doing nothing or reporting
wrong memory figures. On a new DeepSpeed release, run ``tests/distributed`` and revisit this file.
"""

from __future__ import annotations

import os
import types
import warnings
from typing import Any

import deepspeed
import deepspeed.ops
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.zero import utils as zero_utils
from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import groups

from kdqat_dist.engine.optim import BertAdam

WRITTEN_FOR = "0.19"

# DeepSpeed's ZeRO collectives call torch.distributed functions that torch 2.13 deprecates; the warning
# fires on every call and says nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


class DeepSpeedChanged(RuntimeError):
    """A private DeepSpeed name that a workaround here needs is gone."""


def _require(obj: Any, name: str, workaround: str) -> Any:
    if not hasattr(obj, name):
        owner = obj.__name__ if isinstance(obj, types.ModuleType) else type(obj).__name__
        raise DeepSpeedChanged(
            f"{workaround}: DeepSpeed {deepspeed.__version__} has no {owner}.{name} (kdqat's workaround was "
            f"written for DeepSpeed {WRITTEN_FOR}); install deepspeed=={WRITTEN_FOR}.* or update "
            "kdqat_dist/engine/ds_workarounds.py"
        )
    return getattr(obj, name)


def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce op on CPU.

    DeepSpeed builds ``deepspeed_shm_comm`` (about 47 s on a 2-core machine) whenever its torch comm
    backend starts on a CPU accelerator, but only ``inference_all_reduce`` (tensor-parallel inference)
    uses it; training collectives go through gloo either way, and ``inference_all_reduce`` falls back to
    gloo when the op is absent. DeepSpeed reads op compatibility from one cached dict, so marking the op
    incompatible there skips the build. Set ``KDQAT_DS_SHM=1`` to keep DeepSpeed's default.
    """
    if os.environ.get("KDQAT_DS_SHM") == "1" or get_accelerator().device_name() != "cpu":
        return
    ops = _require(deepspeed.ops, "__compatible_ops__", "skip_shm_comm_build")
    if "deepspeed_shm_comm" not in ops:
        raise DeepSpeedChanged(
            f"skip_shm_comm_build: DeepSpeed {deepspeed.__version__} has no op "
            f"'deepspeed_shm_comm' (written for DeepSpeed {WRITTEN_FOR})"
        )
    ops["deepspeed_shm_comm"] = False


def declare_tested_optimizers() -> None:
    """Add BertAdam to the optimizers DeepSpeed's ZeRO accepts without ``zero_allow_untested_optimizer``.

    DeepSpeed keeps one list of the optimizer classes it has tested with ZeRO; any other class needs
    ``zero_allow_untested_optimizer`` and then logs "You are using ZeRO with an untested optimizer" on every
    run. BertAdam is tested under ZeRO 0-3 here (tests/distributed/test_dist_zero.py: the same losses as one
    process), so it goes on that list.
    """
    tested = _require(zero_utils, "ZERO_SUPPORTED_OPTIMIZERS", "declare_tested_optimizers")
    if BertAdam not in tested:
        tested.append(BertAdam)


def restore_torch_linear() -> None:
    """Undo ZeRO-3's process-wide ``torch.nn.functional.linear`` replacement once its engines are gone.

    ZeRO-3 swaps in its memory-efficient linear for every module in the process and leaves it there
    ("this will persist unless manually reset"); a later single-process run in the same process (a notebook,
    the test suite) then trains through it and is no longer bit-reproducible against itself across a resume.
    The next ZeRO-3 engine installs it again. (``linear_bk`` appears with the first ZeRO-3 engine.)
    """
    original = getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", None)
    if original is not None and torch.nn.functional.linear is not original:
        torch.nn.functional.linear = original


# Module globals of deepspeed.utils.groups that hold groups of the destroyed process group (a sample that
# must exist; every `_..GROUP..` and `_MPU_..` global is reset).
_KNOWN_GROUP_GLOBALS = ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP")


def forget_deepspeed_groups() -> None:
    """Drop the process groups DeepSpeed caches in module globals (``deepspeed.utils.groups``).

    They belong to the process group just destroyed; a second run in the same process (a notebook, two
    ``run()`` calls in one test process) would otherwise hand a stale group to its first broadcast
    ("Group ... is not registered"). Reset to the values the module starts with, so DeepSpeed makes new
    ones from the new group.
    """
    for name in _KNOWN_GROUP_GLOBALS:
        _require(groups, name, "forget_deepspeed_groups")
    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.isupper() and ("GROUP" in name or name.startswith("_MPU_")):
            setattr(groups, name, {} if isinstance(value, dict) else None)
    if hasattr(groups, "mesh_device"):
        groups.mesh_device = None


def zero_grad_tensors(optimizer: Any) -> list[torch.Tensor]:
    """The gradient buffers a ZeRO optimizer holds itself (private attributes), for the memory report:
    ZeRO-1/2 ``averaged_gradients`` (partition -> flat tensor or list), ZeRO-3 also its
    ``grad_partitions_flat_buffer``. Other optimizers hold none."""
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        names = ("averaged_gradients", "grad_partitions_flat_buffer")
    elif isinstance(optimizer, DeepSpeedZeroOptimizer):
        names = ("averaged_gradients",)
    else:
        return []
    tensors: list[torch.Tensor] = []
    for name in names:
        held = _require(optimizer, name, "zero_grad_tensors")
        if isinstance(held, dict):
            for v in held.values():
                tensors += v if isinstance(v, list) else [v]
        elif torch.is_tensor(held):
            tensors.append(held)
    return [t for t in tensors if torch.is_tensor(t)]


def fp32_master_tensors(optimizer: Any) -> list[torch.Tensor]:
    """The fp32 master weights of this rank's partition (private attributes of the ZeRO optimizers);
    other optimizers keep none apart from their parameters."""
    if isinstance(optimizer, DeepSpeedZeroOptimizer_Stage3):
        return list(_require(optimizer, "fp32_partitioned_groups_flat", "fp32_master_tensors"))
    if isinstance(optimizer, DeepSpeedZeroOptimizer):
        return list(_require(optimizer, "single_partition_of_fp32_groups", "fp32_master_tensors"))
    return []
