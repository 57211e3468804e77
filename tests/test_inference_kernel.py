"""The compact formats and the compiled sparse kernel against dense ``F.linear`` on the same weights."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from losa.errors import LosaError
from losa.inference import SparseLinear, pack, unpack
from losa.inference import kernel as kmod
from losa.inference.formats import FORMAT_CODES, choose_format

KERNEL = kmod.load_kernel()


pytestmark = pytest.mark.usefixtures("no_measured_thresholds")
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="C++ sparse kernel could not be built here")
ISAS = [name for code, name in kmod.ISA_NAMES.items() if KERNEL is not None and code <= KERNEL.cpu_isa()]


def random_mask(rows: int, cols: int, pattern: str | float, gen: torch.Generator) -> torch.Tensor:
    """Keep-mask: unstructured at a sparsity, or "n:m" with exactly n kept per group (independent of losa)."""
    if isinstance(pattern, float):
        return torch.rand(rows, cols, generator=gen) >= pattern
    n, m = map(int, pattern.split(":"))
    ranks = torch.rand(rows, cols // m, m, generator=gen).argsort(-1).argsort(-1)
    return (ranks < n).reshape(rows, cols)


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, vdtype: torch.dtype) -> torch.Tensor:
    return F.linear(x.double(), w.to(vdtype).double(), None if b is None else b.double()).float()


# ------------------------------------------------------------------ formats (pure tensor math)

def test_bitmask_layout_by_hand():
    w = torch.tensor([[0.0, 2.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 5.0]])
    p = pack(w, torch.float32, "bitmask")
    # bits 1 and 3 of byte 0, bit 0 of byte 1 (input 8); 9 inputs pad to 32 bits = 4 bytes
    assert p.meta.tolist() == [[0b1010, 1, 0, 0]]
    assert p.values[:3].tolist() == [2.0, 3.0, 5.0] and p.row_ptr.tolist() == [0, 3]
    assert torch.equal(unpack(p), w)


def test_nm24_layout_by_hand():
    w = torch.tensor([[0.0, 5.0, 0.0, 7.0, 1.0, 0.0, 0.0, 2.0]])
    p = pack(w, torch.float32, "nm24")
    # group 0 keeps inputs 1, 3; group 1 keeps 0, 3 -> 2-bit indices 1, 3, 0, 3 packed little-endian
    assert p.meta[0, 0].item() == 1 | 3 << 2 | 0 << 4 | 3 << 6
    assert p.values[:4].tolist() == [5.0, 7.0, 1.0, 2.0]
    assert torch.equal(unpack(p), w)


@pytest.mark.parametrize("fmt,pattern", [("bitmask", 0.0), ("bitmask", 0.7), ("bitmask", 0.99),
                                         ("nm24", "2:4"), ("nm14", "1:4"), ("nm24", "1:4")])
def test_pack_roundtrip(fmt, pattern):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(19, 36, generator=gen) * random_mask(19, 36, pattern, gen)
    for vdtype in (torch.float32, torch.bfloat16):
        assert torch.equal(unpack(pack(w, vdtype, fmt)), w.to(vdtype).float())


def test_choose_format():
    gen = torch.Generator().manual_seed(2)
    assert choose_format(random_mask(64, 64, "1:4", gen)) == "nm14"
    assert choose_format(random_mask(64, 64, 0.7, gen)) == "bitmask"
    assert choose_format(random_mask(64, 64, "2:4", gen)) == "bitmask"  # same bytes as nm24, faster decode


def test_format_errors():
    w = torch.randn(4, 8)
    with pytest.raises(LosaError, match="at most 2 kept"):
        pack(w, torch.float32, "nm24")
    with pytest.raises(LosaError, match="unknown sparse format"):
        pack(w, torch.float32, "csr")
    with pytest.raises(LosaError, match="value_dtype"):
        SparseLinear.from_dense(w, value_dtype="float16")
    with pytest.raises(LosaError, match="2-D"):
        pack(torch.randn(8), torch.float32)


# ------------------------------------------------------------------ kernel vs F.linear

CASES = [  # (out, in, pattern, fmt)
    (37, 53, 0.5, "bitmask"), (5, 1, 0.0, "bitmask"), (64, 96, 0.7, "bitmask"), (33, 130, 0.8, "bitmask"),
    (40, 200, 0.95, "bitmask"), (24, 64, "2:4", "nm24"), (24, 68, "2:4", "bitmask"), (17, 44, "1:4", "nm14"),
    (29, 72, "4:8", "bitmask"), (16, 32, 1.0, "bitmask"),
]


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,pattern,fmt", CASES)
def test_sparse_linear_matches_dense(monkeypatch, isa, vdtype, out_f, in_f, pattern, fmt):
    monkeypatch.setenv("LOSA_SPARSE_ISA", isa)
    gen = torch.Generator().manual_seed(out_f * 1000 + in_f)
    w = torch.randn(out_f, in_f, generator=gen) * random_mask(out_f, in_f, pattern, gen)
    b = torch.randn(out_f, generator=gen)
    layer = SparseLinear.from_dense(w, b, vdtype, fmt, dense_batch_threshold=8)
    assert layer.fmt == fmt and layer.value_dtype == vdtype
    for batch in (1, 2, 3, 5, 8, 13, 40):  # <= 8 sparse kernel, above: tiled decompress + GEMM
        x = torch.randn(batch, in_f)  # fresh inputs every time
        torch.testing.assert_close(layer(x), reference(x, w, b, vdtype), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,pattern,fmt", CASES[:8])
def test_bf16_prefill_matches_a_dense_bf16_linear(monkeypatch, isa, vdtype, out_f, in_f, pattern, fmt):
    """prefill_dtype=bfloat16: large batches compute like F.linear on bf16 inputs and bf16 weights."""
    monkeypatch.setenv("LOSA_SPARSE_ISA", isa)
    gen = torch.Generator().manual_seed(out_f * 7 + in_f)
    w = torch.randn(out_f, in_f, generator=gen) * random_mask(out_f, in_f, pattern, gen)
    b = torch.randn(out_f, generator=gen)
    layer = SparseLinear.from_dense(w, b, vdtype, fmt, dense_batch_threshold=8, prefill_dtype="bfloat16")
    assert "prefill_dtype=bfloat16" in repr(layer)
    for rows in (20, 40):  # both tile orientations (DENSE_XW_MAX_ROWS)
        x = torch.randn(rows, in_f)
        want = F.linear(x.bfloat16().double(), w.to(vdtype).bfloat16().double()).bfloat16().float() + b
        torch.testing.assert_close(layer(x), want, rtol=1e-2, atol=2e-2 * in_f**0.5)
    small = torch.randn(3, in_f)  # decode rows still use the float32 sparse kernel
    torch.testing.assert_close(layer(small), reference(small, w, b, vdtype), rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("out_f,in_f,pattern,fmt", CASES)
def test_bf16_inputs_compute_like_a_dense_bf16_linear(monkeypatch, isa, out_f, in_f, pattern, fmt):
    """bf16 inputs (a bf16 model) with bf16 values: exact bf16 products summed in float32, bf16 output.

    On AVX-512 CPUs with AVX512-BF16 this is the vdpbf16ps loop (decode) and the bf16 GEMM (prefill);
    elsewhere the float32 loop on the widened inputs. The reference sums the same exact products in double.
    """
    monkeypatch.setenv("LOSA_SPARSE_ISA", isa)
    gen = torch.Generator().manual_seed(out_f * 31 + in_f)
    w = torch.randn(out_f, in_f, generator=gen) * random_mask(out_f, in_f, pattern, gen)
    b = torch.randn(out_f, generator=gen)
    layer = SparseLinear.from_dense(w, b, torch.bfloat16, fmt, dense_batch_threshold=8)
    for batch in (1, 2, 3, 5, 8, 9, 13, 40):  # <= 8: sparse kernel, above: tiles + bf16 GEMM (AMX CPUs: AMX kernel)
        x = torch.randn(batch, in_f, generator=gen).bfloat16()
        y = layer(x)
        assert y.dtype == torch.bfloat16 and y.shape == (batch, out_f)
        exact = F.linear(x.double(), w.bfloat16().double(), b.double())
        if batch <= 8:  # float32 sums of exact products, rounded once to bf16
            torch.testing.assert_close(y.double(), exact, rtol=8e-3, atol=1e-5 * in_f**0.5)
        else:  # the GEMM also rounds its [B, N] output to bf16 before the bias is added
            torch.testing.assert_close(y.double(), exact, rtol=2e-2, atol=2e-2)
    raw = KERNEL.spmm(x[:3], layer.meta, layer.values, layer.row_ptr, None, out_f, in_f,
                      {"bitmask": 0, "nm24": 1, "nm14": 2}[fmt], kmod.best_isa())
    assert raw.dtype == torch.float32  # the kernel itself returns float32 sums
    torch.testing.assert_close(raw.double(), F.linear(x[:3].double(), w.bfloat16().double()),
                               rtol=1e-5, atol=1e-5 * in_f**0.5)


@pytest.mark.parametrize("value,on", [("1", True), ("on", True), ("TRUE", True), (" yes ", True), ("0", False),
                                      ("off", False), ("False", False), ("no", False), ("", False), (None, True)])
def test_hugepages_setting_is_read_as_documented(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("LOSA_HUGEPAGES", raising=False)
    else:
        monkeypatch.setenv("LOSA_HUGEPAGES", value)
    assert kmod.hugepages_enabled() is on


def test_a_mistyped_hugepages_setting_is_an_error(monkeypatch, capsys):
    monkeypatch.setenv("LOSA_HUGEPAGES", "banana")
    with pytest.raises(LosaError, match="LOSA_HUGEPAGES='banana' is not understood; use 1 .* or 0"):
        kmod.hugepages_enabled()
    from losa.cli import main

    assert main(["generate", "smollm2-135m", "--prompt", "hi", "--max-new-tokens", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: LOSA_HUGEPAGES='banana'") and err.count("\n") == 1  # before any loading


@needs_kernel
def test_hugepage_copy_keeps_contents(monkeypatch):
    big = torch.randint(0, 255, (3 << 20,), dtype=torch.uint8)  # 3 MiB: copied into huge-page memory
    small = torch.randn(10)
    out = KERNEL.hugepage_copy(big)
    assert torch.equal(out, big) and out.dtype == big.dtype and out.data_ptr() != big.data_ptr()
    assert KERNEL.hugepage_copy(small).data_ptr() == small.data_ptr()  # below 2 MiB: unchanged
    w = torch.randn(1100, 1024) * (torch.rand(1100, 1024) > 0.5)  # > 2 MiB of values
    x = torch.randn(2, 1024)
    monkeypatch.setenv("LOSA_HUGEPAGES", "0")
    plain = SparseLinear.from_dense(w)
    monkeypatch.setenv("LOSA_HUGEPAGES", "1")
    huge = SparseLinear.from_dense(w)
    assert torch.equal(plain(x), huge(x)) and torch.equal(huge.to_dense(), w)


@needs_kernel
def test_leading_dims_dtype_and_no_bias():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(30, 45, generator=gen) * random_mask(30, 45, 0.6, gen)
    layer = SparseLinear.from_dense(w)
    x = torch.randn(2, 3, 45, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 3, 30) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x.float(), w).to(torch.bfloat16), rtol=1e-2, atol=1e-2)


@needs_kernel
@pytest.mark.parametrize("batch", [3, 30])  # sparse kernel and tiled GEMM
def test_float16_and_non_contiguous_inputs(batch):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(30, 45, generator=gen) * random_mask(30, 45, 0.6, gen)
    layer = SparseLinear.from_dense(w, value_dtype="bfloat16")
    x = torch.randn(45, batch, generator=gen).half().t()  # a transposed (non-contiguous) float16 view
    assert not x.is_contiguous()
    y = layer(x)
    assert y.dtype == torch.float16 and y.shape == (batch, 30)
    torch.testing.assert_close(y.float(), reference(x.float(), w, None, torch.bfloat16), rtol=2e-3, atol=2e-3)


@needs_kernel
@pytest.mark.parametrize("vdtype", [torch.float32, torch.bfloat16])
def test_prefill_on_two_threads_in_inference_mode(vdtype):
    """The tiled prefill runs its GEMMs on worker threads; they must inherit inference mode."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(600, 64, generator=gen) * random_mask(600, 64, 0.7, gen)  # 3 tiles of 256 rows
    layer = SparseLinear.from_dense(w, value_dtype=vdtype)
    x = torch.randn(40, 64, generator=gen).to(vdtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            y = layer(x)
    finally:
        torch.set_num_threads(threads)
    tol = 2e-2 if vdtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(y.float(), reference(x.float(), w, None, vdtype), rtol=tol, atol=tol)


@needs_kernel
def test_decompress_kernel_is_exact():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(50, 77, generator=gen) * random_mask(50, 77, 0.6, gen)
    for vdtype in (torch.float32, torch.bfloat16):
        p = pack(w, vdtype)
        for isa in range(KERNEL.cpu_isa() + 1):
            d = KERNEL.decompress(p.meta, p.values, p.row_ptr, 50, 77, 0, isa, 10, 50)
            assert torch.equal(d, w.to(vdtype).float()[10:])


def test_fallback_without_compiler(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(12, 20, generator=gen) * random_mask(12, 20, 0.5, gen)
    layer = SparseLinear.from_dense(w, value_dtype="bfloat16")
    monkeypatch.setattr(kmod, "load_kernel", lambda: None)
    x = torch.randn(3, 20)
    torch.testing.assert_close(layer(x), reference(x, w, None, torch.bfloat16), rtol=1e-5, atol=1e-5)


def test_kernel_build_failure_warns(monkeypatch):
    monkeypatch.setenv("LOSA_DISABLE_KERNEL", "1")
    kmod._build.cache_clear()
    kmod.load_kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="fall back to a dense matmul"):
            assert kmod.load_kernel() is None
    finally:
        monkeypatch.delenv("LOSA_DISABLE_KERNEL")
        kmod._build.cache_clear()
        kmod.load_kernel.cache_clear()


@needs_kernel
def test_bad_inputs(monkeypatch):
    layer = SparseLinear.from_dense(torch.eye(8))
    assert "value_dtype=float32" in repr(layer) and "format=" in repr(layer)
    with pytest.raises(LosaError, match="expects 8"):
        layer(torch.randn(2, 7))
    monkeypatch.setenv("LOSA_SPARSE_ISA", "neon")
    with pytest.raises(LosaError, match="LOSA_SPARSE_ISA"):
        layer(torch.randn(2, 8))


BF16_SPARSE_PREFILL = KERNEL is not None and kmod.bf16_dot_available()


@pytest.mark.skipif(not BF16_SPARSE_PREFILL, reason="zero-skipping bf16 prefill needs an AVX512-BF16 CPU")
@pytest.mark.parametrize("out_f,in_f,pattern,fmt", [(37, 45, 0.7, "bitmask"), (300, 97, 0.9, "bitmask"),
                                                    (64, 128, 0.5, "bitmask"), (40, 64, "1:4", "nm14"),
                                                    (33, 96, "2:4", "nm24"), (17, 33, 1.0, "bitmask")])
@pytest.mark.parametrize("batch", [1, 7, 16, 25, 32, 33, 128, 129, 300])  # chunks of 128, tails rounded up to 32
def test_sparse_bf16_prefill_matches_exact_products(out_f, in_f, pattern, fmt, batch):
    """The zero-skipping bf16 GEMM: exact bf16 products summed in float32 (output bf16, or float32 + bias)."""
    gen = torch.Generator().manual_seed(out_f * 7 + in_f + batch)
    w = torch.randn(out_f, in_f, generator=gen) * random_mask(out_f, in_f, pattern, gen)
    b = torch.randn(out_f, generator=gen)
    p = pack(w, torch.bfloat16, fmt)
    code = {"bitmask": 0, "nm24": 1, "nm14": 2}[fmt]
    x = torch.randn(batch, in_f, generator=gen).bfloat16()
    exact = F.linear(x.double(), w.bfloat16().double())
    y = KERNEL.sparse_mm_bf16(x, p.meta, p.values, p.row_ptr, None, out_f, in_f, code)
    assert y.dtype == torch.bfloat16 and y.shape == (batch, out_f)
    torch.testing.assert_close(y.double(), exact, rtol=8e-3, atol=1e-5 * in_f**0.5)  # one bf16 rounding
    yb = KERNEL.sparse_mm_bf16(x, p.meta, p.values, p.row_ptr, b, out_f, in_f, code)
    assert yb.dtype == torch.float32  # float32 sums: only the summation order differs from the exact sum
    torch.testing.assert_close(yb.double(), exact + b.double(), rtol=1e-5, atol=1e-5 * in_f**0.5)


@pytest.mark.skipif(not BF16_SPARSE_PREFILL, reason="zero-skipping bf16 prefill needs an AVX512-BF16 CPU")
def test_sparse_prefill_is_chosen_by_density(monkeypatch, no_amx, sparse_gemm_by_default):
    """Layers sparser than SPARSE_PREFILL_MAX_DENSITY use it for large bf16 batches; denser ones do not (on a CPU
    where it is on by default)."""
    from losa.inference import sparse_linear as sl
    gen = torch.Generator().manual_seed(9)
    sparse = SparseLinear.from_dense(torch.randn(64, 96, generator=gen) * random_mask(64, 96, 0.8, gen), None, "bfloat16")
    dense = SparseLinear.from_dense(torch.randn(64, 96, generator=gen) * random_mask(64, 96, 0.5, gen), None, "bfloat16")
    fp32 = SparseLinear.from_dense(torch.randn(64, 96, generator=gen) * random_mask(64, 96, 0.8, gen))
    assert sparse.sparse_prefill and not dense.sparse_prefill and not fp32.sparse_prefill
    assert "bf16_prefill=sparse" in repr(sparse) and "bf16_prefill=dense" in repr(dense)
    calls = []
    real = KERNEL.sparse_mm_bf16
    monkeypatch.setattr(sl._kernel, "load_kernel", lambda: _Spy(KERNEL, calls))
    x = torch.randn(40, 96, generator=gen).bfloat16()
    for layer in (sparse, dense):
        y = layer(x)
        torch.testing.assert_close(y.double(), F.linear(x.double(), layer.to_dense().bfloat16().double()),
                                   rtol=2e-2, atol=2e-2)
    assert calls == ["sparse_mm_bf16", "dense_mm"] and real is KERNEL.sparse_mm_bf16
    calls.clear()
    # (small layers) row loop up to DENSE_BATCH_THRESHOLD_BF16_SMALL; then batch-rows-first tiles up to
    # DENSE_XW_MAX_ROWS (the sparse layer only up to SPARSE_GEMM_BATCH_THRESHOLD, then its sparse GEMM);
    # then weight-rows-first tiles
    edges = (sl.DENSE_BATCH_THRESHOLD_BF16_SMALL, sl.DENSE_BATCH_THRESHOLD_BF16_SMALL + 1,
             sl.SPARSE_GEMM_BATCH_THRESHOLD, sl.SPARSE_GEMM_BATCH_THRESHOLD + 1, sl.DENSE_XW_MAX_ROWS,
             sl.DENSE_XW_MAX_ROWS + 1)
    assert sorted(edges) == list(edges)
    for rows in edges:
        x = torch.randn(rows, 96, generator=gen).bfloat16()
        for layer in (sparse, dense):
            torch.testing.assert_close(layer(x).double(), F.linear(x.double(), layer.to_dense().bfloat16().double()),
                                       rtol=2e-2, atol=2e-2)
    assert calls == ["spmm", "spmm", "dense_mm_xw", "dense_mm_xw", "dense_mm_xw", "dense_mm_xw",
                     "sparse_mm_bf16", "dense_mm_xw", "sparse_mm_bf16", "dense_mm_xw", "sparse_mm_bf16", "dense_mm"]
    calls.clear()  # a layer over SMALL_LAYER_WEIGHTS leaves the row loop earlier
    big = SparseLinear.from_dense(torch.randn(1024, 1040, generator=gen) * random_mask(1024, 1040, 0.5, gen), None,
                                  "bfloat16")
    assert big.out_features * big.in_features > sl.SMALL_LAYER_WEIGHTS
    for rows in (sl.DENSE_BATCH_THRESHOLD_BF16, sl.DENSE_BATCH_THRESHOLD_BF16 + 1):
        big(torch.randn(rows, 1040, generator=gen).bfloat16())
    assert calls == ["spmm", "dense_mm_xw"]


@pytest.fixture
def no_amx(monkeypatch):
    """The dispatch of a native-bf16 CPU without AMX, also on an AMX machine (the AMX kernel has tests of its own)."""
    monkeypatch.setattr(kmod, "amx_available", lambda isa=None: False)


class _Spy:
    """Records which kernel entry points a layer calls."""

    def __init__(self, kernel, calls):
        self._k, self._calls = kernel, calls

    def __getattr__(self, name):
        fn = getattr(self._k, name)
        if name in ("sparse_mm_bf16", "dense_mm", "dense_mm_xw", "spmm", "amx_mm_bf16"):
            def wrapped(*a, **kw):
                self._calls.append(name)
                return fn(*a, **kw)
            return wrapped
        return fn


@pytest.mark.skipif(not BF16_SPARSE_PREFILL, reason="zero-skipping bf16 prefill needs an AVX512-BF16 CPU")
def test_sparse_bf16_prefill_same_bits_on_two_threads():
    """Threads split the output rows; each row's sums run in the same order, so the bits match."""
    gen = torch.Generator().manual_seed(10)
    w = torch.randn(700, 300, generator=gen) * random_mask(700, 300, 0.7, gen)
    p = pack(w, torch.bfloat16, "bitmask")
    x = torch.randn(150, 300, generator=gen).bfloat16()
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(KERNEL.sparse_mm_bf16(x, p.meta, p.values, p.row_ptr, None, 700, 300, 0))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------ the AVX2 path, forced (runs on any x86-64 with AVX2)

AVX2 = KERNEL is not None and KERNEL.cpu_isa() >= 1
needs_avx2 = pytest.mark.skipif(not AVX2, reason="needs an x86-64 CPU with AVX2 (elsewhere the scalar path runs)")
CODES = {"bitmask": 0, "nm24": 1, "nm14": 2}


def every_byte_mask(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Keep-mask whose 8-input groups take all 256 patterns (so every row of the AVX2 shuffle tables is used)."""
    groups = torch.randperm(256, generator=gen).repeat(rows * cols // 8 // 256 + 1)[: rows * cols // 8]
    bits = (groups.unsqueeze(-1) >> torch.arange(8)) & 1
    return bits.reshape(rows, cols).bool()


@needs_avx2
@pytest.mark.parametrize("vdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5, 8, 11])
def test_avx2_row_loop_every_group_pattern(monkeypatch, vdtype, batch):
    """The AVX2 loop (bf16: vpshufb widening, float32: vpermps) against F.linear, all 256 group masks."""
    monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")
    gen = torch.Generator().manual_seed(batch)
    out_f, in_f = 48, 256
    w = torch.randn(out_f, in_f, generator=gen) * every_byte_mask(out_f, in_f, gen)
    w[3] = 0.0  # an empty row
    w[5] = torch.randn(in_f, generator=gen)  # a full row
    p = pack(w, vdtype, "bitmask")
    x = torch.randn(batch, in_f, generator=gen)
    y = KERNEL.spmm(x, p.meta, p.values, p.row_ptr, None, out_f, in_f, 0, kmod.best_isa())
    assert kmod.best_isa() == 1
    torch.testing.assert_close(y.double(), reference(x, w, None, vdtype).double(), rtol=1e-5, atol=1e-5)
    d = KERNEL.decompress(p.meta, p.values, p.row_ptr, out_f, in_f, 0, 1, 0, out_f)
    assert torch.equal(d, w.to(vdtype).float())


@needs_avx2
@pytest.mark.parametrize("fmt,pattern,in_f", [("bitmask", 0.7, 4100), ("nm24", "2:4", 96), ("nm14", "1:4", 132),
                                              ("bitmask", 0.3, 45)])
def test_avx2_row_loop_long_rows_and_tails(monkeypatch, fmt, pattern, in_f):
    """LLaMA-width rows (prefetch runs past the end of the values) and inputs that are not a multiple of 32."""
    monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")
    gen = torch.Generator().manual_seed(in_f)
    w = torch.randn(21, in_f, generator=gen) * random_mask(21, in_f, pattern, gen)
    b = torch.randn(21, generator=gen)
    layer = SparseLinear.from_dense(w, b, "bfloat16", fmt)
    for batch in (1, 2, 7):
        x = torch.randn(batch, in_f, generator=gen)
        torch.testing.assert_close(layer(x), reference(x, w, b, torch.bfloat16), rtol=1e-4, atol=1e-4)


@needs_avx2
@pytest.mark.parametrize("rows", [17, 200, 700])
def test_avx2_row_loop_same_bits_on_any_thread_count(monkeypatch, rows):
    """Threads split the output rows (row counts that are not a multiple of the split, more threads than
    16-row slices); every row is written once and sums in the same order, so any thread count gives the
    1-thread bits, and those match F.linear."""
    monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(rows, 300, generator=gen) * random_mask(rows, 300, 0.7, gen)
    p = pack(w, torch.bfloat16)
    x = torch.randn(1, 300, generator=gen)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3, 8):
            torch.set_num_threads(t)
            outs.append(KERNEL.spmm(x, p.meta, p.values, p.row_ptr, None, rows, 300, 0, 1))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outs[0], reference(x, w, None, torch.bfloat16), rtol=1e-5, atol=1e-5)
    for y in outs[1:]:
        assert torch.equal(outs[0], y)


@needs_avx2
@pytest.mark.parametrize("prefill_dtype", ["float32", "bfloat16"])
def test_no_bf16_gemm_without_native_bf16(monkeypatch, prefill_dtype):
    """Forced AVX2: bf16 inputs and prefill_dtype=bfloat16 take the float32 GEMM, never torch's bf16 GEMM."""
    from losa.inference import sparse_linear as sl

    monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(64, 96, generator=gen) * random_mask(64, 96, 0.8, gen)
    b = torch.randn(64, generator=gen)
    layer = SparseLinear.from_dense(w, b, "bfloat16", prefill_dtype=prefill_dtype)
    assert not layer.sparse_prefill and not kmod.native_bf16()
    calls = []
    monkeypatch.setattr(sl._kernel, "load_kernel", lambda: _GemmSpy(KERNEL, calls))
    exact_w = w.bfloat16().double()
    for rows in (20, 40, 200):
        xb = torch.randn(rows, 96, generator=gen).bfloat16()
        y = layer(xb)  # a bf16 model's prompt: float32 sums of exact products, rounded once to bf16
        assert y.dtype == torch.bfloat16
        exact = F.linear(xb.double(), exact_w, b.double())
        torch.testing.assert_close(y.double(), exact.bfloat16().double(), rtol=8e-3, atol=1e-5 * 96**0.5)
        xf = torch.randn(rows, 96, generator=gen)
        torch.testing.assert_close(layer(xf), reference(xf, w, b, torch.bfloat16), rtol=1e-4, atol=1e-4)
    assert calls and all(bf16 is False for _, bf16 in calls)


class _GemmSpy:
    """Records (entry point, bf16 GEMM flag) of the tiled prefill calls."""

    def __init__(self, kernel, calls):
        self._k, self._calls = kernel, calls

    def __getattr__(self, name):
        fn = getattr(self._k, name)
        if name in ("dense_mm", "dense_mm_xw"):
            def wrapped(*a):
                self._calls.append((name, a[-1]))
                return fn(*a)
            return wrapped
        if name == "sparse_mm_bf16":
            raise AssertionError("the zero-skipping bf16 GEMM ran without native bf16")
        return fn


def _evex_or_avx512_lines(disasm: list[str]) -> list[str]:
    """Instructions that only AVX-512 CPUs run: EVEX-encoded (first opcode byte 0x62 after legacy prefixes),
    or naming zmm, opmask or xmm/ymm16-31 registers."""
    import re

    bad = []
    prefixes = {"66", "67", "f2", "f3", "2e", "3e", "26", "64", "65", "36", "f0"}
    regs = re.compile(r"%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b")
    for line in disasm:
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        raw = parts[1].split()
        while raw and raw[0] in prefixes:
            raw = raw[1:]
        if (raw and raw[0] == "62") or regs.search(parts[2]):
            bad.append(line.strip())
    return bad


@pytest.mark.skipif(not AVX2 or __import__("shutil").which("objdump") is None,
                    reason="needs the x86-64 kernel and binutils' objdump")
def test_avx2_path_contains_no_avx512_instruction():
    """Everything LOSA_SPARSE_ISA=avx2 runs in the kernel is AVX2/FMA/F16C code: no EVEX encoding, no zmm/opmask.

    The AVX-512 loop is checked the same way and must be flagged, so the check itself can fail.
    """
    import re
    import subprocess

    text = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", KERNEL.__file__], capture_output=True,
                          text=True, check=True).stdout
    raw = subprocess.run(["objdump", "-d", "-C", KERNEL.__file__], capture_output=True, text=True,
                         check=True).stdout
    assert text  # objdump worked
    funcs: dict[str, list[str]] = {}
    name = None
    for line in raw.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = m.group(1)
            funcs[name] = []
        elif name is not None:
            funcs[name].append(line)
    avx2_path = re.compile(r"row_avx2<|expand_avx2<|gemv_rows<1,|expand_rows<1,|expand_group|hsum256|table_row<|"
                           r"dense_rows_f32x_avx2|silu_avx2|attn_avx2::|Vec8::|dot_avx2<|axpy_avx2<")
    checked = {n: body for n, body in funcs.items() if avx2_path.search(n)}
    assert any("row_avx2<0, 1, unsigned short>" in n for n in checked)  # the batch-1 bf16 loop itself
    assert any("dense_rows_f32x_avx2" in n for n in checked)  # the dense loop over bf16 weights (LM heads)
    assert any("gemv_rows<1, 0, unsigned short, float" in n for n in checked)
    assert any("attn_avx2::attend_blocked<unsigned short>" in n for n in checked)  # the decode attention's loop
    offenders = {n: lines[:3] for n, body in checked.items() if (lines := _evex_or_avx512_lines(body))}
    assert not offenders
    for name in ("row_avx512<0, 1, unsigned short", "attn_avx512::attend_blocked<unsigned short>"):
        bodies = [body for n, body in funcs.items() if name in n]  # (either expansion; .cold parts too)
        assert any(_evex_or_avx512_lines(body) for body in bodies), name


@needs_kernel
@pytest.mark.skipif(KERNEL is None or KERNEL.cpu_isa() < 2, reason="needs the AVX-512 level")
@pytest.mark.parametrize("fmt,pattern", [("bitmask", 0.7), ("bitmask", 0.3), ("nm24", "2:4"), ("nm14", "1:4")])
def test_both_bf16_expansions_of_the_avx512_float32_loop(fmt, pattern):
    """The AVX-512 float32-input loops expand bf16 values either by widening first or by vpexpandw first (chosen by
    CPU vendor): both give the reference's values, and the same bits as each other (same products, same order),
    in the row loop (batches 1 and 3) and in the decompression of the prompt path."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(70, 200, generator=gen) * random_mask(70, 200, pattern, gen)
    layer = SparseLinear.from_dense(w, None, "bfloat16", fmt)
    outs = []
    try:
        for mode in (0, 1):
            KERNEL.set_bf16_expand(mode)
            assert bool(KERNEL.bf16_expand16()) == (mode == 1)
            got = []
            for rows in (1, 3):
                x = torch.randn(rows, 200, generator=torch.Generator().manual_seed(rows))
                y = KERNEL.spmm(x, layer.meta, layer.values, layer.row_ptr, None, 70, 200, FORMAT_CODES[fmt], 2)
                torch.testing.assert_close(y, reference(x, w, None, torch.bfloat16), rtol=1e-4, atol=1e-4)
                got.append(y)
            dense = KERNEL.decompress(layer.meta, layer.values, layer.row_ptr, 70, 200, FORMAT_CODES[fmt], 2, 0, 70)
            assert torch.equal(dense, w.bfloat16().float())  # exact: the bf16-rounded weights, zeros in place
            outs.append(got)
    finally:
        KERNEL.set_bf16_expand(-1)
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    with pytest.raises(RuntimeError, match="set_bf16_expand takes -1"):
        KERNEL.set_bf16_expand(2)


# ------------------------------------------------------------------ per-CPU arithmetic (pure)

from losa.inference.arith import IsaInfo, Requested, choose_arithmetic  # noqa: E402

ISA_CASES = {  # name: (IsaInfo, expected auto (dtype, values, prefill, activations))
    "avx512-bf16-amx": (IsaInfo("avx512", native_bf16=True, amx=True), ("bfloat16", "bfloat16", "bfloat16", "bfloat16")),
    "avx512-bf16-amx-tiles": (IsaInfo("avx512", native_bf16=True, amx=True, amx_tiles=True),
                              ("bfloat16", "bfloat16", "bfloat16", "bfloat16")),
    "avx512-bf16": (IsaInfo("avx512", native_bf16=True), ("bfloat16", "bfloat16", "bfloat16", "bfloat16")),
    "avx512-bf16-zen4": (IsaInfo("avx512", native_bf16=True, sparse_gemm=True),
                         ("bfloat16", "bfloat16", "bfloat16", "bfloat16")),
    "avx512": (IsaInfo("avx512"), ("float32", "bfloat16", "float32", "float32")),
    "avx2": (IsaInfo("avx2"), ("float32", "bfloat16", "float32", "float32")),
    "avx2-forced": (IsaInfo("avx2", forced="avx2"), ("float32", "bfloat16", "float32", "float32")),
    "scalar": (IsaInfo("scalar"), ("float32", "bfloat16", "float32", "float32")),
    "no-kernel": (IsaInfo("avx2", kernel=False), ("float32", "float32", "float32", "float32")),
}


@pytest.mark.parametrize("case", list(ISA_CASES))
def test_choose_arithmetic_auto_for_every_isa(case):
    isa, (dtype, values, prefill, act) = ISA_CASES[case]
    c = choose_arithmetic(isa, Requested())
    assert (c.dtype, c.value_dtype, c.prefill_dtype, c.activations) == (dtype, values, prefill, act)
    line = c.line()
    assert "\n" not in line and c.reason in line and c.isa in line and "as set" not in line
    if act == "float32" and isa.kernel:  # no native bf16: the prompt never goes through a bf16 GEMM
        assert "bf16 GEMM" not in c.prefill and "float32 GEMM" in c.prefill
    if isa.native_bf16:
        assert "bf16 GEMM" in c.prefill and ("AMX" in line) == isa.amx
        assert ("AMX tiles" in line) == isa.amx_tiles and ("AMX tiles" in c.prefill) == isa.amx_tiles
        # the start-up line names the prompt path this CPU takes: zero-skipping only where it is enabled
        assert ("zero-skipping" in c.prefill) == isa.sparse_gemm and ("tiles" in c.prefill) != isa.sparse_gemm


def test_cpuinfo_reads_the_first_processor_block(tmp_path):
    from losa.inference.arith import cpuinfo
    from losa.inference.thresholds import sparse_gemm_by_default

    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
                 "model name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                 "processor\t: 1\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n")
    fields = cpuinfo(str(f))
    assert fields["vendor_id"] == "AuthenticAMD" and fields["cpu family"] == "25"
    assert fields["model name"] == "AMD EPYC 9R14" and "avx512_bf16" in fields["flags"].split()
    assert sparse_gemm_by_default(fields) is True
    assert cpuinfo(str(tmp_path / "missing")) == {}


@pytest.mark.parametrize("case", list(ISA_CASES))
def test_choose_arithmetic_explicit_requests(case):
    isa, _ = ISA_CASES[case]
    native = isa.native_bf16 and isa.kernel
    c = choose_arithmetic(isa, Requested("bf16", "float32", "auto"))  # explicit requests are kept ...
    assert (c.dtype, c.value_dtype, c.activations) == ("bfloat16", "float32", "float32")
    assert ("widen" in c.reason) == (not native)
    # the line tells the flags given from what auto would pick on this CPU
    assert c.reason.startswith("--dtype bf16, --value-dtype float32 as set; auto on this CPU: ")
    assert "AMX tiles" not in c.prefill  # the AMX kernel needs bf16 values
    c = choose_arithmetic(isa, Requested("float32", "bfloat16", "bfloat16"))
    # ... except a bf16 prompt GEMM without native bf16
    assert c.prefill_dtype == ("bfloat16" if native else "float32")
    assert ("ignored" in c.reason) == (not native)
    # a float32 model's bf16 prompt GEMM on bf16 values: short prompts on AMX tiles where the kernel runs them
    assert ("AMX tiles for short prompts" in c.prefill) == (native and isa.amx_tiles)
    c = choose_arithmetic(isa, Requested("float32"))  # an explicit float32 model keeps float32 prompts
    assert c.prefill_dtype == "float32" and c.activations == "float32"
    c = choose_arithmetic(isa, Requested("float16", "bfloat16"))
    assert c.dtype == "float16" and c.activations == "float32"


@pytest.mark.parametrize("case", list(ISA_CASES))
def test_dense_line_says_nothing_of_sparse_values(case):
    """``--dense`` keeps every layer dense: the line names the model dtype and why, nothing of sparse values
    (it claimed bf16 values)."""
    isa = ISA_CASES[case][0]
    c = choose_arithmetic(isa, Requested())
    line = c.line(dense=True)
    assert line.startswith(f"arithmetic ({isa.name}): {c.dtype} model, dense layers (--dense: no sparse values) -- ")
    assert "values" not in line.split(" -- ")[1]
    reason = {"avx512-bf16-amx": "native bf16", "avx512-bf16-amx-tiles": "native bf16", "avx512-bf16": "native bf16",
              "avx512-bf16-zen4": "native bf16",
              "no-kernel": "float32 keeps the weights exact"}.get(case, "no native bf16")  # by hand, per case
    assert line.split(" -- ")[1].startswith(reason)
    native = case.startswith("avx512-bf16")
    bf16 = choose_arithmetic(isa, Requested("bfloat16")).line(dense=True)
    assert "--dtype bfloat16 as given" in bf16 and ("slow" in bf16) == (not native)


def test_choose_arithmetic_bad_requests():
    with pytest.raises(LosaError, match="--value-dtype 'int8' is not supported"):
        choose_arithmetic(IsaInfo("avx2"), Requested(value_dtype="int8"))
    with pytest.raises(LosaError, match="--dtype"):
        choose_arithmetic(IsaInfo("avx2"), Requested(dtype="float64"))
    with pytest.raises(LosaError, match="--prefill-dtype"):
        choose_arithmetic(IsaInfo("avx2"), Requested(prefill_dtype="float16"))
    with pytest.raises(LosaError, match="unknown ISA level"):
        IsaInfo("neon")


@needs_kernel
def test_detect_isa_follows_the_forced_level(monkeypatch):
    from losa.inference.arith import detect_isa

    native = detect_isa()
    assert native.level == kmod.ISA_NAMES[KERNEL.cpu_isa()] and native.forced is None and native.kernel
    assert native.native_bf16 == bool(KERNEL.cpu_has_bf16dot() and KERNEL.cpu_isa() == 2)
    for level in [n for c, n in kmod.ISA_NAMES.items() if c <= KERNEL.cpu_isa()]:
        monkeypatch.setenv("LOSA_SPARSE_ISA", level)
        for use_kernel in (True, False):
            got = detect_isa(use_kernel=use_kernel)
            assert got.level == level and got.forced == level and "forced" in got.name
            assert not (got.native_bf16 and level != "avx512")
        if level != "avx512":  # forcing below AVX-512 emulates a CPU without native bf16
            assert choose_arithmetic(detect_isa()).activations == "float32"
    monkeypatch.setenv("LOSA_SPARSE_ISA", "neon")
    with pytest.raises(LosaError, match="LOSA_SPARSE_ISA"):
        detect_isa()


# ------------------------------------------------------------------ thresholds measured per CPU (losa bench-runtime)

@needs_avx2
def test_cached_thresholds_drive_the_dispatch(monkeypatch):
    from losa.inference import sparse_linear as sl
    from losa.inference import thresholds

    monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(40, 64, generator=gen) * random_mask(40, 64, 0.7, gen)
    layer = SparseLinear.from_dense(w, None, "bfloat16")
    calls = []
    monkeypatch.setattr(sl._kernel, "load_kernel", lambda: _Spy(KERNEL, calls))
    rows = (2, 3, sl.DENSE_BATCH_THRESHOLD, sl.DENSE_BATCH_THRESHOLD + 1)
    for r in rows:
        layer(torch.randn(r, 64, generator=gen))
    assert calls == ["spmm", "spmm", "spmm", "dense_mm"]  # the built-in default
    thresholds.save({"dense_batch_threshold": 2, "date": "test"}, "avx2")
    thresholds.save({"dense_batch_threshold": 50}, "avx512")  # another ISA level: not used
    calls.clear()
    for r in rows:
        x = torch.randn(r, 64, generator=gen)
        torch.testing.assert_close(layer(x), reference(x, w, None, torch.bfloat16), rtol=1e-4, atol=1e-4)
    assert calls == ["spmm", "dense_mm", "dense_mm", "dense_mm"]
    calls.clear()
    explicit = SparseLinear.from_dense(w, None, "bfloat16", dense_batch_threshold=3)  # an explicit value wins
    explicit(torch.randn(3, 64, generator=gen))
    assert calls == ["spmm"]


@needs_kernel
def test_bench_runtime_command_writes_the_cache(monkeypatch, capsys):
    from losa.cli import main
    from losa.inference import thresholds

    threads = torch.get_num_threads()
    try:
        assert main(["bench-runtime", "--shape", "96x256", "--reps", "1", "--threads", "1", "--rows", "1,2,4"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "cached for" in out and str(thresholds.cache_path()) in out
    data = json.loads(thresholds.cache_path().read_text())
    (key, entry), = data.items()
    assert key == thresholds.cpu_key(kmod.ISA_NAMES[kmod.best_isa()], 1) and key.endswith(" | 1 thread")
    assert entry["shape"] == "96x256" and entry["threads"] == 1 and set(entry["timings_ms"]["loop"]) == {"1", "2", "4"}
    assert 1 <= entry["dense_batch_threshold"] <= 4
    assert ("sparse_gemm_batch_threshold" in entry) == kmod.native_bf16()
    if kmod.native_bf16():  # the sparse GEMM is also timed at prompt sizes, the row loop is not
        assert set(entry["timings_ms"]["sparse_gemm_bf16"]) == {"1", "2", "4", "128", "256"}
        assert set(entry["timings_ms"]["loop_bf16"]) == {"1", "2", "4"}
    assert thresholds.cached_thresholds(kmod.best_isa())["dense_batch_threshold"] == entry["dense_batch_threshold"]
    tiles = {int(t): ms for t, ms in entry["tile_rows_ms_at_128_rows"].items()}
    assert set(tiles) == set(thresholds.TILE_ROWS) and tiles[entry["dense_tile_rows"]] == min(tiles.values())
    assert main(["bench-runtime", "--shape", "12"]) == 2
    assert "--shape '12' is not OUTxIN" in capsys.readouterr().err
    assert main(["bench-runtime", "--sparsity", "1.5"]) == 2
    assert "--sparsity 1.5" in capsys.readouterr().err
    assert main(["bench-runtime", "--rows", "4,2"]) == 2
    assert "--rows '4,2' must be increasing" in capsys.readouterr().err
    thresholds.cache_path().write_text("{not json")
    thresholds.clear()
    with pytest.raises(LosaError, match="delete it and rerun losa bench-runtime"):
        thresholds.cached_thresholds(kmod.best_isa())


def test_crossovers_from_timings():
    """Thresholds from hand-made timings: the last count of an unbroken run of wins, "never" for the sparse GEMM
    when the tiles won at every count, prompt sizes included."""
    from losa.inference.thresholds import crossovers

    rows = (1, 2, 4, 8)
    fp32 = {"loop": {1: 1.0, 2: 1.5, 4: 3.0, 8: 2.0}, "tiles": {1: 5.0, 2: 2.0, 4: 2.5, 8: 2.5}}
    assert crossovers(fp32, rows) == {"dense_batch_threshold": 2}  # loses at 4: the later win at 8 does not count
    assert crossovers({"loop": fp32["tiles"], "tiles": fp32["loop"]}, rows) == {"dense_batch_threshold": 1}

    def bf16(sgemm_wins_from: int | None) -> dict:
        counts = (*rows, 128, 256)
        tiles = {r: float(r) for r in counts}
        sgemm = {r: r * (0.5 if sgemm_wins_from is not None and r >= sgemm_wins_from else 2.0) for r in counts}
        return {**fp32, "loop_bf16": {1: 0.5, 2: 3.0, 4: 5.0, 8: 9.0}, "tiles_bf16": tiles, "sparse_gemm_bf16": sgemm}

    entry = crossovers(bf16(None), rows, (128, 256))
    assert entry == {"dense_batch_threshold": 2, "dense_batch_threshold_bf16": 1, "sparse_gemm_batch_threshold": "never",
                     "prefill_rows": [128, 256]}
    assert crossovers(bf16(256), rows, (128, 256))["sparse_gemm_batch_threshold"] == 128
    assert crossovers(bf16(4), rows, (128, 256))["sparse_gemm_batch_threshold"] == 2
    assert crossovers(bf16(1), rows, (128, 256))["sparse_gemm_batch_threshold"] == 0


def test_crossovers_with_amx_timings():
    """With AMX timings the bf16 row loop hands over to the AMX kernel where that is faster, and the AMX kernel
    runs while it beats the bf16 tiles at every count (prompt sizes included)."""
    from losa.inference.thresholds import crossovers

    rows, counts = (1, 2, 4, 8), (1, 2, 4, 8, 128, 256)
    timings = {"loop": {r: 1.0 for r in rows}, "tiles": {r: 2.0 for r in rows},
               "loop_bf16": {1: 1.0, 2: 1.5, 4: 3.0, 8: 6.0}, "tiles_bf16": {r: 4.0 for r in counts},
               "sparse_gemm_bf16": {r: 9.0 for r in counts},
               "amx_bf16": {1: 2.0, 2: 2.0, 4: 2.0, 8: 2.5, 128: 3.0, 256: 5.0}}
    entry = crossovers(timings, rows, (128, 256))
    # the loop beats the AMX kernel at 1 and 2 rows (it beat the tiles at 4 too, but the AMX kernel follows it)
    assert entry["dense_batch_threshold_bf16"] == 2
    assert entry["amx_max_rows"] == 128  # loses to the tiles at 256
    timings["amx_bf16"][1] = 9.0  # a loss where the loop runs anyway does not count
    assert crossovers(timings, rows, (128, 256))["amx_max_rows"] == 128
    timings["amx_bf16"].update({4: 9.0, 8: 9.0})  # the loop now beats the AMX kernel at every row count
    assert crossovers(timings, rows, (128, 256))["amx_max_rows"] == 128  # which takes over above them, at 128
    timings["amx_bf16"][128] = 9.0
    entry = crossovers(timings, rows, (128, 256))
    # the AMX kernel never beats the tiles after the loop: off, and the loop is measured against the tiles
    assert entry["amx_max_rows"] == 0 and entry["dense_batch_threshold_bf16"] == 4


def test_cached_bf16_threshold_from_before_amx_is_not_used(monkeypatch):
    """A cached bf16 row-loop threshold measured with the AMX kernel off (no ``amx_max_rows``) is left out where it
    now runs, and one measured with it on is left out where it no longer runs; ``advice`` says to measure again."""
    from losa.inference import thresholds

    isa = kmod.best_isa() if KERNEL is not None else 2
    monkeypatch.setattr(thresholds, "cpu_key", lambda name, threads=None: f"test cpu | {name}")
    thresholds.save({"dense_batch_threshold": 7, "dense_batch_threshold_bf16": 12, "prefill_rows": [128],
                     "sparse_gemm_batch_threshold": "never"}, kmod.ISA_NAMES[isa])
    for amx in (True, False):
        monkeypatch.setattr(kmod, "amx_available", lambda isa=None, amx=amx: amx)
        thresholds.clear()
        cached = thresholds.cached_thresholds(isa)
        assert cached["dense_batch_threshold"] == 7
        assert ("dense_batch_threshold_bf16" in cached) is not amx
        assert ("AMX" in (thresholds.advice(isa) or "")) is amx
    thresholds.save({"dense_batch_threshold_bf16": 3, "amx_max_rows": 64}, kmod.ISA_NAMES[isa])
    for amx in (True, False):
        monkeypatch.setattr(kmod, "amx_available", lambda isa=None, amx=amx: amx)
        thresholds.clear()
        assert ("dense_batch_threshold_bf16" in thresholds.cached_thresholds(isa)) is amx
        assert (thresholds.advice(isa) is None) is amx
    assert thresholds.cached_thresholds(isa)["amx_max_rows"] == 64  # read, but used only where the kernel runs


def test_tile_rows_measured_else_per_cpu_default(monkeypatch):
    """The tile height: the fastest measured (bench-runtime), else 512 rows for bf16 GEMMs on AMX, else 256."""
    from losa.inference import sparse_linear as sl
    from losa.inference import thresholds

    assert thresholds.crossovers({"loop": {1: 1.0}, "tiles": {1: 2.0}}, [1], (),
                                 {256: 3.0, 512: 2.0, 1024: 2.5})["dense_tile_rows"] == 512
    monkeypatch.setattr(thresholds, "amx_present", lambda: True)
    assert (sl.tile_rows({}, True), sl.tile_rows({}, False)) == (512, 256)
    monkeypatch.setattr(thresholds, "amx_present", lambda: False)
    assert (sl.tile_rows({}, True), sl.tile_rows({}, False)) == (256, 256)
    assert sl.tile_rows({"dense_tile_rows": 1024}, True) == 1024
    thresholds.save({"dense_tile_rows": 0, "dense_batch_threshold": 2}, kmod.ISA_NAMES[kmod.best_isa()])
    assert thresholds.cached_thresholds(kmod.best_isa()) == {"dense_batch_threshold": 2}  # 0 rows is no height


@pytest.mark.skipif(KERNEL is None, reason="needs the compiled kernel")
def test_measured_tile_rows_reach_the_kernel(monkeypatch):
    """A cached height is what the layer's prompt GEMM decompresses per tile; the result does not depend on it."""
    from losa.inference import sparse_linear as sl
    from losa.inference import thresholds

    gen = torch.Generator().manual_seed(23)
    w = torch.randn(300, 96, generator=gen) * random_mask(300, 96, 0.6, gen)
    layer = SparseLinear.from_dense(w)
    x = torch.randn(80, 96, generator=gen)
    tiles = []

    class TileSpy:
        def __getattr__(self, name):
            fn = getattr(KERNEL, name)
            if name != "dense_mm":
                return fn

            def dense_mm(*a):
                tiles.append(a[-2])
                return fn(*a)
            return dense_mm
    monkeypatch.setattr(sl._kernel, "load_kernel", lambda: TileSpy())
    for height in (64, 1024):
        thresholds.save({"dense_tile_rows": height}, kmod.ISA_NAMES[kmod.best_isa()])
        torch.testing.assert_close(layer(x), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert tiles == [64, 1024]


def test_never_in_the_cache_reads_as_no_batch_large_enough():
    from losa.inference import thresholds

    assert "built-in defaults" in thresholds.advice(2)
    thresholds.save({"sparse_gemm_batch_threshold": "never", "dense_batch_threshold": 4, "prefill_rows": [128]},
                    "avx512")
    thresholds.save({"sparse_gemm_batch_threshold": "sometimes", "prefill_rows": [128]}, "avx2")  # not a threshold
    assert thresholds.cached_thresholds(2) == {"sparse_gemm_batch_threshold": thresholds.NEVER,
                                               "dense_batch_threshold": 4}
    assert thresholds.cached_thresholds(1) == {} and thresholds.advice(2) is None
    # written before prompt sizes were timed: that threshold was only the last batch measured, so it is not used
    thresholds.save({"sparse_gemm_batch_threshold": 64, "dense_batch_threshold": 4}, "avx512")
    assert thresholds.cached_thresholds(2) == {"dense_batch_threshold": 4}
    assert "rerun `losa bench-runtime`" in thresholds.advice(2)


def test_thresholds_in_use_are_named_with_their_thread_count():
    """``losa generate`` / ``serve`` print which measured thresholds apply, and say when they were measured at
    another thread count than the run's (the new-user trial saw nothing printed and 2-thread values used at 1)."""
    from losa.inference import thresholds

    assert thresholds.in_use(2, 1) is None  # nothing cached: advice() speaks instead
    thresholds.save({"dense_batch_threshold": 12, "sparse_gemm_batch_threshold": "never", "prefill_rows": [128],
                     "date": "2026-12-04 06:22 UTC", "threads": 2}, "avx512")
    line = thresholds.in_use(2, 2)
    assert line == ("batch-size thresholds measured on this CPU by losa bench-runtime (2026-12-04 06:22 UTC, "
                    "2 threads): dense_batch_threshold=12, sparse_gemm_batch_threshold=never")
    assert thresholds.in_use(2, 1) == line + ("; none measured at this run's 1 thread: `losa bench-runtime --threads "
                                              "1` measures them (the crossovers move with the thread count)")
    assert thresholds.in_use(1, 2) is None  # another ISA level's entry
    # each thread count keeps its own; a count never measured takes the nearest one's
    thresholds.save({"dense_batch_threshold": 5, "date": "d1", "threads": 1}, "avx512")
    thresholds.save({"dense_batch_threshold": 30, "date": "d8", "threads": 8}, "avx512")
    assert [thresholds.cached_thresholds(2, t)["dense_batch_threshold"] for t in (1, 2, 3, 6, 16)] == [5, 12, 12, 30, 30]
    thresholds.save({"dense_batch_threshold": 20, "threads": 4}, "avx512")  # 6 is as near to 4 as to 8: the lower
    thresholds.save({"dense_batch_threshold": 99}, "avx512")  # no thread count (a hand-made entry): the farthest
    assert [thresholds.cached_thresholds(2, t)["dense_batch_threshold"] for t in (3, 6, 7)] == [12, 20, 30]
    assert thresholds.in_use(2, 1).startswith("batch-size thresholds measured on this CPU by losa bench-runtime (d1, 1 "
                                              "thread): dense_batch_threshold=5") and "none" not in thresholds.in_use(2, 1)
    assert thresholds.cached_thresholds(1, 2) == {}


@pytest.mark.parametrize("fields,expected", [
    ({"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "17"}, True),  # Zen 4 (EPYC 9004)
    ({"vendor_id": "AuthenticAMD", "cpu family": "26", "model": "2"}, False),  # Zen 5
    ({"vendor_id": "GenuineIntel", "cpu family": "6", "model": "143"}, False),  # Sapphire Rapids (AMX)
    ({"vendor_id": "AuthenticAMD", "cpu family": "x"}, False), ({}, False)])
def test_sparse_gemm_default_per_cpu(fields, expected):
    from losa.inference import thresholds

    assert thresholds.sparse_gemm_by_default(fields) is expected


@pytest.mark.skipif(not BF16_SPARSE_PREFILL, reason="zero-skipping bf16 prefill needs an AVX512-BF16 CPU")
@pytest.mark.parametrize("default_on", [True, False])
def test_unmeasured_cpu_takes_its_kinds_prefill_path(monkeypatch, no_amx, default_on):
    """Nothing cached: a 70 % bf16 layer's large batches take the zero-skipping GEMM only on CPUs where it is on
    by default; a cached measurement overrides the default either way."""
    from losa.inference import sparse_linear as sl
    from losa.inference import thresholds

    monkeypatch.setattr(thresholds, "_this_cpu_sparse_gemm", lambda: default_on)
    gen = torch.Generator().manual_seed(22)
    w = torch.randn(64, 96, generator=gen) * random_mask(64, 96, 0.7, gen)
    calls = []
    monkeypatch.setattr(sl._kernel, "load_kernel", lambda: _Spy(KERNEL, calls))
    layer = SparseLinear.from_dense(w, None, "bfloat16")
    assert layer.sparse_prefill is default_on
    x = torch.randn(128, 96, generator=gen).bfloat16()
    torch.testing.assert_close(layer(x).double(), F.linear(x.double(), w.bfloat16().double()), rtol=2e-2, atol=2e-2)
    assert calls == (["sparse_mm_bf16"] if default_on else ["dense_mm"])
    thresholds.save({"sparse_gemm_batch_threshold": 24 if not default_on else "never", "prefill_rows": [128, 256]},
                    kmod.ISA_NAMES[kmod.best_isa()])
    assert SparseLinear.from_dense(w, None, "bfloat16").sparse_prefill is not default_on


@pytest.mark.skipif(not BF16_SPARSE_PREFILL, reason="zero-skipping bf16 prefill needs an AVX512-BF16 CPU")
def test_measured_sparse_gemm_threshold_drives_the_prefill(monkeypatch, no_amx):
    """A cached "never" keeps large bf16 batches on the decompressed tiles; a cached count moves the switch."""
    from losa.inference import sparse_linear as sl
    from losa.inference import thresholds

    gen = torch.Generator().manual_seed(21)
    w = torch.randn(64, 96, generator=gen) * random_mask(64, 96, 0.8, gen)
    isa = kmod.ISA_NAMES[kmod.best_isa()]
    calls = []
    monkeypatch.setattr(sl._kernel, "load_kernel", lambda: _Spy(KERNEL, calls))
    for cached, expected in (("never", ["dense_mm_xw", "dense_mm"]), (40, ["dense_mm_xw", "dense_mm"]),
                             (24, ["sparse_mm_bf16", "sparse_mm_bf16"])):
        thresholds.save({"sparse_gemm_batch_threshold": cached, "prefill_rows": [128, 256]}, isa)
        layer = SparseLinear.from_dense(w, None, "bfloat16")
        assert layer.sparse_prefill == (cached != "never")
        calls.clear()
        for rows in (30, 40):
            x = torch.randn(rows, 96, generator=gen).bfloat16()
            torch.testing.assert_close(layer(x).double(), F.linear(x.double(), w.bfloat16().double()),
                                       rtol=2e-2, atol=2e-2)
        assert calls == expected, cached


@pytest.mark.parametrize("k", [64, 70])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_pack_dense_is_pack_with_every_weight_kept(k, value_dtype):
    from losa.inference.formats import pack, pack_dense

    w = torch.randn(37, k)
    w[3, 5] = 0.0  # a zero is stored like any other weight
    ref = pack(w, value_dtype, "bitmask", keep=torch.ones_like(w, dtype=torch.bool))
    got = pack_dense(w, value_dtype)
    assert got.fmt == ref.fmt == "bitmask" and got.shape == ref.shape
    for name in ("meta", "values", "row_ptr"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 2, 7, 34])
@pytest.mark.parametrize("k", [64, 576, 1536, 1568])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_one_row_decode_with_odd_and_even_output_rows(isa, n, k, x_dtype):
    """Batch 1, odd and even output-row counts, short and long rows, every format: against a float64 product of
    the same (bf16) weights and inputs (a loop that handles rows in pairs or blocks must get the last row right)."""
    gen = torch.Generator().manual_seed(n * 7 + k)
    for fmt, pattern in (("bitmask", 0.7), ("nm24", "2:4"), ("nm14", "1:4")):
        w = torch.randn(n, k, generator=gen) * random_mask(n, k, pattern, gen)
        b = torch.randn(n, generator=gen)
        p = pack(w, torch.bfloat16, fmt)
        x = torch.randn(1, k, generator=gen).to(x_dtype)
        code = {v: c for c, v in kmod.ISA_NAMES.items()}[isa]
        y = KERNEL.spmm(x, p.meta, p.values, p.row_ptr, b, n, k, FORMAT_CODES[fmt], code)
        torch.testing.assert_close(y, reference(x.float(), w, b, torch.bfloat16), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ AMX tiles kernel (CPUs with AMX-BF16)

AMX = KERNEL is not None and bool(KERNEL.amx_available())
needs_amx = pytest.mark.skipif(not AMX, reason="needs a CPU with AMX-BF16 (Sapphire Rapids or later)")


def _products_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case error of float32 sums of exact bf16 products: K * 2^-24 * sum |x_j w_j| (recursive summation)."""
    return x.shape[1] * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())


@needs_amx
@pytest.mark.parametrize("out_f,in_f,pattern,fmt", [(64, 96, 0.7, "bitmask"), (100, 70, 0.5, "bitmask"),
                                                    (33, 2050, 0.6, "bitmask"), (96, 64, "2:4", "nm24"),
                                                    (40, 96, "1:4", "nm14")])
@pytest.mark.parametrize("batch", [1, 15, 16, 17, 32, 33, 100, 200])
def test_amx_matches_exact_products(out_f, in_f, pattern, fmt, batch):
    """The AMX kernel against float64 sums of the same bf16 products: float32 sums (with a bias) within the
    summation bound, bf16 sums (without) within one bf16 rounding of it. Batches cover one and two token tiles
    (the sums kept in tiles) and the chunked path beyond 32 rows (several input chunks at 2050 inputs)."""
    gen = torch.Generator().manual_seed(batch * 131 + out_f)
    w = (torch.randn(out_f, in_f, generator=gen) * random_mask(out_f, in_f, pattern, gen)).bfloat16()
    p = pack(w, torch.bfloat16, fmt)
    x = torch.randn(batch, in_f, generator=gen).bfloat16()
    b = torch.randn(out_f, generator=gen)
    exact = F.linear(x.double(), w.double())
    bound = _products_bound(x, w)
    y = KERNEL.amx_mm_bf16(x, p.meta, p.values, p.row_ptr, b, out_f, in_f, FORMAT_CODES[fmt])
    assert y.dtype == torch.float32 and y.shape == (batch, out_f)
    assert ((y.double() - exact - b.double()).abs() <= bound + 1e-6 * b.double().abs()).all()
    yb = KERNEL.amx_mm_bf16(x, p.meta, p.values, p.row_ptr, None, out_f, in_f, FORMAT_CODES[fmt])
    assert yb.dtype == torch.bfloat16
    assert ((yb.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + bound * 1.01).all()
    if batch == 1:  # no rows: an empty result of the right shape and dtype
        empty = KERNEL.amx_mm_bf16(x[:0], p.meta, p.values, p.row_ptr, b, out_f, in_f, FORMAT_CODES[fmt])
        assert empty.shape == (0, out_f) and empty.dtype == torch.float32
        empty = KERNEL.amx_mm_bf16(x[:0], p.meta, p.values, p.row_ptr, None, out_f, in_f, FORMAT_CODES[fmt])
        assert empty.shape == (0, out_f) and empty.dtype == torch.bfloat16
    # the same inputs starting at an odd bf16 offset of their storage
    odd = torch.empty(batch * in_f + 1, dtype=torch.bfloat16)[1:].view(batch, in_f)
    odd.copy_(x)
    assert torch.equal(KERNEL.amx_mm_bf16(odd, p.meta, p.values, p.row_ptr, None, out_f, in_f, FORMAT_CODES[fmt]), yb)


@needs_amx
def test_amx_same_bits_on_any_thread_count():
    """Each block of 32 weight rows is summed by one thread in a fixed order: 1 and 2 threads give the same bits."""
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(300, 1100, generator=gen) * random_mask(300, 1100, 0.7, gen)).bfloat16()
    p = pack(w, torch.bfloat16, "bitmask")
    before = torch.get_num_threads()
    try:
        for batch in (8, 70):
            x = torch.randn(batch, 1100, generator=gen).bfloat16()
            outs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                outs.append(KERNEL.amx_mm_bf16(x, p.meta, p.values, p.row_ptr, None, 300, 1100, 0))
            assert torch.equal(outs[0], outs[1])
    finally:
        torch.set_num_threads(before)


@needs_amx
def test_amx_runs_between_the_row_loop_and_the_large_batch_paths(monkeypatch):
    """bf16 batches of a bf16 layer: the row loop up to AMX_ROW_LOOP_ROWS rows, the AMX kernel up to AMX_MAX_ROWS
    (AMX_MAX_ROWS_SMALL on a small layer), the large-batch paths above; float32 inputs reach it only with a bf16
    prompt GEMM (``prefill_dtype="bfloat16"``) and bf16 values, and a forced lower ISA never."""
    from losa.inference import sparse_linear as sl

    gen = torch.Generator().manual_seed(17)
    w = torch.randn(64, 96, generator=gen) * random_mask(64, 96, 0.5, gen)  # small, not sparse enough for sparse GEMM
    layer = SparseLinear.from_dense(w, None, "bfloat16")
    calls = []
    monkeypatch.setattr(sl._kernel, "load_kernel", lambda: _Spy(KERNEL, calls))
    loop, most = sl.AMX_ROW_LOOP_ROWS, sl.AMX_MAX_ROWS_SMALL
    assert layer._small
    for rows in (loop, loop + 1, most, most + 1):
        x = torch.randn(rows, 96, generator=gen).bfloat16()
        torch.testing.assert_close(layer(x).double(), F.linear(x.double(), w.bfloat16().double()), rtol=2e-2, atol=2e-2)
    assert calls == ["spmm", "amx_mm_bf16", "amx_mm_bf16", "dense_mm"]
    calls.clear()
    monkeypatch.setattr(sl, "SMALL_LAYER_WEIGHTS", 0)  # the same weights as a large layer: AMX_MAX_ROWS
    large = SparseLinear.from_dense(w, None, "bfloat16")
    for rows in (sl.AMX_MAX_ROWS, sl.AMX_MAX_ROWS + 1):
        large(torch.randn(rows, 96, generator=gen).bfloat16())
    assert calls == ["amx_mm_bf16", "dense_mm"]
    calls.clear()
    rows = sl.DENSE_BATCH_THRESHOLD + 8  # above every row loop's threshold, within the AMX kernel's range
    x = torch.randn(rows, 96, generator=gen)
    torch.testing.assert_close(layer(x), reference(x, w, None, torch.bfloat16), rtol=1e-4, atol=1e-4)
    assert calls == ["dense_mm"]  # float32 inputs: the float32 tiles
    calls.clear()
    # float32 inputs with a bf16 prompt GEMM: the AMX kernel on inputs rounded to bf16, its output rounded to bf16
    # and the bias added in float32, as the bf16 tiles compute it; float32 values keep the tiles
    b = torch.randn(64, generator=gen)
    want = F.linear(x.bfloat16().double(), w.bfloat16().double()).bfloat16().double() + b.double()
    for vdtype, path in (("bfloat16", "amx_mm_bf16"), ("float32", "dense_mm_xw")):  # (bf16 tiles, x · Wᵀ)
        bf16_prompt = SparseLinear.from_dense(w, b, vdtype, prefill_dtype="bfloat16")
        y = bf16_prompt(x)
        assert y.dtype == torch.float32 and calls == [path]
        torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=2e-2 * 96**0.5)
        calls.clear()
    # the AMX kernel's result and the bf16 tiles' differ by the float32 summation order and one bf16 rounding each
    amx_y = SparseLinear.from_dense(w, b, "bfloat16", prefill_dtype="bfloat16")(x).double() - b.double()
    real = kmod.amx_available
    monkeypatch.setattr(kmod, "amx_available", lambda isa=None: False)
    tiles_y = SparseLinear.from_dense(w, b, "bfloat16", prefill_dtype="bfloat16")(x).double() - b.double()
    monkeypatch.setattr(kmod, "amx_available", real)
    assert calls == ["amx_mm_bf16", "dense_mm_xw"]
    bound = 2 * _products_bound(x.bfloat16(), w.bfloat16()) + 1e-5 * (1 + b.double().abs())
    assert ((amx_y - tiles_y).abs() <= 2.0 ** -7 * amx_y.abs().maximum(tiles_y.abs()) + bound).all()
    calls.clear()
    monkeypatch.setenv("LOSA_SPARSE_ISA", "avx2")
    assert not kmod.amx_available()
    x = torch.randn(rows, 96, generator=gen).bfloat16()
    torch.testing.assert_close(layer(x).double(), F.linear(x.double(), w.bfloat16().double()), rtol=2e-2, atol=2e-2)
    assert calls == ["dense_mm"]  # no native bf16 at this level: widened to float32 for the float32 tiles


@pytest.mark.skipif(KERNEL is None or AMX, reason="checks the error on a CPU without AMX")
def test_amx_kernel_says_what_it_needs_without_amx():
    w = torch.randn(32, 64).bfloat16()
    p = pack(w, torch.bfloat16, "bitmask")
    with pytest.raises(RuntimeError, match="AMX"):
        KERNEL.amx_mm_bf16(torch.randn(4, 64).bfloat16(), p.meta, p.values, p.row_ptr, None, 32, 64, 0)
    assert not kmod.amx_available()


def test_the_package_data_ships_every_kernel_source_and_header():
    """A wheel install compiles the kernel from the files it ships: every source and header the build reads
    (losa.inference.kernel) matches a package-data pattern of pyproject.toml, so none is left out of the wheel."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["losa"]
    package = root / "src" / "losa"
    shipped = {p.relative_to(package).as_posix() for pat in patterns for p in package.glob(pat)}  # setuptools' globs
    needed = [p.resolve().relative_to(package).as_posix() for p in kmod._SRC + kmod._HEADERS]
    assert "inference/csrc/decode_attention_blocked.h" in needed
    assert not [p for p in needed if p not in shipped]
