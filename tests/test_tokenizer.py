"""Tokenizer tests on a tiny sentencepiece model trained here, once per module.

The model is trained on a fixed list of Python standard-library files plus a
short multilingual block, so whitespace-heavy code and byte fallback
(characters too rare to get a piece) are both exercised.
"""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from jaxserve.text.base import IncrementalDetokenizer
from jaxserve.text.sentencepiece_tokenizer import SentencePieceTokenizer, train_tokenizer

STDLIB = Path(os.__file__).parent
# Fixed and sorted so the trained model is the same on every run; files that a
# given Python version lacks are simply left out.
TRAIN_FILES = sorted(
    p
    for p in (
        STDLIB / name
        for name in (
            "argparse.py", "ast.py", "dataclasses.py", "functools.py", "inspect.py",
            "os.py", "shlex.py", "string.py", "textwrap.py", "typing.py",
        )
    )
    if p.is_file()
)
HELD_OUT_FILE = STDLIB / "fractions.py"  # never trained on

MULTILINGUAL = (
    "Café, naïve, Straße, über, Ærøskøbing.\n"
    "中文分词很有趣。日本語のテキスト。한국어 문장.\n"
    "Emoji: 🙂 🚀 ✨ — “quotes” and ‘more’ … ok\n"
    "Ελληνικά και русский текст.\n"
)
VOCAB_SIZE = 800
REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    assert len(TRAIN_FILES) >= 5, TRAIN_FILES
    root = tmp_path_factory.mktemp("tokenizer")
    extra = root / "multilingual.txt"
    extra.write_text(MULTILINGUAL * 3, encoding="utf-8")
    return train_tokenizer([*TRAIN_FILES, extra], root / "tok", VOCAB_SIZE)


@pytest.fixture(scope="module")
def tok(model_path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(model_path)


def byte_ids(tok: SentencePieceTokenizer, s: str) -> list[int]:
    """The byte-fallback token ids spelling `s`, one token per UTF-8 byte."""
    return [tok._sp.PieceToId(f"<0x{b:02X}>") for b in s.encode("utf-8")]


def stream(det: IncrementalDetokenizer, ids, chunks=None) -> list[str]:
    """Push `ids` (one at a time, or in the given chunk sizes); deltas + flush."""
    deltas, i = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(det.push(ids[i : i + size]))
        i += size
    assert i >= len(ids)
    deltas.append(det.flush())
    return deltas


# -- training ----------------------------------------------------------------


def test_trained_model_has_requested_vocab_and_ids(model_path, tok):
    assert model_path.is_file() and model_path.suffix == ".model"
    assert tok.vocab_size == VOCAB_SIZE
    assert (tok.bos_id, tok.eos_ids) == (1, (2,))
    assert tok.id_to_piece(0) == "<unk>"


def test_training_is_deterministic(model_path, tok, tmp_path):
    extra = tmp_path / "multilingual.txt"
    extra.write_text(MULTILINGUAL * 3, encoding="utf-8")
    again = SentencePieceTokenizer(
        train_tokenizer([*TRAIN_FILES, extra], tmp_path / "again", VOCAB_SIZE))
    # (The files themselves differ: they record the input paths and prefix.)
    vocab = [(tok._sp.IdToPiece(i), tok._sp.GetScore(i)) for i in range(tok.vocab_size)]
    assert [(again._sp.IdToPiece(i), again._sp.GetScore(i)) for i in range(again.vocab_size)] == vocab


def test_training_rejects_missing_input_file_naming_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer([missing], tmp_path / "m", 300)


# -- round trips ---------------------------------------------------------------


def test_round_trip_python_source_files(tok):
    for path in [*TRAIN_FILES[:3], HELD_OUT_FILE]:
        src = path.read_text(encoding="utf-8")
        ids = tok.encode(src)
        assert tok.decode(ids) == src, path
        # Whitespace-only pieces make indentation cheap: far fewer tokens than bytes.
        assert len(ids) < len(src.encode("utf-8")) / 2, path


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        "\n\n\n",
        "  \n\t\n",
        " leading space",
        "   three leading spaces",
        "trailing spaces   ",
        "a  b   c    d",
        "def f(x):\n    if x:\n        return x\n\n\treturn None\n",
        "line\r\nwindows\r\n",
        "12345 + 678.9e10",
    ],
)
def test_round_trip_keeps_newlines_and_indentation_exactly(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, add_bos=False)) == text


def test_round_trip_multilingual_uses_byte_fallback(tok):
    text = MULTILINGUAL + "Unseen: 🦀🧪 ǅ ℵ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \x00\x7f"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # The test is only meaningful if some characters really went through bytes.
    assert any(tok._sp.IsByte(i) for i in ids)
    assert tok.encode("🦀", add_bos=False)[-4:] == byte_ids(tok, "🦀")


# -- special ids -------------------------------------------------------------------


def test_bos_is_prepended_according_to_add_bos(model_path, tok):
    plain = tok.encode("x = 1", add_bos=False)
    assert plain[0] != tok.bos_id
    assert tok.encode("x = 1") == [tok.bos_id, *plain]
    no_bos = SentencePieceTokenizer(model_path, add_bos=False)
    assert no_bos.add_bos is False
    assert no_bos.encode("x = 1") == plain
    assert no_bos.encode("x = 1", add_bos=True) == [1, *plain]


def test_config_bos_and_eos_ids_override_the_model(model_path, tok):
    # Like a chat model whose end-of-turn marker is an ordinary piece.
    self_id, colon_id = tok.encode("self", add_bos=False)[-1], tok.encode(":", add_bos=False)[-1]
    t = SentencePieceTokenizer(model_path, bos_token_id=colon_id, eos_token_ids=[2, self_id])
    assert t.bos_id == colon_id
    assert t.eos_ids == (2, self_id)
    assert t.encode("x")[0] == colon_id
    ids = tok.encode("a self b", add_bos=False)
    assert self_id in ids
    assert t.decode(ids) == tok.decode([i for i in ids if i != self_id])  # skipped as special
    assert "self" not in t.decode(ids)
    assert t.decode(ids, skip_special_tokens=False) == "a self b"
    assert tok.decode(ids) == "a self b"  # ... but is plain text for the default config


def test_eos_ids_empty_list_from_config_means_no_eos(model_path):
    assert SentencePieceTokenizer(model_path, eos_token_ids=[]).eos_ids == ()


def test_bos_id_is_none_when_neither_model_nor_config_has_one(tmp_path):
    spm.SentencePieceTrainer.train(
        input=str(TRAIN_FILES[0]), model_prefix=str(tmp_path / "nobos"), vocab_size=500,
        model_type="bpe", byte_fallback=True, bos_id=-1, eos_id=1, unk_id=0, minloglevel=2,
    )
    t = SentencePieceTokenizer(tmp_path / "nobos.model")
    assert t.bos_id is None and t.eos_ids == (1,)
    assert t.encode("x") == t.encode("x", add_bos=False)
    assert SentencePieceTokenizer(tmp_path / "nobos.model", bos_token_id=1).encode("x")[0] == 1


def test_decode_skips_special_tokens_unless_asked(tok):
    ids = tok.encode("    return x") + [*tok.eos_ids]
    assert tok.decode(ids) == "    return x"
    # Shown like HF's Llama tokenizer: the dummy-prefix space stays after "<s>".
    assert tok.decode(ids, skip_special_tokens=False) == "<s>     return x</s>"
    mid = [*tok.encode("a b", add_bos=False), 2, *tok.encode("c", add_bos=False)]
    assert tok.decode(mid) == "a b c"
    assert tok.decode(mid, skip_special_tokens=False) == "a b</s> c"


# -- errors ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [VOCAB_SIZE, VOCAB_SIZE + 1234, -1])
def test_decode_rejects_out_of_range_id_naming_it(tok, bad):
    with pytest.raises(ValueError, match=rf"(^|\D){bad}\b"):
        tok.decode([5, bad, 6])
    with pytest.raises(ValueError, match=rf"(^|\D){bad}\b"):
        tok.id_to_piece(bad)


def test_decode_rejects_non_integer_ids(tok):
    with pytest.raises(TypeError, match="float"):
        tok.decode([5, 1.5])


@pytest.mark.parametrize("bad", [b"bytes", None, 42, ["a"]])
def test_encode_rejects_non_str_naming_the_type(tok, bad):
    with pytest.raises(TypeError, match=type(bad).__name__):
        tok.encode(bad)


def test_missing_model_path_raises_naming_the_path(tmp_path):
    missing = tmp_path / "does_not_exist.model"
    with pytest.raises(FileNotFoundError, match="does_not_exist.model"):
        SentencePieceTokenizer(missing)


def test_unreadable_model_file_raises_naming_the_path(tmp_path):
    bad = tmp_path / "garbage.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="garbage.model"):
        SentencePieceTokenizer(bad)


def test_config_id_out_of_range_is_rejected(model_path):
    with pytest.raises(ValueError, match="99999"):
        SentencePieceTokenizer(model_path, eos_token_ids=[2, 99999])


# -- incremental detokenizer ------------------------------------------------------

STREAM_TEXTS = [
    "def main(argv):\n    for arg in argv:\n        print(arg)  # done\n",
    MULTILINGUAL,
    "  leading spaces and\ttabs\n\n  after blank line 🙂🙂🙂",
    "🦀 crab first, then text",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_incremental_one_token_at_a_time_matches_decode_and_emits_only_whole_chars(tok, text):
    ids = tok.encode(text)  # bos included: specials are skipped in the stream too
    det = tok.incremental()
    deltas = stream(det, ids)
    assert REPLACEMENT not in text
    assert all(REPLACEMENT not in d for d in deltas), deltas
    assert "".join(deltas) == tok.decode(ids) == text
    assert det.text == text
    assert det.token_ids == ids
    assert deltas[-1] == ""  # nothing was pending at the end


@pytest.mark.parametrize("seed", range(5))
def test_incremental_random_chunk_sizes_match_decode(tok, seed):
    rng = random.Random(seed)
    text = "".join(rng.sample(STREAM_TEXTS, len(STREAM_TEXTS)))
    ids = tok.encode(text, add_bos=False)
    chunks, left = [], len(ids)
    while left:
        chunks.append(min(left, rng.randint(1, 7)))
        left -= chunks[-1]
    deltas = stream(IncrementalDetokenizer(tok), ids, chunks)
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) == text


def test_incremental_holds_emoji_split_over_byte_tokens_until_complete(tok):
    head = tok.encode("ok", add_bos=False)
    crab = byte_ids(tok, "🦀")
    assert len(crab) == 4 and all(tok._sp.IsByte(i) for i in crab)
    det = tok.incremental()
    assert det.push(head) == "ok"
    assert [det.push([i]) for i in crab[:3]] == ["", "", ""]
    assert det.text == "ok"
    assert det.push(crab[3:]) == "🦀"
    assert det.push(tok.encode("!", add_bos=False)[-1:]) == "!"
    assert det.flush() == ""
    assert det.text == "ok🦀!"


def test_incremental_flush_releases_an_unfinished_char_as_decode_does(tok):
    ids = tok.encode("ok", add_bos=False) + byte_ids(tok, "🦀")[:2]
    det = tok.incremental()
    assert "".join(det.push([i]) for i in ids) == "ok"
    tail = det.flush()
    assert tail == tok.decode(ids)[2:] and REPLACEMENT in tail
    assert det.flush() == ""
    with pytest.raises(RuntimeError):
        det.push([5])


def test_incremental_invalid_byte_runs_are_not_held_forever(tok):
    # A model spewing lead bytes that never complete: each one is released
    # once the next shows it was invalid, and the total still matches decode.
    ids = byte_ids(tok, "\u2028")[:1] * 50 + tok.encode("x", add_bos=False)[-1:]
    det = tok.incremental()
    deltas = [det.push([i]) for i in ids]
    assert deltas[1] == REPLACEMENT  # released one token later, not at flush
    assert "".join(deltas) + det.flush() == tok.decode(ids)
    assert len(det._stream.window) <= 8  # bounded context


def test_incremental_prompt_context_gives_first_token_its_leading_space(tok):
    full = tok.encode("result = compute(value)")
    k = next(i for i in range(2, len(full)) if tok.id_to_piece(full[i]).startswith("\u2581"))
    prompt, gen = full[:k], full[k:]
    with_ctx = "".join(stream(tok.incremental(prompt), gen))
    assert with_ctx.startswith(" ")
    assert tok.decode(prompt) + with_ctx == tok.decode(full)
    # Without context the first piece's space is dropped, exactly like decode(gen).
    without = "".join(stream(tok.incremental(), gen))
    assert without == tok.decode(gen) == with_ctx[1:]


def test_incremental_prompt_ending_inside_a_char_emits_the_whole_char(tok):
    crab = byte_ids(tok, "🦀")
    prompt = tok.encode("say") + crab[:1]
    gen = crab[1:] + tok.encode(" ok", add_bos=False)[1:]
    det = tok.incremental(prompt)
    deltas = stream(det, gen)
    assert deltas[:3] == ["", "", "🦀"]
    assert "say" + "".join(deltas) == tok.decode(prompt + gen)


def test_incremental_special_tokens_mid_stream_keep_following_space(tok):
    # ignore_eos generation: eos in the middle must not eat the next space.
    a, b = tok.encode("x = 1", add_bos=False), tok.encode("y", add_bos=False)
    ids = [*a, *tok.eos_ids, *tok.eos_ids, *b]
    expected = tok.decode(ids)
    assert expected == "x = 1 y"
    assert "".join(stream(tok.incremental(), ids)) == expected
    det = tok.incremental(skip_special_tokens=False)
    assert "".join(stream(det, ids)) == tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_random_ids_concat_equals_decode(tok, skip):
    # Arbitrary ids (bytes, pieces, specials; invalid UTF-8 included): the
    # stream must still add up to the one-shot decode.
    rng = random.Random(1234)
    byte_pool = byte_ids(tok, "é中🦀\u2028") + byte_ids(tok, "\x80")
    for _ in range(150):
        ids = [
            rng.choice(byte_pool) if rng.random() < 0.4 else rng.randrange(tok.vocab_size)
            for _ in range(rng.randint(0, 40))
        ]
        prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 6))]
        chunks = [rng.randint(1, 4) for _ in ids]
        det = tok.incremental(prompt, skip_special_tokens=skip)
        got = "".join(stream(det, ids, chunks))
        full = tok.decode(prompt + ids, skip_special_tokens=skip)
        if not prompt:
            assert got == tok.decode(ids, skip_special_tokens=skip), ids
        elif not any(tok._sp.IsByte(i) for i in prompt):
            assert tok.decode(prompt, skip_special_tokens=skip) + got == full, (prompt, ids)


def test_incremental_window_stays_small_over_a_long_generation(tok):
    src = HELD_OUT_FILE.read_text(encoding="utf-8")
    ids = tok.encode(src, add_bos=False)
    assert len(ids) > 2000
    prompt = tok.encode("prompt")
    det = tok.incremental(prompt)
    out = []
    for i in ids:
        out.append(det.push([i]))
        assert len(det._stream.window) <= 8
    # The prompt gives the first piece's dummy-prefix "▁" a left context, so
    # it stays a space: the generated text is " " + src.
    assert "".join(out) + det.flush() == " " + src == tok.decode(prompt + ids)[len("prompt") :]


@pytest.mark.parametrize("module, loads", [
    ("jaxserve.text.base", ["jaxserve.text.base"]),
    ("jaxserve.text.chat", ["jaxserve.text.chat"]),
    ("jaxserve.text.sentencepiece_tokenizer",
     ["jaxserve.text.base", "jaxserve.text.sentencepiece_tokenizer", "sentencepiece"]),
    ("jaxserve.text.hf_tokenizer", ["jaxserve.text.base", "jaxserve.text.hf_tokenizer",
                                    "tokenizers"]),
])
def test_text_modules_import_only_what_is_below_them(module, loads):
    # The backends sit under the base, which imports neither; only jaxserve.text.load picks
    # one. No text module loads jax (the HTTP front end runs them without an accelerator).
    probe = ("import sys, importlib; importlib.import_module(sys.argv[1]); "
             "print(sorted(m for m in sys.modules if m.startswith('jaxserve.text.') or "
             "m in ('jax', 'sentencepiece', 'tokenizers')))")
    out = subprocess.run([sys.executable, "-c", probe, module], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == repr(sorted(loads))
