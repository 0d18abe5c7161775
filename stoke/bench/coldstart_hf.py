"""The baseline of `stoke bench coldstart`, in a fresh process: what a user would otherwise run.

    python -m stoke.bench.coldstart_hf HF_DIR PROMPT_IDS_JSON THREADS

Imports torch (limited to THREADS threads, as each stoke instance is) and transformers (and
the model's modeling module, which `from_pretrained` would otherwise import inside its own
timing), then times `AutoModelForCausalLM.from_pretrained` and a greedy
`generate(max_new_tokens=1)` on the given prompt ids. Prints one JSON line: seconds from the
interpreter's start to the end of the imports, of the load, and of the generate. The parent
evicts the safetensors files from the page cache first and times the process from its spawn.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

STARTED = time.perf_counter()  # before the heavy imports


def main(argv: list[str]) -> int:
    hf_dir, prompt_ids, threads = argv[0], json.loads(argv[1]), int(argv[2])
    import torch

    torch.set_num_threads(threads)  # as many as each stoke instance gets
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(hf_dir))]  # imports the module
    ids = torch.tensor([prompt_ids])
    imported = time.perf_counter()
    model: Any = AutoModelForCausalLM.from_pretrained(hf_dir)
    loaded = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
    done = time.perf_counter()
    report = {
        "import_s": imported - STARTED,
        "load_s": loaded - imported,
        "generate_s": done - loaded,
        "dtype": str(model.dtype).removeprefix("torch."),
    }
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
