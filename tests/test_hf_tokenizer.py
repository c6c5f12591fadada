"""The HF `tokenizers` backend, chat templates and HF tokenizer files in checkpoints.

A byte-level BPE `tokenizer.json` with Llama-3's special tokens is trained here (once per module);
transformers' `AutoTokenizer` on the same directory is the oracle for encode, decode and chat
rendering. The end-to-end part converts a tiny HF Llama whose weights make it a bigram model
(attention and MLP write nothing, the LM head is a transition table), so its greedy output is
known: three ordinary tokens, then the *second* EOS id of generation_config.json.
"""

import json
import random
from pathlib import Path

import pytest

from jaxserve.text.base import PrefixOffsetStream
from jaxserve.text.chat import ChatTemplateError, render_chat, validate_conversations
from jaxserve.text.hf_tokenizer import HFTokenizer
from jaxserve.text.load import load_tokenizer
from jaxserve.text.sentencepiece_tokenizer import SentencePieceTokenizer

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>"]
BOS, END_OF_TEXT, EOT = 0, 1, 4  # trainer order of SPECIAL
REPLACEMENT = "\ufffd"

CORPUS = (
    "def main(argv):\n    if not argv:\n        return 0\n    for x in argv:\n"
    "        print(f'{x!r}')\n    return 1\n\n\nclass Foo(Bar):\n\tpass\n",
    "The quick brown fox jumps over the lazy dog. Hello, world! It's 12345 + 678.9e10.",
    "Café, naïve, Straße, über, Ærøskøbing. 中文分词很有趣。日本語のテキスト。한국어 문장.",
    "Emoji: 🙂 🚀 ✨ — “quotes” and ‘more’ … ok. Ελληνικά και русский текст.",
)

# A Llama-3-style template, written over several indented lines so that trim_blocks and
# lstrip_blocks matter, with tojson, raise_exception and bos_token.
TEMPLATE = """{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set rest = messages[1:] %}
{% else %}
    {% set system = 'Default system. Meta: ' ~ ({'lang': 'fr', 'note': 'é <b>&'} | tojson) %}
    {% set rest = messages %}
{% endif %}
{{ bos_token }}<|start_header_id|>system<|end_header_id|>

{{ system | trim }}<|eot_id|>
{% for message in rest %}
    {% if message['role'] == 'system' %}
        {{ raise_exception('a system message must come first') }}
    {% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
{% endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

TEXTS = [
    "",
    "hello",
    " leading space",
    "   three leading spaces and trailing   ",
    "def f(x):\n    if x:\n        return x\n\n\treturn None\n",
    "line\r\nwindows\r\n",
    "Emoji: 🙂🚀✨ and unseen 🦀🧪 ǅ ℵ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "中文分词很有趣。日本語のテキスト。한국어",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937",
    "special inside <|eot_id|> text <|start_header_id|>user",
    "\x00\x7f control",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "You write code."},
     {"role": "user", "content": "Write hello world 🙂"},
     {"role": "assistant", "content": "print('hello world')\n"},
     {"role": "user", "content": "Now in 中文"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "tool", "content": "{\"ok\": true}"}, {"role": "user", "content": "c"}],
]


def train_hf_tokenizer(out: Path) -> Path:
    from tokenizers import Tokenizer as HFTk, decoders, models, pre_tokenizers, processors, \
        trainers

    tk = HFTk(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(CORPUS) * 5, trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", BOS)])
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": False, "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = train_hf_tokenizer(tmp_path_factory.mktemp("hf_tok"))
    return d


@pytest.fixture(scope="module")
def tok(tok_dir) -> HFTokenizer:
    t = load_tokenizer(tok_dir)
    assert isinstance(t, HFTokenizer)
    return t


@pytest.fixture(scope="module")
def ref(tok_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(tok_dir)


# -- encode / decode against transformers -------------------------------------------------


def test_special_tokens_and_ids_from_tokenizer_config(tok, ref):
    assert tok.vocab_size == len(ref)
    assert tok.bos_id == BOS == ref.bos_token_id and tok.add_bos
    assert tok.eos_ids == (END_OF_TEXT,) == (ref.eos_token_id,)
    assert set(SPECIAL) == {tok.id_to_piece(i) for i in tok.special_ids}
    assert tok.special_tokens_map == {"bos_token": SPECIAL[0], "eos_token": SPECIAL[1]}
    assert tok.chat_template == TEMPLATE


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, ref, text):
    assert tok.encode(text) == ref.encode(text)
    plain = tok.encode(text, add_bos=False)
    assert plain == ref.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_bos=True) == [BOS, *plain]
    ids = tok.encode(text)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(
            ids, skip_special_tokens=skip)
    assert tok.decode(ids) == text.replace("<|eot_id|>", "").replace("<|start_header_id|>", "")


def test_decode_errors_name_the_bad_id(tok):
    with pytest.raises(ValueError, match=f"{tok.vocab_size} is out of range"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(TypeError, match="float"):
        tok.decode([1.5])
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"x")


def test_ids_past_the_tokenizer_up_to_the_model_vocabulary_decode_to_nothing(tok_dir, tok):
    class Config:
        vocab_size, bos_token_id, eos_token_ids = tok.vocab_size + 8, None, ()

    padded = load_tokenizer(tok_dir, Config())
    assert padded.vocab_size == tok.vocab_size
    ids = tok.encode("naïve 🙂", add_bos=False)
    extra = tok.vocab_size + 7
    assert padded.decode([extra, *ids, extra]) == "naïve 🙂"
    det = padded.incremental()
    assert "".join(stream(det, [extra, *ids[:2], extra, *ids[2:]])) == "naïve 🙂"
    with pytest.raises(ValueError, match=f"{tok.vocab_size + 8} is out of range"):
        padded.decode([tok.vocab_size + 8])


# -- streaming ------------------------------------------------------------------------------


def stream(det, ids, chunks=None) -> list[str]:
    deltas, i = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(det.push(ids[i:i + size]))
        i += size
    deltas.append(det.flush())
    return deltas


def check_deltas(deltas: list[str], full: str) -> None:
    assert "".join(deltas) == full
    if REPLACEMENT not in full:  # no delta holds half a character
        assert not any(REPLACEMENT in d for d in deltas)


@pytest.mark.parametrize("decode_stream", [True, False], ids=["DecodeStream", "prefix-offset"])
def test_streamed_deltas_concatenate_to_decode_and_never_split_a_char(tok, decode_stream):
    for text in TEXTS:
        ids = tok.encode(text)
        for skip in (True, False):
            full = tok.decode(ids, skip_special_tokens=skip)
            det = tok.incremental(skip_special_tokens=skip, use_decode_stream=decode_stream)
            check_deltas(stream(det, ids), full)
            assert det.token_ids == ids and det.text == full
    # Multi-byte characters really are split over several byte-level tokens here.
    ids = tok.encode("🦀", add_bos=False)
    assert len(ids) > 1 and all(REPLACEMENT in tok.decode([i]) for i in ids)
    det = tok.incremental(use_decode_stream=decode_stream)
    assert [det.push([i]) for i in ids] == [""] * (len(ids) - 1) + ["🦀"]


@pytest.mark.parametrize("decode_stream", [True, False], ids=["DecodeStream", "prefix-offset"])
def test_random_ids_stream_equals_decode_and_flush_releases_held_bytes(tok, decode_stream):
    rng = random.Random(0)
    for trial in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        skip = trial % 2 == 0
        chunks = []
        while sum(chunks) < len(ids):
            chunks.append(rng.randint(1, 3))
        det = tok.incremental(skip_special_tokens=skip, use_decode_stream=decode_stream)
        check_deltas(stream(det, ids, chunks), tok.decode(ids, skip_special_tokens=skip))
    # An unfinished character at the end comes out of flush() as decode shows it.
    crab = tok.encode("ok 🦀", add_bos=False)
    det = tok.incremental()
    emitted = "".join(det.push([i]) for i in crab[:-1])
    assert emitted.startswith("ok") and REPLACEMENT not in emitted
    held = det.flush()
    assert emitted + held == tok.decode(crab[:-1]) and held.endswith(REPLACEMENT)


def test_stream_with_prompt_context_matches_decode_of_the_whole(tok):
    prompt = tok.encode("Hello")
    gen = tok.encode(" world, naïve 🙂 中文", add_bos=False)
    det = tok.incremental(prompt)
    assert "".join(stream(det, gen)) == " world, naïve 🙂 中文"
    # A prompt ending inside a character: the generation completes it and emits it whole.
    both = tok.encode("ab🙂cd", add_bos=False)
    for cut in range(1, len(both)):
        det = tok.incremental(both[:cut])
        full, head = tok.decode(both), tok.decode(both[:cut])
        text = "".join(stream(det, both[cut:]))
        assert (head.rstrip(REPLACEMENT) + text) == full, cut


@pytest.mark.parametrize("decode_stream", [True, False], ids=["DecodeStream", "prefix-offset"])
def test_prompt_ending_inside_a_char_right_after_another_emits_it_whole(tok, decode_stream):
    # Each "𝔘" is 4 byte-level tokens here, so the last few prompt tokens can start inside the
    # first and end inside the second: the context must still be whole characters.
    both = tok.encode("x 𝔘𝔘 y", add_bos=False)
    assert sum(REPLACEMENT in tok.decode([i]) for i in both) == 8
    full = tok.decode(both)
    for cut in range(1, len(both)):
        det = tok.incremental(both[:cut], use_decode_stream=decode_stream)
        text = "".join(stream(det, both[cut:]))
        assert tok.decode(both[:cut]).rstrip(REPLACEMENT) + text == full, cut
        assert REPLACEMENT not in text, cut


@pytest.fixture(scope="module")
def byte_fallback_tok(tmp_path_factory) -> HFTokenizer:
    """A Llama-2-style tokenizer.json (Metaspace, byte-fallback pieces "<0xE4>", a decoder that
    strips the first space): transformers' conversion of a sentencepiece model trained here."""
    import transformers

    from jaxserve.text.sentencepiece_tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("byte_fallback")
    corpus = root / "c.txt"
    corpus.write_text("\n".join(CORPUS) * 3, encoding="utf-8")
    src = root / "sp"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(train_tokenizer([corpus], root / "m", 600).read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "legacy": False}))
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(root / "hf")
    (root / "hf" / "tokenizer.model").unlink(missing_ok=True)
    tok = load_tokenizer(root / "hf")
    assert isinstance(tok, HFTokenizer) and len(tok._byte_ids) == 256
    return tok


def test_byte_fallback_runs_are_held_until_final(byte_fallback_tok):
    # The ByteFallback decoder turns a whole run of byte pieces into U+FFFD once one byte is
    # invalid ("<0x6C>" alone is "l", followed by "<0x80>" it is not), so a run is only emitted
    # when a non-byte piece ends it; DecodeStream would raise on such input.
    tok = byte_fallback_tok
    det = tok.incremental()
    assert isinstance(det._stream, PrefixOffsetStream)
    rng = random.Random(1)
    switched = 0
    for trial in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 30))]
        skip = trial % 2 == 0
        det = tok.incremental(skip_special_tokens=skip)
        check_deltas(stream(det, ids), tok.decode(ids, skip_special_tokens=skip))
        # Forced onto DecodeStream, such input makes it raise: the stream goes on in Python.
        forced = tok.incremental(skip_special_tokens=skip, use_decode_stream=True)
        assert isinstance("".join(stream(forced, ids)), str)
        switched += isinstance(forced._stream.fallback, PrefixOffsetStream)
    assert switched > 0
    for text in TEXTS:
        ids = tok.encode(text)
        check_deltas(stream(tok.incremental(), ids), tok.decode(ids))
        prompt = tok.encode("Hi")
        det = tok.incremental(prompt)
        gen = tok.encode(text, add_bos=False)
        assert tok.decode(prompt) + "".join(stream(det, gen)) == tok.decode(prompt + gen)


# -- chat rendering against transformers ----------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_rendering_matches_apply_chat_template(tok, ref, conversation, add_generation_prompt):
    messages = CONVERSATIONS[conversation]
    expected = ref.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)
    conversations, batched = validate_conversations(messages)
    assert not batched
    got = render_chat(tok.chat_template, conversations[0],
                      add_generation_prompt=add_generation_prompt,
                      special_tokens=tok.special_tokens_map)
    assert got == expected
    assert '{"lang": "fr", "note": "é <b>&"}' in got or messages[0]["role"] == "system"


def test_chat_template_errors_and_message_validation():
    with pytest.raises(ChatTemplateError, match="system message must come first"):
        render_chat(TEMPLATE, [{"role": "user", "content": "a"},
                               {"role": "system", "content": "b"}], special_tokens={})
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for %}", [{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="message 1 field 'role'.*'robot'"):
        validate_conversations([{"role": "user", "content": "a"},
                                {"role": "robot", "content": "b"}])
    with pytest.raises(TypeError, match="conversation 1: message 0 field 'content' must be a "
                                        "str, got list"):
        validate_conversations([[{"role": "user", "content": "a"}],
                                [{"role": "user", "content": ["b"]}]])
    with pytest.raises(TypeError, match="message 0 must be a dict"):
        validate_conversations(["hello"])
    with pytest.raises(ValueError, match="is empty"):
        validate_conversations([])


def test_chat_template_file_wins_and_named_templates(tok_dir, tmp_path):
    from jaxserve.text.load import chat_template_of

    d = tmp_path / "ckpt"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((tok_dir / name).read_bytes())
    assert chat_template_of(d) == TEMPLATE
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert load_tokenizer(d).chat_template == "{{ messages[0]['content'] }}"
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "T"},
                               {"name": "default", "template": "D"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert chat_template_of(d) == "D"


def test_sentencepiece_checkpoint_still_loads_with_the_same_ids(tmp_path):
    from jaxserve.text.sentencepiece_tokenizer import train_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(CORPUS) * 3, encoding="utf-8")
    model = train_tokenizer([corpus], tmp_path / "sp", 600)
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "tokenizer.model").write_bytes(model.read_bytes())
    t = load_tokenizer(d)
    assert isinstance(t, SentencePieceTokenizer) and (t.bos_id, t.eos_ids) == (1, (2,))
    assert t.chat_template is None
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_tokenizer(d).eos_ids == (2, 7)
    assert load_tokenizer(tmp_path / "nothing-here") is None


# -- a converted checkpoint with the HF tokenizer -------------------------------------------

CHAIN = ["The", "Ġquick", "Ġbrown"]  # the bigram model's greedy output, then EOT


@pytest.fixture(scope="module")
def checkpoint(tok_dir, tok, tmp_path_factory):
    import torch
    import transformers

    from jaxserve.checkpoint import convert_hf
    from tests.hf_models import make_hf_model

    root = tmp_path_factory.mktemp("hf_tok_model")
    hf_dir = make_hf_model("llama", root / "hf", vocab_size=tok.vocab_size, num_hidden_layers=1,
                           bos_token_id=BOS, eos_token_id=END_OF_TEXT)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype="float32")
    chain = [tok.token_to_id(p) for p in CHAIN]
    hidden = model.config.hidden_size
    assert None not in chain and len({i % hidden for i in [*chain, EOT]}) == 4, chain
    with torch.no_grad():  # x = embed(token) = one-hot(token % hidden): a bigram model
        model.model.embed_tokens.weight.copy_(torch.eye(hidden)[torch.arange(tok.vocab_size)
                                                               % hidden])
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(tok.vocab_size, hidden)
        head[chain[0], :] = 1.0  # any token -> chain[0] -> chain[1] -> chain[2] -> EOT
        for a, b in zip(chain, [*chain[1:], EOT]):
            head[:, a % hidden] = 0.0
            head[b, a % hidden] = 1.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(hf_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (hf_dir / name).write_bytes((tok_dir / name).read_bytes())
    (hf_dir / "chat_template.jinja").write_text(TEMPLATE, encoding="utf-8")
    # after save_pretrained, which writes its own generation_config.json
    (hf_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS, "eos_token_id": [END_OF_TEXT, EOT]}))
    out = root / "jaxserve"
    convert_hf(hf_dir, out, dtype="float32")
    return out


@pytest.fixture(scope="module")
def llm(checkpoint):
    from jaxserve import LLM

    return LLM(checkpoint, max_model_len=128, block_size=16, kv_blocks=32, max_num_seqs=4,
               max_num_batched_tokens=128, max_prefill_chunk=128)


def test_convert_copies_the_tokenizer_files(checkpoint, tok_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                 "chat_template.jinja"):
        assert (checkpoint / name).is_file(), name
    assert not (checkpoint / "tokenizer.model").exists()
    assert json.loads((checkpoint / "config.json").read_text())["eos_token_ids"] == [
        END_OF_TEXT, EOT]


def test_generate_text_and_stop_at_the_second_eos_id(llm):
    from jaxserve import SamplingParams

    assert isinstance(llm.tokenizer, HFTokenizer)
    assert llm.tokenizer.eos_ids == (END_OF_TEXT, EOT) and llm.engine.eos_ids == (END_OF_TEXT, EOT)
    out = llm.generate("some text", SamplingParams(temperature=0, max_tokens=8),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.tokenizer.encode("some text")
    assert out.prompt_token_ids[0] == BOS
    c = out.outputs[0]
    assert c.token_ids[-1] == EOT and len(c.token_ids) == 4
    assert (c.text, c.finish_reason) == ("The quick brown", "stop")
    # ignore_eos: the same chain goes on past EOT until max_tokens
    c = llm.generate("some text", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                     use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "length" and c.token_ids[3] == EOT


def test_chat_uses_exactly_the_rendered_prompt_ids(llm, ref):
    from jaxserve import SamplingParams

    outs = llm.chat([CONVERSATIONS[0], CONVERSATIONS[2]],
                    SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    for out, messages in zip(outs, [CONVERSATIONS[0], CONVERSATIONS[2]]):
        rendered = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert out.prompt == rendered
        ids = ref.encode(rendered, add_special_tokens=False)
        assert out.prompt_token_ids == ids and ids.count(BOS) == 1 and ids[0] == BOS
        assert (out.outputs[0].text, out.outputs[0].finish_reason) == ("The quick brown", "stop")
    # one conversation, and a user template
    out = llm.chat(CONVERSATIONS[1], SamplingParams(temperature=0, max_tokens=8),
                   chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
                   use_tqdm=False)
    assert len(out) == 1 and out[0].prompt == "  Be brief.  \n2+2?\n"


def test_chat_errors(llm, checkpoint, tmp_path):
    with pytest.raises(ValueError, match="message 0 field 'role'"):
        llm.chat([{"role": "bot", "content": "x"}])
    with pytest.raises(TypeError, match="message 0 field 'content' must be a str, got int"):
        llm.chat([{"role": "user", "content": 3}])
    template, llm.tokenizer.chat_template = llm.tokenizer.chat_template, None
    try:
        with pytest.raises(ValueError, match=f"checkpoint {checkpoint} has no chat template"):
            llm.chat([{"role": "user", "content": "x"}])
    finally:
        llm.tokenizer.chat_template = template
