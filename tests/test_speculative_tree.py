"""Token trees: the tree mask in the attention metadata, and committing the accepted path.

Oracles: every tree node's logits equal those of a fresh prefill of the sequence followed by
the node's path (siblings share a position, not a KV slot, and never see each other); after a
branch's KV is moved to its positions, the next token's logits equal a fresh prefill of the
accepted tokens (within 1e-5, float32).
"""

import numpy as np
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.ops.attention import ChunkRow, build_metadata, table_width
from jaxserve.token_tree import TokenTree, parse_tree
from tests.hf_models import small_vocab_llama

VOCAB = 12
BS = 8
# one sequence at a time: few step shapes to compile (decode rows 1, 4 and 8 with a 2x2 tree)
ENGINE = dict(max_model_len=64, block_size=BS, max_num_seqs=1, max_num_batched_tokens=32,
              max_prefill_chunk=32, kv_blocks=20)
PROMPT = [3, 4, 5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return small_vocab_llama(tmp_path_factory.mktemp("tree"), VOCAB)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, **ENGINE)


def _forward(llm, decodes, chunks, tokens, trees=False):
    """Logits [tokens, vocab] of one step of decode rows and prefill chunks (16-token tiles)."""
    width = table_width(64 // BS, BS)
    prefill = 16 * sum(-(-chunk.length // 16) for chunk in chunks)
    md, first = build_metadata([(decodes, chunks)], len(decodes), prefill, 16, BS, width,
                               trees=trees)
    ids = np.zeros(len(decodes) + prefill, np.int32)
    ids[:len(decodes)] = tokens[:len(decodes)]
    rest = tokens[len(decodes):]
    for k, chunk in enumerate(chunks):
        f = first[0, len(decodes) + k]
        ids[f:f + chunk.length] = rest[:chunk.length]
        rest = rest[chunk.length:]
    return np.asarray(llm.runner.forward(ids, md))[:, :VOCAB], first


def _fresh(llm, tokens, blocks):
    """Logits of a prefill of `tokens` from position 0 into `blocks`."""
    logits, first = _forward(llm, [], [ChunkRow(0, len(tokens), blocks)], tokens)
    return logits[first[0, 0]:first[0, 0] + len(tokens)]


def test_tree_nodes_see_their_ancestors_only_and_the_committed_path_equals_a_fresh_prefill(llm):
    tree = parse_tree("2x2")  # chains [a, b] and [c, d] under the sequence's last token
    a, b, c, d = 10, 11, 5, 4
    seq_blocks = [1, 2]
    _forward(llm, [], [ChunkRow(0, len(PROMPT) - 1, seq_blocks)], PROMPT[:-1])
    L = len(PROMPT)  # the tree's first slot: right after the last token's (L - 1)
    masks = tree.ancestor_masks()
    rows = [ChunkRow(L - 1, 1, seq_blocks)] + [
        ChunkRow(L - 1 + tree.depth(i), 1, seq_blocks, tree=(L + i, L, masks[i]))
        for i in range(tree.size)]
    logits, _ = _forward(llm, rows, [], [PROMPT[-1], a, b, c, d], trees=True)
    first_branch = _fresh(llm, PROMPT + [a, b], [3, 4])
    second_branch = _fresh(llm, PROMPT + [c, d], [5, 6])
    np.testing.assert_allclose(logits[0], first_branch[L - 1], atol=1e-5)
    np.testing.assert_allclose(logits[1:3], first_branch[L:L + 2], atol=1e-5)
    np.testing.assert_allclose(logits[3:5], second_branch[L:L + 2], atol=1e-5)
    # the second branch is accepted: its KV moves from slots L + 2, L + 3 to L, L + 1
    slot = lambda pos: seq_blocks[pos // BS] * BS + pos % BS  # noqa: E731
    pairs = np.zeros((1, 4, 2), np.int32)
    pairs[0, :2] = [(slot(L + 2), slot(L)), (slot(L + 3), slot(L + 1))]
    llm.runner.copy_slots(pairs)
    x = 7
    logits, _ = _forward(llm, [ChunkRow(L + 2, 1, seq_blocks)], [], [x])
    np.testing.assert_allclose(logits[0], _fresh(llm, PROMPT + [c, d, x], [5, 6])[L + 2],
                               atol=1e-5)


def test_token_trees_are_parsed_from_width_by_depth_or_parent_indices():
    assert parse_tree("2x3").parents == (-1, 0, 1, -1, 3, 4)
    assert parse_tree([-1, 0, 0, 1]) == TokenTree((-1, 0, 0, 1))
    tree = parse_tree([-1, 0, 0, 1])
    assert [tree.depth(i) for i in range(4)] == [1, 2, 2, 3] and tree.max_depth == 3
    assert tree.ancestor_masks() == [0b1, 0b11, 0b101, 0b1011]
    assert tree.path(3) == [0, 1, 3]


@pytest.mark.parametrize("spec, error", [
    ("3x", "speculative tree '3x': give 'WxD'"),
    ("0x2", "speculative tree '0x2': give 'WxD'"),
    ([-1, 2, 0], r"speculative tree \[-1, 2, 0\] is not a tree: node 1's parent 2 must be"),
    ([0], r"is not a tree: node 0's parent 0 must be -1"),
    ([], "speculative tree has no nodes"),
    ("8x4", "speculative tree '8x4' has 32 nodes; at most 31"),
])
def test_bad_trees_are_refused_naming_the_value(spec, error):
    with pytest.raises(ValueError, match=error):
        parse_tree(spec)


# ---- the engine with a token tree ----

# The random model's greedy continuation of the first is 2, then 8s: after "9 2 8" the latest
# 8 was followed by 9, an earlier one by 8, so the second branch wins.
TREE_PROMPTS = [[9, 8, 8, 9, 5, 9, 6, 9], [3, 4, 8, 3, 4, 6, 3, 4]]


def _greedy(llm, prompts):
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    return [r.outputs[0] for r in llm.generate(prompts, sp, use_tqdm=False)]


def _assert_greedy(llm, prompts, outs):
    """Each output's tokens are the argmaxes of a fresh prefill of the prompt and the tokens
    before it, with that prefill's logprobs (within 1e-5): plain greedy decoding's."""
    for prompt, out in zip(prompts, outs):
        logits = _fresh(llm, prompt + out.token_ids, [3, 4, 5])[len(prompt) - 1:-1]
        assert out.token_ids == logits.argmax(axis=-1).tolist()
        logprobs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                   keepdims=True)) - logits.max(-1, keepdims=True)
        np.testing.assert_allclose([lp[t] for lp, t in zip(out.logprobs, out.token_ids)],
                                   logprobs[np.arange(len(out.token_ids)), out.token_ids],
                                   atol=1e-5)


@pytest.fixture(scope="module")
def tree_llm(model_dir):
    return LLM(model_dir, speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                              "tree": "2x2", "auto_fallback": False}, **ENGINE)


def test_a_token_tree_gives_the_greedy_tokens_after_other_branches_win(llm, tree_llm):
    """Prompt lookup fills the tree with what followed several earlier occurrences; each
    branch is a run from the last token, so the tokens are greedy decoding's: each the argmax
    of a fresh prefill of the prompt and the tokens before it, with that prefill's logprob
    (within 1e-5). A kept branch other than the first has its KV moved to its positions, and
    the logits of every later token read it (checked to fail without the move)."""
    before = tree_llm.stats()
    _assert_greedy(llm, TREE_PROMPTS, _greedy(tree_llm, TREE_PROMPTS))
    after = tree_llm.stats()
    assert after["spec_accepted_tokens"] > before["spec_accepted_tokens"]
    assert after["spec_tree_branch_commits"] > before.get("spec_tree_branch_commits", 0)


def test_branch_commits_of_several_sequences_in_one_step_all_fit_the_slot_moves(tree_llm):
    """Each sequence that commits a branch moves up to the tree's depth of slots, so a step
    may move more slots than the tree has nodes: the moves double in size until all fit."""
    moves = [(20 + i, i) for i in range(6)]  # three sequences, two kept nodes each
    pairs = tree_llm.engine.builder.slot_pairs(moves, 4)  # a 2x2 tree: 4 nodes
    assert pairs.shape == (1, 8, 2) and pairs[0, :6].tolist() == [list(m) for m in moves]
    assert not pairs[0, 6:].any()  # (0, 0) pads
    assert tree_llm.engine.builder.slot_pairs(moves[:2], 4).shape == (1, 4, 2)


def test_trees_need_prompt_lookup_and_fit_k():
    from jaxserve.settings import SpeculativeSettings

    with pytest.raises(ValueError, match=r"speculative tree '2x2' needs method 'ngram'"):
        SpeculativeSettings(method="draft", model="x", tree="2x2")
    with pytest.raises(ValueError, match=r"speculative tree '2x5' is 5 deep, more than "
                                         r"num_speculative_tokens \(4\)"):
        SpeculativeSettings(tree="2x5")
    with pytest.raises(ValueError, match=r"is not a tree: node 1's parent 1"):
        SpeculativeSettings.from_config({"tree": [-1, 1]})
    assert SpeculativeSettings(tree=[-1, 0, -1]).token_tree.step_rows == 5

    from jaxserve import cli

    args = cli.build_parser().parse_args(["generate", "--prompt", "x",
                                          "--speculative-tree=-1,0,0"])
    assert cli._settings(args).speculative.token_tree == TokenTree((-1, 0, 0))
    args = cli.build_parser().parse_args(["generate", "--prompt", "x", "--speculative-method",
                                          "draft", "--speculative-tree", "3x3"])
    with pytest.raises(ValueError, match=r"speculative tree '3x3' needs method 'ngram' \(prompt "
                                         r"lookup fills its branches\), got 'draft'"):
        cli._settings(args)


def test_a_token_tree_on_a_tp2_mesh_gives_the_single_device_greedy_tokens(llm, model_dir):
    """Greedy decoding with a 2x2 tree on a tp=2 mesh (heads split over two devices: the tree
    masks and a kept branch's KV move on both) gives the single-device engine's greedy tokens
    and logprobs (the fresh-prefill oracle above, within 1e-5); proposals were kept and a
    branch other than the first was committed, so the tree's rows did run."""
    tree_tp2 = LLM(model_dir, mesh="tp=2", rules="tp",
                   speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                       "tree": "2x2", "auto_fallback": False}, **ENGINE)
    _assert_greedy(llm, TREE_PROMPTS, _greedy(tree_tp2, TREE_PROMPTS))
    stats = tree_tp2.stats()
    assert stats["spec_accepted_tokens"] > 0 and stats["spec_tree_branch_commits"] > 0
