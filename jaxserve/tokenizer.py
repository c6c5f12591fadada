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

import json
import operator
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

__all__ = ["IncrementalDetokenizer", "Tokenizer", "SentencePieceTokenizer", "load_tokenizer",
           "train_tokenizer", "SP_TOKENIZER_FILE", "HF_TOKENIZER_FILE", "TOKENIZER_CONFIG_FILE",
           "GENERATION_CONFIG_FILE", "CHAT_TEMPLATE_FILE", "TOKENIZER_FILES"]

# The files of a checkpoint's tokenizer (all optional; see checkpoints/README.md).
SP_TOKENIZER_FILE = "tokenizer.model"  # sentencepiece
HF_TOKENIZER_FILE = "tokenizer.json"  # HF tokenizers (wins when both are present)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # bos/eos tokens, added tokens, chat template
GENERATION_CONFIG_FILE = "generation_config.json"  # eos_token_id (an int or a list)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (SP_TOKENIZER_FILE, HF_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                   GENERATION_CONFIG_FILE, CHAT_TEMPLATE_FILE)


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


class TokenizerBase:
    """What both tokenizer backends expose beside encode/decode: sizes and special ids, set by
    the backend's constructor."""

    _vocab_size: int
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

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"expected a sequence of token ids, got {type(ids).__name__}")
        return [self._check_id(i) for i in ids]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self._path)!r}, vocab_size={self._vocab_size}, "
                f"bos_id={self._bos_id}, eos_ids={self._eos_ids}, add_bos={self._add_bos})")


class Tokenizer(TokenizerBase):
    """A sentencepiece model plus the special-token ids of the served model."""

    backend = "sentencepiece"
    # Set by `load_tokenizer` from the checkpoint's tokenizer_config.json / chat_template.jinja.
    chat_template: str | None = None
    special_tokens_map: dict[str, str] = {}

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

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.PieceToId(token)
        return None if i == self._sp.unk_id() and token != self._sp.IdToPiece(i) else i

    def incremental(
        self, prompt_ids: Sequence[int] = (), *, skip_special_tokens: bool = True
    ) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(
            self, prompt_ids, skip_special_tokens=skip_special_tokens
        )

    # -- internals --------------------------------------------------------
    def _check_id(self, token_id: int, what: str = "token id") -> int:
        return self._check_index(token_id, what, self._vocab_size)

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



SentencePieceTokenizer = Tokenizer

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                       "cls_token", "mask_token")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: object, where: str) -> str | None:
    """tokenizer_config.json writes a special token as a string or as an AddedToken object."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where}: expected a token string or {{'content': ...}}, got {value!r}")


def _ids(value: object, where: str) -> list[int]:
    """An id field of a config: an int, a list of ints, or null."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{where}: expected an int or a list of ints, got {value!r}")
    return list(values)


def chat_template_of(model_dir: str | os.PathLike[str]) -> str | None:
    """The checkpoint's chat template: ``chat_template.jinja`` (which wins, as in transformers),
    else ``tokenizer_config.json["chat_template"]`` (a string, or a list of named templates of
    which "default" is used)."""
    d = Path(model_dir)
    if (d / CHAT_TEMPLATE_FILE).is_file():
        return (d / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    where = d / TOKENIZER_CONFIG_FILE
    template = _read_json(where).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ValueError(
            f"{where}: chat_template must be a string, got {type(template).__name__}")
    return template


def load_tokenizer(model_dir: str | os.PathLike[str], config: object = None):
    """The tokenizer of a checkpoint directory, or None when it has none.

    The one place that chooses the backend: ``tokenizer.json`` -> HF `tokenizers`
    (`jaxserve.tokenizer_hf.HFTokenizer`), else ``tokenizer.model`` -> sentencepiece
    (`Tokenizer`). Special tokens: BOS is ``tokenizer_config.json``'s ``bos_token``, else
    ``generation_config.json``'s ``bos_token_id``, else the model config's; EOS is the union of
    ``tokenizer_config.json``'s ``eos_token``, ``generation_config.json``'s ``eos_token_id`` (an
    int or a list: Llama-3 lists several) and the model config's ``eos_token_ids``, so
    generation stops at any of them. `config` is the model's `ModelConfig` (or None).
    """
    d = Path(model_dir)
    hf_path, sp_path = d / HF_TOKENIZER_FILE, d / SP_TOKENIZER_FILE
    if not hf_path.is_file() and not sp_path.is_file():
        return None
    tc_path, gc_path = d / TOKENIZER_CONFIG_FILE, d / GENERATION_CONFIG_FILE
    tc, gc = _read_json(tc_path), _read_json(gc_path)
    specials = {}
    for key in _SPECIAL_TOKEN_KEYS:
        content = _token_content(tc.get(key), f"{tc_path}: {key}")
        if content is not None:
            specials[key] = content
    config_bos = getattr(config, "bos_token_id", None)
    config_eos = list(getattr(config, "eos_token_ids", ()) or ())
    gen_bos = _ids(gc.get("bos_token_id"), f"{gc_path}: bos_token_id")
    gen_eos = _ids(gc.get("eos_token_id"), f"{gc_path}: eos_token_id")
    bos: int | str | None = specials.get("bos_token")
    if bos is None:
        bos = gen_bos[0] if gen_bos else config_bos
    eos: list[int | str] = ([specials["eos_token"]] if "eos_token" in specials else [])
    eos += gen_eos + config_eos
    template = chat_template_of(d)

    if hf_path.is_file():
        from jaxserve.tokenizer_hf import HFTokenizer

        tok = HFTokenizer(hf_path, bos_token_id=bos, eos_token_ids=eos, chat_template=template,
                          special_tokens_map=specials,
                          model_vocab_size=getattr(config, "vocab_size", None))
        return tok
    add_bos = tc.get("add_bos_token", True)
    if isinstance(bos, str) or any(isinstance(e, str) for e in eos):
        plain = Tokenizer(sp_path)  # to look the token strings up

        def look_up(token: int | str, what: str) -> int:
            if not isinstance(token, str):
                return token
            i = plain.token_to_id(token)
            if i is None:
                raise ValueError(f"{tc_path}: {what} {token!r} is not a token of {sp_path}")
            return i

        bos = None if bos is None else look_up(bos, "bos_token")
        eos = [look_up(e, "eos_token") for e in eos]
    tok = Tokenizer(sp_path, bos_token_id=bos, eos_token_ids=list(dict.fromkeys(eos)) or None,
                    add_bos=bool(add_bos))
    tok.chat_template = template
    tok.special_tokens_map = specials
    return tok
