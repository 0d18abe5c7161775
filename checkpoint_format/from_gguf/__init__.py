"""GGUF import: a llama.cpp / Ollama `.gguf` file -> a stoke checkpoint.

- `convert_gguf(path, out_dir, dtype=...)`: dequantize, un-permute, build the tokenizer and
  config from the metadata, write the checkpoint (nothing left behind on failure).
- `is_gguf_file(path)`: a regular file starting with the GGUF magic.
- `GGUFError`: what every refusal raises (a `ConversionError`).
"""

from checkpoint_format.from_gguf.convert import convert_gguf
from checkpoint_format.from_gguf.read import GGUFError, is_gguf_file
from checkpoint_format.from_gguf.tensors import SUPPORTED_TYPES
from checkpoint_format.from_gguf.tokenizer import SUPPORTED_TOKENIZERS

__all__ = ["SUPPORTED_TOKENIZERS", "SUPPORTED_TYPES", "GGUFError", "convert_gguf", "is_gguf_file"]
