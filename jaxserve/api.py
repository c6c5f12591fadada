"""The public Python surface: `LLM` (vLLM-like). Validates what users give, hands it to the engine.

    from jaxserve import LLM, SamplingParams
    llm = LLM("path/to/checkpoint", mesh="tp=2", rules="tp", dtype="float32")
    llm.generate(["def main():"], SamplingParams(temperature=0, max_tokens=32))
    llm.score(["The capital of France is"], [" Paris", " Lyon"], top_n=5)  # -> [ScoreOutput]
    llm.logits([[1, 2, 3]])  # -> [np.ndarray of shape [3, vocab]]

`self.config` is the model fitted to the layout (`jaxserve.placement`): token ids are checked
against the real `vocab_size`; arrays on the devices are `vocab_rows` wide and hold
`stored_kv_heads` KV heads.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
import itertools
from typing import Iterator, Sequence

import jax
import numpy as np

from jaxserve.checkpoint import CONFIG_FILE, parse_dtype, restore_model
from jaxserve.config import ModelConfig
from jaxserve.engine.engine import Engine
from jaxserve.outputs import CandidateScore, RequestOutput, ScoreOutput, TopToken
from jaxserve.sampling_params import SamplingParams
from jaxserve.engine import sizing
from jaxserve.engine.scoring import JobScores, ScoreJob, ScoreRun
from jaxserve.engine.speculative.draft import check_vocabulary, draft_layout
from jaxserve.kv_cache import NULL_BLOCK, KVPool, kv_format
from jaxserve.models import MODEL_CLASSES
from jaxserve.ops.moe import DEFAULT_AUTO_THRESHOLD, MoEExecution
from jaxserve.perf import moe_auto
from jaxserve.runtime import compile_cache, distributed
from jaxserve.runtime.follower import follow
from jaxserve.runtime.draft_runner import DraftRunner
from jaxserve.runtime.leader import LeaderRunner
from jaxserve.runtime.runner import MAX_LOGPROBS, ModelRunner
from jaxserve.engine.disaggregated import DisaggregatedEngine
from jaxserve.engine.handoff import Handoffs, KVMover, check_pair
from jaxserve.settings import (ROLES, CacheSettings, DisaggregationSettings, Settings,
                               SpeculativeSettings)
from jaxserve.sharding import Layout, replicas_of


MAX_TOP_N = MAX_LOGPROBS  # top tokens `score` returns per prompt (computed on device)


class LLM:
    def __init__(self, model_dir: str | Path, settings: Settings | None = None, *,
                 speculative_config: dict | None = None, disaggregate=None, **overrides):
        """Load a jaxserve checkpoint onto a mesh, with the engine `settings`
        (jaxserve/settings.py: cache, scheduler, parallel, sampling; defaults when None) and
        any of them overridden by name, e.g. `LLM(model_dir, mesh="tp=2", max_num_seqs=8)`.

        mesh: e.g. "tp=4" or "dp=2,tp=2"; None = one device. rules: a built-in name
        (jaxserve/sharding_rules/) or a YAML path. dtype: parameter/compute dtype (default: the
        checkpoint's). KV pool: `kv_blocks` blocks of `block_size` tokens per DP replica, or
        `kv_memory_fraction` of each device's free memory; by default room for max_num_seqs
        full-length sequences per replica, capped by what memory allows (see
        jaxserve/engine/sizing.py). max_model_len: longest sequence served (default: the model's
        limit, lowered to what the pool holds). The max_* settings bound a step per DP replica;
        max_steps_in_flight bounds asynchronous dispatch.
        enable_prefix_caching: reuse the KV of prompt prefixes computed before (see
        jaxserve/engine/block_pool.py). routing: which DP replica a new sequence joins,
        "prefix" (the one caching its longest prefix unless it is overloaded), "least_loaded",
        "round_robin" or a policy object (see jaxserve/engine/router.py).
        sampling: "sequence_parallel" (each device samples its own rows; see
        jaxserve/runtime/step_sampling.py) or "replicated". output_processing: "inline",
        "thread" (detokenization and stop strings beside the next step) or "auto" (inline on
        cpu, thread on gpu/tpu; see jaxserve/engine/output_processor.py).
        compilation: when step programs compile: "background" (the default: what the first
        requests need now, the rest on a thread while requests run), "upfront" (all now) or
        "on_use" (each when a step first needs it); None = $JAXSERVE_COMPILATION or the default
        (see jaxserve/engine/warmup.py). compilation_cache: where compiled programs are kept
        between runs, a directory or "off" (default: $JAXSERVE_COMPILATION_CACHE, else
        ~/.cache/jaxserve/xla; see jaxserve/runtime/compile_cache.py).
        quantization: the linear layers' weight format, "auto" (the checkpoint's), "none" or
        None (float), "int8" (per-channel scales) or "int8-g32/64/128" (per group of inputs); a
        float checkpoint is quantized on load (see jaxserve/ops/quant.py).
        quantize_embeddings: the embedding and LM head too.
        weight_layout: how linear weights are stored on the devices, "auto" (the platform's:
        as declared, today everywhere), "in_out" or "out_in" (see jaxserve/ops/quant.py).
        kv_cache_dtype: the KV pool's format, "auto" (the model's dtype), "float32",
        "bfloat16", "int8" or "fp8_e4m3" (8-bit values with a scale per token and KV head; see
        jaxserve/kv_cache.py); the pool's default size counts its real bytes, so int8 holds about
        4x the tokens of float32.
        distributed (a DistributedSettings, or coordinator=, num_processes=, process_id=):
        run as one of several processes (hosts) that form one engine (see
        jaxserve/runtime/distributed.py): the same script on every process; process 0's LLM
        serves, the others' constructor runs the steps process 0 sends and exits the process
        when process 0 is done.
        speculative_config: vLLM's dict, e.g. {"method": "ngram", "num_speculative_tokens": 4,
        "prompt_lookup_min": 1, "prompt_lookup_max": 3}, or {"method": "draft", "model": DIR,
        "num_speculative_tokens": 4} (a smaller checkpoint of the same vocabulary, run greedily
        on the same devices, or on its own with "mesh": "tp=1@4"; no "model": the embedded
        model's draft): each step verifies up to k proposed tokens per sequence,
        losslessly (see jaxserve/engine/speculative/); None = off.
        disaggregate: {"prefill": {"mesh": "tp=2", "devices": [0, 1], "dtype": ...,
        "kv_cache_dtype": ...}, "decode": {"mesh": "tp=4", "devices": [2, 3, 4, 5], ...},
        "transfer": "auto" | "device" | "host", "max_prefill_ahead": 4} (or a
        DisaggregationSettings): prompts run on a prefill engine and each sequence's KV is
        handed to a decode engine on other devices, converted to its format (see
        jaxserve/engine/handoff.py); the other settings apply to both. None = one engine.
        """
        if settings is None:
            settings = Settings()
        if not isinstance(settings, Settings):
            raise TypeError(f"settings must be a jaxserve.settings.Settings, got "
                            f"{type(settings).__name__}")
        settings = settings.replace(**overrides)
        if speculative_config is not None:
            settings = dataclasses.replace(
                settings, speculative=SpeculativeSettings.from_config(speculative_config))
        if disaggregate is not None:
            settings = dataclasses.replace(
                settings, disaggregation=DisaggregationSettings.from_config(disaggregate))
        self.model_dir = Path(model_dir)
        if settings.disaggregation is not None:
            self._load_disaggregated(settings)
        else:
            self._load(settings)

    def _load(self, settings: Settings, devices: list | None = None) -> None:
        """Restore the model onto `devices` (default: the first the mesh needs) and build its
        engine."""
        cache, parallel = settings.cache, settings.parallel
        self.cluster = distributed.join(settings.distributed)  # before any device is used
        # a split latent (TPLA) has its own built-in rules unless the user names others
        split = parallel.attention != "mla" and parallel.rules == "tp"
        self.layout = Layout.create(parallel.mesh, "tpla" if split else parallel.rules, devices)
        self.compilation_cache = compile_cache.use(settings.compile.compilation_cache)
        calibration = (calibration_latents(self.model_dir, parallel, settings.dtype)
                       if parallel.attention != "mla" and parallel.latent_transform == "pca"
                       else None)
        self.config, graphdef, params = restore_model(
            self.model_dir, self.layout, settings.dtype, settings.precision.quantization,
            settings.precision.quantize_embeddings, settings.precision.weight_layout,
            parallel.attention, parallel.latent_transform, calibration)
        limit = self.config.max_position_embeddings
        max_model_len = settings.scheduler.max_model_len
        if max_model_len is not None and max_model_len > limit:
            raise ValueError(f"max_model_len must be an integer in [1, {limit}] (the model's "
                             f"max_position_embeddings), got {max_model_len!r}")
        self.max_model_len = max_model_len or limit
        spec = settings.speculative
        if spec is not None and spec.num_speculative_tokens >= self.max_model_len:
            raise ValueError(f"num_speculative_tokens ({spec.num_speculative_tokens}) must be "
                             f"less than max_model_len ({self.max_model_len})")
        dtype = parse_dtype(settings.dtype, default=self.config.dtype)
        self.kv_format = kv_format(settings.precision.kv_cache_dtype, dtype)
        if self.kv_format.dtype != np.dtype(dtype):  # the model's own dtype compiles already
            self.kv_format.check_supported(self.layout.mesh.devices.flat[0])
        self.cache_spec = MODEL_CLASSES[self.config.family].cache_spec(
            self.config, dtype).with_format(self.kv_format)
        self.num_replicas = replicas_of(self.layout)
        kv_blocks = self._kv_pool_blocks(cache, settings.scheduler.max_num_seqs,
                                         max_model_len is not None)
        if self.cluster is not None:  # every process must build the same pool
            kv_blocks, self.max_model_len = self.cluster.agree_min(
                "kv_pool", (kv_blocks, self.max_model_len))
        kv = KVPool.create(self.cache_spec, kv_blocks * self.num_replicas, cache.block_size,
                           self.layout)
        moe = self._moe_execution(parallel, dtype)
        self.runner = ModelRunner(self.config, graphdef, params, self.layout, kv, moe,
                                  settings.sampling.mode)
        if self.cluster is not None and self.cluster.is_leader:
            self.runner = LeaderRunner(self.runner, self.cluster.channel)
        # The engine's settings as they are resolved: max_model_len known, the pool sized.
        self.settings = settings.replace(max_model_len=self.max_model_len, kv_blocks=kv_blocks,
                                         kv_memory_fraction=None,
                                         kv_cache_dtype=self.kv_format.name)
        from jaxserve.text.load import load_tokenizer
        # tokenizer.json (HF tokenizers) or tokenizer.model (sentencepiece), or None
        self.tokenizer = load_tokenizer(self.model_dir, self.config)
        # What writes the KV: equal prefix cache hashes must mean equal KV.
        identity = "|".join(map(str, (self.model_dir.resolve(), self.config, self.kv_format,
                                      self.layout.rules.source)))
        draft_runner = self._load_draft(spec, dtype, kv_blocks, moe) \
            if spec is not None and spec.method == "draft" else None
        self.engine = Engine(self.runner, self.config, self.settings, self.tokenizer,
                             cache_identity=identity, draft_runner=draft_runner)
        self._request_ids = itertools.count()
        if self.cluster is not None and not self.cluster.is_leader:
            follow(self.runner, self.cluster.channel, self.settings.scheduler.max_steps_in_flight)
            self.cluster.close()
            raise SystemExit(0)  # the leader is done: so is this process

    def _load_disaggregated(self, settings: Settings) -> None:
        """A prefill engine and a decode engine on their own devices and the handoffs between
        them (jaxserve/engine/disaggregated.py). The decode engine is built first: its
        max_model_len is the pair's."""
        pair = settings.disaggregation
        if settings.distributed.enabled or settings.speculative is not None:
            raise ValueError("disaggregate runs in one process without speculative decoding; "
                             "leave coordinator and speculative_config unset")
        devices = jax.devices()
        missing = sorted(d for role in ROLES for d in getattr(pair, role).devices
                         if d >= len(devices))
        if missing:
            raise ValueError(f"disaggregate: device ids {missing} do not exist: there are "
                             f"{len(devices)} {devices[0].platform} devices (ids 0 to "
                             f"{len(devices) - 1})")
        stored = ModelConfig.load(self.model_dir / "config.json")
        formats = [kv_format(getattr(pair, role).kv_cache_dtype or
                             settings.precision.kv_cache_dtype,
                             parse_dtype(getattr(pair, role).dtype or settings.dtype,
                                         default=stored.dtype)) for role in ROLES]
        check_pair(*formats)  # before anything loads
        self.roles: dict[str, LLM] = {}
        for role in ("decode", "prefill"):
            given = getattr(pair, role)
            role_settings = settings.replace(
                mesh=given.mesh, rules=given.rules or settings.parallel.rules,
                dtype=given.dtype or settings.dtype,
                kv_cache_dtype=given.kv_cache_dtype or settings.precision.kv_cache_dtype,
                **({"kv_blocks": given.kv_blocks, "kv_memory_fraction": None}
                   if given.kv_blocks is not None else {}),
                **({"block_size": given.block_size} if given.block_size is not None else {}))
            if role == "prefill":  # the first token's text is made before its handoff
                role_settings = role_settings.replace(
                    output_processing="inline",
                    max_model_len=self.roles["decode"].max_model_len)
            engine = LLM.__new__(LLM)
            engine.model_dir = self.model_dir
            engine._load(dataclasses.replace(role_settings, disaggregation=None),
                         [devices[d] for d in given.devices])
            self.roles[role] = engine
        prefill, decode = self.roles["prefill"], self.roles["decode"]
        mover = KVMover(prefill.runner, decode.runner, prefill.cache_spec, decode.cache_spec,
                        prefill.config.kv_head_copies, decode.config.kv_head_copies,
                        pair.transfer)
        for name in ("cluster", "layout", "compilation_cache", "config", "max_model_len",
                     "kv_format", "cache_spec", "num_replicas", "runner", "tokenizer",
                     "moe_threshold_source", "_request_ids"):
            setattr(self, name, getattr(decode, name))
        self.settings = dataclasses.replace(decode.settings, disaggregation=pair)
        self.engine = DisaggregatedEngine(prefill.engine, decode.engine,
                                          Handoffs(mover, pair.handoff_retries), pair)

    def _colocated_only(self, what: str) -> None:
        if self.settings.disaggregation is not None:
            raise ValueError(f"{what} needs one engine; this LLM disaggregates prefill and "
                             f"decode (build one without disaggregate)")

    def _load_draft(self, spec: SpeculativeSettings, dtype, kv_blocks: int,
                    moe: MoEExecution) -> DraftRunner:
        """The draft model (speculative method 'draft') on the target's mesh or its own
        (`spec.mesh`), with a KV pool
        of its own as many blocks as the target's, after checking it shares the target's
        vocabulary (see jaxserve/engine/speculative/draft.py)."""
        from jaxserve.text.load import load_tokenizer

        draft_dir = Path(spec.model)
        if not (draft_dir / "config.json").is_file():
            raise ValueError(f"speculative draft model {spec.model!r}: no jaxserve checkpoint "
                             f"there (config.json missing)")
        if self.cluster is not None:
            raise ValueError("speculative method 'draft' runs in one process; use 'ngram' "
                             "with several processes")
        stored = ModelConfig.load(draft_dir / "config.json")  # checked before any restore
        check_vocabulary(self.config, self.tokenizer, stored, load_tokenizer(draft_dir, stored),
                         draft_dir)
        settings = self.settings
        layout = self.layout if spec.mesh is None else \
            draft_layout(spec.mesh, self.layout, settings.parallel.rules)
        config, graphdef, params = restore_model(
            draft_dir, layout, settings.dtype, settings.precision.quantization,
            settings.precision.quantize_embeddings)
        if config.max_position_embeddings < self.max_model_len:
            raise ValueError(f"the draft model {spec.model!r} reaches "
                             f"{config.max_position_embeddings} positions, less than "
                             f"max_model_len ({self.max_model_len})")
        cache_spec = MODEL_CLASSES[config.family].cache_spec(config, dtype).with_format(
            self.kv_format)
        kv = KVPool.create(cache_spec, kv_blocks * self.num_replicas, settings.cache.block_size,
                           layout)
        return DraftRunner(config, graphdef, params, layout, kv, moe, settings.sampling.mode)

    def _moe_execution(self, parallel, dtype) -> MoEExecution:
        """MoE `auto`'s threshold: the explicit setting, else the performance model's crossover
        for this model and mesh on the devices in use (jaxserve/perf/moe_auto.py)."""
        threshold = parallel.moe_auto_threshold
        self.moe_threshold_source = "moe_auto_threshold" if threshold is not None else None
        if threshold is None and self.config.num_moe_layers:
            device = jax.devices()[0]
            threshold, self.moe_threshold_source = moe_auto.auto_threshold(
                self.config, self.layout.mesh_rules, np.dtype(dtype).name, device.platform,
                device.device_kind, DEFAULT_AUTO_THRESHOLD)
        return MoEExecution(parallel.moe_strategy,
                            DEFAULT_AUTO_THRESHOLD if threshold is None else threshold)

    def _kv_pool_blocks(self, cache: CacheSettings, max_num_seqs: int,
                        max_model_len_given: bool) -> int:
        """Blocks in each DP replica's shard of the pool (see `jaxserve.engine.sizing`)."""
        if cache.kv_blocks is not None:
            return cache.kv_blocks
        per_block = sizing.bytes_per_block_per_device(self.cache_spec, cache.block_size,
                                                      self.layout)
        budget = sizing.kv_budget_bytes(self.layout, cache.kv_memory_fraction)
        blocks, self.max_model_len = sizing.pool_blocks(
            budget, per_block, cache.block_size, max_num_seqs, self.max_model_len,
            max_model_len_given)
        return blocks

    def validate_token_ids(self, token_ids: Sequence[int], what: str = "prompt") -> list[int]:
        """The one check every token-id input passes before it can reach a device."""
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
            raise TypeError(f"{what} must be a list of token ids, got {type(token_ids).__name__}")
        if len(token_ids) == 0:
            raise ValueError(f"{what} is empty")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"{what} has {len(token_ids)} tokens, more than max_model_len "
                             f"{self.max_model_len}")
        vocab = self.config.vocab_size
        for i, t in enumerate(token_ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab:
                raise ValueError(f"{what}: token id {t!r} at index {i} is not in [0, {vocab})")
        return [int(t) for t in token_ids]

    def _token_ids(self, text_or_ids, what: str, add_bos: bool | None = None
                   ) -> tuple[list[int], str | None]:
        """(validated token ids, the text or None) of a prompt or candidate given as text or ids.
        add_bos: None = the tokenizer's special tokens, False = none."""
        if not isinstance(text_or_ids, str):
            return self.validate_token_ids(text_or_ids, what), None
        if not text_or_ids:
            raise ValueError(f"{what} is empty")
        if self.tokenizer is None:
            raise ValueError(f"{what} is text but the model has no tokenizer (tokenizer.json or "
                             "tokenizer.model); give token ids")
        ids = self.tokenizer.encode(text_or_ids, add_bos=add_bos)
        if not ids:
            raise ValueError(f"{what} {text_or_ids!r} encodes to no tokens")
        return self.validate_token_ids(ids, what), text_or_ids

    # ---- generation ----
    def _prepare(self, prompts, sampling_params, *, add_special_tokens: bool = True
                 ) -> list[tuple[list[int], str | None, SamplingParams]]:
        """Validate every prompt and its params before any request is queued. Text prompts are
        encoded with the tokenizer's special tokens (BOS), or without any when
        `add_special_tokens` is False (chat: the template writes them)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} "
                             "prompts")
        prepared = []
        for i, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            if not isinstance(params, SamplingParams):
                raise TypeError(f"sampling_params[{i}] must be SamplingParams, got "
                                f"{type(params).__name__}")
            ids, text = self._token_ids(prompt, f"prompt {i}",
                                        add_bos=None if add_special_tokens else False)
            params.validate_for_model(self.config.vocab_size, self.max_model_len)
            prepared.append((ids, text, params))
        return prepared

    def generate_stream(self, prompts, sampling_params=None, use_tqdm: bool = False
                        ) -> Iterator[tuple[int, RequestOutput]]:
        """Yield (input index, output) as each request finishes."""
        return self._stream(self._prepare(prompts, sampling_params), use_tqdm)

    def _stream(self, prepared, use_tqdm: bool) -> Iterator[tuple[int, RequestOutput]]:
        ids = {}
        self.engine.timeline.lap("idle")  # the engine had nothing to do since its last step
        try:
            for i, (token_ids, text, params) in enumerate(prepared):
                request_id = f"gen-{next(self._request_ids)}"
                self.engine.add_request(request_id, token_ids, params, text)
                ids[request_id] = i
            progress = _progress(len(prepared)) if use_tqdm else None
            done = 0
            while done < len(prepared):
                for request in self.engine.step():
                    if request.request_id in ids:
                        done += 1
                        if progress is not None:
                            progress.update(1)
                            progress.set_postfix(self._throughput(progress), refresh=False)
                        yield ids.pop(request.request_id), request.output()
            if progress is not None:
                progress.close()
        finally:  # interrupted or failed: release everything this call queued
            for request_id in ids:
                self.engine.abort(request_id)

    def _throughput(self, progress) -> dict[str, str]:
        elapsed = max(progress.format_dict["elapsed"], 1e-9)
        return {"tok/s": f"{self.engine.counters['generated_tokens'] / elapsed:.1f}"}

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = True
                 ) -> list[RequestOutput]:
        """Generate for every prompt; outputs in input order."""
        results: dict[int, RequestOutput] = dict(self.generate_stream(prompts, sampling_params,
                                                                      use_tqdm))
        return [results[i] for i in range(len(results))]

    # ---- chat ----
    def render_chat(self, messages, add_generation_prompt: bool = True,
                    chat_template: str | None = None) -> list[str]:
        """The prompt text of each conversation (one conversation, a list of message dicts, or
        a list of them), rendered with `chat_template` or the checkpoint's template."""
        from jaxserve.text.chat import render_chat, validate_conversations

        conversations, _ = validate_conversations(messages)
        if chat_template is None:
            chat_template = getattr(self.tokenizer, "chat_template", None)
            if chat_template is None:
                raise ValueError(
                    f"checkpoint {self.model_dir} has no chat template (neither "
                    "tokenizer_config.json's 'chat_template' nor chat_template.jinja); give "
                    "chat_template=...")
        special = getattr(self.tokenizer, "special_tokens_map", None) or {}
        return [render_chat(chat_template, c, add_generation_prompt=add_generation_prompt,
                            special_tokens=special) for c in conversations]

    def chat(self, messages, sampling_params=None, add_generation_prompt: bool = True,
             chat_template: str | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to conversations: `messages` is one conversation (a list of
        {"role": "system"|"user"|"assistant"|"tool", "content": str} dicts) or a list of them.
        Each is rendered with the checkpoint's chat template (or `chat_template`) as
        transformers' apply_chat_template renders it, tokenized without adding special tokens
        (the template writes BOS), then generated as `generate` does; outputs in input order."""
        if self.tokenizer is None:
            raise ValueError(f"checkpoint {self.model_dir} has no tokenizer (tokenizer.json or "
                             "tokenizer.model): chat needs one")
        texts = self.render_chat(messages, add_generation_prompt, chat_template)
        prepared = self._prepare(texts, sampling_params, add_special_tokens=False)
        results = dict(self._stream(prepared, use_tqdm))
        return [results[i] for i in range(len(results))]

    def warmup(self) -> int:
        """Compile every step shape now (a background warm-up in progress is finished here);
        returns the number of programs compiled."""
        compiled = self.engine.warmup()
        self.engine.timeline.lap("idle")  # compiling is not step work
        return compiled

    def stats(self, peak_flops: float | None = None) -> dict:
        """Engine counters, host time per phase, and FLOPs: `true_flops` (what the steps'
        real tokens needed), `executed_flops` (what the compiled programs ran) and, given one
        device's peak FLOP/s, `mfu` (see jaxserve/engine/accounting.py). Under "timeline",
        the Amdahl table of the recent steps: per phase ms/step and the part of it the device
        had nothing queued for, device vs host-only time (jaxserve/engine/timeline.py)."""
        return {**self.engine.stats(peak_flops), "timeline": self.engine.timeline.summary()}

    # ---- scoring ----
    def score(self, prompts, candidates=None, top_n: int = 0, use_tqdm: bool = False
              ) -> list[ScoreOutput]:
        """Score continuations with one prefill pass per prompt; nothing is sampled, no KV block
        stays held, and prompts reuse (and leave) cached prefixes like `generate` (see
        jaxserve/engine/scoring.py). Outputs in input order.

        prompts: a string or token-id list, or a list of them (text is encoded as `generate`
        encodes it). candidates: None, one list of candidates for every prompt, or one list per
        prompt (a list as long as `prompts` whose items are lists of candidates); a candidate
        is text (encoded without special tokens) or token ids, of any length. Each gets
        log P(candidate | prompt), summed over its tokens, and the per-token log-probs.
        top_n: also return the top_n most likely next tokens after each prompt (at most
        MAX_TOP_N).
        """
        results = dict(self.score_stream(prompts, candidates, top_n, use_tqdm))
        return [results[i] for i in range(len(results))]

    def score_stream(self, prompts, candidates=None, top_n: int = 0, use_tqdm: bool = False
                     ) -> Iterator[tuple[int, ScoreOutput]]:
        """`score`, yielding (input index, output) as each prompt finishes."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                        and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        if candidates is None:
            candidates = []
        if isinstance(candidates, str) or not isinstance(candidates, Sequence):
            raise TypeError(f"candidates must be a list (of candidates, or of one list of "
                            f"candidates per prompt), got {type(candidates).__name__}")
        if _is_per_prompt(candidates, len(prompts)) and candidates:
            jobs = [self.prepare_score(p, c, top_n, f"prompt {i}", f"prompt {i} candidate {{}}")
                    for i, (p, c) in enumerate(zip(prompts, candidates))]
        else:
            jobs = [self.prepare_score(p, candidates, top_n, f"prompt {i}")
                    for i, p in enumerate(prompts)]
        return self.score_jobs(jobs, use_tqdm)

    def prepare_score(self, prompt, candidates, top_n: int, prompt_name: str = "prompt",
                      candidate_name: str = "candidate {}") -> ScoreJob:
        """Validate one prompt's scoring request; every error names the bad value (`prompt_name`,
        `candidate_name` with the candidate's index)."""
        self._colocated_only("score")
        if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or \
                not 0 <= top_n <= min(MAX_TOP_N, self.config.vocab_size):
            raise ValueError(f"top_n must be an integer in [0, "
                             f"{min(MAX_TOP_N, self.config.vocab_size)}], got {top_n!r}")
        prompt_ids, prompt_text = self._token_ids(prompt, prompt_name)
        if isinstance(candidates, str) or not isinstance(candidates, Sequence):
            raise TypeError(f"{prompt_name}: candidates must be a list, got "
                            f"{type(candidates).__name__}")
        if not candidates and top_n == 0:
            raise ValueError(f"{prompt_name}: nothing to score: give candidates or top_n >= 1")
        blocks = self.engine.pools[0]
        ids_list, texts = [], []
        for j, candidate in enumerate(candidates):
            what = candidate_name.format(j)
            ids, text = self._token_ids(candidate, what, add_bos=False)
            total = len(prompt_ids) + len(ids)
            if total > self.max_model_len:
                raise ValueError(f"{prompt_name} ({len(prompt_ids)} tokens) + {what} ({len(ids)} "
                                 f"tokens) is more than max_model_len ({self.max_model_len})")
            if blocks.blocks_for(total) > blocks.capacity:
                raise ValueError(f"{prompt_name} + {what} needs {blocks.blocks_for(total)} KV "
                                 f"blocks but a replica's pool has {blocks.capacity}: raise "
                                 "kv_blocks")
            ids_list.append(ids)
            texts.append(text)
        return ScoreJob(prompt_ids, ids_list, int(top_n), prompt_text, texts)

    def score_jobs(self, jobs: list[ScoreJob], use_tqdm: bool = False
                   ) -> Iterator[tuple[int, ScoreOutput]]:
        """Run prepared jobs (`prepare_score`); yields (job index, output) as each finishes."""
        if self.engine.has_unfinished():
            raise RuntimeError(f"score() needs the engine to itself, but "
                               f"{len(self.engine.requests)} requests are running: let them "
                               "finish (or abort them) first")
        run = ScoreRun(self.engine, jobs)
        progress = _progress(len(jobs), "score", "prompt") if use_tqdm else None
        try:
            while not run.done:
                finished = run.step()
                if finished is None:  # every block is free: validation rules this out
                    raise RuntimeError("scoring found no free KV blocks for its next piece")
                for i in finished:
                    if progress is not None:
                        progress.update(1)
                    yield i, self.score_output(jobs[i], run.scores[i])
        finally:  # done, interrupted or failed: no KV outlives the call
            run.release()
            if progress is not None:
                progress.close()

    def score_output(self, job: ScoreJob, scores: JobScores) -> ScoreOutput:
        """A finished job's scores as user-facing output (top tokens decoded alone)."""
        def decode(token_id: int) -> str | None:
            if self.tokenizer is None:
                return None
            return self.tokenizer.decode([token_id], skip_special_tokens=False)

        candidates = [CandidateScore(ids, text, sum(lps), lps) for ids, text, lps in
                      zip(job.candidates, job.candidate_texts, scores.token_logprobs)]
        top = [TopToken(t, lp, decode(t)) for t, lp in scores.top]
        return ScoreOutput(job.prompt, job.prompt_ids, candidates, top)

    def logits(self, token_id_lists: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Full-sequence logits of one prefill pass: one float32 [len, vocab_size] array per
        input (the real vocabulary: a layout's padding columns are dropped)."""
        self._colocated_only("logits")
        seqs = [self.validate_token_ids(ids, f"input {i}") for i, ids in enumerate(token_id_lists)]
        if not seqs:
            raise ValueError("token_id_lists is empty")
        if self.engine.has_unfinished():
            raise RuntimeError("logits() needs the KV pool to itself: requests are running")
        self.engine.clear_prefix_cache()  # its pages are overwritten below
        bs, pool = self.runner.block_size, self.runner.blocks_per_replica - 1
        out: list[np.ndarray] = []
        group: list[list[int]] = []
        for seq in seqs + [None]:  # as many sequences per pass as one replica's pool holds
            need = sum(math.ceil(len(s) / bs) for s in group)
            if seq is None or (group and need + math.ceil(len(seq) / bs) > pool):
                out += self._logits_pass(group)
                group = []
            if seq is not None:
                group.append(seq)
        return out

    def _logits_pass(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """Every sequence on every replica (each replica's pool holds the whole group), so the
        replicas compute the same logits; the first replica's copy is read."""
        bs = self.runner.block_size
        tables, next_block = [], NULL_BLOCK + 1
        for seq in seqs:
            n = math.ceil(len(seq) / bs)
            tables.append(list(range(next_block, next_block + n)))
            next_block += n
        replica = list(zip(seqs, tables))
        tokens, metadata, starts = self.engine.builder.prefill_only(
            [replica] * self.num_replicas)
        logits = np.asarray(self.runner.forward(tokens, metadata))[:, :self.config.vocab_size]
        return [logits[start:start + len(seq)] for start, seq in zip(starts[0], seqs)]


CALIBRATION_TOKENS = 1024  # at most this many tokens of the calibration text are run


def calibration_latents(model_dir: Path, parallel, dtype: str | None) -> np.ndarray:
    """latent_transform 'pca': the exact (MLA) model's cached latents of the calibration text,
    [layers, tokens, kv_lora_rank], read from the pool after one prefill pass on the same mesh
    (`checkpoint.restore_model` takes their principal axes)."""
    from jaxserve.package_data import latent_calibration_text

    path = Path(parallel.latent_calibration or latent_calibration_text())
    if not path.is_file():
        raise FileNotFoundError(f"latent_calibration: no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"latent_calibration {path} is not UTF-8 text: {e}") from None
    block_size = 16
    config = ModelConfig.load(model_dir / CONFIG_FILE)
    limit = min(CALIBRATION_TOKENS, config.max_position_embeddings)
    exact = LLM(model_dir, mesh=parallel.mesh, dtype=dtype, max_num_seqs=1,
                max_model_len=limit, block_size=block_size,
                kv_blocks=math.ceil(limit / block_size) + 1)
    if exact.tokenizer is None:
        raise ValueError(f"latent_calibration {path}: {model_dir} has no tokenizer to read it "
                         f"with (latent_transform 'pca' needs one)")
    ids = exact.tokenizer.encode(text)[:limit]
    if len(ids) < 2:
        raise ValueError(f"latent_calibration {path} holds {len(ids)} tokens; the principal "
                         f"axes need a text of many")
    exact.logits([ids])  # its latents go to blocks NULL_BLOCK + 1, ... of the first replica
    blocks = slice(NULL_BLOCK + 1, NULL_BLOCK + 1 + math.ceil(len(ids) / block_size))
    layers = [np.asarray(exact.runner.kv.layer(i)["c_kv"][blocks], np.float32)
              for i in range(exact.config.num_layers)]
    return np.stack([c.reshape(-1, c.shape[-1])[:len(ids)] for c in layers])


def _progress(total: int, desc: str = "generate", unit: str = "req"):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit)


def _is_per_prompt(candidates, num_prompts: int) -> bool:
    """Candidates given per prompt: one list of candidates (text or id lists) per prompt."""
    return len(candidates) == num_prompts and all(
        isinstance(c, (list, tuple)) and all(isinstance(x, (str, list, tuple)) for x in c)
        for c in candidates)
