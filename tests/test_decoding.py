"""CTC decoding: greedy collapse rules, beam search vs greedy, the LM weight's effect, bad LM files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.nn.ctc import greedy_ctc
from models.tasks.decoding import batches_by_frames
from models.tasks.search import BeamSearchDecoder, DecodingError, make_decoder

VOCAB = ["<blank>", "<unk>", "a", "b", "c"]


def _log_probs(rows: list[list[float]]) -> torch.Tensor:
    """(T, V) probabilities -> (T, V) log-probabilities (rows renormalised)."""
    p = torch.tensor(rows, dtype=torch.float64) + 1e-6
    return (p / p.sum(-1, keepdim=True)).log().float()


def test_greedy_collapses_repeats_drops_blanks_and_respects_lengths() -> None:
    # best path per frame: a a - a b b - c | padding frames argmax 'c' must be ignored for the second item
    seq = [2, 2, 0, 2, 3, 3, 0, 4]
    lp = torch.full((2, 8, 5), -10.0)
    for t, k in enumerate(seq):
        lp[0, t, k] = 0.0
    for t, k in enumerate([3, 0, 3, 4, 4, 4, 4, 4]):
        lp[1, t, k] = 0.0
    out = greedy_ctc(lp, torch.tensor([8, 3]))
    assert out == [[2, 2, 3, 4], [3, 3]]


def test_beam_agrees_with_greedy_on_peaked_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    decoder = BeamSearchDecoder(VOCAB, beam_size=8)
    for _ in range(10):
        t = int(torch.randint(5, 30, (1,), generator=gen))
        labels = torch.randint(0, len(VOCAB), (t,), generator=gen)
        logits = torch.randn(t, len(VOCAB), generator=gen)
        logits[torch.arange(t), labels] += 12.0  # one unit takes > 99.9 % of each frame
        lp = logits.log_softmax(-1)[None]
        lengths = torch.tensor([t])
        assert decoder.decode(lp, lengths) == greedy_ctc(lp, lengths)


def test_beam_finds_the_better_label_sequence_where_the_best_path_misleads() -> None:
    # Two frames, P(blank) = 0.6, P(a) = 0.4 each. Best path "--" -> "" has probability 0.36, but the label
    # sequence "a" collects aa + a- + -a = 0.16 + 0.24 + 0.24 = 0.64.
    lp = _log_probs([[0.6, 0, 0.4, 0, 0], [0.6, 0, 0.4, 0, 0]])[None]
    lengths = torch.tensor([2])
    assert greedy_ctc(lp, lengths) == [[]]
    assert BeamSearchDecoder(VOCAB, beam_size=5).decode(lp, lengths) == [[2]]


def _write_arpa(path: Path, unigrams: dict[str, float]) -> Path:
    """A tiny ARPA model: unigram log10 probabilities, the same values for <s> -> x, and flat x -> </s>."""
    words = {"<s>": -99.0, "</s>": -1.0, "<unk>": -5.0, **unigrams}
    bigrams = [f"{p}\t<s> {w}" for w, p in unigrams.items()] + [f"-0.3\t{w} </s>" for w in unigrams]
    lines = ["\\data\\", f"ngram 1={len(words)}", f"ngram 2={len(bigrams)}", "", "\\1-grams:"]
    lines += [f"{p}\t{w}\t0" for w, p in words.items()]
    lines += ["", "\\2-grams:", *bigrams, "", "\\end\\", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def test_lm_weight_moves_the_result_towards_the_lm(tmp_path: Path) -> None:
    # acoustics slightly prefer "a" (0.50) over "b" (0.45); the LM strongly prefers "b"
    arpa = _write_arpa(tmp_path / "lm.arpa", {"a": -3.0, "b": -0.1, "c": -3.0})
    lp = _log_probs([[0.04, 0, 0.5, 0.45, 0.01]])[None]
    lengths = torch.tensor([1])
    no_lm = BeamSearchDecoder(VOCAB, beam_size=5, lm_path=arpa, lm_weight=0.0).decode(lp, lengths)
    small = BeamSearchDecoder(VOCAB, beam_size=5, lm_path=arpa, lm_weight=0.01).decode(lp, lengths)
    strong = BeamSearchDecoder(VOCAB, beam_size=5, lm_path=arpa, lm_weight=1.0).decode(lp, lengths)
    assert no_lm == [[2]]
    assert small == [[2]]
    assert strong == [[3]]
    # and the other way round: an LM preferring "a" keeps "a" at any weight
    arpa_a = _write_arpa(tmp_path / "lm_a.arpa", {"a": -0.1, "b": -3.0, "c": -3.0})
    assert BeamSearchDecoder(VOCAB, 5, lm_path=arpa_a, lm_weight=1.0).decode(lp, lengths) == [[2]]


def test_unreadable_lm_files_raise_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DecodingError, match=r"missing\.arpa does not exist"):
        BeamSearchDecoder(VOCAB, lm_path=tmp_path / "missing.arpa", lm_weight=0.5)
    garbage = tmp_path / "garbage.arpa"
    garbage.write_text("this is not an n-gram model\n", encoding="utf-8")
    with pytest.raises(DecodingError, match=r"cannot read language model .*garbage\.arpa"):
        BeamSearchDecoder(VOCAB, lm_path=garbage, lm_weight=0.5)
    with pytest.raises(DecodingError, match="needs beam search"):
        make_decoder("greedy", VOCAB, lm_path=garbage)
    with pytest.raises(DecodingError, match="unknown decoding method"):
        make_decoder("viterbi", VOCAB)


def test_batches_by_frames_respects_the_budget_and_covers_every_item() -> None:
    lengths = [50, 300, 120, 80, 80, 1000, 10]
    batches = batches_by_frames(lengths, 400)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 400
    assert [5] in batches  # longer than the budget: alone
