"""x W^T for a packed Linear on the GPU, chosen by tokens per forward.

One token, BCQ: a CUDA-core kernel (`gemv`) moves each weight's sign bit into c x in registers. Up
to a few dozen tokens (memory-bound), uniform formats: a fused tensor-core kernel reads the packed
bits and never forms W. Many tokens (compute-bound): W is dequantized just in time, a block of rows
at a time, into two bf16 scratch buffers shared by every layer (the next block on a side stream while
cuBLAS multiplies the current one). No layer keeps a dequantized copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qdllm.kernels.layout import BcqLayout, UniformLayout, bcq_layout, uniform_layout

# Tokens per forward up to which the fused kernel runs, per packed kind. H200, LLaDA-8B shapes
# (experiments/results/bench_packed_h200.json): the blocked path beats the fused BCQ kernel at every
# M from 1 on all three shapes (33 vs 38 us, 92 vs 107 us, 94 vs 107 us at M = 1), so BCQ never runs
# fused; the fused uniform kernel wins up to 16 tokens and loses at 64.
FUSED_MAX_TOKENS = {"bcq": 0, "uniform": 32}
# Tokens per forward up to which BCQ runs the CUDA-core kernel: at 1 token it beats the blocked path
# 1.5-2x on the three shapes (22 vs 34 us, 49 vs 93, 52 vs 95); at 4 it loses (68 vs 34 us), as its
# cost grows with every token. 2 and 3 were not measured. (A CUDA-core kernel for the uniform formats
# was measured slower than the fused one at 1 and 4 tokens, 36 vs 19 us on 4096x4096, and dropped.)
GEMV_MAX_TOKENS = {"bcq": 1, "uniform": 0}
# one row block of W in bf16; 64 MiB blocks beat L2-sized 16 MiB ones (fewer launches)
SCRATCH_BYTES = 64 * 2**20
DEQUANT_BLOCK_ROWS = 32


@dataclass(frozen=True)
class FusedConfig:
    """Launch shape of a fused matmul: `block_rows` output features x `block_tokens` tokens per
    program, `groups_per_program` column groups each (fewer -> more programs adding into fp32)."""

    block_rows: int
    block_tokens: int
    groups_per_program: int
    num_warps: int = 4


def fused_config(rows: int, groups: int, tokens: int, processors: int, block_rows: int = 64) -> FusedConfig:
    """Enough programs to fill the GPU about four times over, splitting the groups when the output
    alone gives too few."""
    block_tokens = 16 if tokens <= 16 else 32 if tokens <= 32 else 64
    tiles = -(-rows // block_rows) * -(-tokens // block_tokens)
    splits = min(groups, max(1, -(-4 * processors // tiles)))
    return FusedConfig(block_rows, block_tokens, groups // splits)  # rounded down: >= `splits` programs


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of the CUDA-core kernel: `block_rows` output features per program, all tokens,
    `groups_per_program` column groups each."""

    block_rows: int
    groups_per_program: int
    num_warps: int = 4


def gemv_config(
    rows: int, groups: int, tokens: int, processors: int, programs_per_processor: int = 4
) -> GemvConfig:
    """Rows x tokens per program held at 32 (at least 4 rows), so the fp32 partial sums (that many
    times the group width) stay in registers; groups split until the GPU is filled
    `programs_per_processor` times over."""
    block_rows = max(4, 32 // (1 << (tokens - 1).bit_length()))  # tokens padded to a power of two
    splits = min(groups, max(1, -(-programs_per_processor * processors // -(-rows // block_rows))))
    return GemvConfig(block_rows, groups // splits)


def processor_count(x: torch.Tensor) -> int:
    """Streaming multiprocessors of x's GPU (1 off the GPU, e.g. under Triton's interpreter)."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1


_SCRATCH: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def scratch(numel: int, device: torch.device, dtype: torch.dtype, slot: int = 0) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, reused by every call on this device and dtype;
    `slot` names one of several such buffers (the blocked path double-buffers)."""
    key = (device, dtype, slot)
    if key not in _SCRATCH or _SCRATCH[key].numel() < numel:
        _SCRATCH[key] = torch.empty(numel, device=device, dtype=dtype)
    return _SCRATCH[key][:numel]


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream on which the blocked path dequantizes, one per device."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class PackedMatmul:
    """The kernels of one packed Linear on one device: its tensors as stored, plus group offsets."""

    def __init__(self, tensors: dict[str, torch.Tensor], kind: str, group_size: int, sym: bool):
        self.tensors, self.kind, self.group_size, self.sym = tensors, kind, group_size, sym
        # read once per layer: a device-to-host read per call would synchronise every forward
        self.shape = tuple(int(v) for v in tensors["weight_shape"])
        self.rows, self.cols = self.shape
        builder = bcq_layout if kind == "bcq" else uniform_layout
        self.layout: BcqLayout | UniformLayout = builder(tensors, group_size, tensors["weight_shape"].device)
        self.groups = -(-self.cols // group_size)

    def fused(self, x: torch.Tensor, config: FusedConfig | None = None) -> torch.Tensor:
        """x (M, C) -> (M, R) without forming W."""
        if config is None:
            config = fused_config(self.rows, self.groups, x.shape[0], processor_count(x))
        launch = (config.block_rows, config.block_tokens, config.groups_per_program, config.num_warps)
        if self.kind == "bcq":
            from qdllm.kernels.bcq import bcq_matmul

            return bcq_matmul(x, self.tensors, self.shape, self.layout, self.group_size, *launch)
        from qdllm.kernels.uniform import uniform_matmul

        return uniform_matmul(x, self.tensors, self.shape, self.layout, self.group_size, self.sym, *launch)

    def gemv(self, x: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
        """x (M, C) -> (M, R) on the CUDA cores, for a few tokens (BCQ layers)."""
        if self.kind != "bcq":
            raise ValueError(f"the CUDA-core kernel reads BCQ layers only, not {self.kind}: use fused()")
        if config is None:
            config = gemv_config(self.rows, self.groups, x.shape[0], processor_count(x))
        from qdllm.kernels.bcq import bcq_gemv

        launch = (config.block_rows, config.groups_per_program, config.num_warps)
        return bcq_gemv(x, self.tensors, self.shape, self.layout, self.group_size, *launch)

    def dequantize_rows(self, out: torch.Tensor, row0: int) -> None:
        """Rows row0 .. row0 + len(out) - 1 of W into `out` (n, C)."""
        if self.kind == "bcq":
            from qdllm.kernels.bcq import bcq_dequantize_rows

            bcq_dequantize_rows(
                out, self.tensors, self.shape, self.layout, self.group_size, row0, DEQUANT_BLOCK_ROWS
            )
        else:
            from qdllm.kernels.uniform import uniform_dequantize_rows

            uniform_dequantize_rows(
                out,
                self.tensors,
                self.shape,
                self.layout,
                self.group_size,
                self.sym,
                row0,
                DEQUANT_BLOCK_ROWS,
            )

    def blocked(self, x: torch.Tensor, dtype: torch.dtype, block_bytes: int = SCRATCH_BYTES) -> torch.Tensor:
        """x (M, C) -> (M, R): W dequantized to `dtype` block by block into two shared scratch
        buffers, each block multiplied by cuBLAS straight into its columns of the output. On CUDA the
        next block is dequantized on a side stream while cuBLAS multiplies the current one."""
        block = max(DEQUANT_BLOCK_ROWS, block_bytes // (self.cols * dtype.itemsize))
        block = min(self.rows, block - block % DEQUANT_BLOCK_ROWS)
        starts = range(0, self.rows, block)
        buffers = [
            scratch(block * self.cols, x.device, dtype, slot).view(block, self.cols)
            for slot in range(min(2, len(starts)))
        ]
        out = torch.empty(x.shape[0], self.rows, dtype=x.dtype, device=x.device)
        overlap = x.is_cuda and len(starts) > 1
        main = torch.cuda.current_stream(x.device) if overlap else None
        side = side_stream(x.device) if overlap else None
        if overlap:
            side.wait_stream(main)  # x is ready and the previous call is done with the buffers
        released: list[torch.cuda.Event | None] = [None] * len(buffers)
        for index, row0 in enumerate(starts):
            slot = index % len(buffers)
            weight = buffers[slot][: min(block, self.rows - row0)]
            if overlap:
                with torch.cuda.stream(side):
                    if released[slot] is not None:
                        side.wait_event(released[slot])  # cuBLAS has read this buffer's last block
                    self.dequantize_rows(weight, row0)
                    ready = torch.cuda.Event()
                    ready.record(side)
                main.wait_event(ready)
            else:
                self.dequantize_rows(weight, row0)
            torch.mm(x, weight.t().to(x.dtype), out=out[:, row0 : row0 + weight.shape[0]])
            if overlap:
                released[slot] = torch.cuda.Event()
                released[slot].record(main)
        return out

    def __call__(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """x (M, C) -> (M, R), by the faster path for M tokens."""
        tokens = x.shape[0]
        if tokens <= GEMV_MAX_TOKENS[self.kind]:
            return self.gemv(x)
        return self.fused(x) if tokens <= FUSED_MAX_TOKENS[self.kind] else self.blocked(x, dtype)


def packed_linear(module, x: torch.Tensor) -> torch.Tensor:
    """`module` (a QuantizedLinear) applied to x (..., in_features) through the kernels; the group
    offsets are computed on the first call and kept on the module until its buffers change."""
    plan = getattr(module, "_kernel_plan", None)
    if plan is None or plan.tensors["weight_shape"] is not module.weight_shape:  # new or moved buffers
        plan = PackedMatmul(module.packed(), module.fmt.kind, module.fmt.group_size, module.fmt.sym)
        module._kernel_plan = plan
    flat = x.reshape(-1, x.shape[-1])
    y = plan(flat if flat.stride(-1) == 1 else flat.contiguous(), module.dtype)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])
