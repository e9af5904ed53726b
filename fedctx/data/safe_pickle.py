"""A pickle reader for data files that builds only what a data release holds, never running code.

``pickle.load`` runs whatever a file asks for: a pickle can name any importable callable
(``os.system``, ``builtins.exec``) and have it called while loading. Data files are downloaded
or copied from elsewhere, so fedctx never calls ``pickle.load`` on them; :func:`load` reads them
with an unpickler whose ``find_class`` hands out only inert stand-ins:

==========================================  ==================================================
global the file names                       what the unpickler builds
==========================================  ==================================================
``numpy.core.multiarray._reconstruct``      a placeholder for an array (CIFAR's release,
(and ``numpy._core.multiarray``, numpy 2)   protocol 2 from Python 2); numpy 2 writes the
                                            ``numpy._core`` path
``numpy.ndarray``                           a marker passed to ``_reconstruct``
``numpy.dtype``                             a placeholder for a dtype
``_codecs.encode``                          ``str.encode("latin-1")`` only (how Python 3 writes
                                            ``bytes`` at protocol 2)
==========================================  ==================================================

Plain ``dict``, ``list``, ``tuple``, ``str``, ``bytes``, ``int``, ``float``, ``bool`` and
``None`` need no global. After loading, every array placeholder is turned into a numpy array by
``numpy.frombuffer`` from its raw bytes, with a plain numeric dtype (``u``/``i``/``f``/``b``,
no object or structured dtype) and a shape whose size matches the bytes; numpy's own
``__setstate__`` never sees the file's data. Any other global, a persistent id, or a malformed
array is refused with :class:`UnsafePickleError`.

The CIFAR-10/100 python releases need exactly ``numpy.core.multiarray._reconstruct``,
``numpy.ndarray`` and ``numpy.dtype`` (checked on the real files); the other two entries let
fedctx read the same layout written by Python 3 with numpy 2 at protocols 2-4.
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any, BinaryIO

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something a data file never holds (a global, a persistent id)."""


_NDARRAY = object()  # what the file's ``numpy.ndarray`` becomes
_DTYPE_CODE = re.compile(r"[uif][1248]|f16|b1")


class _DType:
    """Stand-in for ``numpy.dtype(code, align, copy)``; its state gives the byte order."""

    def __init__(self, code: Any, align: Any = False, copy: Any = False) -> None:
        self.code, self.state = code, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def build(self) -> np.dtype:
        code = self.code.decode("latin-1") if isinstance(self.code, bytes) else self.code
        if not isinstance(code, str) or not _DTYPE_CODE.fullmatch(code):
            raise UnsafePickleError(f"array dtype {code!r} is not a plain number type")
        order = "|"
        if self.state is not None:
            if not (isinstance(self.state, tuple) and len(self.state) >= 2):
                raise UnsafePickleError("malformed dtype state")
            order = self.state[1]
            if any(s is not None for s in self.state[2:4]):  # sub-array or fields
                raise UnsafePickleError("structured array dtypes are not allowed")
        if order not in ("<", ">", "|", "="):
            raise UnsafePickleError(f"malformed dtype byte order {order!r}")
        dtype = np.dtype(code)
        return dtype.newbyteorder(order) if order in "<>" else dtype


class _Array:
    """Stand-in for ``numpy.core.multiarray._reconstruct(ndarray, shape, typecode)``."""

    def __init__(self, cls: Any, shape: Any = (0,), typecode: Any = b"b") -> None:
        if cls is not _NDARRAY:
            raise UnsafePickleError("_reconstruct may build numpy.ndarray only")
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def build(self) -> np.ndarray:
        state = self.state
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # drop the version
        if not (isinstance(state, tuple) and len(state) == 4):
            raise UnsafePickleError("malformed array state")
        shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DType):
            raise UnsafePickleError("array without a dtype")
        if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
            raise UnsafePickleError(f"malformed array shape {shape!r}")
        raw = raw.encode("latin-1") if isinstance(raw, str) else raw
        if not isinstance(raw, bytes):
            raise UnsafePickleError("array data are not raw bytes")
        dt = dtype.build()
        if len(raw) != int(np.prod(shape, dtype=object)) * dt.itemsize:
            raise UnsafePickleError(f"array of shape {shape} and dtype {dt} does not match its "
                                    f"{len(raw)} bytes")
        flat = np.frombuffer(raw, dtype=dt).copy()
        return flat.reshape(shape, order="F" if fortran else "C")


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1")):
        raise UnsafePickleError("_codecs.encode is allowed only as str -> latin-1 bytes")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _Array,
    ("numpy._core.multiarray", "_reconstruct"): _Array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DType,
    ("_codecs", "encode"): _encode,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise UnsafePickleError(f"it asks to build {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("it holds a persistent id")


def _finish(obj: Any) -> Any:
    if isinstance(obj, _Array):
        return obj.build()
    if isinstance(obj, _DType):
        return obj.build()
    if isinstance(obj, dict):
        return {k: _finish(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finish(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_finish(v) for v in obj)
    return obj


def load(file: BinaryIO, encoding: str = "latin1") -> Any:
    """Unpickle ``file`` building only dicts, lists, tuples, strings, bytes, numbers and plain
    numeric numpy arrays.

    Raises:
        UnsafePickleError: the file asks for anything else (the message says what).
        pickle.UnpicklingError, EOFError, ValueError: the file is not a complete pickle.
    """
    return _finish(_Unpickler(file, encoding=encoding).load())


def loads(data: bytes, encoding: str = "latin1") -> Any:
    """:func:`load` from bytes."""
    return load(io.BytesIO(data), encoding)
