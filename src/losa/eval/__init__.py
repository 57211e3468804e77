"""Evaluation: perplexity (``ppl``) and zero-shot tasks through lm-evaluation-harness (``zeroshot``)."""
