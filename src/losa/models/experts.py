"""Fused mixture-of-experts tensors seen one expert matrix at a time.

transformers 5 stores the routed experts of Mixtral, Qwen2-MoE, Qwen3-MoE (and others) in one module
with two 3-D parameters: ``gate_up_proj`` ``[E, 2I, H]`` (expert e's gate rows ``[:I]`` over its up
rows ``[I:]``) and ``down_proj`` ``[E, H, I]``. For each expert e the tokens routed to it compute
``down_e(act(gate_e(x)) * up_e(x))`` weighted by their router weight. Pruning needs each of the 3·E
matrices on its own, with statistics of exactly the tokens routed to that expert, so this module

* says whether a fused experts module has that standard layout (:func:`unsupported_reason`),
* gives its per-expert 2-D weights as views ``[out, in]`` (:func:`expert_weights`), and
* builds :class:`UnfusedExperts`, a drop-in replacement whose experts are ordinary ``nn.Linear``
  (``<e>.gate_proj`` / ``<e>.up_proj`` / ``<e>.down_proj``, weights viewing the fused storage) with the
  same forward (routing included), and folds it back (:meth:`UnfusedExperts.fold_into`).

Nothing here knows about decoder layers or families: :mod:`losa.models.moe` applies it to a model.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

#: the per-expert projections, in the order the forward calls them
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

#: the flags transformers' ``use_experts_implementation`` sets, and the values of the standard layout
_STANDARD_FLAGS = {"has_gate": True, "has_bias": False, "is_transposed": False, "is_concatenated": True,
                   "has_post_expert_norm": False}


def is_fused_experts(module: nn.Module) -> bool:
    """True for a module with a 3-D parameter of its own (fused experts, in whatever layout)."""
    params = dict(module.named_parameters(recurse=False))
    return any(p.ndim == 3 for p in params.values())


def _default_apply_gate() -> object | None:
    """transformers' default gate (``act(gate) * up`` on the concatenated halves), if transformers is loaded
    (a model with fused experts has loaded it)."""
    mod = sys.modules.get("transformers.integrations.moe")
    return getattr(mod, "_default_apply_gate", None)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module``'s fused experts cannot be unfused, or None when they have the standard layout.

    The standard layout: exactly the parameters ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj``
    ``[E, H, I]``, transformers' experts flags at their defaults (gated, concatenated gate/up, not
    transposed, no bias, no post-expert norm), the default gate ``act_fn(gate) * up`` and ``num_experts == E``.

    Args:
        module: a fused experts module (e.g. ``MixtralExperts``).
    Returns:
        a short reason (for an error message), or None.
    """
    params = {n: p for n, p in module.named_parameters(recurse=False)}
    if set(params) != {"gate_up_proj", "down_proj"}:
        return f"parameters {sorted(params)} instead of gate_up_proj and down_proj"
    gu, dn = params["gate_up_proj"], params["down_proj"]
    if gu.ndim != 3 or dn.ndim != 3:
        return "gate_up_proj / down_proj are not 3-D"
    e, two_i, h = gu.shape
    if two_i % 2 or tuple(dn.shape) != (e, h, two_i // 2):
        return f"gate_up_proj {list(gu.shape)} and down_proj {list(dn.shape)} are not [E, 2I, H] and [E, H, I]"
    for flag, want in _STANDARD_FLAGS.items():
        if getattr(module, flag, None) is not want:
            return f"{flag}={getattr(module, flag, None)} (expected {want})"
    default_gate = _default_apply_gate()
    if default_gate is None or getattr(type(module), "_apply_gate", None) is not default_gate:
        return "a custom gate function"
    if not isinstance(getattr(module, "act_fn", None), nn.Module) or getattr(module, "num_experts", None) != e:
        return "no act_fn module or num_experts that matches the tensors"
    return None


def _slices(gate_up: torch.Tensor, down: torch.Tensor, e: int) -> dict[str, torch.Tensor]:
    inter = gate_up.shape[1] // 2
    return {"gate_proj": gate_up[e, :inter], "up_proj": gate_up[e, inter:], "down_proj": down[e]}


def expert_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every expert matrix of a standard fused experts module, as a view ``[out, in]``.

    Args:
        module: fused experts with ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``.
    Returns:
        ``"<e>.gate_proj"`` ``[I, H]``, ``"<e>.up_proj"`` ``[I, H]``, ``"<e>.down_proj"`` ``[H, I]`` for
        e = 0..E-1, in that order (the names of the :class:`UnfusedExperts` linears); views of the
        parameters, do not write through them.
    """
    gu, dn = module.gate_up_proj.detach(), module.down_proj.detach()
    return {f"{e}.{p}": w for e in range(gu.shape[0]) for p, w in _slices(gu, dn, e).items()}


def _linear_view(weight: torch.Tensor, requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` (no bias) whose weight shares ``weight``'s storage (no copy, no initialisation)."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=requires_grad)
    return lin


class ExpertMLP(nn.Module):
    """One expert: ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``.

    Args:
        gate_proj: ``[I, H]`` linear.
        up_proj: ``[I, H]`` linear.
        down_proj: ``[H, I]`` linear.
        act_fn: the activation module (shared by all experts of a layer).
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[tokens, H]`` -> ``[tokens, H]``; gate and up receive the same tensor (one statistic)."""
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.Module):
    """The experts of a fused module as E :class:`ExpertMLP` children named ``"0"`` .. ``"E-1"``.

    Same call as the fused module, ``forward(hidden_states, top_k_index, top_k_weights)``, and the same
    arithmetic as its eager forward: the tokens routed to expert e (``top_k_index``) go through expert e,
    are scaled by their router weight and summed into the output. Each expert linear is therefore called
    once per forward with exactly its routed tokens (idle experts are not called at all).

    Args:
        experts: one :class:`ExpertMLP` per expert.
    """

    def __init__(self, experts: list[ExpertMLP]) -> None:
        super().__init__()
        self.num_experts = len(experts)
        for e, mlp in enumerate(experts):
            self.add_module(str(e), mlp)

    @classmethod
    def from_fused(cls, fused: nn.Module) -> UnfusedExperts:
        """Per-expert linears viewing ``fused``'s parameters (no copy).

        Args:
            fused: a standard fused experts module (see :func:`unsupported_reason`).
        Returns:
            the unfused module; writing an expert linear's weight in place writes the fused parameter
            (until something, e.g. ``.to(device)``, gives the linear its own storage).
        """
        gu, dn = fused.gate_up_proj, fused.down_proj
        experts = []
        for e in range(gu.shape[0]):
            views = _slices(gu.data, dn.data, e)
            grads = {"gate_proj": gu.requires_grad, "up_proj": gu.requires_grad, "down_proj": dn.requires_grad}
            experts.append(ExpertMLP(*(_linear_view(views[p], grads[p]) for p in PROJECTIONS), fused.act_fn))
        return cls(experts)

    def expert(self, e: int) -> ExpertMLP:
        """Expert ``e``'s module."""
        return self._modules[str(e)]  # type: ignore[return-value]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Route and combine like the fused eager forward.

        Args:
            hidden_states: ``[tokens, H]``.
            top_k_index: ``[tokens, k]`` expert ids per token.
            top_k_weights: ``[tokens, k]`` their router weights.
        Returns:
            ``[tokens, H]``, the weighted sum of each token's experts' outputs.
        """
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for row in hit:
            e = int(row[0])
            if e == self.num_experts:  # transformers' sentinel for tokens routed nowhere
                continue
            top_k_pos, token_idx = torch.where(expert_mask[e])
            out = self.expert(e)(hidden_states[token_idx])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def fold_into(self, fused: nn.Module) -> None:
        """Write every expert linear's weight back into ``fused``'s 3-D parameters.

        ``fused`` is first moved to the experts' device and dtype (the unfused module may have been moved
        since :meth:`from_fused`); weights that still share the fused storage are not copied.

        Args:
            fused: the module this one was made from.
        Raises:
            TypeError: an expert projection is no longer a plain ``nn.Linear`` (e.g. still wrapped by an adapter).
        """
        linears = {(e, p): getattr(self.expert(e), p) for e in range(self.num_experts) for p in PROJECTIONS}
        for (e, p), lin in linears.items():
            if type(lin) is not nn.Linear:
                raise TypeError(f"expert {e} {p} is a {type(lin).__name__}, not nn.Linear")
        first = linears[(0, "gate_proj")].weight
        fused.to(device=first.device, dtype=first.dtype)
        with torch.no_grad():
            for e in range(self.num_experts):
                for p, target in _slices(fused.gate_up_proj.data, fused.down_proj.data, e).items():
                    w = linears[(e, p)].weight.detach()
                    if w.data_ptr() != target.data_ptr() or w.stride() != target.stride():
                        target.copy_(w)
