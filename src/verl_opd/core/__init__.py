"""The math: pure tensor functions (advantage, metrics), no verl import.

Everything here takes tensors (and ids or byte tables) and returns tensors, so
it is testable without verl, Ray or a model.
"""
