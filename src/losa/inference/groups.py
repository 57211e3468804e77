"""Sparse layers that multiply the same input (q/k/v, gate/up): one row-loop call per group in decode.

A LLaMA-style decoder layer feeds one normalised hidden state to ``q_proj``, ``k_proj`` and ``v_proj`` and
another to ``gate_proj`` and ``up_proj``. Decode calls the kernel's row loop once per layer and token, and on a
small model the per-call cost (dispatch, thread fork/join, load balance of the small k/v layers) is a visible
part of a token (``benchmarks/results/sibling_fusion.md``). :func:`plan_groups` finds such siblings without
knowing the architecture: one forward of a single token records which sparse layers receive the very same
input tensor, in which order. For each group the first member's decode step then computes every member's
output in one call of the kernel's ``spmm_group`` (the weights keep their own buffers; nothing is copied but
a stacked bias) and hands the others their columns; each member's result is bit for bit what its own row loop
gives. A member called with another input, or with more rows than the row loop takes, computes alone as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from losa.calib.hooks import record_inputs
from losa.inference import kernel as _kernel
from losa.inference.formats import FORMAT_CODES
from losa.inference.sparse_linear import SparseLinear


@dataclass(eq=False)
class DecodeGroup:
    """Sparse layers that share an input, computed by one ``spmm_group`` call in decode steps.

    Built by :func:`plan_groups` after the members' decode plans (:meth:`SparseLinear.plan_decode`): the
    kernel arguments are fixed then, so a step pays no Python work beyond one call (plan the groups again after
    re-planning a member; a member whose plan changed or was removed computes alone until then).

    Attributes:
        members: the layers, in the order the model calls them (the first one computes for all).
        plans: the members' decode plans when the group was built.
        bounds: column offsets of each member's output in the stacked result, ``len(members) + 1`` ints.
        args: the kernel arguments after the input: metas, values, row_ptrs, the stacked float32 bias
            ``[sum out_features]`` (zeros for a member without one: the row loop adds ``0.0`` then, as it does
            without a bias; None when no member has one), out_features, in_features, format codes, ISA.
        max_rows: the most input rows the group takes, for float32 / float16 and for bfloat16 inputs.
        stash: ``(input, stacked output)`` between the first member's call and the last member's.
    """

    members: list[SparseLinear]
    plans: list
    bounds: list[int]
    args: tuple
    max_rows: tuple[int, int]
    stash: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, members: list[SparseLinear]) -> DecodeGroup | None:
        """The group of ``members`` (all planned, one ISA), or None when they cannot share a call."""
        plans = [m.decode_plan for m in members]
        if any(p is None for p in plans) or len({p.isa for p in plans}) != 1:
            return None
        bounds = [0]
        for m in members:
            bounds.append(bounds[-1] + m.out_features)
        bufs = [m._buffers for m in members]
        biases = [b["bias"] for b in bufs]
        bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(m.out_features) if b is None else b.float() for m, b in zip(members, biases)])
        args = ([b["meta"] for b in bufs], [b["values"] for b in bufs], [b["row_ptr"] for b in bufs], bias,
                [m.out_features for m in members], members[0].in_features,
                [FORMAT_CODES[m.fmt] for m in members], plans[0].isa)
        return cls(members, plans, bounds, args,
                   (min(p.max_rows_other for p in plans), min(p.max_rows_bf16 for p in plans)))

    def output(self, index: int, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor | None:
        """Member ``index``'s output ``[rows, out_features]`` for input ``x`` (``x2`` = ``x`` as ``[rows, in]``).

        Returns:
            The output in ``x``'s dtype, or None when the group does not cover this call (more rows than the
            row loop takes, a member re-planned since, or an input other than the first member's): the member
            then computes alone.
        """
        if index > 0:
            st = self.stash
            if st is None or st[0] is not x:
                return None
            if index == len(self.members) - 1:
                self.stash = None
            return st[1][:, self.bounds[index]:self.bounds[index + 1]]
        if x2.shape[0] > self.max_rows[x2.dtype == torch.bfloat16]:
            return None
        for m, p in zip(self.members, self.plans):
            if m.decode_plan is not p:
                return None
        if torch.compiler.is_compiling():
            # the buffers read through the members, as their own calls would: the compiled step guards the same
            # tensors as without groups (a second path to them through this object would add guards per step)
            bufs = [m._buffers for m in self.members]
            args = ([b["meta"] for b in bufs], [b["values"] for b in bufs], [b["row_ptr"] for b in bufs],
                    *self.args[3:])
            y = _kernel.spmm_group_op()(x2, *args)  # the dispatcher op, in x2's dtype
        else:  # the extension's direct binding: a dispatcher call costs more per step
            y = _kernel.load_kernel().spmm_group(x2, *self.args)
            y = y if y.dtype == x2.dtype else y.to(x2.dtype)
        self.stash = (x, y)
        return y[:, :self.bounds[1]]


def find_groups(model: nn.Module) -> list[list[str]]:
    """Names of the sparse layers that receive the very same input tensor one after another, per group.

    Runs one forward of a single token (``input_ids`` of zeros, no cache) with :func:`record_inputs` on every
    :class:`SparseLinear`. Consecutive calls with the identical input object and the same ``in_features`` and
    value dtype form a group; layers called more than once in the forward are left out.

    Args:
        model: a causal LM after :func:`~losa.inference.sparsify_for_inference`, on the CPU.

    Returns:
        Groups of at least two module names, in call order (empty when the forward cannot run this way).
    """
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    if len(sparse) < 2:
        return []
    calls: list[tuple[str, object]] = []
    try:
        with record_inputs(sparse, calls), torch.inference_mode():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long), use_cache=False)
    except Exception:  # noqa: BLE001 - grouping is only a speed-up: a model that needs other inputs keeps none
        return []
    counts: dict[str, int] = {}
    for name, _ in calls:
        counts[name] = counts.get(name, 0) + 1
    groups: list[list[str]] = []
    prev_x: object = None
    for name, x in calls:
        m = sparse[name]
        cur = groups[-1] if groups else None
        if (cur is not None and x is prev_x and counts[name] == 1 and counts[cur[0]] == 1
                and m.in_features == sparse[cur[0]].in_features and m.value_dtype == sparse[cur[0]].value_dtype):
            cur.append(name)
        else:
            groups.append([name])
        prev_x = x
    return [g for g in groups if len(g) > 1]


def plan_groups(model: nn.Module) -> int:
    """Give every group of :func:`find_groups` one :class:`DecodeGroup` (set on its members).

    Call after the members' decode plans (:meth:`SparseLinear.plan_decode`; :class:`LeanDecoder` does both):
    unplanned layers are not grouped. Earlier groups of the model are removed first, so planning again follows
    the model's current layers and plans.

    Args:
        model: the sparse causal LM.

    Returns:
        The number of groups.
    """
    clear_groups(model)
    if _kernel.load_kernel() is None:
        return 0
    modules = dict(model.named_modules())
    groups = find_groups(model)
    count = 0
    for names in groups:
        group = DecodeGroup.of([modules[n] for n in names])
        if group is None:
            continue
        count += 1
        for i, n in enumerate(names):
            modules[n].decode_group = (group, i)
    return count


def clear_groups(model: nn.Module) -> None:
    """Remove every :class:`DecodeGroup` from the model's sparse layers (each computes alone again)."""
    for m in model.modules():
        if isinstance(m, SparseLinear):
            m.decode_group = None
