"""`transformers` on the same weights as stoke, whatever the model path is, for benchmarks.

A Hugging Face directory loads as usual; a `.gguf` file through transformers' own GGUF reader;
a stoke checkpoint (which transformers cannot read) by building the model from its config and
loading the tensors stoke's loader reads, so both engines run exactly the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def reference_model(model: Path) -> Any:
    """A float32 `transformers` causal LM in eval mode for `model` (directory or .gguf file)."""
    import torch
    import transformers

    from checkpoint_format import is_checkpoint

    auto = transformers.AutoModelForCausalLM
    if model.is_file():
        return auto.from_pretrained(
            str(model.parent), gguf_file=model.name, dtype=torch.float32
        ).eval()
    if not is_checkpoint(model):
        return auto.from_pretrained(model, dtype=torch.float32).eval()
    from loader import load_state_dict

    config = transformers.AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        hf = auto.from_config(config, dtype=torch.float32)
    state = {k: v.to(torch.float32) for k, v in load_state_dict(model).items()}
    hf.load_state_dict(state, strict=False, assign=True)
    hf.tie_weights()
    return hf.eval()
