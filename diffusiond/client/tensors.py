"""Rebuilding ``Tensor`` messages (e.g. LATENT previews) as numpy arrays."""

from __future__ import annotations

from typing import Any

from diffusiond.api.v1 import diffusion_pb2 as pb

_NUMPY_DTYPES = {
    pb.DATA_TYPE_FLOAT32: "<f4",
    pb.DATA_TYPE_FLOAT16: "<f2",
}


def tensor_to_numpy(tensor: pb.Tensor) -> Any:
    """Shape + dtype + little-endian bytes -> numpy array (needs numpy)."""
    import numpy as np

    if tensor.dtype not in _NUMPY_DTYPES:
        raise ValueError(f"tensor dtype {pb.DataType.Name(tensor.dtype)} has no numpy equivalent here")
    array = np.frombuffer(tensor.data, dtype=np.dtype(_NUMPY_DTYPES[tensor.dtype]))
    return array.reshape(tuple(tensor.shape))
