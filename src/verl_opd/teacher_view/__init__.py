"""The teacher's own view of a conversation (``opd.teacher.view=own``): tokenizer-facing code.

- :mod:`verl_opd.teacher_view.byte_tables`: exact bytes per token id, byte-level BPE checks, encodings of
  exact bytes (the student's canonical re-encoding, the teacher's response ids).
- :mod:`verl_opd.teacher_view.render`: the teacher's prompt from verl's ``raw_prompt`` messages in its own
  chat template (plus ``opd.teacher.system_prompt`` / ``opd.teacher.context_key``), its end-of-turn ids.

Uses ``transformers`` / ``tokenizers`` (and verl's own chat-template renderer); the alignment math on the
ids it produces is :mod:`verl_opd.core.xtok`.
"""
