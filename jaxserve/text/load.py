"""A checkpoint directory's tokenizer: the one place that picks the backend.

What this module is for: the names of a checkpoint's tokenizer files, its chat template
(`chat_template_of`) and `load_tokenizer`, which reads ``tokenizer_config.json`` and
``generation_config.json`` for the special tokens and builds the sentencepiece or the HF
`tokenizers` backend. It may import both backends; they import only `jaxserve.text.base`.

Never imports jax or anything else from jaxserve outside `jaxserve.text`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxserve.text.base import Tokenizer
from jaxserve.text.hf_tokenizer import HFTokenizer
from jaxserve.text.sentencepiece_tokenizer import SentencePieceTokenizer

__all__ = ["load_tokenizer", "chat_template_of", "SP_TOKENIZER_FILE", "HF_TOKENIZER_FILE",
           "TOKENIZER_CONFIG_FILE", "GENERATION_CONFIG_FILE", "CHAT_TEMPLATE_FILE",
           "TOKENIZER_FILES"]

# The files of a checkpoint's tokenizer (all optional; see checkpoints/README.md).
SP_TOKENIZER_FILE = "tokenizer.model"  # sentencepiece
HF_TOKENIZER_FILE = "tokenizer.json"  # HF tokenizers (wins when both are present)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # bos/eos tokens, added tokens, chat template
GENERATION_CONFIG_FILE = "generation_config.json"  # eos_token_id (an int or a list)
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (SP_TOKENIZER_FILE, HF_TOKENIZER_FILE, TOKENIZER_CONFIG_FILE,
                   GENERATION_CONFIG_FILE, CHAT_TEMPLATE_FILE)

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


def load_tokenizer(model_dir: str | os.PathLike[str], config: object = None) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory, or None when it has none.

    The one place that chooses the backend: ``tokenizer.json`` -> HF `tokenizers`
    (`HFTokenizer`), else ``tokenizer.model`` -> sentencepiece (`SentencePieceTokenizer`).
    Special tokens: BOS is ``tokenizer_config.json``'s ``bos_token``, else
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
        tok = HFTokenizer(hf_path, bos_token_id=bos, eos_token_ids=eos, chat_template=template,
                          special_tokens_map=specials,
                          model_vocab_size=getattr(config, "vocab_size", None))
        return tok
    add_bos = tc.get("add_bos_token", True)
    if isinstance(bos, str) or any(isinstance(e, str) for e in eos):
        plain = SentencePieceTokenizer(sp_path)  # to look the token strings up

        def look_up(token: int | str, what: str) -> int:
            if not isinstance(token, str):
                return token
            i = plain.token_to_id(token)
            if i is None:
                raise ValueError(f"{tc_path}: {what} {token!r} is not a token of {sp_path}")
            return i

        bos = None if bos is None else look_up(bos, "bos_token")
        eos = [look_up(e, "eos_token") for e in eos]
    tok = SentencePieceTokenizer(sp_path, bos_token_id=bos,
                                 eos_token_ids=list(dict.fromkeys(eos)) or None,
                                 add_bos=bool(add_bos))
    tok.chat_template = template
    tok.special_tokens_map = specials
    return tok
