"""Minimal, explicit shims that let Detectron2 0.6 run on today's torch / NumPy / Pillow.

``apply()`` runs once when :mod:`tbd` is imported. Every shim checks that the thing it fixes is
really broken in this environment and does nothing otherwise, so a compiled, official Detectron2
on an older stack is used exactly as it is. ``APPLIED`` records which shims were installed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import types
import warnings
from datetime import timedelta
from typing import Any, Callable

logger = logging.getLogger(__name__)

#: names of the shims that ``apply`` installed in this process
APPLIED: list[str] = []

_INSTALL_HINT = (
    "Detectron2 was installed without its C++ extension (detectron2._C), which holds only "
    "deformable convolution, rotated-box ops and the fast COCO evaluator. Build Detectron2 from "
    "source with its extension (pip install 'git+https://github.com/facebookresearch/detectron2.git') "
    "to use {op}; RetinaNet, FCOS, Faster R-CNN and every tbd head work without it."
)


class MissingExtensionOp:
    """Stand-in for one attribute of the absent ``detectron2._C``: fails clearly when used."""

    def __init__(self, op: str) -> None:
        self.op = op

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"detectron2._C.{self.op} is not available. " + _INSTALL_HINT.format(op=self.op))

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__"):
            raise AttributeError(item)
        return MissingExtensionOp(f"{self.op}.{item}")


class _MissingExtensionModule(types.ModuleType):
    """``detectron2._C`` when it was not built: its ops fail clearly, its build queries say "not built".

    ``collect_env_info`` (called by ``default_setup``) asks the extension how it was compiled.
    """

    def get_compiler_version(self) -> str:
        return "not built (detectron2._C is absent; tbd.compat stands in for it)"

    def get_cuda_version(self) -> str:
        return "not built (detectron2._C is absent)"

    def has_cuda(self) -> bool:
        return False

    def __getattr__(self, item: str) -> Any:
        if item.startswith("__"):
            raise AttributeError(item)
        return MissingExtensionOp(item)


def has_compiled_ops() -> bool:
    """True when a real, compiled ``detectron2._C`` is importable."""
    stub = sys.modules.get("detectron2._C")
    if isinstance(stub, _MissingExtensionModule):
        return False
    return importlib.util.find_spec("detectron2._C") is not None


def _shim_missing_extension() -> None:
    # Reason: detectron2.layers imports detectron2._C at import time, so without the extension
    # even `import detectron2.modeling` fails although no detector we use needs it.
    if "detectron2._C" in sys.modules or importlib.util.find_spec("detectron2._C") is not None:
        return
    import detectron2

    stub = _MissingExtensionModule("detectron2._C", "placeholder for the absent C++ extension")
    sys.modules["detectron2._C"] = stub
    detectron2._C = stub  # type: ignore[attr-defined]
    APPLIED.append("missing_extension")


def _shim_pillow() -> None:
    # Reason: Pillow 10 removed Image.LINEAR, a default argument in detectron2.data.transforms.
    from PIL import Image

    if not hasattr(Image, "LINEAR"):
        Image.LINEAR = Image.BILINEAR  # type: ignore[attr-defined]
        APPLIED.append("pillow_linear")


_NUMPY_ALIASES = {"int": int, "float": float, "bool": bool, "str": str, "object": object}


def _shim_numpy() -> None:
    # Reason: NumPy 1.24/2.0 removed np.int, np.float, np.bool, np.str, np.object, which
    # Detectron2 0.6 uses (e.g. the class histogram built with every training data loader).
    import warnings

    import numpy as np

    added = []
    for name, value in _NUMPY_ALIASES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            present = hasattr(np, name)
        if not present:
            setattr(np, name, value)
            added.append(name)
    if added:
        APPLIED.append("numpy_aliases")


def _shim_coco_fast_eval() -> None:
    # Reason: COCOEvaluator defaults to the C++ evaluator, which lives in detectron2._C.
    if has_compiled_ops():
        return
    from detectron2.evaluation import coco_evaluation

    original = coco_evaluation.COCOEvaluator.__init__
    if getattr(original, "_tbd_shim", False):
        return

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("use_fast_impl", False)
        original(self, *args, **kwargs)

    __init__._tbd_shim = True  # type: ignore[attr-defined]
    coco_evaluation.COCOEvaluator.__init__ = __init__  # type: ignore[method-assign]
    APPLIED.append("coco_pycocotools")


def _cpu_distributed_worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_gpus_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    timeout: timedelta = timedelta(minutes=30),
) -> None:
    """``detectron2.engine.launch`` worker for machines without CUDA: GLOO instead of NCCL."""
    import torch.distributed as dist
    from detectron2.utils import comm

    apply()  # a spawned child starts fresh
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    dist.init_process_group(
        backend="GLOO", init_method=dist_url, world_size=world_size, rank=global_rank, timeout=timeout
    )
    num_machines = world_size // num_gpus_per_machine
    for i in range(num_machines):
        group = dist.new_group(list(range(i * num_gpus_per_machine, (i + 1) * num_gpus_per_machine)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    comm.synchronize()
    main_func(*args)
    # a worker leaving while its peer still talks to it can abort inside GLOO: leave together
    # (after an exception, mp.spawn tears the others down instead)
    dist.barrier()
    dist.destroy_process_group()
    # torch's C++ side can still abort ("terminate called without an active exception") while
    # the interpreter tears a finished CPU worker down; its work is done, so leave directly.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(0)


def _shim_cpu_launch() -> None:
    # Reason: launch() in 0.6 asserts CUDA and hard-codes NCCL; later Detectron2 uses GLOO on CPU.
    import importlib

    import torch

    launch_module = importlib.import_module("detectron2.engine.launch")
    if torch.cuda.is_available() or launch_module._distributed_worker is _cpu_distributed_worker:
        return
    launch_module._distributed_worker = _cpu_distributed_worker
    APPLIED.append("cpu_launch_gloo")


def _shim_head_norm_probe() -> None:
    # Reason: RetinaNetHead (and FCOSHead) build get_norm(norm, 1) only to read the norm's type;
    # torch now rejects GroupNorm(32, 1), so a GN head cannot be constructed at all.
    import torch.nn as nn
    from detectron2.layers import batch_norm
    from detectron2.modeling.meta_arch import retinanet

    try:
        batch_norm.get_norm("GN", 1)
        return
    except ValueError:
        pass
    original = retinanet.get_norm
    if getattr(original, "_tbd_shim", False):
        return

    def get_norm(norm: Any, out_channels: int) -> Any:
        if norm == "GN" and out_channels == 1:
            return nn.GroupNorm(1, 1)
        return original(norm, out_channels)

    get_norm._tbd_shim = True  # type: ignore[attr-defined]
    retinanet.get_norm = get_norm
    APPLIED.append("gn_head_norm_probe")


def _shim_cpu_ddp() -> None:
    # Reason: create_ddp_model always passes device_ids=[local_rank], which torch's
    # DistributedDataParallel rejects for a model on the CPU (multi-process CPU training).
    import torch
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    if torch.cuda.is_available() or getattr(original, "_tbd_shim", False):
        return

    def create_ddp_model(model: Any, *, fp16_compression: bool = False, **kwargs: Any) -> Any:
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
        if on_cpu and "device_ids" not in kwargs:
            kwargs["device_ids"] = None
        return original(model, fp16_compression=fp16_compression, **kwargs)

    create_ddp_model._tbd_shim = True  # type: ignore[attr-defined]
    defaults.create_ddp_model = create_ddp_model
    APPLIED.append("cpu_ddp_device_ids")


_DONE = False


def apply() -> list[str]:
    """Install every shim this environment needs (idempotent). Returns the names applied."""
    global _DONE
    if _DONE:
        return list(APPLIED)
    _DONE = True
    with warnings.catch_warnings():
        # Detectron2 0.6 scripts a few helpers with torch.jit at import time, which recent torch
        # reports as deprecated on every import: noise for a tbd user, so import them quietly.
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        _apply_all()
    if APPLIED:
        logger.debug("tbd.compat applied: %s", ", ".join(APPLIED))
    return list(APPLIED)


def _apply_all() -> None:
    _shim_missing_extension()
    _shim_pillow()
    _shim_numpy()
    _shim_coco_fast_eval()
    _shim_cpu_launch()
    _shim_head_norm_probe()
    _shim_cpu_ddp()
    import detectron2.engine  # noqa: F401  (the rest of Detectron2, under the same filter)
    import detectron2.modeling  # noqa: F401
