"""Names of the tensors a quantized layer stores (suffixes after `<layer>.`), shared by layout, kinds, qlinear."""

from __future__ import annotations

QWEIGHT, LUT, SCALE, ZERO = "weight", "lut", "scale", "zero"
IN_SCALE, SIGN_IN, SIGN_OUT = "in_scale", "sign_in", "sign_out"
ROWPTR, COL, VALUE = "sparse_rowptr", "sparse_col", "sparse_value"
DENSE_TENSORS = (QWEIGHT,)
TABLE_TENSORS = (LUT, SCALE, ZERO, IN_SCALE, SIGN_IN, SIGN_OUT)
SPARSE_TENSORS = (ROWPTR, COL, VALUE)
V1_QWEIGHT = "qweight"  # format v1's name of the packed codes, 2-D (out, ceil(in/8)·bits)
