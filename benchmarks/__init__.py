"""fast_attn's benchmark suite: ``python -m benchmarks`` from the repository root.

Every op on every fast_attn backend that implements it, against the best peers (torch
SDPA's flash / cuDNN / efficient backends, FlexAttention, torch eager and
``torch.compile``, Liger-Kernel and flash_attn when installed), on the shapes of
DESIGN.md's benchmark protocol, with the copy and matmul ceilings measured in the same
run. One file per op (``bench_<op>.py``) turns its shapes into cases; ``common`` times
them; ``formulas`` says what a FLOP and a byte are; ``report`` writes the tables, JSON,
CSV, Markdown and plots. How to run and what is measured: ``benchmarks/NOTES.md``.
"""
