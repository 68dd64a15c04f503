"""Triton kernels, installed as fast_attn.triton_kernels; one file per op.

setup.py maps this folder to the subpackage `fast_attn.triton_kernels`: import it under
that name only. No top-level module `triton_kernels` is ever installed, because that
import name belongs to the Triton project's own kernel library.
"""
