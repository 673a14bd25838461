"""Storage kinds are registered classes, one per QuantizedTensor kind, storing exactly its TABLES."""

import subprocess
import sys

import pytest

from requant.errors import CheckpointError
from requant.format.kinds import KINDS, StorageKind, register
from requant.format.layout import LayerLayout, encode_layer
from requant.quantizers.base import TENSOR_KINDS


def test_every_quantized_tensor_kind_has_a_storage_kind_and_back():
    assert set(KINDS) == set(TENSOR_KINDS) == {"lut", "uniform", "awq", "trellis"}


@pytest.mark.parametrize(("kind", "group"), [("lut", None), ("uniform", 16), ("awq", 16), ("trellis", None)])
def test_a_kinds_tables_are_its_tensor_classes_tables(make_layer, kind, group):
    q = make_layer(16, 64, 3, kind=kind, nnz=5, group=group, seed=1)
    layout, tensors = encode_layer(q)
    tables = set(layout.storage.tables(layout))
    assert tables == set(q.dense.tables()) == set(TENSOR_KINDS[kind].TABLES) & set(q.dense.tables())
    assert set(tensors) == {"weight", *tables, "sparse_rowptr", "sparse_col", "sparse_value"}


def test_registration_refuses_a_second_kind_of_the_same_name():
    class Again(StorageKind):
        name = "lut"

        def tables(self, layout):
            return {}

    with pytest.raises(ValueError, match="registered twice"):
        register(Again)
    with pytest.raises(CheckpointError, match="has no stored layout"):
        LayerLayout("nope", 4, 8, 3)


def test_kinds_are_known_whatever_was_imported_first():
    code = (
        "from requant.quantizers.base import QuantizedTensor\n"
        "from requant.format.kinds import KINDS\n"
        "import sys; print(sorted(KINDS))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['awq', 'lut', 'trellis', 'uniform']"
