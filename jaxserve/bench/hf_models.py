"""Tiny random HF reference models (float32), saved with save_pretrained: the families the
engine imports, small enough to build in a second (the parity tests and `gpu_check` use them).
torch and transformers are imported when a model is built, never when this module is."""

from __future__ import annotations

from pathlib import Path

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=8, max_position_embeddings=512, rms_norm_eps=1e-5)

DEEPSEEK = dict(COMMON, vocab_size=128, num_hidden_layers=2, num_attention_heads=4,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                routed_scaling_factor=1.5)

HF_CONFIGS = {
    # GQA (8 q / 2 kv heads), Llama-3 rope scaling, untied embeddings
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        COMMON, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        COMMON, num_key_value_heads=4, sliding_window=None, tie_word_embeddings=False)),
    # q/k norm, explicit head_dim != hidden/heads, tied embeddings
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        COMMON, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)),
    # 8 experts, top-2 without renormalisation; layer 1 keeps a dense MLP (mlp_only_layers)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        COMMON, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[1])),
    # every second layer MoE (decoder_sparse_step=2), top-3 renormalised
    "qwen3_moe_sparse": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        COMMON, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=3,
        moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=2)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        COMMON, num_key_value_heads=4, intermediate_size=32, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=None)),
    # latent attention, vocab 128, 2 layers (the first dense), 8 experts in 4 groups, one
    # shared expert. V2: no q_lora_rank, group-limited greedy softmax routing, default rope.
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        DEEPSEEK, q_lora_rank=None, topk_method="group_limited_greedy", norm_topk_prob=False)),
    # V3: q_lora_rank, YaRN (mscale != mscale_all_dim: both factors matter), sigmoid routing
    # with a (randomised) correction bias, renormalised
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        DEEPSEEK, q_lora_rank=48, norm_topk_prob=True, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 128, "mscale": 1.0, "mscale_all_dim": 0.8,
            "beta_fast": 32, "beta_slow": 1})),
}
MOE_FAMILIES = ("qwen3_moe", "qwen3_moe_sparse", "mixtral", "deepseek_v2", "deepseek_v3")


def make_hf_model(name: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    import torch
    import transformers

    config_cls, model_cls, kwargs = HF_CONFIGS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**kwargs, **overrides})
    model = getattr(transformers, model_cls)(config).to(torch.float32).eval()
    with torch.no_grad():  # HF's init leaves norms at 1: randomise them so they are tested
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            elif pname.endswith((".mlp.gate.weight", ".block_sparse_moe.gate.weight")):
                p.normal_(0.0, 0.5)  # routers: clear choices, so no near-ties in the top-k
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):  # zeros would test nothing
                b.uniform_(-0.2, 0.2)
    model.save_pretrained(out_dir)
    return Path(out_dir)
