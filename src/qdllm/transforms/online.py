"""Online input transforms of a Linear: x -> x T before the Linear, with W T folded into its weight.

An equivalence transform that cannot be folded into the op before a Linear (attention before
o_proj, the SwiGLU product before down_proj, ...) runs online. `attach_input_transform(linear, t)`
keeps the Linear at its dotted name (the pipeline finds, quantizes and checkpoints Linears by name
and writes their weights in place) and:

* registers `t` as the Linear's child `input_transform`: its buffers move with the model on
  `.to(device)` and are non-persistent, so the state dict keeps the model's own keys (a saved
  transformed model therefore needs its transforms re-attached on load);
* registers `t.pre_hook` as a forward pre-hook with `prepend=True`, so it runs before any hook added
  later (activation fake-quant, the pipeline's input statistics): they all see the rotated input
  x T, which is what the rotated weight W T multiplies.

A module that replaces the Linear (e.g. a packed `QuantizedLinear`) carries the transform over with
`attach_input_transform(new, input_transform_of(old))`. A deep copy of the block keeps it: the hook
is a bound method of the child, which `copy.deepcopy` re-binds to the copied child.

A packed checkpoint stores each transform as a record: `transform_record(t)` gives its JSON-able
description (`kind` + arguments) and its tensors; `transform_from_record` rebuilds it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qdllm.transforms.hadamard import KroneckerRotation

CHILD_NAME = "input_transform"
_KINDS: dict[str, type[InputTransform]] = {}


class InputTransform(nn.Module):
    """Base of online transforms: `forward(x)` maps (..., C) to x T, (..., C). A subclass names
    itself with `kind` (registering it for checkpoints) and implements `record` / `from_record`."""

    kind = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:  # its own name, not one inherited from a parent kind
            _KINDS[cls.kind] = cls

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        return (self(args[0]), *args[1:])

    def record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able arguments, tensors) that `from_record` rebuilds this transform from."""
        raise NotImplementedError

    @classmethod
    def from_record(cls, args: dict[str, Any], tensors: dict[str, torch.Tensor]) -> InputTransform:
        raise NotImplementedError


def transform_record(transform: InputTransform) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`transform` as ({"kind": ..., arguments}, tensors) for a checkpoint."""
    args, tensors = transform.record()
    return {"kind": transform.kind, **args}, tensors


def transform_from_record(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> InputTransform:
    """The transform a `transform_record` describes."""
    import qdllm.transforms  # noqa: F401  (registers every transform module's kinds)

    kind = spec.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown online input transform kind {kind!r}; known: {sorted(_KINDS)}")
    return _KINDS[kind].from_record({k: v for k, v in spec.items() if k != "kind"}, tensors)


def attach_input_transform(linear: nn.Module, transform: InputTransform) -> None:
    """Run `transform` on `linear`'s input from now on (see the module docstring)."""
    if input_transform_of(linear) is not None:
        raise ValueError(
            f"{type(linear).__name__} already has an online input transform; compose the transforms "
            "into one before attaching (two equivalence transforms on the same input)"
        )
    linear.add_module(CHILD_NAME, transform)
    linear.register_forward_pre_hook(transform.pre_hook, prepend=True)


def input_transform_of(linear: nn.Module) -> InputTransform | None:
    child = getattr(linear, CHILD_NAME, None)
    return child if isinstance(child, InputTransform) else None


class LastDimRotation(InputTransform):
    """x -> x Q with Q a `KroneckerRotation` (e.g. the full Hadamard at the down_proj input)."""

    kind = "last_dim_rotation"

    def __init__(self, rotation: KroneckerRotation):
        super().__init__()
        self.rotation = rotation

    def record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return self.rotation.record()

    @classmethod
    def from_record(cls, args: dict[str, Any], tensors: dict[str, torch.Tensor]) -> LastDimRotation:
        return cls(KroneckerRotation.from_record(args, tensors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation(x)


class HeadMixing(InputTransform):
    """x -> x (Q_heads ⊗ I_head_dim): mixes the heads of the attention output, (..., heads * hd).

    Channel c = head * hd + j (the layout of concatenated heads); Q_heads an orthogonal rotation of
    order `heads` applied to every within-head index j.
    """

    kind = "head_mixing"

    def __init__(self, rotation: KroneckerRotation, head_dim: int):
        super().__init__()
        self.rotation = rotation
        self.head_dim = int(head_dim)

    def record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        args, tensors = self.rotation.record()
        return {**args, "head_dim": self.head_dim}, tensors

    @classmethod
    def from_record(cls, args: dict[str, Any], tensors: dict[str, torch.Tensor]) -> HeadMixing:
        return cls(KroneckerRotation.from_record(args, tensors), args["head_dim"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.rotation.n
        y = x.reshape(*x.shape[:-1], heads, self.head_dim).transpose(-1, -2)
        return self.rotation(y).transpose(-1, -2).reshape(x.shape)
