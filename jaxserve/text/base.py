"""The tokenizer interface of jaxserve, and the one incremental detokenizer both backends use.

What this module is for:
  * ``Tokenizer``: what the engine, the servers and the API see of a tokenizer whatever its
    backend (sizes, special ids, id checks, ``decode``, ``incremental``); a backend
    (`sentencepiece_tokenizer`, `hf_tokenizer`) supplies encode, the decode of a window of ids
    and the rules that say which trailing ids may still change their text.
  * ``IncrementalDetokenizer`` and ``PrefixOffsetStream``: a stream of generated ids -> a stream
    of text deltas, for streaming responses.

Design (one detokenizer for every backend): decoding is not concatenative -- sentencepiece drops
the first "▁" of its output, byte tokens (sentencepiece's byte fallback, byte-level BPE) only
become text together -- so a token cannot be decoded on its own. The detokenizer does what every
backend needs the same way (validate ids, drop special ids *before* they reach the stream when
skipping them, keep the last prompt tokens as left context, hold back a prompt that ends inside a
character, record ids and text, flush once) and hands the ids to a stream. The stream is vLLM's
prefix-offset/read-offset technique (`PrefixOffsetStream`), asking the backend which trailing ids
to hold back; a backend may supply a faster stream with the same contract (the HF backend's
`tokenizers.decoders.DecodeStream`).

What it must never do:
  * never emit a partial UTF-8 character, and never let the streamed text differ from the
    one-shot decode: the deltas plus ``flush()`` equal ``decode`` of the generated ids;
  * never silently accept a bad id: errors name the id;
  * never import jax, a tokenizer backend or anything else from jaxserve (it runs in the HTTP
    front end and in tests without an accelerator).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

__all__ = ["REPLACEMENT", "IncrementalDetokenizer", "PrefixOffsetStream", "TextStream",
           "Tokenizer"]

REPLACEMENT = "\ufffd"  # what a decode shows for bytes that are not (yet) a whole character


class Tokenizer:
    """What both tokenizer backends expose: encode/decode, sizes and special ids (set by the
    backend's constructor), and an incremental detokenizer."""

    backend: str  # "sentencepiece" or "tokenizers"
    # The checkpoint's chat template and special tokens (tokenizer_config.json).
    chat_template: str | None = None
    special_tokens_map: dict[str, str] = {}

    _vocab_size: int
    _id_limit: int  # ids below it are valid (>= vocab_size: a model may have padded rows)
    _bos_id: int | None
    _eos_ids: tuple[int, ...]
    _add_bos: bool
    _special_ids: frozenset[int]
    _path: Path

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def add_bos(self) -> bool:
        """Whether ``encode(text)`` starts with the BOS id."""
        return self._add_bos

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids dropped by ``decode(..., skip_special_tokens=True)``."""
        return self._special_ids

    @property
    def model_path(self) -> Path:
        return self._path

    # -- encode / decode --------------------------------------------------
    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        ids = self._check_ids(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._decode_window(ids, skip_special_tokens)

    def incremental(self, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True,
                    **stream_options) -> IncrementalDetokenizer:
        """A detokenizer for ids generated after `prompt_ids`; `stream_options` go to the
        backend's stream (the HF backend's ``use_decode_stream``)."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens=skip_special_tokens,
                                      **stream_options)

    # -- what the incremental detokenizer asks of a backend ---------------
    def _decode_window(self, ids: list[int], skip_special_tokens: bool) -> str:
        """The text of `ids`, already validated, and free of special ids when skipping them."""
        raise NotImplementedError

    def _unfinished_tail(self, ids: Sequence[int], skip_special_tokens: bool) -> int:
        """How many trailing ids (at most 3) hold part of a character that more ids could
        complete. This default judges from the text, for backends that cannot tell from the ids:
        a decode ending in U+FFFD is unfinished, unless it still is without those ids (an
        invalid byte run then, not an unfinished character)."""
        def unfinished(k: int) -> bool:
            return self._text_may_change(
                self._decode_window(list(ids[:len(ids) - k]), skip_special_tokens))

        limit = min(3, len(ids))
        k = 0
        while k < limit and unfinished(k):
            k += 1
        if k and k == limit and unfinished(k):  # still unfinished without them: invalid bytes
            return 0
        return k

    def _held_back(self, ids: Sequence[int], read: int) -> int:
        """How many trailing ids of ``ids[read:]`` a stream step leaves undecoded because more
        ids may still change their text. Default: none."""
        return 0

    def _text_may_change(self, text: str) -> bool:
        """Whether more ids may still change the end of a decoded text (default: it ends in
        U+FFFD, the look of an unfinished character)."""
        return text.endswith(REPLACEMENT)

    def _decode_stream(self, context: list[int], read: int, skip_special_tokens: bool
                       ) -> TextStream:
        """The stream of a new detokenizer: ``context[:read]`` is text already shown (the
        prompt's end), ``context[read:]`` the prompt's unfinished character."""
        return PrefixOffsetStream(self, context, read, skip_special_tokens)

    # -- id checks ---------------------------------------------------------
    @staticmethod
    def _check_index(token_id, what: str, limit: int) -> int:
        try:
            i = operator.index(token_id)  # accepts numpy ints, rejects floats
        except TypeError:
            raise TypeError(
                f"{what} must be an int, got {type(token_id).__name__}: {token_id!r}") from None
        if not 0 <= i < limit:
            raise ValueError(f"{what} {i} is out of range [0, {limit})")
        return i

    def _check_id(self, token_id, what: str = "token id") -> int:
        return self._check_index(token_id, what, self._id_limit)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"expected a sequence of token ids, got {type(ids).__name__}")
        return [self._check_id(i) for i in ids]

    def _check_eos_ids(self, eos_token_ids: Sequence) -> list[int]:
        if isinstance(eos_token_ids, (int, str, bytes)):
            raise TypeError(
                f"eos_token_ids must be a sequence of ints, got {type(eos_token_ids).__name__}")
        return [self._check_id(i, "eos_token_ids") for i in eos_token_ids]

    @staticmethod
    def _check_text(text: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self._path)!r}, vocab_size={self._vocab_size}, "
                f"bos_id={self._bos_id}, eos_ids={self._eos_ids}, add_bos={self._add_bos})")


class TextStream(Protocol):
    """Ids in, text out: `step` returns the text that is final now (None: nothing yet); `flush`
    returns whatever is still held back."""

    def step(self, token_ids: list[int]) -> str | None: ...

    def flush(self) -> str: ...


class PrefixOffsetStream:
    """vLLM's prefix-offset/read-offset technique. ``window[:read]`` is text already emitted,
    kept only as left context; a step decodes ``window[:cut]`` and ``window[:read]`` and returns
    the difference, where ``cut`` leaves out the trailing ids the backend holds back (the byte
    tokens of an unfinished character, a byte-fallback run), and a decode whose end may still
    change is not emitted yet. Then the window slides (the emitted chunk becomes the left
    context), so each step decodes only the last emitted chunk plus the new ids: the cost does
    not grow with the length of the generation.

    Why the difference is exact: a dropped leading space can only come from the window's first
    piece, which both decodes share, and the text before ``cut`` decodes the same whatever
    follows."""

    def __init__(self, tokenizer: Tokenizer, context: list[int], read: int,
                 skip_special_tokens: bool) -> None:
        self._tok, self._skip = tokenizer, skip_special_tokens
        self.window = list(context)
        self._read = read

    def step(self, token_ids: list[int]) -> str | None:
        window, tok = self.window, self._tok
        window.extend(token_ids)
        cut = len(window) - tok._held_back(window, self._read)
        if cut <= self._read:
            return None  # nothing new, or only what may still change
        emitted = tok._decode_window(window[:self._read], self._skip)
        text = tok._decode_window(window[:cut], self._skip)
        if len(text) <= len(emitted) or tok._text_may_change(text):
            return None
        del window[:self._read]  # slide: the new chunk becomes the left context
        self._read = cut - self._read
        return text[len(emitted):]

    def flush(self) -> str:
        window = self.window
        if len(window) <= self._read:
            return ""
        emitted = self._tok._decode_window(window[:self._read], self._skip)
        self._read = len(window)
        return self._tok._decode_window(window, self._skip)[len(emitted):]


class IncrementalDetokenizer:
    """Streams text deltas for generated ids; never emits half a character.

    Special ids are dropped *before* they reach the stream when skipping them, so the left
    context is never an invisible eos that would let the next piece's space be stripped. With
    ``prompt_ids`` the last few prompt tokens are the initial context, so the first generated
    token gets its leading space exactly as in ``decode(prompt + generated)``; a prompt ending
    inside a character (a truncated prompt) leaves those ids unread, so the generation completes
    the character and emits it. Without a prompt the deltas plus ``flush()`` equal
    ``tokenizer.decode(generated)``.
    """

    # Prompt tokens kept as left context. One visible token is enough; a few more cost nothing.
    _PROMPT_CONTEXT = 4

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), *,
                 skip_special_tokens: bool = True, **stream_options) -> None:
        self._tok = tokenizer
        self._hidden = tokenizer.special_ids if skip_special_tokens else frozenset()
        prompt = [i for i in tokenizer._check_ids(prompt_ids) if i not in self._hidden]
        tail = tokenizer._unfinished_tail(prompt[-(self._PROMPT_CONTEXT + 3):],
                                          skip_special_tokens)
        context = prompt[max(0, len(prompt) - tail - self._PROMPT_CONTEXT):]
        self._stream: TextStream = tokenizer._decode_stream(
            context, len(context) - tail, skip_special_tokens, **stream_options)
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
        delta = self._stream.step(ids) if ids else None
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
