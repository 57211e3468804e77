"""The compact LoSA resume state: bitmasks, only the base weights the original checkpoint does not give,
bit-identical resume (Wanda, SparseGPT, rank folds), refusal of another checkpoint, the older layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from losa.errors import LosaError
from losa.lora import SparseLoRAConfig, add_sparse_lora, sparse_lora_modules
from losa.lora.layer import SparseLoRALinear
from losa.lora.model import adapter_state_dict
from losa.pipelines.losa import LoSAConfig, run
from losa.pipelines.losa.loop import LoSARun
from losa.pipelines.losa.state import WeightOrigin, load_state, pack_mask, save_state, unpack_mask


class CharTokenizer:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}


def _data(tmp_path, n=32):
    f = tmp_path / "ft.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"{i % 3} abcdabcdabcd"}) for i in range(n)) + "\n")
    return str(f)


def _cfg(data, **kw):
    base = dict(sparsity=0.5, steps=2, nsamples=4, seqlen=16, recon_nsamples=2, r_max=8, r_min=1,
                omega_first=4, omega_last=6, finetune_data=data, device="cpu",
                finetune={"batch_size": 4, "max_length": 32, "lr": 1e-2, "epochs": 1})
    base.update(kw)
    return LoSAConfig(**base)


@pytest.fixture
def calib():
    return torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def _model(seed=0):
    return make_tiny_model("llama", seed=seed, layers=2, hidden=64)


def _interrupted(tmp_path, cfg, calib, steps, seed=0):
    """A run directory whose state holds ``steps`` finished steps (as if killed in the next one)."""
    job = LoSARun(_model(seed), CharTokenizer(), cfg, tmp_path / "run", calib_ids=calib, progress=False)
    job.setup()
    for t in range(1, steps + 1):
        job.step(t)
    return tmp_path / "run"


def _assert_same_model(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k].view(torch.int32), pb[k].view(torch.int32)), k  # bit for bit


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_bitmask_layout_is_numpy_packbits():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5), (8, 16), (1, 1), (7, 9), (64, 24)]:
        mask = torch.rand(shape, generator=g) < 0.4
        packed = pack_mask(mask)
        assert packed.dtype == torch.uint8 and packed.shape == ((mask.numel() + 7) // 8,)
        assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().reshape(-1)))  # independent reference
        assert torch.equal(unpack_mask(packed, shape), mask)
    with pytest.raises(LosaError, match="does not fit a mask of shape"):
        unpack_mask(torch.zeros(3, dtype=torch.uint8), (8, 8))


def test_wanda_state_is_masks_plus_adapters(tmp_path, calib):
    """50 % Wanda without rank drops: no base weight is stored, the masks cost 1 bit per weight."""
    cfg = _cfg(_data(tmp_path), rank_allocation=False)  # ranks 4 -> 6: they only grow, nothing folds
    model = _model()
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if n.endswith("proj")}
    run(model, CharTokenizer(), cfg, out_dir=tmp_path / "run", calib_ids=calib, progress=False)
    d = tmp_path / "run" / "state"
    assert _keys(d / "weights.safetensors") == set()
    ad = load_file(str(d / "adapters.safetensors"))
    assert sorted(ad) == sorted(f"{n}.{k}" for n in shapes for k in ("active_rank", "lora_A", "lora_B", "mask_bits"))
    assert not any(t.shape in shapes.values() for t in ad.values())  # no dense [out, in] tensor at all
    # independent of the implementation: numel / 8 bytes per mask, A [r_max, in] + B [out, r_max] fp32, int64 rank
    mask_bytes = sum(o * i // 8 for o, i in shapes.values())
    adapter_bytes = sum(4 * 8 * (o + i) + 8 for o, i in shapes.values())
    overhead = 200 * 4 * len(shapes) + 1024  # safetensors JSON header: one entry per tensor
    assert sum(ad[f"{n}.mask_bits"].numel() for n in shapes) == mask_bytes
    dense_fp32 = sum(4 * o * i for o, i in shapes.values())
    assert mask_bytes * 32 == dense_fp32
    tensors = (d / "adapters.safetensors").stat().st_size + (d / "weights.safetensors").stat().st_size
    assert tensors <= mask_bytes + adapter_bytes + overhead
    # the stored masks are the model's final sparsity pattern (adapters merged into kept positions only)
    for n, shape in shapes.items():
        mask = unpack_mask(ad[f"{n}.mask_bits"], shape)
        w = model.get_submodule(n).weight
        assert not bool(w[~mask].any()), n
        assert abs(mask.float().mean().item() - 0.5) < 0.1, n


def test_sparsegpt_resume_is_bit_identical(tmp_path, calib):
    """SparseGPT changes the kept weights: they are stored (1-D, kept positions only) and restored exactly."""
    cfg = _cfg(_data(tmp_path), method="sparsegpt")
    ref = _model()
    run(ref, CharTokenizer(), cfg, out_dir=tmp_path / "ref", calib_ids=calib, progress=False)
    d = _interrupted(tmp_path, cfg, calib, 1)
    stored = load_file(str(d / "state" / "weights.safetensors"))
    masks = load_file(str(d / "state" / "adapters.safetensors"))
    fresh = _model()
    assert sorted(stored) == sorted(f"{n}.kept" for n in add_sparse_lora(_model(), SparseLoRAConfig()))
    for k, v in stored.items():
        q = k[: -len(".kept")]
        orig = fresh.get_submodule(q).weight
        mask = unpack_mask(masks[f"{q}.mask_bits"], orig.shape)
        assert v.dim() == 1 and v.numel() == int(mask.sum())
        assert not torch.equal(v, orig[mask]), q  # SparseGPT compensated the kept weights
    resumed = _model()
    rep = run(resumed, CharTokenizer(), cfg, out_dir=d, resume=True, calib_ids=calib, progress=False)
    assert [s.step for s in rep.steps] == [1, 2]
    _assert_same_model(ref, resumed)


def test_rank_fold_is_stored_and_resumes_bit_identical(tmp_path, calib):
    """A rank that drops folds its trained update into W (Wanda included): those kept values are stored."""
    cfg = _cfg(_data(tmp_path), steps=3, rank_allocation=False, omega_first=6, omega_last=2)  # ranks 6, 4, 2
    ref = _model()
    run(ref, CharTokenizer(), cfg, out_dir=tmp_path / "ref", calib_ids=calib, progress=False)
    d = _interrupted(tmp_path, cfg, calib, 1)
    assert _keys(d / "state" / "weights.safetensors") == set()  # step 1: rank 6 from 6, nothing folded
    d = _interrupted(tmp_path / "two", cfg, calib, 2)
    names = add_sparse_lora(_model(), SparseLoRAConfig())
    assert _keys(d / "state" / "weights.safetensors") == {f"{n}.kept" for n in names}  # step 2: 6 -> 4 folded
    resumed = _model()
    run(resumed, CharTokenizer(), cfg, out_dir=d, resume=True, calib_ids=calib, progress=False)
    _assert_same_model(ref, resumed)


def test_state_of_another_checkpoint_is_refused(tmp_path, calib):
    cfg = _cfg(_data(tmp_path))
    d = _interrupted(tmp_path, cfg, calib, 1, seed=0)
    with pytest.raises(LosaError) as e:
        run(_model(seed=1), CharTokenizer(), cfg, out_dir=d, resume=True, calib_ids=calib, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert "the model's weights differ from those the run" in msg and "14 of 14 modules" in msg
    assert "load the same checkpoint or use a new out_dir (--out)" in msg
    # one weight changed in one module is enough (the whole weight is hashed)
    other = _model()
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight[5, 7] += 1e-3
    with pytest.raises(LosaError, match=r"\(1 of 14 modules, e\.g\. model\.layers\.1\.mlp\.down_proj\)"):
        run(other, CharTokenizer(), cfg, out_dir=d, resume=True, calib_ids=calib, progress=False)


def test_older_dense_state_still_loads(tmp_path, calib):
    """A state in the dense layout (weights.safetensors with every weight, bool masks) resumes exactly."""
    cfg = _cfg(_data(tmp_path), method="sparsegpt")
    job = LoSARun(_model(), CharTokenizer(), cfg, tmp_path / "run", calib_ids=calib, progress=False)
    job.setup()
    job.step(1)
    d = tmp_path / "run" / "state"
    mods = sparse_lora_modules(job.model)
    save_file({f"{q}.weight": m.base.weight.detach().clone() for q, m in mods.items()}, str(d / "weights.safetensors"))
    old_adapters = {k: v for k, v in adapter_state_dict(job.model).items() if not k.endswith(".mask_bits")}
    old_adapters.update({f"{q}.mask": m.mask.cpu() for q, m in mods.items()})  # the old layout: bool [out, in]
    save_file(old_adapters, str(d / "adapters.safetensors"))
    meta = json.loads((d / "state.json").read_text())
    (d / "state.json").write_text(json.dumps({k: meta[k] for k in ("step", "recipe", "data", "rows")}))
    fresh = _model()
    add_sparse_lora(fresh, SparseLoRAConfig(r_max=8, rank=4, alpha=cfg.lora_alpha, init_seed=cfg.seed))
    step, rows = load_state(tmp_path / "run", fresh, job.recipe, job.fingerprint)
    assert step == 1 and len(rows) == 1
    for q, m in sparse_lora_modules(fresh).items():
        ref = mods[q]
        for a, b in ((m.base.weight, ref.base.weight), (m.mask, ref.mask), (m.lora_A, ref.lora_A),
                     (m.lora_B, ref.lora_B), (m.active_rank, ref.active_rank)):
            assert torch.equal(a, b), q
        assert m.base_edited  # SparseGPT's kept values differ from the checkpoint's


def test_merged_adapters_are_never_saved_into_the_weights(tmp_path):
    model = _model()
    add_sparse_lora(model, SparseLoRAConfig(r_max=4, rank=2))
    origin = WeightOrigin.of(model)
    m = next(iter(sparse_lora_modules(model).values()))
    m.merge()
    with pytest.raises(LosaError, match="is merged into its weight; unmerge the adapters before saving"):
        save_state(tmp_path, model, 1, {}, [], {}, origin)
    m.unmerge()
    save_state(tmp_path, model, 1, {}, [], {}, origin)
    assert _keys(tmp_path / "state" / "weights.safetensors") == set()  # unpruned, unchanged: nothing to store


def test_an_edit_behind_the_wrappers_back_is_still_stored(tmp_path):
    """A kept weight changed without going through the wrapper is caught by the sampled original values."""
    model = _model()
    add_sparse_lora(model, SparseLoRAConfig(r_max=4, rank=2))
    origin = WeightOrigin.of(model)
    q, m = next(iter(sparse_lora_modules(model).items()))
    with torch.no_grad():
        m.base.weight.mul_(0.5)
    assert not m.base_edited
    save_state(tmp_path, model, 1, {}, [], {}, origin)
    stored = load_file(str(tmp_path / "state" / "weights.safetensors"))
    assert sorted(stored) == [f"{q}.kept"] and torch.equal(stored[f"{q}.kept"], m.base.weight.reshape(-1))


def test_base_edited_tracks_every_change_of_a_kept_weight():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 8, generator=g)
    lin = torch.nn.Linear(8, 6, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w0)
    m = SparseLoRALinear(lin, r_max=4, alpha=4.0, rank=4, generator=g)
    keep = torch.rand(6, 8, generator=g) > 0.5
    m.merge()
    m.unmerge(lin.weight.detach() * keep, keep)  # pruning without compensation (Wanda / magnitude)
    assert not m.base_edited and torch.equal(lin.weight, w0 * keep)
    m.set_rank(2)  # B is zero: nothing to fold
    assert not m.base_edited
    m.set_mask(keep | torch.eye(6, 8, dtype=torch.bool))  # a mask that grows keeps W = 0 where W0 is not
    assert m.base_edited
    m2 = SparseLoRALinear(torch.nn.Linear(8, 6, bias=False), r_max=4, alpha=4.0, rank=4, generator=g)
    m2.merge()
    w = m2.base.weight.detach().clone()
    w[0, 0] += 1.0  # a compensated kept weight (SparseGPT)
    m2.unmerge(w, torch.ones(6, 8, dtype=torch.bool))
    assert m2.base_edited
    m3 = SparseLoRALinear(torch.nn.Linear(8, 6, bias=False), r_max=4, alpha=4.0, rank=4, generator=g)
    with torch.no_grad():
        m3.lora_B.normal_(generator=g)
    m3.set_rank(1)  # the dropped components' trained update is folded into W
    assert m3.base_edited


def test_a_resume_under_another_number_of_processes_keeps_the_global_batch(tmp_path):
    """The global batch (batch_size x grad_accum x processes) is what a resume must keep: 2 processes x 4 become
    1 process x 4 x grad_accum 2 (refused as a differing grad_accum before), and 1 process x 4 alone is refused
    (it went on silently with twice the optimizer steps). A state written before the process count was recorded
    keeps the strict recipe check."""
    from losa.pipelines.losa.state import check_resume

    def recipe(batch_size: int, grad_accum: int) -> dict:
        return LoSAConfig(finetune={"batch_size": batch_size, "grad_accum": grad_accum}).model_dump()

    (tmp_path / "state").mkdir()
    meta = {"step": 1, "recipe": json.loads(json.dumps(recipe(4, 1))), "processes": 2}
    (tmp_path / "state" / "state.json").write_text(json.dumps(meta))
    assert check_resume(tmp_path, recipe(4, 2), processes=1)["step"] == 1
    assert check_resume(tmp_path, recipe(2, 1), processes=4)["step"] == 1
    with pytest.raises(LosaError, match=r"global batch of 8 examples \(batch size 4 x grad_accum 1 x 2 processes\), "
                                        r"this one with 4 \(4 x 1 x 1\); pass .*--grad-accum\) 2 to keep it$"):
        check_resume(tmp_path, recipe(4, 1), processes=1)
    with pytest.raises(LosaError, match=r"this one with 9 \(3 x 3 x 1\); run it with 2 processes$"):
        check_resume(tmp_path, recipe(3, 3), processes=1)  # 8 is no multiple of 3: no grad_accum keeps it
    meta["step"] = 5  # all of LoSAConfig's default 5 steps saved: nothing left to fine-tune, any batch will do
    (tmp_path / "state" / "state.json").write_text(json.dumps(meta))
    assert check_resume(tmp_path, recipe(4, 1), processes=1)["step"] == 5
    meta["step"] = 1
    del meta["processes"]
    (tmp_path / "state" / "state.json").write_text(json.dumps(meta))
    with pytest.raises(LosaError, match=r"differs from this run's in finetune.grad_accum \(saved 1, now 2\);"):
        check_resume(tmp_path, recipe(4, 2), processes=1)


def test_a_run_saved_before_a_field_existed_resumes(tmp_path):
    """A state.json written before lora_dropout existed lacks it: the run used what its default does, so it resumes
    (it was refused as a differing recipe); a value other than the default is not."""
    from losa.pipelines.losa.state import check_resume

    old = json.loads(json.dumps(LoSAConfig().model_dump()))
    del old["lora_dropout"]
    del old["finetune"]["grad_accum"]
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text(json.dumps({"step": 1, "recipe": old}))
    assert check_resume(tmp_path, LoSAConfig().model_dump(), processes=1)["step"] == 1
    with pytest.raises(LosaError, match=r"differs from this run's in lora_dropout \(saved 0\.0, now 0\.1\);"):
        check_resume(tmp_path, LoSAConfig(lora_dropout=0.1).model_dump(), processes=1)
