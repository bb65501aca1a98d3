"""Checks that run before anything loads: resources, inputs, the teacher's fit,
tokenizers, and the teacher identity recorded in checkpoints.

The driver and the doctor call the same functions, so a run and its pre-flight
refuse the same things with the same messages.
"""
