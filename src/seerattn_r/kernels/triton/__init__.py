"""Portable Triton kernels (NVIDIA and AMD), one module per op.

Each module exposes a function named after its op with the op's positional signature
(inputs already validated by ``seerattn_r.ops``) and ``aot_configs()``, the list of builds
that ``tests/test_triton_aot.py`` compiles ahead of time for NVIDIA and AMD targets.
"""
