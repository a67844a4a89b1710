"""Kernels behind the ops: ``triton/`` (portable, NVIDIA and AMD) and ``tilelang/``
(Hopper). Nothing here is imported until :mod:`seerattn_r.backend` asks for it."""
