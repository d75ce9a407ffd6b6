"""torch's dtypes, layouts and memory formats by name, without importing torch.

DCP's ``.metadata`` names a tensor's dtype (and its layout and memory format) as a global of the
``torch`` module; reading it for ``inspect`` or ``diff`` needs only the name and the element size,
which this table gives (tests/unit/test_unpickler.py holds it to torch's own). A name not here
is looked up in torch itself.
"""

from __future__ import annotations

# Bytes per element of every dtype a DCP checkpoint may name, as torch names them (a unit test
# holds this table to torch's own itemsizes). A dtype not listed is looked up in torch.
ITEMSIZE: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint16": 2, "uint32": 4, "uint64": 8,
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "complex32": 4, "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "float4_e2m1fn_x2": 1, "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
    "bits1x8": 1, "bits2x4": 1, "bits4x2": 1, "bits8": 1, "bits16": 2,
    **{f"int{k}": 1 for k in range(1, 8)}, **{f"uint{k}": 1 for k in range(1, 8)},
}
# torch's other names of dtypes (torch.float is torch.float32), which a pickle may name too.
ALIASES = {"short": "int16", "int": "int32", "long": "int64", "half": "float16", "float": "float32",
           "double": "float64", "chalf": "complex32", "cfloat": "complex64", "cdouble": "complex128", "bit": "uint1"}
# Complex dtypes and the real dtype of their two parts (a complex piece is described and
# fingerprinted as its real view: one more dim of 2).
COMPLEX_PARTS = {"complex64": "float32", "complex128": "float64", "complex32": "float16"}
LAYOUTS = frozenset({"strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn", "jagged"})
MEMORY_FORMATS = frozenset({"contiguous_format", "channels_last", "channels_last_3d", "preserve_format",
                            "legacy_contiguous_format"})
