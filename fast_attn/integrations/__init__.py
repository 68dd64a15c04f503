"""Entry points that let code written for other attention libraries run on fast_attn.

- ``fast_attn.integrations.flash_attn``: FlashAttention-2's public functions
  (``flash_attn_func``, ``flash_attn_qkvpacked_func``, ``flash_attn_kvpacked_func``,
  ``flash_attn_varlen_func`` and its packed variants, ``flash_attn_with_kvcache``) with
  flash_attn's signatures, defaults, shapes and return values, so such code runs by
  changing its import.
- ``fast_attn.integrations.sdpa``: ``scaled_dot_product_attention`` with the signature and
  semantics of ``torch.nn.functional.scaled_dot_product_attention`` (layout
  ``(..., H, S, D)``, top-left causal mask).
- ``fast_attn.integrations.huggingface``: registers ``attn_implementation="fast_attn"``
  with Hugging Face ``transformers``.

Each module documents where it differs from the original. Importing this package imports
none of them (and nothing heavy): import the submodule you need, or use the re-exports in
``fast_attn``.
"""
