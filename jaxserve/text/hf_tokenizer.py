"""The HF `tokenizers` backend (`tokenizer.json`) of jaxserve's tokenizer interface.

Same surface as the sentencepiece backend (`jaxserve.text.base.Tokenizer`: encode, decode,
incremental, bos_id, eos_ids, special_ids, vocab_size, id_to_piece), so the engine and the servers
work with either. Encoding follows transformers' `AutoTokenizer` for a `tokenizer.json`: with
``add_bos=None`` the file's own post-processor decides which special tokens are added (that is
where Llama-3 puts `<|begin_of_text|>`); ``add_bos=False`` adds none, ``add_bos=True`` prepends
the BOS id and nothing else.

Incremental detokenization is the base module's `IncrementalDetokenizer`, with its guarantees: a
delta never holds part of a UTF-8 character (byte-level BPE tokens can end mid-character; a
decode ending in U+FFFD is held back), and the deltas plus ``flush()`` equal ``decode`` of the
generated ids. The per-token work is `tokenizers.decoders.DecodeStream` (the same prefix-offset
technique, in Rust) when the installed `tokenizers` has it, else the base's
`PrefixOffsetStream` -- which is also used for decoders with a ``ByteFallback`` step
(Llama-2-style `tokenizer.json`): there a run of byte pieces is held until a non-byte piece ends
it, because one invalid byte turns the whole run into U+FFFD (so a newline written as ``<0x0A>``
comes out with the next token). `flush()` releases what the stream still holds (an unfinished
character, as U+FFFD, exactly as `decode` shows it).

`decode` never applies transformers' ``clean_up_tokenization_spaces`` heuristic: it would make
the one-shot text differ from the streamed one.

Never imports jax or anything else from jaxserve but the tokenizer base.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import tokenizers

from jaxserve.text.base import PrefixOffsetStream, TextStream, Tokenizer

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - depends on the installed version
    DecodeStream = None

__all__ = ["HFTokenizer"]


class HFTokenizer(Tokenizer):
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
        self._eos_ids = tuple(dict.fromkeys(self._check_eos_ids(
            () if eos_token_ids is None else eos_token_ids)))
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
        self._check_text(text)
        if add_bos is None:
            return list(self._tk.encode(text, add_special_tokens=True).ids)
        ids = list(self._tk.encode(text, add_special_tokens=False).ids)
        if add_bos and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        return ids

    def id_to_piece(self, token_id: int) -> str:
        return self._tk.id_to_token(self._check_id(token_id, "token id")) or ""

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    # -- internals --------------------------------------------------------
    def _check_id(self, token_id: int | str, what: str = "token id") -> int:
        if isinstance(token_id, str) and what != "token id":
            i = self._tk.token_to_id(token_id)
            if i is None:
                raise ValueError(f"{what} {token_id!r} is not a token of {self._path}")
            return i
        return self._check_index(token_id, what, self._id_limit)

    def _decode_window(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def _held_back(self, ids: Sequence[int], read: int) -> int:
        # A trailing run of byte-fallback pieces: one more invalid byte would turn the whole run
        # into U+FFFD, so a run is final only when a non-byte piece ends it.
        held = 0
        while held < len(ids) - read and ids[-1 - held] in self._byte_ids:
            held += 1
        return held

    def _decode_stream(self, context: list[int], read: int, skip_special_tokens: bool, *,
                       use_decode_stream: bool | None = None) -> TextStream:
        """`DecodeStream` (Rust) when the installed `tokenizers` has it and the decoder is not
        ``ByteFallback`` (whose decode of a byte run can change when the run grows, which
        `DecodeStream` reports as an error), else the base's `PrefixOffsetStream`;
        `use_decode_stream` forces the choice (tests)."""
        if use_decode_stream is None:
            use_decode_stream = DecodeStream is not None and not self._byte_ids
        if use_decode_stream:
            try:
                stream = _RustStream(self, context[:read], skip_special_tokens)
            except TypeError:  # an older DecodeStream that takes no initial ids
                pass
            else:
                if read < len(context):  # the prompt's unfinished character: pending
                    stream.step(context[read:])
                return stream
        return PrefixOffsetStream(self, context, read, skip_special_tokens)


class _RustStream:
    """`tokenizers.decoders.DecodeStream` plus the flush it lacks: a step that returns nothing
    leaves its ids pending, and flush decodes them after a few emitted ids as left context.
    When `DecodeStream` finds its text changed (it raises), the stream goes on as a
    `PrefixOffsetStream` (`fallback`) from the last emitted ids."""

    _CONTEXT = 4

    def __init__(self, tok: HFTokenizer, context: list[int], skip_special_tokens: bool) -> None:
        self._tok, self._skip = tok, skip_special_tokens
        self._stream = DecodeStream(ids=list(context), skip_special_tokens=skip_special_tokens)
        self._context = list(context)[-self._CONTEXT:]
        self._pending: list[int] = []
        self.fallback: PrefixOffsetStream | None = None

    def step(self, token_ids: list[int]) -> str | None:
        if self.fallback is not None:
            return self.fallback.step(token_ids)
        try:
            delta = self._stream.step(self._tok._tk, token_ids)  # raises before any change
        except Exception:  # the Rust side raises plain Exception
            self.fallback = PrefixOffsetStream(self._tok, self._context, len(self._context),
                                               self._skip)
            return self.fallback.step(self._pending + token_ids)
        self._pending.extend(token_ids)
        if delta is not None:
            self._context = (self._context + self._pending)[-self._CONTEXT:]
            self._pending = []
        return delta

    def flush(self) -> str:
        if self.fallback is not None:
            return self.fallback.flush()
        if not self._pending:
            return ""
        decode = self._tok._decode_window
        before = decode(self._context, self._skip)
        delta = decode(self._context + self._pending, self._skip)[len(before):]
        self._pending = []
        return delta
