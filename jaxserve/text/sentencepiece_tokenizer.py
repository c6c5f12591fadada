"""The sentencepiece backend (`tokenizer.model`) of jaxserve's tokenizer interface: a thin,
strict wrapper around sentencepiece.

What this module is for:
  * ``train_tokenizer``: deterministic training of a small byte-fallback BPE
    model (used by tests and toy checkpoints), normalisation-free, so any
    Unicode text round-trips exactly (``decode(encode(s)) == s``).
  * ``SentencePieceTokenizer``: encode/decode with the bos/eos ids taken from
    the model config when given (they override the sentencepiece model's own
    ids), and the rules the incremental detokenizer (`jaxserve.text.base`)
    needs: which trailing byte-fallback tokens are a character still unfinished.

What it must never do:
  * never emit a partial UTF-8 character: a character split over several
    byte-fallback tokens (``<0xF0><0x9F><0x99><0x82>``) is held back until it
    is complete, and a delta never contains a U+FFFD that the final text would
    not contain;
  * never silently accept a bad id or a bad model path: errors name the id or
    the path;
  * never import jax or anything else from jaxserve but the tokenizer base.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from jaxserve.text.base import Tokenizer

__all__ = ["SentencePieceTokenizer", "train_tokenizer"]


# Byte-fallback BPE, fixed ids, no normalisation, unshuffled input: see `train_tokenizer`.
_TRAINING_OPTIONS = {
    "model_type": "bpe", "byte_fallback": True,
    "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
    "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
    "allow_whitespace_only_pieces": True, "split_digits": True,
    "shuffle_input_sentence": False,
    "minloglevel": 2,  # keep training chatter out of test output
}


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
            input=[str(f) for f in files], model_prefix=str(prefix), vocab_size=int(vocab_size),
            character_coverage=character_coverage, max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size, num_threads=num_threads,
            **_TRAINING_OPTIONS)
    except RuntimeError as e:  # e.g. vocab_size too small/large for the corpus
        raise ValueError(f"sentencepiece training to {prefix} failed: {e}") from e
    return prefix.with_name(prefix.name + ".model")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model plus the special-token ids of the served model. `load_tokenizer`
    sets `chat_template` and `special_tokens_map` from the checkpoint."""

    backend = "sentencepiece"

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
        self._vocab_size = self._id_limit = n

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
            self._eos_ids = tuple(self._check_eos_ids(eos_token_ids))
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

    # -- encode / decode --------------------------------------------------
    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        self._check_text(text)
        ids = self._sp.EncodeAsIds(text)
        if (self._add_bos if add_bos is None else add_bos) and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        return ids

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.IdToPiece(self._check_id(token_id, "token id"))

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.PieceToId(token)
        return None if i == self._sp.unk_id() and token != self._sp.IdToPiece(i) else i

    # -- internals --------------------------------------------------------
    def _decode_window(self, ids: list[int], skip_special_tokens: bool) -> str:
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

    def _unfinished_tail(self, ids: Sequence[int], skip_special_tokens: bool = True) -> int:
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

    def _held_back(self, ids: Sequence[int], read: int) -> int:
        return self._unfinished_tail(ids)

    def _text_may_change(self, text: str) -> bool:
        # The byte tokens tell exactly which character is unfinished: a U+FFFD in a decode
        # that holds none of them is an invalid byte, final as it is.
        return False
