"""What unpacking one Linear needs besides its tensors, recorded per module in the checkpoint.

Format version 2 records every packed module's `ModuleFormat` under
`quantization_config.modules`; version 1 recorded only the kind per module and one `group_size` /
`sym` for the whole checkpoint (scale dtype implied by the stored scales). Both are read, and every
module's format is cross-checked against its tensors at load. A uniform module may carry a
per-input-channel scale (`uq_input_scale`, AWQ), recorded as `input_scale: true`; a format without
the key has none, so checkpoints written before it load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from qdllm.quant.spec import SCALE_DTYPES

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
KINDS = ("bcq", "uniform")
FIELDS = {"bcq": ("group_size", "scale_dtype"), "uniform": ("group_size", "scale_dtype", "sym")}
OPTIONAL_FIELDS = {"bcq": (), "uniform": ("input_scale",)}  # recorded only when set
GROUP_KEY = {"bcq": "bcq_k", "uniform": "uq_bits"}  # one entry per column group
SCALE_KEYS = {
    "bcq": ("bcq_row_scale", "bcq_col_scale", "bcq_row_mean"),
    "uniform": ("uq_scale", "uq_mean", "uq_input_scale"),
}
INPUT_SCALE_KEY = "uq_input_scale"


class PackedFormatError(ValueError):
    """Packed tensors disagree with each other or with the checkpoint's config."""


@dataclass(frozen=True)
class ModuleFormat:
    """Layout of one packed Linear.

    kind: "bcq" (binary-coded planes) or "uniform" (integer codes).
    group_size: columns per group as quantized (this Linear's effective group size).
    scale_dtype: storage dtype of every scale (and row mean), a key of `SCALE_DTYPES`.
    sym: uniform only; True when the zero point 2^(b-1) is implied, not stored. None for bcq.
    input_scale: uniform only; True when the codes store Q(W diag(s)) and the Linear divides its
        input by s (C,) (`uq_input_scale`, AWQ).
    """

    kind: str
    group_size: int
    scale_dtype: str
    sym: bool | None = None
    input_scale: bool = False

    @classmethod
    def of_tensors(
        cls, kind: str, group_size: int, tensors: dict[str, torch.Tensor], sym: bool | None = None
    ) -> ModuleFormat:
        """The format of hand-built packed `tensors` of one Linear, scale dtype read from its scales."""
        dtype = tensors[SCALE_KEYS[kind][0]].dtype
        names = [name for name, candidate in SCALE_DTYPES.items() if candidate == dtype]
        if not names:
            raise PackedFormatError(f"scales of dtype {dtype} are not one of {list(SCALE_DTYPES)}")
        if kind == "bcq":
            return cls(kind, group_size, names[0])
        return cls(kind, group_size, names[0], sym, INPUT_SCALE_KEY in tensors)

    def to_json(self) -> dict[str, Any]:
        fields = ("kind", *FIELDS[self.kind], *(f for f in OPTIONAL_FIELDS[self.kind] if getattr(self, f)))
        return {key: value for key, value in asdict(self).items() if key in fields}

    @classmethod
    def from_json(cls, module: str, raw: Any) -> ModuleFormat:
        """Validate the recorded format of `module`; `PackedFormatError` names the module and field."""
        if not isinstance(raw, Mapping):
            raise PackedFormatError(
                f"module {module}: its format is {raw!r}, not a mapping of kind and {FIELDS['uniform']}; "
                "re-save the checkpoint with qdllm.packing.save_quantized"
            )
        kind = raw.get("kind")
        if kind not in KINDS:
            raise PackedFormatError(f"module {module}: kind={kind!r} must be one of {KINDS}")
        missing = [key for key in FIELDS[kind] if key not in raw]
        unknown = sorted(set(raw) - {"kind", *FIELDS[kind], *OPTIONAL_FIELDS[kind]})
        if missing or unknown:
            optional = f" (optional {OPTIONAL_FIELDS[kind]})" if OPTIONAL_FIELDS[kind] else ""
            raise PackedFormatError(
                f"module {module}: a {kind} format records exactly {FIELDS[kind]}{optional}; "
                f"missing {missing}, unknown {unknown}"
            )
        group_size, scale_dtype = raw["group_size"], raw["scale_dtype"]
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise PackedFormatError(f"module {module}: group_size={group_size!r} must be a positive int")
        if scale_dtype not in SCALE_DTYPES:
            raise PackedFormatError(
                f"module {module}: scale_dtype={scale_dtype!r} must be one of {list(SCALE_DTYPES)}"
            )
        sym = raw.get("sym")
        if kind == "uniform" and not isinstance(sym, bool):
            raise PackedFormatError(f"module {module}: sym={sym!r} must be true or false")
        input_scale = raw.get("input_scale", False)
        if not isinstance(input_scale, bool):
            raise PackedFormatError(f"module {module}: input_scale={input_scale!r} must be true or false")
        return cls(kind, group_size, scale_dtype, sym, input_scale)

    def check(self, module: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise `PackedFormatError` unless `tensors` (loaded values) are laid out as recorded."""
        cols = int(tensors["weight_shape"][1])
        groups = -(-cols // self.group_size)
        stored = tensors[GROUP_KEY[self.kind]].shape[0]
        if stored != groups:
            raise PackedFormatError(
                f"module {module}: group_size={self.group_size} makes {groups} groups of {cols} columns, "
                f"but {GROUP_KEY[self.kind]} has {stored}"
            )
        dtype = SCALE_DTYPES[self.scale_dtype]
        for key in SCALE_KEYS[self.kind]:
            if key in tensors and tensors[key].dtype != dtype:
                raise PackedFormatError(
                    f"module {module}: scale_dtype={self.scale_dtype!r} but {key} is stored as "
                    f"{tensors[key].dtype}"
                )
        if self.kind == "uniform":
            self._check_zero_points(module, tensors)
            self._check_input_scale(module, tensors, cols)

    def _check_input_scale(self, module: str, tensors: Mapping[str, torch.Tensor], cols: int) -> None:
        """`input_scale` set <=> a (C,) uq_input_scale is stored."""
        stored = tensors.get(INPUT_SCALE_KEY)
        if self.input_scale != (stored is not None):
            has = "stores" if stored is not None else "does not store"
            raise PackedFormatError(
                f"module {module}: input_scale={self.input_scale} but the module {has} {INPUT_SCALE_KEY}"
            )
        if stored is not None and tuple(stored.shape) != (cols,):
            raise PackedFormatError(
                f"module {module}: {INPUT_SCALE_KEY} has shape {tuple(stored.shape)}, expected ({cols},)"
            )

    def _check_zero_points(self, module: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Asymmetric grids store their zero points (uq_zero); symmetric ones imply 2^(b-1). A
        module of binarised groups only (uq_bits all 0) has no zero points either way."""
        has_uniform_groups = bool((tensors["uq_bits"] != 0).any())
        if has_uniform_groups and self.sym == ("uq_zero" in tensors):
            stored = "stores" if "uq_zero" in tensors else "does not store"
            raise PackedFormatError(
                f"module {module}: sym={self.sym} but the module {stored} zero points (uq_zero)"
            )


def module_formats(qc: Mapping[str, Any]) -> dict[str, ModuleFormat]:
    """Module name -> `ModuleFormat` from a checkpoint's `quantization_config` (version 1 or 2)."""
    version = qc.get("format_version")
    if version not in READABLE_VERSIONS:
        raise PackedFormatError(
            f"quantization_config.format_version={version!r}: this qdllm reads versions {READABLE_VERSIONS}"
        )
    modules = qc.get("modules")
    if not isinstance(modules, Mapping):
        raise PackedFormatError("quantization_config.modules must map module names to their packed formats")
    if version == 1:
        modules = {name: _version1_format(qc, name, kind) for name, kind in modules.items()}
    return {name: ModuleFormat.from_json(name, raw) for name, raw in modules.items()}


def _version1_format(qc: Mapping[str, Any], module: str, kind: Any) -> dict[str, Any]:
    """Version 1 recorded group_size and sym once for all modules; its scale dtype is the dtype of
    the stored scales (the first scale key of the kind, in `quantization_config.tensors`)."""
    if kind not in KINDS:
        raise PackedFormatError(f"module {module}: kind={kind!r} must be one of {KINDS}")
    for key in FIELDS[kind]:
        if key != "scale_dtype" and key not in qc:
            raise PackedFormatError(
                f"quantization_config.{key} is missing: a format_version 1 checkpoint records it once "
                f"for all modules (module {module} needs it); add it to config.json or re-save the checkpoint"
            )
    scale_key = SCALE_KEYS[kind][0]
    try:
        scale_dtype = qc["tensors"][module][scale_key]["dtype"]
    except (KeyError, TypeError) as exc:
        raise PackedFormatError(
            f"module {module}: quantization_config.tensors lacks the dtype of {scale_key}"
        ) from exc
    shared = {key: qc[key] for key in FIELDS[kind] if key != "scale_dtype"}
    return {"kind": kind, "scale_dtype": scale_dtype, **shared}
