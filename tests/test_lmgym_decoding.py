"""IncrementalDecoder: logits of a left-padded, cached batch equal unpadded full forwards."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmgym.assets import load_causal_lm
from lmgym.decoding import IncrementalDecoder, contiguous_output_layer, decode_in_lockstep, forward_last, position_ids_from_mask
from lmgym.task import left_pad


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny_model(request, tiny_lm_path, tiny_gpt2_path):
    model, tokenizer = load_causal_lm({"llama": tiny_lm_path, "gpt2": tiny_gpt2_path}[request.param])
    return model, tokenizer


def full_forward(model, tokens, output_hidden=False):
    """Last-position logits (and final hidden state) of one unpadded sequence."""
    with torch.no_grad():
        out = model(torch.tensor([tokens]), output_hidden_states=output_hidden)
    return out.logits[0, -1], (out.hidden_states[-1][0, -1] if output_hidden else None)


def decode_batch(model, pad_id, prompts, continuations, output_hidden=False):
    """Prefill ``prompts`` then append ``continuations`` column by column; check every step."""
    decoder = IncrementalDecoder(model, output_hidden=output_hidden)
    ids, mask = left_pad(prompts, max(map(len, prompts)), pad_id)
    out = decoder.prefill(torch.from_numpy(ids), torch.from_numpy(mask))
    sequences = [list(p) for p in prompts]
    for step in range(len(continuations[0]) + 1):
        for row, tokens in enumerate(sequences):
            logits, hidden = full_forward(model, tokens, output_hidden)
            torch.testing.assert_close(out.logits[row], logits, atol=1e-4, rtol=1e-4)
            if output_hidden:
                torch.testing.assert_close(out.hidden[row], hidden, atol=1e-4, rtol=1e-4)
        if step == len(continuations[0]):
            break
        column = [c[step] for c in continuations]
        for tokens, token in zip(sequences, column):
            tokens.append(token)
        out = decoder.append(torch.tensor(column))
    assert out.logits.dtype == torch.float32


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
    assert torch.equal(position_ids_from_mask(mask), expected)


@pytest.mark.parametrize("output_hidden", [False, True])
def test_cached_left_padded_logits_equal_full_forward(tiny_model, output_hidden):
    model, tokenizer = tiny_model
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12], [13, 14, 15]]
    continuations = [[20, 21, 22, 23], [30, 31, 32, 33], [40, 41, 42, 43]]
    decode_batch(model, tokenizer.pad_token_id, prompts, continuations, output_hidden)
    out = IncrementalDecoder(model).prefill(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long))
    assert out.hidden is None


def test_positions_matter(tiny_model):
    """The check above has power: the same tokens at shifted positions give different logits."""
    model, tokenizer = tiny_model
    padded = torch.tensor([[tokenizer.pad_token_id] * 3 + [5, 6, 7]])
    shifted = model(padded).logits[0, -1]  # pads attended and positions shifted
    assert not torch.allclose(shifted, full_forward(model, [5, 6, 7])[0], atol=1e-3)


def test_append_before_prefill_raises(tiny_model):
    with pytest.raises(RuntimeError, match="prefill"):
        IncrementalDecoder(tiny_model[0]).append(torch.tensor([1]))


@settings(deadline=None, max_examples=10)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    steps=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_random_batches(tiny_lm_path, lengths, steps, seed):
    model, tokenizer = load_causal_lm(tiny_lm_path)
    generator = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)
    prompts = [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]
    continuations = [torch.randint(0, vocab, (steps,), generator=generator).tolist() for _ in lengths]
    decode_batch(model, tokenizer.pad_token_id, prompts, continuations)


def check_rows(model, out, sequences, rows):
    for position, row in enumerate(rows):
        torch.testing.assert_close(out.logits[position], full_forward(model, sequences[row])[0], atol=1e-4, rtol=1e-4)


def test_replace_rows_before_prefill_raises(tiny_model):
    with pytest.raises(RuntimeError, match="prefill"):
        IncrementalDecoder(tiny_model[0]).replace_rows(torch.tensor([0]), torch.tensor([[5]]), torch.tensor([[1]]))


@settings(deadline=None, max_examples=12)
@given(
    lengths=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    new_lengths=st.lists(st.integers(1, 12), min_size=4, max_size=4),
    replaced=st.lists(st.booleans(), min_size=4, max_size=4),
    steps=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_replace_rows_equals_full_prefill(tiny_model, lengths, new_lengths, replaced, steps, seed):
    """Splicing new prompts into some rows of a cached batch gives, at that step and the following
    appends, the logits of an unpadded forward of every row; the cache is as long as the longest row."""
    model, tokenizer = tiny_model
    generator = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer)

    def tokens(n):
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    sequences = [tokens(n) for n in lengths]
    decoder = IncrementalDecoder(model)
    ids, mask = left_pad(sequences, max(lengths), tokenizer.pad_token_id)
    decoder.prefill(torch.from_numpy(ids), torch.from_numpy(mask))
    for _ in range(steps):
        column = tokens(len(sequences))
        for row, token in zip(sequences, column):
            row.append(token)
        decoder.append(torch.tensor(column))
    rows = [i for i in range(len(sequences)) if replaced[i]] or [0]
    for i in rows:
        sequences[i] = tokens(new_lengths[i])
    new = [sequences[i] for i in rows]
    ids, mask = left_pad(new, max(map(len, new)), tokenizer.pad_token_id)
    out = decoder.replace_rows(torch.tensor(rows), torch.from_numpy(ids), torch.from_numpy(mask))
    check_rows(model, out, sequences, rows)
    assert decoder.attention_mask.shape[1] == max(map(len, sequences))
    for _ in range(2):
        column = tokens(len(sequences))
        for row, token in zip(sequences, column):
            row.append(token)
        out = decoder.append(torch.tensor(column))
        check_rows(model, out, sequences, range(len(sequences)))


def test_contiguous_output_layer_keeps_logits_and_feeds_a_contiguous_input(tiny_lm_path):
    model, _ = load_causal_lm(tiny_lm_path)
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]])
    mask = (ids != 0).long()
    expected = forward_last(model, ids, mask, 3).logits
    seen = []
    head = contiguous_output_layer(contiguous_output_layer(model)).get_output_embeddings()
    head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    torch.testing.assert_close(forward_last(model, ids, mask, 3).logits, expected)
    assert seen == [True] and len(head._forward_pre_hooks) == 2  # ours once, the recorder


def test_decode_in_lockstep_gives_each_model_the_chosen_tokens_and_stops_at_eos(tiny_model):
    """Two copies of one model in lockstep, greedy on the first: both see the same states, so their
    logits agree at every step and equal an unpadded forward; a row that writes EOS goes inactive,
    and the loop stops once every row has."""
    model, tokenizer = tiny_model
    prompts = [[5, 6, 7], [8, 9]]
    ids, mask = left_pad(prompts, 3, tokenizer.pad_token_id or 0)
    greedy = [list(p) for p in prompts]
    eos = None
    steps = []
    for outputs, tokens, active in decode_in_lockstep(
        [model, model], torch.from_numpy(ids), torch.from_numpy(mask), 6, None, lambda outs: outs[0].logits.argmax(-1), (True,)
    ):
        assert outputs[0].hidden is not None and outputs[1].hidden is None
        torch.testing.assert_close(outputs[0].logits, outputs[1].logits)
        for row, sequence in enumerate(greedy):
            torch.testing.assert_close(outputs[0].logits[row], full_forward(model, sequence)[0].float(), rtol=1e-4, atol=1e-4)
            sequence.append(int(tokens[row]))
        steps.append((tokens, active))
        eos = int(tokens[0]) if eos is None else eos
    assert len(steps) == 6 and all(active.all() for _, active in steps)
    # with row 0's first greedy token as EOS: a row is active until it has written EOS, and the loop
    # ends once no row is active (or after 6 tokens)
    stopped = list(decode_in_lockstep([model], torch.from_numpy(ids), torch.from_numpy(mask), 6, eos, lambda outs: outs[0].logits.argmax(-1)))
    ended = torch.zeros(2, dtype=torch.bool)
    for t, (_, tokens, active) in enumerate(stopped):
        assert torch.equal(active, ~ended) and active.any()
        ended |= tokens == eos
    assert ended.all() or len(stopped) == 6
    assert not stopped[-1][2][0] or len(stopped) == 1  # row 0 ended at its first token
