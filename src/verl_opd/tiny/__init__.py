"""Hub-free tiny models and data: everything the demo and tests need, built locally and deterministically.

- :mod:`verl_opd.tiny.tokenizer`: a byte-level BPE tokenizer (one token per digit) with a ChatML template.
- :mod:`verl_opd.tiny.model`: a seeded random Qwen2 causal LM saved next to its tokenizer.
- :mod:`verl_opd.tiny.task`: an addition task in verl's gsm8k parquet schema.

Import from the submodules: this package deliberately imports nothing, so that e.g. reading the task does
not pull in torch and transformers.
"""
