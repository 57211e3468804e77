"""Several processes (``torchrun`` / ``accelerate launch``) through accelerate's process state.

A LoSA run under N processes computes the calibration passes, pruning and rank allocation on every
rank, then makes every rank hold rank 0's result bit for bit (:func:`broadcast_tensors`); the
transformers Trainer fine-tunes data-parallel (gloo on CPU, NCCL on GPU); only the main process writes
files, the others wait at :func:`barrier`. With one process every function here is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch


def launched_distributed() -> bool:
    """True when this process was started as one of several (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _state():
    if not launched_distributed():
        return None
    from accelerate import PartialState

    # initialises the process group from the launcher's environment, once (gloo on CPU, NCCL on GPU);
    # without cpu=True accelerate does not treat several CPU processes as distributed
    return PartialState(cpu=not torch.cuda.is_available())


def world_size() -> int:
    """Number of processes (1 when not launched distributed)."""
    st = _state()
    return 1 if st is None else st.num_processes


def is_main() -> bool:
    """True on the process that writes files (rank 0, or the only process)."""
    st = _state()
    return st is None or st.is_main_process


def barrier() -> None:
    """Wait until every process gets here (no-op with one process)."""
    st = _state()
    if st is not None:
        st.wait_for_everyone()


def broadcast_tensors(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite ``tensors`` in place, on every rank, with rank 0's values (bit for bit).

    Boolean tensors travel as uint8 (gloo has no bool); every tensor goes over the process group's
    device (CPU for gloo) and back.
    """
    st = _state()
    if st is None:
        return
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    with torch.no_grad():
        for t in tensors:
            buf = t.detach().to(dev, torch.uint8 if t.dtype == torch.bool else t.dtype).contiguous()
            dist.broadcast(buf, src=0)
            t.copy_(buf.to(t.device, t.dtype))


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a picklable object; returned unchanged with one process)."""
    st = _state()
    if st is None:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]
