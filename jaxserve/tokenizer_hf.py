"""The HF `tokenizers` backend (`tokenizer.json`) of jaxserve's tokenizer interface.

Same surface as the sentencepiece `jaxserve.tokenizer.Tokenizer` (encode, decode, incremental,
bos_id, eos_ids, special_ids, vocab_size, id_to_piece), so the engine and the servers work with
either. Encoding follows transformers' `AutoTokenizer` for a `tokenizer.json`: with
``add_bos=None`` the file's own post-processor decides which special tokens are added (that is
where Llama-3 puts `<|begin_of_text|>`); ``add_bos=False`` adds none, ``add_bos=True`` prepends
the BOS id and nothing else.

Incremental detokenization gives the sentencepiece backend's guarantees: a delta never holds part
of a UTF-8 character (byte-level BPE tokens can end mid-character), and the deltas plus
``flush()`` equal ``decode`` of the generated ids. The per-token work is
`tokenizers.decoders.DecodeStream` (vLLM's prefix-offset/read-offset technique, in Rust) when the
installed `tokenizers` has it, else the same technique here -- which is also used for decoders
with a ``ByteFallback`` step (Llama-2-style `tokenizer.json`): there a run of byte pieces is held
until a non-byte piece ends it, because one invalid byte turns the whole run into U+FFFD (so a
newline written as ``<0x0A>`` comes out with the next token). `flush()` releases what the stream
still holds (an unfinished character, as U+FFFD, exactly as `decode` shows it).

`decode` never applies transformers' ``clean_up_tokenization_spaces`` heuristic: it would make
the one-shot text differ from the streamed one.

Never imports jax or anything else from jaxserve but the tokenizer base.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers

from jaxserve.tokenizer import TokenizerBase

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - depends on the installed version
    DecodeStream = None

__all__ = ["HFTokenizer", "HFIncrementalDetokenizer"]

REPLACEMENT = "\ufffd"


class HFTokenizer(TokenizerBase):
    """A `tokenizer.json` plus the special-token ids of the served model."""

    backend = "tokenizers"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        bos_token_id: int | str | None = None,
        eos_token_ids: Sequence[int | str] | None = None,
        chat_template: str | None = None,
        special_tokens_map: dict[str, str] | None = None,
        model_vocab_size: int | None = None,
    ) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception
            raise ValueError(f"cannot load HF tokenizer {path}: {e}") from e
        self._tk = tk
        self._path = path
        self._vocab_size = tk.get_vocab_size(with_added_tokens=True)
        # A model may have more embedding rows than the tokenizer has tokens (Qwen pads them):
        # ids up to the model's vocabulary are valid and decode to nothing, as in transformers.
        self._id_limit = max(self._vocab_size, model_vocab_size or 0)
        # Ids, or token strings (as tokenizer_config.json names them) looked up here.
        self._bos_id = None if bos_token_id is None else self._check_id(bos_token_id,
                                                                        "bos_token_id")
        if eos_token_ids is None:
            eos_token_ids = ()
        if isinstance(eos_token_ids, (int, str, bytes)):
            raise TypeError(
                f"eos_token_ids must be a sequence of ints, got {type(eos_token_ids).__name__}")
        self._eos_ids = tuple(dict.fromkeys(self._check_id(i, "eos_token_ids")
                                            for i in eos_token_ids))
        added = tk.get_added_tokens_decoder()
        self._special_ids = frozenset(
            {i for i, t in added.items() if t.special}
            | {i for i in (self._bos_id, *self._eos_ids) if i is not None})
        # Byte-fallback pieces ("<0xE4>") when the decoder has a ByteFallback step.
        decoder = tk.decoder.__getstate__() if tk.decoder is not None else b""
        self._byte_ids = frozenset(
            i for piece, i in tk.get_vocab(with_added_tokens=False).items()
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
        ) if b'"ByteFallback"' in decoder else frozenset()
        default = tk.encode("", add_special_tokens=True).ids
        self._add_bos = self._bos_id is not None and default[:1] == [self._bos_id]
        self.chat_template = chat_template
        self.special_tokens_map = dict(special_tokens_map or {})

    # -- encode / decode --------------------------------------------------
    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. add_bos: None = the tokenizer's own special tokens (as
        transformers' ``encode(text)``), False = none (``add_special_tokens=False``), True =
        the BOS id prepended to the plain ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if add_bos is None:
            return list(self._tk.encode(text, add_special_tokens=True).ids)
        ids = list(self._tk.encode(text, add_special_tokens=False).ids)
        if add_bos and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._decode_window(ids, skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        return self._tk.id_to_token(self._check_id(token_id, "token id")) or ""

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def incremental(self, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True
                    ) -> HFIncrementalDetokenizer:
        return HFIncrementalDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens)

    # -- internals --------------------------------------------------------
    def _check_id(self, token_id: int | str, what: str = "token id") -> int:
        if isinstance(token_id, str) and what != "token id":
            i = self._tk.token_to_id(token_id)
            if i is None:
                raise ValueError(f"{what} {token_id!r} is not a token of {self._path}")
            return i
        return self._check_index(token_id, what, self._id_limit)

    def _decode_window(self, ids: list[int], skip_special_tokens: bool) -> str:
        # ids are validated, and free of our special ids when skipping them.
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)


class _PrefixOffsetStream:
    """vLLM's prefix-offset/read-offset technique: ``ids[prefix:read]`` is text already emitted,
    kept as left context; a step decodes ``ids[prefix:cut]`` and ``ids[prefix:read]`` and
    returns the difference (or None), then slides the window. ``cut`` leaves out what may still
    change: a trailing run of byte-fallback tokens (the ``ByteFallback`` decoder turns a whole
    run into U+FFFD once one byte of it is invalid, so a run is final only when a non-byte token
    ends it), and a decode ending in U+FFFD (an unfinished character of byte-level BPE)."""

    def __init__(self, tok: HFTokenizer, context: list[int], skip_special_tokens: bool) -> None:
        self._tok, self._skip = tok, skip_special_tokens
        self._ids = list(context)
        self._prefix, self._read = 0, len(self._ids)

    def step(self, token_ids: list[int]) -> str | None:
        ids = self._ids
        ids.extend(token_ids)
        cut = len(ids)
        while cut > self._read and ids[cut - 1] in self._tok._byte_ids:
            cut -= 1
        if cut <= self._read:
            return None
        decode = self._tok._decode_window
        emitted = decode(ids[self._prefix:self._read], self._skip)
        text = decode(ids[self._prefix:cut], self._skip)
        if len(text) <= len(emitted) or text.endswith(REPLACEMENT):
            return None
        del ids[:self._prefix]  # slide: the new chunk becomes the left context
        self._prefix, self._read = self._read - self._prefix, cut - self._prefix
        return text[len(emitted):]

    def flush(self) -> str:
        ids, decode = self._ids, self._tok._decode_window
        if len(ids) <= self._read:
            return ""
        emitted = decode(ids[self._prefix:self._read], self._skip)
        self._read = len(ids)
        return decode(ids[self._prefix:], self._skip)[len(emitted):]


class _RustStream:
    """`tokenizers.decoders.DecodeStream` plus the flush it lacks: a step that returns nothing
    leaves its ids pending, and flush decodes them after a few emitted ids as left context."""

    _CONTEXT = 4

    def __init__(self, tok: HFTokenizer, context: list[int], skip_special_tokens: bool) -> None:
        self._tok, self._skip = tok, skip_special_tokens
        self._stream = DecodeStream(ids=list(context), skip_special_tokens=skip_special_tokens)
        self._context = list(context)[-self._CONTEXT:]
        self._pending: list[int] = []

    def step(self, token_ids: list[int]) -> str | None:
        delta = self._stream.step(self._tok._tk, token_ids)  # raises before any change
        self._pending.extend(token_ids)
        if delta is not None:
            self._context = (self._context + self._pending)[-self._CONTEXT:]
            self._pending = []
        return delta

    def flush(self) -> str:
        if not self._pending:
            return ""
        decode = self._tok._decode_window
        before = decode(self._context, self._skip)
        delta = decode(self._context + self._pending, self._skip)[len(before):]
        self._pending = []
        return delta


class HFIncrementalDetokenizer:
    """Streams text deltas for generated ids; never emits half a character.

    Special ids are dropped *before* they reach the stream when skipping them. The stream is
    `DecodeStream` (Rust) when the installed `tokenizers` has it and the decoder is not
    ``ByteFallback`` (whose decode of a byte run can change when the run grows, which
    `DecodeStream` reports as an error), else `_PrefixOffsetStream`; ``use_decode_stream``
    forces the choice (tests).

    With ``prompt_ids`` the last few prompt tokens are the initial context (the first generated
    token gets its leading space as in ``decode(prompt + generated)``); a prompt ending inside a
    character leaves those ids pending, so the generation completes the character and emits it.
    """

    _CONTEXT = 4  # prompt tokens of left context

    def __init__(self, tokenizer: HFTokenizer, prompt_ids: Sequence[int] = (), *,
                 skip_special_tokens: bool = True, use_decode_stream: bool | None = None) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._hidden = tokenizer.special_ids if skip_special_tokens else frozenset()
        prompt = [i for i in tokenizer._check_ids(prompt_ids) if i not in self._hidden]
        context = prompt[-self._CONTEXT:]
        pending: list[int] = []
        # At most 3 ids of one unfinished character (a byte-level token holds >= 1 byte).
        while context and len(pending) < 3 and \
                tokenizer._decode_window(context, skip_special_tokens).endswith(REPLACEMENT):
            pending.insert(0, context.pop())
        if pending and tokenizer._decode_window(context, skip_special_tokens).endswith(
                REPLACEMENT):  # an invalid byte run, not an unfinished char: keep it as context
            context, pending = context + pending, []
        if use_decode_stream is None:
            use_decode_stream = DecodeStream is not None and not tokenizer._byte_ids
        self._stream: _RustStream | _PrefixOffsetStream | None = None
        if use_decode_stream:
            try:
                self._stream = _RustStream(tokenizer, context, skip_special_tokens)
            except TypeError:  # an older DecodeStream that takes no initial ids
                pass
        if self._stream is None:
            self._stream = _PrefixOffsetStream(tokenizer, context, skip_special_tokens)
        if pending:
            self._stream.step(list(pending))
        self.token_ids: list[int] = []  # every generated id, specials included
        self.text = ""  # every delta emitted so far
        self._flushed = False

    def push(self, new_ids: Sequence[int]) -> str:
        """Add generated ids; return the text that is now complete (maybe "")."""
        if self._flushed:
            raise RuntimeError("IncrementalDetokenizer.push() after flush()")
        ids = self._tok._check_ids(new_ids)
        self.token_ids.extend(ids)
        ids = [i for i in ids if i not in self._hidden]
        if not ids:
            return ""
        try:
            delta = self._stream.step(ids)
        except Exception:  # DecodeStream found its text changed: go on with the Python stream
            if not isinstance(self._stream, _RustStream):
                raise
            rust = self._stream
            self._stream = _PrefixOffsetStream(self._tok, rust._context, self._skip)
            delta = self._stream.step(rust._pending + ids)
        if delta is None:
            return ""
        self.text += delta
        return delta

    def flush(self) -> str:
        """End of stream: return what is still held back (an unfinished character comes out as
        U+FFFD replacement chars, as in ``decode``)."""
        if self._flushed:
            return ""
        self._flushed = True
        delta = self._stream.flush()
        self.text += delta
        return delta
