"""kubellm's model implementations against Hugging Face transformers on the same folders (fp32, CPU).

Prompts run through a freshly allocated paged KV cache whose block tables are
deliberately non-contiguous, then decode token by token; every logit must match
transformers' forward over the full sequence.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from engine.attention_metadata import AttentionMetadata
from engine.model_config import load_model_config, parse_model_config
from engine.layers.rotary_embedding import rope_inv_freq
from engine.models.loader import load_model
from engine.testing import make_model_folder
from kernels import cpu_linear

BLOCK_SIZE = 16
NUM_BLOCKS = 8
TOLERANCE = 1e-4
BFLOAT16_TOLERANCE = 2**-4  # one bfloat16 step of the largest logits (8 to 16): summation orders differ
FAMILIES = ["llama", "qwen2", "mistral", "qwen3", "qwen3_moe", "mixtral", "gemma3"]


@pytest.fixture(scope="module", params=[*FAMILIES, "mistral:tiny-sliding-window"])
def models(request, tiny_model_folder, tmp_path_factory):
    """family, or family:size for a shape other than tiny."""
    family, _, size = request.param.partition(":")
    folder = make_model_folder(tmp_path_factory.mktemp(size), family, size) if size else tiny_model_folder(family)
    ours = load_model(folder, load_model_config(folder), dtype="float32", device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, theirs


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def allocate_cache(model) -> None:
    """Fresh caches filled with garbage: a read of any slot not written this test shows up in the logits."""
    layers = list(model.attention_layers())
    first = layers[0]
    shape = (NUM_BLOCKS, BLOCK_SIZE, first.num_kv_heads, first.head_dim)
    weight = next(model.parameters())
    model.bind_kv_cache(
        [tuple(torch.randn(shape, device=weight.device, dtype=weight.dtype) * 100 for _ in "kv") for _ in layers]
    )


def step_metadata(chunks: list[tuple[list[int], int, int]], device: str | torch.device = "cpu") -> AttentionMetadata:
    """chunks: (block_table, tokens already cached, new tokens) per sequence, packed in order."""
    slots, starts, seq_lens = [], [0], []
    for table, cached, new in chunks:
        for pos in range(cached, cached + new):
            slots.append(table[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        starts.append(starts[-1] + new)
        seq_lens.append(cached + new)
    width = max(len(table) for table, _, _ in chunks)
    tables = [table + [0] * (width - len(table)) for table, _, _ in chunks]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        max_query_len=max(new for _, _, new in chunks),
        max_seq_len=max(seq_lens),
    )


def run_step(model, tokens: list[int], positions: list[int], meta: AttentionMetadata) -> torch.Tensor:
    device = device_of(model)
    with torch.inference_mode():
        hidden = model(torch.tensor(tokens, device=device), torch.tensor(positions, device=device), meta)
        return model.compute_logits(hidden).cpu()


def reference_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


def prompt(length: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def check_prefill_then_decode(ours, theirs, prompt_len: int, atol: float) -> None:
    """Prefill through blocks [3, 0, 5, 1], decode 4 tokens greedily; all logits must match transformers'."""
    allocate_cache(ours)
    table, device = [3, 0, 5, 1], device_of(ours)
    tokens = prompt(prompt_len, ours.config.vocab_size, seed=prompt_len)
    logits = [run_step(ours, tokens, list(range(prompt_len)), step_metadata([(table, 0, prompt_len)], device))]
    for _ in range(4):
        tokens.append(int(logits[-1][-1].argmax()))
        pos = len(tokens) - 1
        logits.append(run_step(ours, tokens[-1:], [pos], step_metadata([(table, pos, 1)], device)))
    expected = reference_logits(theirs, tokens)
    torch.testing.assert_close(torch.cat(logits)[:-1], expected[:-1], atol=atol, rtol=0)
    torch.testing.assert_close(logits[-1][-1], expected[-1], atol=atol, rtol=0)


@pytest.mark.parametrize("prompt_len", [1, 17, 40])
def test_prefill_then_decode_matches_transformers(models, prompt_len):
    check_prefill_then_decode(*models, prompt_len, TOLERANCE)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for the Triton path")
@pytest.mark.parametrize("family", FAMILIES)
def test_triton_path_on_cuda_matches_transformers(tmp_path, family):
    folder = make_model_folder(tmp_path, family=family, seed=4)
    ours = load_model(folder, load_model_config(folder), dtype="float32", device="cuda")
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for prompt_len in (1, 17, 40):
        check_prefill_then_decode(ours, theirs, prompt_len, TOLERANCE)


def test_packed_mixed_batch_equals_each_sequence_alone(models):
    """One step holding a decode of sequence A and a chunked prefill of sequence B."""
    ours, theirs = models
    allocate_cache(ours)
    vocab = ours.config.vocab_size
    seq_a, seq_b = prompt(18, vocab, seed=7), prompt(37, vocab, seed=8)
    table_a, table_b = [6, 2], [5, 1, 7]
    run_step(ours, seq_a[:17], list(range(17)), step_metadata([(table_a, 0, 17)]))
    run_step(ours, seq_b[:20], list(range(20)), step_metadata([(table_b, 0, 20)]))
    meta = step_metadata([(table_a, 17, 1), (table_b, 20, 17)])
    logits = run_step(ours, seq_a[17:] + seq_b[20:], [17] + list(range(20, 37)), meta)
    torch.testing.assert_close(logits[0], reference_logits(theirs, seq_a)[17], atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(logits[1:], reference_logits(theirs, seq_b)[20:], atol=TOLERANCE, rtol=0)


def test_without_cache_each_sequence_attends_to_itself(models):
    """The profiling pass (no cache bound yet) still computes correct causal attention per sequence."""
    ours, theirs = models
    ours.bind_kv_cache([(None, None)] * ours.config.num_hidden_layers)
    vocab = ours.config.vocab_size
    seq_a, seq_b = prompt(5, vocab, seed=9), prompt(11, vocab, seed=10)
    meta = step_metadata([([0], 0, 5), ([0], 0, 11)])
    logits = run_step(ours, seq_a + seq_b, list(range(5)) + list(range(11)), meta)
    torch.testing.assert_close(logits[:5], reference_logits(theirs, seq_a), atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(logits[5:], reference_logits(theirs, seq_b), atol=TOLERANCE, rtol=0)


def test_classic_config_with_llama3_rope_matches_transformers(tmp_path):
    folder = make_model_folder(tmp_path, family="llama", seed=2, classic_config=True)
    config = load_model_config(folder)
    assert config.rope.rope_type == "llama3" and config.rope.factor == 8.0
    ours = load_model(folder, config, dtype="float32")
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    allocate_cache(ours)
    tokens = prompt(33, config.vocab_size, seed=3)
    logits = run_step(ours, tokens, list(range(33)), step_metadata([([4, 2, 6], 0, 33)]))
    torch.testing.assert_close(logits, reference_logits(theirs, tokens), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize(
    "params",
    [
        # Llama 3.1 (factor 8) and 3.2 (factor 32)
        dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=8192),
        dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
             original_max_position_embeddings=8192),
        dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
        dict(rope_type="default", rope_theta=1e6),
    ],
    ids=["llama3-8", "llama3-32", "linear", "default"],
)
def test_rope_inverse_frequencies_equal_transformers(params):
    """Bit for bit: a rounding difference here grows with position and long contexts drift."""
    hf_config = LlamaConfig(hidden_size=4096, num_attention_heads=32, head_dim=128,
                            max_position_embeddings=131072, rope_parameters=params)
    expected = LlamaRotaryEmbedding(hf_config).inv_freq
    folder_config = parse_model_config({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
                                        "num_attention_heads": 32, "num_hidden_layers": 1, "intermediate_size": 8,
                                        "vocab_size": 8, "rope_parameters": params}, {}, Path("."))
    assert torch.equal(rope_inv_freq(128, folder_config.rope), expected)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("regime", ["blocks", "whole-matrices"])
def test_bfloat16_on_cpu_matches_transformers_bfloat16(monkeypatch, tiny_model_folder, family, regime):
    """CPU bf16 (widened GEMMs for prefill, bf16 GEMVs for decode) within bf16 rounding of transformers in bf16.

    The tiny matrices fit one block of either size, so "blocks" shrinks the few-rows block to 1,024 elements
    (several blocks per matrix, as a real model's decode has) and "whole-matrices" sends the 40-row prefill
    down the many-rows path that long prompts take."""
    if regime == "blocks":
        monkeypatch.setattr(cpu_linear, "FEW_ROWS_BLOCK_ELEMENTS", 1024)
    else:
        monkeypatch.setattr(cpu_linear, "MANY_ROWS", 2)
    folder = tiny_model_folder(family)
    ours = load_model(folder, load_model_config(folder), dtype="bfloat16", device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    check_prefill_then_decode(ours, theirs, 40, BFLOAT16_TOLERANCE)
