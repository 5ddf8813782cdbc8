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
"""

from __future__ import annotations

import torch
from torch import nn

CHILD_NAME = "input_transform"


class InputTransform(nn.Module):
    """Base of online transforms: `forward(x)` maps (..., C) to x T, (..., C)."""

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        return (self(args[0]), *args[1:])


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

    def __init__(self, rotation: nn.Module):
        super().__init__()
        self.rotation = rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation(x)


class HeadMixing(InputTransform):
    """x -> x (Q_heads ⊗ I_head_dim): mixes the heads of the attention output, (..., heads * hd).

    Channel c = head * hd + j (the layout of concatenated heads); Q_heads an orthogonal rotation of
    order `heads` applied to every within-head index j.
    """

    def __init__(self, rotation: nn.Module, head_dim: int):
        super().__init__()
        self.rotation = rotation
        self.head_dim = int(head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = self.rotation.n
        y = x.reshape(*x.shape[:-1], heads, self.head_dim).transpose(-1, -2)
        return self.rotation(y).transpose(-1, -2).reshape(x.shape)
