"""Sampler on random logits: greedy, filters, seeds, penalties (vs transformers' processors), logprobs."""

import numpy as np
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from engine.core_messages import EngineCoreRequest
from engine.layers.sampler import Sampler
from engine.model_runner import InFlightStep
from engine.sampling import SamplingParams
from engine.sampling_batch import SamplingState, sampling_row
from engine.scheduler import SampledTokens
from engine.sequence import Request, Sequence

VOCAB = 50
EOS = 7
CPU = torch.device("cpu")


def make_seq(params: SamplingParams, prompt=(1, 2, 3), output=(), index=0) -> Sequence:
    """A sequence as the sampler sees it: outputs known, the token being sampled a placeholder."""
    seq = Request(EngineCoreRequest("r", list(prompt), params, 0.0, max_tokens=100)).seqs[index]
    seq.token_ids.extend(output)
    seq.num_placeholders = 1
    return seq


def make_sampler(seed=0) -> Sampler:
    return Sampler(seed=seed, device=CPU)


def prepare(seqs: list[Sequence], newest: list[int] | None = None):
    """What the runner does for a step: rows in the sampling state, then the step's SamplingBatch.

    newest: each row's newest token as the device holds it (default: the last one the host knows).
    """
    state = SamplingState(len(seqs), VOCAB, (EOS,), CPU)
    for row, seq in enumerate(seqs):
        state.add_row(row, seq)
    params = torch.tensor([sampling_row(seq.params) for seq in seqs], dtype=torch.float32)
    newest = newest or [seq.token_ids[-1] for seq in seqs]
    return state, state.batch(seqs, params, np.arange(len(seqs)), lambda: torch.tensor(newest))


def sample(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence], newest: list[int] | None = None) -> SampledTokens:
    state, batch = prepare(seqs, newest)
    output = sampler(logits, batch, state.penalties)
    return InFlightStep(output, batch.logprobs_wanted, CPU).result()


def tokens(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    return sample(sampler, logits, seqs).token_ids.tolist()


def random_logits(rows: int, seed=0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def penalized_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    state, batch = prepare(seqs)
    return make_sampler()._apply_penalties(logits, batch, state.penalties)


def test_greedy_and_filters_that_leave_one_token_pick_the_argmax():
    logits = random_logits(4)
    seqs = [
        make_seq(SamplingParams(temperature=0.0)),
        make_seq(SamplingParams(temperature=1.0, top_k=1)),
        make_seq(SamplingParams(temperature=1.5, top_p=1e-6)),
        make_seq(SamplingParams(temperature=1.0, min_p=1.0)),
    ]
    assert tokens(make_sampler(), logits, seqs) == logits.argmax(dim=-1).tolist()


def test_top_k_and_top_p_only_ever_pick_allowed_tokens():
    logits = random_logits(1, seed=3).repeat(200, 1)
    top5 = set(logits[0].topk(5).indices.tolist())
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    nucleus_size = int((probs[order].cumsum(0) < 0.6).sum()) + 1
    nucleus = set(order[:nucleus_size].tolist())
    sampler = make_sampler()
    assert set(tokens(sampler, logits, [make_seq(SamplingParams(top_k=5))] * 200)) <= top5
    assert set(tokens(sampler, logits, [make_seq(SamplingParams(top_p=0.6))] * 200)) <= nucleus


def test_sampling_follows_the_softmax_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).repeat(4000, 1)
    params = SamplingParams(temperature=2.0)
    counts = torch.bincount(torch.tensor(tokens(make_sampler(), logits, [make_seq(params)] * 4000)), minlength=4)
    expected = torch.softmax(logits[0] / 2.0, -1)
    assert torch.allclose(counts / 4000, expected, atol=0.03)


def test_a_seeded_sequence_draws_the_same_tokens_whatever_the_batch():
    params = SamplingParams(temperature=1.0, seed=1234)
    alone, batched = make_seq(params), make_seq(params)
    sampler_alone, sampler_batched = make_sampler(seed=1), make_sampler(seed=2)
    alone_tokens, batched_tokens = [], []
    for step in range(20):
        logits = random_logits(1, seed=step)
        alone_tokens += tokens(sampler_alone, logits, [alone])
        others = [make_seq(SamplingParams(temperature=1.0)) for _ in range(step % 4)]
        batch = others + [batched]
        batch_logits = torch.cat([random_logits(len(others), seed=100 + step), logits])
        batched_tokens.append(tokens(sampler_batched, batch_logits, batch)[-1])
    assert alone_tokens == batched_tokens
    assert len(set(alone_tokens)) > 3  # really sampled, not greedy
    other_seed = make_seq(SamplingParams(temperature=1.0, seed=99))
    assert [tokens(make_sampler(), random_logits(1, seed=s), [other_seed])[0] for s in range(20)] != alone_tokens


def test_n_completions_of_a_seeded_request_differ():
    params = SamplingParams(temperature=1.0, seed=5, n=2)
    first, second = make_seq(params, index=0), make_seq(params, index=1)
    logits = torch.zeros(2, VOCAB)  # uniform: equal draws would be a coincidence
    sampler = make_sampler()
    draws = [tuple(tokens(sampler, logits, [first, second])) for _ in range(10)]
    assert any(a != b for a, b in draws)


def test_repetition_penalty_matches_transformers():
    logits = random_logits(2)
    prompt, output = (1, 2, 3, 10), (10, 11, 12)
    seqs = [make_seq(SamplingParams(repetition_penalty=1.3), prompt, output), make_seq(SamplingParams(), prompt, output)]
    ours = penalized_logits(logits, seqs)
    input_ids = torch.tensor([list(prompt + output)])
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(input_ids, logits[:1].clone())
    torch.testing.assert_close(ours[:1], theirs)
    torch.testing.assert_close(ours[1:], logits[1:])  # untouched row


def test_presence_and_frequency_penalties_follow_openai():
    logits = random_logits(1)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    seq = make_seq(params, prompt=(4, 5), output=(10, 10, 10, 11))
    ours = penalized_logits(logits, [seq])
    expected = logits.clone()
    expected[0, 10] -= 0.5 + 3 * 0.25
    expected[0, 11] -= 0.5 + 0.25
    torch.testing.assert_close(ours, expected)  # prompt tokens 4 and 5 are not penalised


@pytest.mark.parametrize("stop_id", [EOS, 9])
def test_min_tokens_masks_eos_and_stop_ids(stop_id):
    logits = torch.zeros(2, VOCAB)
    logits[:, stop_id] = 10.0
    waiting = make_seq(SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9]), output=(20, 21))
    done = make_seq(SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[9]), output=(20, 21))
    chosen = tokens(make_sampler(), logits, [waiting, done])
    assert chosen[0] != stop_id and chosen[1] == stop_id


def test_logprobs_are_the_raw_log_softmax_with_the_chosen_token_first():
    logits = random_logits(3)
    seqs = [
        make_seq(SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5), output=(5, 6)),
        make_seq(SamplingParams(temperature=0.0)),
        make_seq(SamplingParams(temperature=1.0, logprobs=0, seed=1)),
    ]
    sampled = sample(make_sampler(), logits, seqs)
    chosen, logprobs = sampled.token_ids.tolist(), sampled.logprobs
    expected = torch.log_softmax(logits, -1)
    first = logprobs[0]
    assert next(iter(first)) == chosen[0]
    top3 = expected[0].topk(3)
    for token_id, value in zip(top3.indices.tolist(), top3.values.tolist()):
        assert first[token_id] == pytest.approx(value, abs=1e-6)
    assert len(first) in (3, 4)  # top 3, plus the chosen token when it is not among them
    assert logprobs[1] is None
    third = logprobs[2]
    assert list(third) == [chosen[2]]
    assert third[chosen[2]] == pytest.approx(expected[2, chosen[2]].item(), abs=1e-6)


def test_logit_bias_and_allowed_token_ids_steer_every_row_alone():
    logits = random_logits(3)
    seqs = [
        make_seq(SamplingParams(temperature=0.0, logit_bias={3: 100.0})),
        make_seq(SamplingParams(temperature=1.0, seed=1, allowed_token_ids=[4, 9])),
        make_seq(SamplingParams(temperature=0.0)),
    ]
    for _ in range(20):
        chosen = tokens(make_sampler(), logits, seqs)
        assert chosen[0] == 3 and chosen[1] in (4, 9) and chosen[2] == logits[2].argmax().item()


def banned_by_vllm_rule(words: list[list[int]], output: list[int]) -> set[int]:
    """vLLM's bad-words rule, written out: a word's last token is banned when the output ends with the rest."""
    return {word[-1] for word in words if len(word) - 1 <= len(output) and output[len(output) - len(word) + 1 :] == word[:-1]}


@pytest.mark.parametrize("newest_on_device", [False, True])
def test_bad_words_ban_the_last_token_after_the_others_as_vllm_does(newest_on_device):
    """Rows with different outputs; with overlap scheduling the newest output token is only on the device."""
    words = [[5], [11, 12], [3, 4, 13], [20, 21, 22, 14]]
    outputs = [[], [11], [3, 4], [9, 3, 4], [20, 21, 22], [21, 22], [1, 2]]
    logits = torch.zeros(len(outputs), VOCAB)
    seqs, newest = [], []
    for output in outputs:
        if newest_on_device and output:
            seq = make_seq(SamplingParams(temperature=0.0, bad_words_token_ids=words), output=output[:-1])
            seq.num_placeholders = 2  # the previous step's token, then the one being sampled
        else:
            seq = make_seq(SamplingParams(temperature=0.0, bad_words_token_ids=words), output=output)
        seqs.append(seq)
        newest.append(output[-1] if output else seq.token_ids[-1])
    state, batch = prepare(seqs, newest)
    masked = logits.clone()
    batch.bad_words.mask(masked)
    banned = [{t for t in range(VOCAB) if masked[row, t] == float("-inf")} for row in range(len(outputs))]
    assert banned == [banned_by_vllm_rule(words, output) for output in outputs]
    assert banned[:5] == [{5}, {5, 12}, {5, 13}, {5, 13}, {5, 14}]  # the rule bans more than single words here


def test_a_bad_word_steers_sampling_away_from_its_last_token():
    logits = random_logits(1)
    favourite = logits[0].argmax().item()
    seq = make_seq(SamplingParams(temperature=0.0, bad_words_token_ids=[[favourite]]))
    assert tokens(make_sampler(), logits, [seq]) != [favourite]
