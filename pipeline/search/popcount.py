"""Hamming distances on a device: binary codes as int32 words ``(n, W)`` against query codes
``(m, W)``, as int32 ``(m, n)`` (one row per query, as the device search lays out scores).

Two implementations of one formula (XOR, then the SWAR popcount of each 32-bit word, summed):

- ``torch``: elementwise torch ops over row slices; runs on any device (CI runs it on the CPU).
  Each step is a pass over an ``(rows, W)`` temporary: on a GPU about ten passes of memory
  traffic per code, so it bounds what a scan of 1e9 codes can reach.
- ``triton``: one fused Triton kernel on CUDA that reads each code once, keeps its words in
  registers and loops over the queries: one pass of memory traffic, whatever ``m``.

:func:`hamming` takes ``triton`` on CUDA where Triton is installed, else ``torch``; ``method``
forces one (``benchmarks/gpu_search.py`` measures both). With ``TRITON_INTERPRET=1`` set before
Triton is imported, the kernel runs on the CPU (slowly): the tests check it against NumPy there.
torch and Triton are imported inside the functions.
"""

from __future__ import annotations

import functools
import os
from typing import Any

TORCH_ROWS = 1 << 22  # rows per slice of the torch path: bounds its (rows, W) temporaries


def _popcount32(v: Any) -> Any:
    """Set bits of each int32 (SWAR; the masks clear the sign bits that arithmetic shifts bring in)."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) >> 24) & 0xFF


def hamming_torch(words: Any, queries: Any) -> Any:
    """int32 ``(m, n)`` Hamming distances by torch elementwise ops."""
    import torch

    n, m = words.shape[0], queries.shape[0]
    out = torch.empty((m, n), dtype=torch.int32, device=words.device)
    for a in range(0, n, TORCH_ROWS):
        w = words[a : a + TORCH_ROWS]
        for j in range(m):
            out[j, a : a + len(w)] = _popcount32(w ^ queries[j]).sum(1, dtype=torch.int32)
    return out


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    """The Triton kernel, compiled on first use (Triton imported here, not at import time)."""
    import triton
    import triton.language as tl

    @triton.jit
    def hamming_kernel(words, queries, out, n, m, W: tl.constexpr, WP: tl.constexpr, BLOCK: tl.constexpr):
        # int64 offsets: a slice of 2**27 codes of 1,024 bits is 2**32 words, past int32
        rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.arange(0, WP)
        inside = (rows[:, None] < n) & (cols[None, :] < W)
        w = tl.load(words + rows[:, None] * W + cols[None, :], mask=inside, other=0)
        for j in range(m):
            q = tl.load(queries + j * W + cols, mask=cols < W, other=0)
            v = w ^ q[None, :]
            v = v - ((v >> 1) & 0x55555555)
            v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
            v = (v + (v >> 4)) & 0x0F0F0F0F
            v = ((v * 0x01010101) >> 24) & 0xFF
            tl.store(out + j * n + rows, tl.sum(v, axis=1), mask=rows < n)

    return hamming_kernel


def hamming_triton(words: Any, queries: Any, block: int = 128) -> Any:
    """int32 ``(m, n)`` Hamming distances by the fused Triton kernel."""
    import torch
    import triton

    n, w = words.shape
    m = queries.shape[0]
    out = torch.empty((m, n), dtype=torch.int32, device=words.device)
    if n and m:
        grid = (triton.cdiv(n, block),)
        _kernel()[grid](words.contiguous(), queries.contiguous(), out, n, m, W=w,
                        WP=triton.next_power_of_2(w), BLOCK=block)  # fmt: skip
    return out


def available(method: str, device: str) -> bool:
    """Whether ``method`` (torch | triton) runs on ``device`` here."""
    if method == "torch":
        return True
    if not device.startswith("cuda") and not os.environ.get("TRITON_INTERPRET"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def default_method(device: str) -> str:
    """The popcount a search on ``device`` uses: ``$AERIAL_SEARCH_POPCOUNT`` where set, else triton
    on CUDA where installed, else torch."""
    chosen = os.environ.get("AERIAL_SEARCH_POPCOUNT")
    if chosen:
        return chosen
    return "triton" if device.startswith("cuda") and available("triton", device) else "torch"


def hamming(words: Any, queries: Any, method: str | None = None) -> Any:
    """int32 ``(m, n)`` Hamming distances; ``method`` None: :func:`default_method`."""
    method = method or default_method(str(words.device))
    return hamming_triton(words, queries) if method == "triton" else hamming_torch(words, queries)
