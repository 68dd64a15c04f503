"""The op layer: torch.library custom ops, fake functions, autograd and input checks.

One module per op family (attention, norm, ffn). Importing a module registers its
``fast_attn::*`` custom ops; the public functions are re-exported by ``fast_attn``.
"""
