"""Flower ``ArrayRecord`` encoding and decoding without ``np.save``/``np.load``'s per-call work.

Flower's :class:`~flwr.app.Array` holds a tensor as the bytes of an ``.npy`` file, written with
``np.save`` and read with ``np.load``, which parses the header with ``ast.literal_eval`` on every
call. A simulated client decodes the model and encodes its reply every round, and the server
decodes each reply's tensors several times (screening, the norm split, the inner strategy): for
the default digits CNN that is several milliseconds per client per round, next to ~20 ms of
local training with 100 clients (both measured in docs/results/simulation_overhead.md). The bytes
here are exactly ``np.save``'s (version 1.0 header), so any Flower code reads them; only the work
is less.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

Tensors = dict[str, torch.Tensor]
_C_ORDER = b"'fortran_order': False"


class PayloadArray(Array):
    """An :class:`~flwr.app.Array` whose ``numpy()`` reads the payload past the ``.npy`` header
    with the dtype and shape the Array already holds (a writable copy, as ``np.load`` gives).
    Any other layout (Fortran order, another serialization) falls back to Flower's ``numpy()``."""

    def numpy(self) -> np.ndarray:
        if self.stype == SType.NUMPY:
            dtype = np.dtype(self.dtype)
            count = math.prod(self.shape)
            offset = len(self.data) - count * dtype.itemsize
            if 0 < offset and _C_ORDER in self.data[:offset]:
                return np.frombuffer(self.data, dtype, count, offset).reshape(self.shape).copy()
        return super().numpy()


@functools.lru_cache(maxsize=4096)  # a pure function of (dtype, shape): a model has few
def _npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` version 1.0 header ``np.save`` writes for a C-ordered array."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue()


def encode(tensors: Tensors) -> ArrayRecord:
    """``ArrayRecord(tensors)``: the same bytes (a tensor that is not C-contiguous, which
    ``np.save`` writes in Fortran order, is written in C order). The items are Flower's own
    :class:`~flwr.app.Array`, so the record can travel anywhere: Flower's Deployment Engine
    serializes only its own classes (a :class:`PayloadArray` is for the receiving side)."""
    record = ArrayRecord()
    for key, tensor in tensors.items():
        array = tensor.detach().cpu().numpy()
        if not array.flags.c_contiguous:
            array = np.ascontiguousarray(array)  # np.save would write it in Fortran order
        header = _npy_header(np.lib.format.dtype_to_descr(array.dtype), array.shape)
        record[key] = Array(dtype=str(array.dtype), shape=array.shape, stype=SType.NUMPY,
                            data=header + array.tobytes())
    return record


def fast(record: Any) -> Any:
    """``record``'s arrays as :class:`PayloadArray` (no copy of the bytes); any other record
    unchanged. For records read in this process only: a message or ``context.state`` that
    Flower's Deployment Engine serializes must hold plain Arrays."""
    if not isinstance(record, ArrayRecord):
        return record
    out = ArrayRecord()
    for key, a in record.items():
        out[key] = (a if isinstance(a, PayloadArray) else
                    PayloadArray(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data))
    return out


def sub_record(record: ArrayRecord, keys: Iterable[str]) -> ArrayRecord:
    """The ``keys`` of ``record`` as a new record holding the same Array objects (Flower's
    ``ArrayRecord({...})`` would copy them into plain Arrays)."""
    out = ArrayRecord()
    for key in keys:
        out[key] = record[key]
    return out
