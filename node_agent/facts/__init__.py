"""The node agent's public, torch-free facts: what the controller (and the CLI) may know about
a model and its checkpoint without the engine or the store.

- `model_config`: `config.json` read and validated (`ModelConfig`).
- `tokenizer`: the model's tokenizer and chat template (`Tokenizer`).
- `sizing`: the KV-cache formula and the memory defaults both sides assume (default KV cache,
  worker overhead, the 4096-token context cap).
- `sources`: where a checkpoint comes from (`parse_source`: `s3://...` or a local directory).
- `s3client`: the S3 client and S3 failures as `RemoteError`.
- `tiers`: tier names (`TierName`) and where a load's bytes came from (`Origin`).
- `units`: the one parser for sizes and durations (`parse_size`, `parse_duration`,
  `format_size`), with its rules.
- `errors`: the typed errors of all the above (`EngineError`, `StoreError` and their kinds).

Nothing here imports torch, the engine, the store or the instances; import-linter holds that
(`pyproject.toml`). Import the submodules themselves: this package re-exports nothing, so
importing one fact never pays for the others (the tokenizer pulls in `tokenizers` and Jinja2).
"""
