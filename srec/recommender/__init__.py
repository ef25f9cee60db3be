"""The MLLM recommender (MLLM-SRec, MLLM-MSR): "will this user buy this item next? Yes. / No."

- ``settings``: variants (the papers' ablations) and hyper-parameters.
- ``data``: items, user contexts (profile, summaries, history) and SFT examples from the tables.
- ``encoding``: prompts through the model's chat template, split into a shared user prefix and a
  per-item suffix; answer token ids checked against the tokenizer; truncation of the oldest history.
- ``training``: LoRA / QLoRA with the loss on the answer tokens only, early stopping on validation AUC,
  resumable checkpoints.
- ``scoring``: P(yes) / (P(yes) + P(no)) in one forward pass, the user prefix's KV cache shared.
- ``pipeline``: the steps the Dagster assets run.
"""
from srec.recommender.settings import RecommenderSettings, Variant

__all__ = ["RecommenderSettings", "Variant"]
