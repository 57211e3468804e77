"""The reference: llm-compressor's ``oneshot`` on the same model and calibration samples.

Runs in a separate venv that has llmcompressor installed (it pins its own transformers).
Usage: python benchmarks/_llmc_worker.py METHOD TARGET CALIB_PT MODEL_DIR OUT_DIR. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from _rss import peak_rss_mb


def main() -> None:
    method, target, calib_pt, model_dir, out_dir = sys.argv[1:6]
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    ids = torch.load(calib_pt)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    kw = {"sparsity": 0.5, "mask_structure": target} if ":" in target else {"sparsity": float(target)}
    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    modifier = cls(targets=["Linear"], ignore=["re:.*lm_head"], **kw)
    t = time.perf_counter()
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=[modifier], num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], pipeline="sequential")
    wall = time.perf_counter() - t
    # plain state dict: llm-compressor's save_pretrained would write its own compressed format
    import os

    os.makedirs(out_dir, exist_ok=True)
    torch.save({k: v.detach().contiguous() for k, v in model.state_dict().items()}, f"{out_dir}/state.pt")
    print(json.dumps({"prune_s": wall, "peak_rss_mb": peak_rss_mb()}))


if __name__ == "__main__":
    main()
