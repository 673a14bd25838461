"""Format v1 kinds "awq" (uniform codes + per-input-channel scale) and "trellis" (QTIP): checkpoints and QuantLinear."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from requant.cli import main
from requant.config import QuantConfig
from requant.errors import CheckpointError
from requant.format import (
    QuantLinear,
    kernels,
    load_checkpoint,
    load_quantized,
    quant_linears,
    save_checkpoint,
    set_kernel_mode,
)
from requant.format.checkpoint import read_header
from requant.format.layout import LayerLayout, check_specs, encode_layer
from requant.format.names import IN_SCALE, SCALE, SIGN_IN, SIGN_OUT
from requant.format.qlinear import DECODE_MAX_ROWS, FAST_PATH_RTOL
from requant.pipeline import quantize
from requant.quantizers import ScaledUniformTensor, TrellisTensor
from requant.results import QuantizedLayer
from requant.sparse import SparseResidual

# Small, fast settings: AWQ with a coarse α grid, QTIP with a tiny trellis and tiles that divide 32/64/96.
CONFIGS = {
    "awq": dict(base="awq", bits=3, group_size=32, base_options={"n_grid": 5}),
    "qtip": dict(base="qtip", bits=2, base_options={"L": 6, "tile": (4, 8)}),
}
DENSE = {"awq": ScaledUniformTensor, "qtip": TrellisTensor}
KIND = {"awq": "awq", "qtip": "trellis"}
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    from helpers import word_text

    return word_text(tmp_path_factory.mktemp("text") / "t.txt")


@pytest.fixture(scope="module")
def runs(calib_text):
    """base → (model, tokenizer, result), quantized once per module (with 1% outliers kept sparse)."""
    from helpers import byte_tokenizer, tiny_llama

    cache = {}

    def get(base: str):
        if base not in cache:
            model, tok = tiny_llama(), byte_tokenizer()
            cfg = QuantConfig(outliers=1.0, calib=str(calib_text), nsamples=4, seqlen=32, **CONFIGS[base])
            cache[base] = (model, tok, quantize(model, tok, cfg))
        return cache[base]

    return get


@pytest.fixture(params=["awq", "qtip"])
def base(request) -> str:
    return request.param


@pytest.fixture
def ckpt(runs, base, tmp_path) -> Path:
    model, tok, result = runs(base)
    return save_checkpoint(tmp_path / base, model, tok, result, dense="fp32")


def test_reload_gives_the_in_memory_logits(runs, base, ckpt):
    model, _, result = runs(base)
    assert all(isinstance(q.dense, DENSE[base]) for q in result.layers.values())
    loaded, _ = load_quantized(ckpt)
    assert {n for n, _ in quant_linears(loaded)} == set(result.layers)
    assert {m.layout.kind for _, m in quant_linears(loaded)} == {KIND[base]}
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        set_kernel_mode(loaded, "reference")
        assert torch.equal(loaded(ids).logits, expected)
        set_kernel_mode(loaded, "auto")
        assert torch.equal(loaded(ids).logits, expected)  # many rows: bit-exact
        step = loaded(ids[:1, :1]).logits  # decode-sized (the kernel for awq)
        torch.testing.assert_close(step, expected[:1, :1], rtol=0, atol=1e-4)
    _, _, back = load_checkpoint(ckpt)
    for name, q in result.layers.items():
        assert type(back.layers[name].dense) is type(q.dense)
        assert torch.equal(back.layers[name].weight(), q.weight())
    assert back.bit_count() == result.bit_count()


def test_stored_bytes_are_the_accounting(runs, base, ckpt, capsys):
    """Stored = accounting + CSR row pointers, exactly (widths 32/64/96: no chunk padding); the accounting
    counts in_scale (16 bits per input) and the trellis signs (1 bit each, padded to bytes) and scale."""
    _, _, result = runs(base)
    table = json.loads((ckpt / "config.json").read_text())["quantization_config"]["layers"]
    layouts = {n: LayerLayout.from_meta(lm, n) for n, lm in table.items()}
    owned = {f"{n}.{s}" for n, lo in layouts.items() for s in lo.tensors()}
    header = read_header(ckpt / "model.safetensors")
    stored = sum(nbytes for name, (_, _, nbytes) in header.items() if name in owned)
    rowptr_bytes = sum(4 * (lo.out_features + 1) for lo in layouts.values() if lo.nnz)
    assert json.loads((ckpt / "requant_report.json").read_text())["stored_bytes"] == stored
    assert 8 * stored == result.bit_count().total_bits + 8 * rowptr_bytes
    for name, q in result.layers.items():
        assert layouts[name].bit_count() == q.bit_count()
        dense_only = QuantizedLayer(q.info, q.dense, SparseResidual.empty(q.dense.shape))
        layout, _ = encode_layer(dense_only)
        assert 8 * layout.stored_bytes() == q.dense.bit_count().total_bits  # no sparse part: exact
    capsys.readouterr()
    assert main(["inspect", str(ckpt), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["quantized_bytes"] == stored == d["code_bytes"] + d["table_bytes"] + d["sparse_bytes"]
    assert d["bits_per_weight"] == pytest.approx(result.bit_count().bits_per_weight)
    assert {lay["kind"] for lay in d["layers"]} == {KIND[base]}


def _rewrite(file: Path, fn) -> None:
    """Edit the tensors of a file, keeping its recorded hashes (so the layout checks, not the hash, speak)."""
    from requant.format.files import file_metadata

    meta = file_metadata(file)
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata=meta)


def _edit_layer_meta(ckpt: Path, **changes) -> None:
    f = ckpt / "config.json"
    cfg = json.loads(f.read_text())
    cfg["quantization_config"]["layers"][Q].update(changes)
    f.write_text(json.dumps(cfg))


def _zero_first(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0] = 0
    return t


CORRUPTIONS = {
    "awq": [
        (
            lambda d: _rewrite(
                d / "model.safetensors", lambda t: t.update({f"{Q}.in_scale": t[f"{Q}.in_scale"][:-1].clone()})
            ),
            rf"tensor {Q}\.in_scale is F16 \[63\], expected F16 \[64\] for a 3-bit awq",
        ),
        (
            lambda d: _rewrite(
                d / "model.safetensors", lambda t: t.update({f"{Q}.in_scale": t[f"{Q}.in_scale"].float()})
            ),
            rf"tensor {Q}\.in_scale is F32 \[64\], expected F16 \[64\]",
        ),
        (
            lambda d: _rewrite(d / "model.safetensors", lambda t: t.pop(f"{Q}.in_scale")),
            rf"tensor {Q}\.in_scale is missing",
        ),
        (
            lambda d: _rewrite(
                d / "model.safetensors", lambda t: t.update({f"{Q}.in_scale": _zero_first(t[f"{Q}.in_scale"])})
            ),
            rf"tensor {Q}\.in_scale holds a zero",
        ),
    ],
    "qtip": [
        (
            lambda d: _rewrite(
                d / "model.safetensors", lambda t: t.update({f"{Q}.sign_in": t[f"{Q}.sign_in"].to(torch.int32)})
            ),
            rf"tensor {Q}\.sign_in is I32 \[8\], expected U8 \[8\] for a 2-bit trellis",
        ),
        (
            lambda d: _rewrite(d / "model.safetensors", lambda t: t.update({f"{Q}.scale": t[f"{Q}.scale"].repeat(2)})),
            rf"tensor {Q}\.scale is F16 \[2\], expected F16 \[1\]",
        ),
        (lambda d: _edit_layer_meta(d, tile=[5, 8]), r"config\.json: layer .*q_proj: trellis tile 5x8 does not"),
        (lambda d: _edit_layer_meta(d, code="nope"), r"config\.json: layer .*q_proj: bad trellis"),
        (
            lambda d: _edit_layer_meta(d, L=None),
            r"config\.json: layer .*q_proj: a trellis layer needs L, V, code and tile",
        ),
    ],
}


@pytest.mark.parametrize(
    ("which", "case"), [(b, i) for b in ("awq", "qtip") for i in range(len(CORRUPTIONS[b]))], ids=str
)
def test_corrupt_new_kind_tensors_are_refused(runs, which, case, tmp_path):
    model, tok, result = runs(which)
    ckpt = save_checkpoint(tmp_path / which, model, tok, result, dense="fp32")
    corrupt, pattern = CORRUPTIONS[which][case]
    corrupt(ckpt)
    with pytest.raises(CheckpointError, match=pattern):
        load_quantized(ckpt, verify=False)  # the layout and value checks themselves (hashes: test_checkpoint)


def test_layouts_of_the_new_kinds():
    awq = LayerLayout("awq", 8, 64, 4, group_size=16).tensors()
    assert awq[IN_SCALE].shape == (64,) and awq[IN_SCALE].dtype == torch.float16 and awq[SCALE].shape == (8, 4)
    tr = LayerLayout("trellis", 12, 20, 2, L=8, V=1, code="1mad", tile=(4, 4)).tensors()
    assert tr[SIGN_IN].shape == (3,) and tr[SIGN_OUT].shape == (2,) and tr[SIGN_IN].dtype == torch.uint8
    assert tr[SCALE].shape == (1,) and tr[SCALE].dtype == torch.float16
    lo = LayerLayout("trellis", 12, 20, 2, L=8, V=2, code="3inst", tile=(4, 4))
    assert LayerLayout.from_meta(json.loads(json.dumps(lo.to_meta())), "x") == lo
    for bad in (dict(tile=(4, 3)), dict(L=1), dict(V=2, tile=(1, 5)), dict(tile=(1, 2)), dict(tile=None)):
        with pytest.raises(CheckpointError):
            LayerLayout(**{**dict(kind="trellis", out_features=12, in_features=20, bits=2, L=8, V=1, code="1mad",
                                  tile=(4, 4)), **bad})  # fmt: skip
    with pytest.raises(CheckpointError, match="group size"):
        LayerLayout("awq", 8, 64, 4)


@pytest.mark.parametrize(("kind", "shape"), [("awq", (17, 100)), ("awq", (8, 64)), ("trellis", (12, 40))])
def test_encode_decode_round_trip(make_layer, kind, shape):
    for bits in (2, 3, 4):
        group = 16 if shape[1] % 16 == 0 else None
        q = make_layer(*shape, bits, kind=kind, nnz=shape[0] * shape[1] // 20, group=group, seed=bits)
        layout, tensors = encode_layer(q)
        check_specs("f", "L", layout, {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()})
        ql = QuantLinear.from_layer(q)
        back = ql.quantized_layer()
        assert type(back.dense) is type(q.dense) and torch.equal(back.weight(), q.weight())
        assert back.bit_count() == q.bit_count() == layout.bit_count()


def _within_tolerance(y, ref, w, x, bias=None) -> bool:
    bound = x.abs() @ w.abs().T + (0 if bias is None else bias.abs())
    return bool(((y - ref).abs() <= FAST_PATH_RTOL * bound + 1e-30).all())


@pytest.mark.skipif(kernels.library() is None, reason=f"C kernels unavailable: {kernels.status()}")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_awq_fast_path_matches_reference(make_layer, bits):
    """Decode rows: the uniform kernel on x / s (sparse values × s) within the uniform tolerance; more rows:
    bit-exact."""
    for i, (out, inp, group) in enumerate([(3, 7, None), (17, 100, None), (33, 128, 16), (8, 1100, 100)]):
        q = make_layer(out, inp, bits, kind="awq", nnz=out * inp // 20, group=group, seed=i)
        bias = torch.randn(out) if i % 2 else None
        ql = QuantLinear.from_layer(q, bias)
        w = q.weight()
        for m in (1, DECODE_MAX_ROWS, DECODE_MAX_ROWS + 1, 64):
            x = torch.randn(m, inp)
            ref = F.linear(x, w, bias)
            with torch.no_grad():
                y = ql(x)
            if m > DECODE_MAX_ROWS:
                assert torch.equal(y, ref)
            else:
                assert _within_tolerance(y, ref, w, x, bias)


def test_trellis_quant_linear_decodes_once_and_is_bit_exact(make_layer, monkeypatch):
    q = make_layer(16, 48, 3, kind="trellis", nnz=30)
    ql = QuantLinear.from_layer(q, torch.randn(16))
    monkeypatch.setattr(kernels, "library", lambda: None)  # no C kernel needed
    w = q.weight()
    calls = []
    real = TrellisTensor.transformed
    monkeypatch.setattr(TrellisTensor, "transformed", lambda self: calls.append(1) or real(self))
    with torch.no_grad():
        for m in (1, 3, 9):
            x = torch.randn(2, m, 48)
            assert torch.equal(ql(x), F.linear(x, w, ql.bias))
        assert len(calls) == 1  # decoded once, then cached
        ql.mode = "reference"
        assert torch.equal(ql(x), F.linear(x, w, ql.bias)) and len(calls) == 2  # the reference decodes per call
        ql.mode = "fast"
        ql.to("cpu")  # .to() drops the cache
        x1 = x[:, :1].contiguous()
        assert torch.equal(ql(x1), F.linear(x1, w, ql.bias)) and len(calls) == 3


def test_generate_on_a_checkpoint(runs, base, ckpt, capsys):
    model, tok, _ = runs(base)
    capsys.readouterr()
    assert main(["generate", str(ckpt), "alpha beta", "--max-new-tokens", "4", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    ids = tok("alpha beta", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for _ in range(4):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    assert obj["new_tokens"] == 4 and obj["continuation"] == tok.decode(ids[0, -4:], skip_special_tokens=True)


def test_cli_quantize_awq_writes_a_checkpoint_eval_and_inspect_read(capsys, model_dir, text_file, tmp_path):
    out = tmp_path / "awq"
    calib = ["--calib", str(text_file), "--nsamples", "4", "--seqlen", "32"]
    argv = ["quantize", str(model_dir), "-o", str(out), "--base", "awq", "--bits", "4", "--group-size", "32"]
    assert main([*argv, "--outliers", "0.5", *calib, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {lay["kind"] for lay in d["layers"]} == {"awq"}
    assert d["bits_per_weight"] == pytest.approx(rep["bits_per_weight"])
    assert 0 < d["overhead_percent"] < 25  # CSR row pointers on 64-wide toy layers; < 2% on real widths
    assert main(["eval", str(out), "--data", str(text_file), "--seqlen", "32", "--limit", "2", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)["results"][0]
    assert res["tokens"] == 2 * 31 and res["perplexity"] > 1
