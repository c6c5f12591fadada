"""Text I/O: token ids <-> text, and conversations -> prompt text.

    base.py                     the tokenizer interface and the one incremental detokenizer
    sentencepiece_tokenizer.py  the sentencepiece backend (`tokenizer.model`), train_tokenizer
    hf_tokenizer.py             the HF `tokenizers` backend (`tokenizer.json`)
    load.py                     a checkpoint's tokenizer files; `load_tokenizer` picks the backend
    chat.py                     chat templates rendered as transformers renders them

The backends import only `base`; only `load` imports both. Nothing here imports jax or the rest
of jaxserve (the HTTP front end and tests use it without an accelerator). This file imports
nothing, so that importing one module does not load the others.
"""
