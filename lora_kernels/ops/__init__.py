"""Registered torch ops (one file per op): the fused LoRA linear and the multi-adapter LoRA."""
