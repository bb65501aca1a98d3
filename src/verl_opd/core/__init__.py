"""The math: pure tensor functions (advantage, metrics, cross-tokenizer chunks in xtok), no verl import.

Everything here takes tensors (and ids or byte tables) and returns tensors, so
it is testable without verl, Ray or a model.
"""
