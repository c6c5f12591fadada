"""Text <-> token ids for jaxserve: a thin, strict wrapper around sentencepiece.

What this module is for:
  * ``train_tokenizer``: deterministic training of a small byte-fallback BPE
    model (used by tests and toy checkpoints), normalisation-free, so any
    Unicode text round-trips exactly (``decode(encode(s)) == s``).
  * ``Tokenizer``: encode/decode with the bos/eos ids taken from the model
    config when given (they override the sentencepiece model's own ids).
  * ``IncrementalDetokenizer``: turns a stream of generated token ids into a
    stream of text deltas for streaming responses.

What it must never do:
  * never emit a partial UTF-8 character: a character split over several
    byte-fallback tokens (``<0xF0><0x9F><0x99><0x82>``) is held back until it
    is complete, and a delta never contains a U+FFFD that the final text would
    not contain;
  * never let the streamed text differ from the one-shot decode: the deltas
    plus ``flush()`` equal ``Tokenizer.decode`` of the generated ids;
  * never silently accept a bad id or a bad model path: errors name the id or
    the path;
  * never import jax or anything else from jaxserve (it runs in the HTTP
    front end and in tests without an accelerator).
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

__all__ = ["IncrementalDetokenizer", "Tokenizer", "train_tokenizer"]


def train_tokenizer(
    text_files: Sequence[str | os.PathLike[str]],
    model_prefix: str | os.PathLike[str],
    vocab_size: int,
    *,
    max_sentence_length: int = 8192,
    input_sentence_size: int = 1_000_000,
    character_coverage: float = 0.9995,
    num_threads: int = 2,
) -> Path:
    """Train a byte-fallback BPE sentencepiece model; return the ``.model`` path.

    Determinism: BPE training has no random component once input shuffling is
    off (sentencepiece then keeps the *first* ``input_sentence_size`` lines
    instead of a random sample), so the same files give a byte-identical model.

    Exact round trip: identity normalisation and no whitespace collapsing keep
    the text as is; whitespace-only pieces let indentation become a few
    tokens; byte fallback covers every character that did not make it into
    the vocabulary, including "\\n" (sentencepiece trains on lines, so a
    newline is never a piece and is always the byte token ``<0x0A>``, as in
    Llama).  Ids: unk=0, bos=1, eos=2, no pad.
    """
    files = [Path(f) for f in text_files]
    if not files:
        raise ValueError("train_tokenizer needs at least one text file")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"tokenizer training file not found: {f}")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            input=[str(f) for f in files],
            model_prefix=str(prefix),
            vocab_size=int(vocab_size),
            model_type="bpe",
            byte_fallback=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=False,
            num_threads=num_threads,
            minloglevel=2,  # keep training chatter out of test output
        )
    except RuntimeError as e:  # e.g. vocab_size too small/large for the corpus
        raise ValueError(f"sentencepiece training to {prefix} failed: {e}") from e
    return prefix.with_name(prefix.name + ".model")


class Tokenizer:
    """A sentencepiece model plus the special-token ids of the served model."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        add_bos: bool = True,
    ) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        sp = spm.SentencePieceProcessor()
        try:
            sp.Load(str(path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"cannot load sentencepiece model {path}: {e}") from e
        self._sp = sp
        self._path = path
        n = sp.GetPieceSize()
        self._vocab_size = n

        # Config ids win over the model's own; sentencepiece reports -1 for
        # "no such token", which we turn into None / ().
        if bos_token_id is None:
            bos = sp.bos_id()
            self._bos_id = bos if bos >= 0 else None
        else:
            self._bos_id = self._check_id(bos_token_id, "bos_token_id")
        if eos_token_ids is None:
            eos = sp.eos_id()
            self._eos_ids: tuple[int, ...] = (eos,) if eos >= 0 else ()
        else:
            if isinstance(eos_token_ids, (int, str, bytes)):
                raise TypeError(
                    f"eos_token_ids must be a sequence of ints, got {type(eos_token_ids).__name__}"
                )
            self._eos_ids = tuple(self._check_id(i, "eos_token_ids") for i in eos_token_ids)
        self._add_bos = bool(add_bos)

        # One pass over the vocabulary: which ids are "special" (dropped by
        # skip_special_tokens) and which are byte-fallback pieces (needed to
        # find unfinished UTF-8 characters without decoding).
        hidden: set[int] = set()  # ids sentencepiece's decode renders as nothing / " ⁇ "
        byte_value: dict[int, int] = {}
        anchor = None
        for i in range(n):
            if sp.IsControl(i) or sp.IsUnknown(i):
                hidden.add(i)
            elif sp.IsByte(i):
                byte_value[i] = int(sp.IdToPiece(i)[3:5], 16)  # "<0xNN>"
            elif anchor is None and not sp.IsUnused(i):
                piece = sp.IdToPiece(i)
                if piece and not piece.startswith("\u2581"):
                    anchor = i
        self._sp_hidden = frozenset(hidden)
        self._special_ids = self._sp_hidden.union(
            i for i in (self._bos_id, *self._eos_ids) if i is not None
        )
        self._byte_value = byte_value
        # A visible piece that does not start with "▁": decoding [anchor] + ids
        # and cutting the anchor's text off gives the text of ids *without*
        # sentencepiece's strip of a leading space at the start of the output.
        self._anchor = anchor
        self._anchor_len = len(sp.DecodeIds([anchor])) if anchor is not None else 0

    # -- properties -------------------------------------------------------
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
        return self._add_bos

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids dropped by ``decode(..., skip_special_tokens=True)``."""
        return self._special_ids

    @property
    def model_path(self) -> Path:
        return self._path

    def __repr__(self) -> str:
        return (
            f"Tokenizer({str(self._path)!r}, vocab_size={self._vocab_size}, "
            f"bos_id={self._bos_id}, eos_ids={self._eos_ids}, add_bos={self._add_bos})"
        )

    # -- encode / decode --------------------------------------------------
    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids = self._sp.EncodeAsIds(text)
        if (self._add_bos if add_bos is None else add_bos) and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        ids = self._check_ids(ids)
        if skip_special_tokens:
            return self._sp.DecodeIds([i for i in ids if i not in self._special_ids])
        return self._decode_with_specials(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(self._check_id(token_id, "token id"))

    def incremental(
        self, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(
            self, prompt_ids, skip_special_tokens=skip_special_tokens
        )

    # -- internals --------------------------------------------------------
    def _check_id(self, token_id: int, what: str = "token id") -> int:
        try:
            i = operator.index(token_id)  # accepts numpy ints, rejects floats
        except TypeError:
            raise TypeError(
                f"{what} must be an int, got {type(token_id).__name__}: {token_id!r}"
            ) from None
        if not 0 <= i < self._vocab_size:
            raise ValueError(f"{what} {i} is out of range [0, {self._vocab_size})")
        return i

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"expected a sequence of token ids, got {type(ids).__name__}")
        return [self._check_id(i) for i in ids]

    def _decode_window(self, ids: list[int], skip_special_tokens: bool) -> str:
        # For IncrementalDetokenizer: ids are already validated, and already
        # free of special ids when skipping them.
        if skip_special_tokens:
            return self._sp.DecodeIds(ids)
        return self._decode_with_specials(ids)

    def _decode_with_specials(self, ids: list[int]) -> str:
        # sentencepiece hides control tokens (and shows unk as " ⁇ "), so those
        # are rendered as their piece text here and the runs between them
        # decoded normally.  A config special that is an ordinary piece (an
        # end-of-turn marker, say) is just text when not skipping.
        # A rendered special counts as text: only a run at the very start of
        # the output loses the dummy-prefix space, so "<s>▁Hi" reads "<s> Hi"
        # (as HF's Llama tokenizer shows it), and the rule depends only on
        # what precedes a run -- which keeps streaming windows consistent.
        out: list[str] = []
        run: list[int] = []

        def flush_run() -> None:
            if run:
                out.append(self._decode_run(run, at_start=not out))
                run.clear()

        for i in ids:
            if i in self._sp_hidden:
                flush_run()
                out.append(self._sp.IdToPiece(i))
            else:
                run.append(i)
        flush_run()
        return "".join(out)

    def _decode_run(self, run: list[int], *, at_start: bool) -> str:
        if at_start or self._anchor is None:
            return self._sp.DecodeIds(run)
        return self._sp.DecodeIds([self._anchor, *run])[self._anchor_len :]

    def _unfinished_char_tokens(self, ids: Sequence[int]) -> int:
        """How many trailing ids are byte tokens of a not-yet-complete UTF-8 char.

        Only byte-fallback tokens can carry part of a character (every other
        piece is whole UTF-8), and a char is at most 4 bytes, so at most the
        last 3 ids are looked at.  "Could still complete" is judged from the
        lead byte's length alone, which is generous (holding back a byte that
        turns out invalid only delays it by one token); every byte before the
        unfinished char decodes the same whatever comes next, because
        sentencepiece replaces invalid bytes one by one.
        """
        bv = self._byte_value
        for k in range(1, min(3, len(ids)) + 1):
            b = bv.get(ids[-k])
            if b is None:
                return 0
            if 0x80 <= b < 0xC0:  # continuation byte: keep looking for the lead
                continue
            need = 2 if 0xC0 <= b < 0xE0 else 3 if 0xE0 <= b < 0xF0 else 4 if 0xF0 <= b < 0xF8 else 1
            return k if k < need else 0
        return 0


class IncrementalDetokenizer:
    """Streams text deltas for generated ids; never emits half a character.

    Technique (vLLM's prefix_offset/read_offset): sentencepiece's decode is not
    concatenative -- the first "▁" of the output is dropped, and byte tokens
    only become text together -- so a token cannot be decoded on its own.
    Instead keep a small window ``ids[prefix:]``; ``ids[prefix:read]`` is text
    already emitted and serves only as left context.  A push decodes
    ``window[:cut]`` and ``window[:read]`` and emits the difference, where
    ``cut`` excludes the byte tokens of a character that is still unfinished.
    The window then slides (prefix <- read, read <- cut), so each push decodes
    only the last emitted chunk plus the new tokens: the cost does not grow
    with the length of the generation.

    Why the difference is exact: the dropped leading space can only come from
    the window's first piece, which both decodes share, and every byte before
    ``cut`` decodes the same whatever follows.  Special tokens are filtered out
    *before* windowing (when skipping them), so the left context is never an
    invisible eos that would let the next piece's space be stripped.

    With ``prompt_ids`` the last few prompt tokens are the initial context, so
    the first generated token gets its leading space exactly as in
    ``decode(prompt + generated)``; without them the deltas plus ``flush()``
    equal ``tokenizer.decode(generated)``.
    """

    # Prompt tokens kept as left context.  One visible token is enough for
    # sentencepiece; a few more cost nothing.
    _PROMPT_CONTEXT = 4

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._hidden = tokenizer.special_ids if skip_special_tokens else frozenset()
        prompt = [i for i in tokenizer._check_ids(prompt_ids) if i not in self._hidden]
        # A prompt ending inside a character (truncated prompt) leaves those
        # bytes unread: the generation completes the character and emits it.
        tail = tokenizer._unfinished_char_tokens(prompt)
        self._window: list[int] = prompt[max(0, len(prompt) - tail - self._PROMPT_CONTEXT) :]
        self._read = len(self._window) - tail
        self.token_ids: list[int] = []  # every generated id, specials included
        self.text = ""  # every delta emitted so far
        self._flushed = False

    def push(self, new_ids: Sequence[int]) -> str:
        """Add generated ids; return the text that is now complete (maybe "")."""
        if self._flushed:
            raise RuntimeError("IncrementalDetokenizer.push() after flush()")
        ids = self._tok._check_ids(new_ids)
        self.token_ids.extend(ids)
        window = self._window
        window.extend(i for i in ids if i not in self._hidden)
        cut = len(window) - self._tok._unfinished_char_tokens(window)
        if cut <= self._read:
            return ""  # nothing new, or only part of a character so far
        return self._emit(cut)

    def flush(self) -> str:
        """End of stream: return what is still held back (an unfinished
        character comes out as U+FFFD replacement chars, as in ``decode``)."""
        if self._flushed:
            return ""
        self._flushed = True
        return self._emit(len(self._window)) if len(self._window) > self._read else ""

    def _emit(self, cut: int) -> str:
        window = self._window
        decode = self._tok._decode_window
        emitted = decode(window[: self._read], self._skip)
        delta = decode(window[:cut], self._skip)[len(emitted) :]
        del window[: self._read]  # slide: the new chunk becomes the left context
        self._read = cut - self._read
        self.text += delta
        return delta

