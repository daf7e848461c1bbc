"""A character n-gram LM of the training transcripts, written as an ARPA file for `gmot decode --lm`.

Interpolated Kneser-Ney (one discount per order, D = n1 / (n1 + 2 n2) of that order's counts): the highest
order uses raw counts, lower orders use continuation counts (how many distinct characters precede an n-gram),
except n-grams that start with <s>, which keep raw counts. The interpolated model is stored in backoff form,
which is what ARPA readers (KenLM, flashlight) expect: each listed n-gram carries its interpolated log10
probability and, when it is the context of a longer n-gram, the log10 weight given to the shorter history.
Unigrams interpolate with the uniform distribution over the characters, </s> and <unk>.

Words are characters: the decoder scores each CTC unit as one LM word, so the ARPA vocabulary is the training
character set.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from data.store import write_text_atomic

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
Gram = tuple[str, ...]


def count_ngrams(sentences: Iterable[Sequence[str]], order: int) -> list[Counter[Gram]]:
    """Raw n-gram counts of `sentences` (each a sequence of units) padded with <s> and </s>.

    Returns a list of `order` Counters; element n-1 counts the n-grams.
    """
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    counts: list[Counter[Gram]] = [Counter() for _ in range(order)]
    for sent in sentences:
        units = [BOS, *sent, EOS]
        for n in range(1, order + 1):
            c = counts[n - 1]
            for i in range(len(units) - n + 1):
                c[tuple(units[i : i + n])] += 1
    return counts


def _adjusted_counts(raw: list[Counter[Gram]]) -> list[Counter[Gram]]:
    """Kneser-Ney counts: raw for the top order and n-grams starting with <s>, continuation counts else."""
    order = len(raw)
    adjusted: list[Counter[Gram]] = [Counter() for _ in range(order)]
    adjusted[order - 1] = Counter(raw[order - 1])
    for n in range(order - 1, 0, -1):  # n-gram length n, continuation counts from the (n+1)-grams
        cont: Counter[Gram] = Counter()
        for gram in raw[n]:
            cont[gram[1:]] += 1
        table = adjusted[n - 1]
        for gram, c in raw[n - 1].items():
            if gram[0] == BOS:
                table[gram] = c
            elif gram in cont:
                table[gram] = cont[gram]
    adjusted[0].pop((BOS,), None)  # <s> is never predicted
    return adjusted


def _discount(counts: Counter[Gram]) -> float:
    n1 = sum(1 for c in counts.values() if c == 1)
    n2 = sum(1 for c in counts.values() if c == 2)
    if n1 == 0 or n2 == 0:
        return 0.5
    return min(max(n1 / (n1 + 2 * n2), 0.1), 0.9)


def kneser_ney(
    sentences: Iterable[Sequence[str]], order: int = 3
) -> tuple[list[dict[Gram, float]], list[dict[Gram, float]]]:
    """Estimate an interpolated Kneser-Ney model.

    Returns (probs, backoffs): per order n (index n-1), natural-log probabilities of the listed n-grams, and
    natural-log backoff weights of the n-grams that are contexts of longer ones. The unigram table holds
    every seen unit, </s>, <unk>, and <s> (probability 0, listed as -99 in ARPA, for its backoff).
    """
    raw = count_ngrams(sentences, order)
    adjusted = _adjusted_counts(raw)
    vocab = {g[0] for g in raw[0]} - {BOS}
    vocab |= {EOS, UNK}
    probs: list[dict[Gram, float]] = [{} for _ in range(order)]
    backoffs: list[dict[Gram, float]] = [{} for _ in range(order)]
    for n in range(1, order + 1):
        table = adjusted[n - 1]
        d = _discount(table)
        totals: defaultdict[Gram, float] = defaultdict(float)
        types: Counter[Gram] = Counter()
        for gram, c in table.items():
            totals[gram[:-1]] += c
            types[gram[:-1]] += 1
        gamma = {h: d * types[h] / totals[h] for h in totals}
        grams = list(table) if n > 1 else [(w,) for w in sorted(vocab)]
        for gram in grams:
            h = gram[:-1]
            c = table.get(gram, 0)
            lower = 1.0 / len(vocab) if n == 1 else math.exp(_lookup(probs, backoffs, gram[1:]))
            p = max(c - d, 0.0) / totals[h] + gamma[h] * lower
            probs[n - 1][gram] = math.log(p)
        if n > 1:
            for h, g in gamma.items():
                backoffs[n - 2][h] = math.log(g)
    probs[0][(BOS,)] = -math.inf
    return probs, backoffs


def _lookup(probs: list[dict[Gram, float]], backoffs: list[dict[Gram, float]], gram: Gram) -> float:
    """Natural-log probability of the last unit of `gram` given the rest, backing off as ARPA does."""
    n = len(gram)
    if gram in probs[n - 1]:
        return probs[n - 1][gram]
    if n == 1:
        return probs[0][(UNK,)]
    return backoffs[n - 2].get(gram[:-1], 0.0) + _lookup(probs, backoffs, gram[1:])


def log_prob(
    probs: list[dict[Gram, float]], backoffs: list[dict[Gram, float]], history: Gram, unit: str
) -> float:
    """Natural-log P(unit | history) under a `kneser_ney` model (history cut to the model order)."""
    order = len(probs)
    h = history[-(order - 1) :] if order > 1 else ()
    if (unit,) not in probs[0]:
        unit = UNK
    return _lookup(probs, backoffs, (*h, unit))


def write_arpa(path: Path, probs: list[dict[Gram, float]], backoffs: list[dict[Gram, float]]) -> None:
    """Write the model in ARPA format (log10 values) to `path` atomically (a temp file, then a rename)."""
    log10e = 1.0 / math.log(10.0)
    lines = ["", "\\data\\"]
    lines += [f"ngram {n + 1}={len(table)}" for n, table in enumerate(probs)]
    for n, table in enumerate(probs):
        lines += ["", f"\\{n + 1}-grams:"]
        for gram in sorted(table):
            lp = table[gram]
            lp10 = -99.0 if lp == -math.inf else lp * log10e
            entry = f"{lp10:.6f}\t{' '.join(gram)}"
            if n + 1 < len(probs) and gram in backoffs[n]:
                entry += f"\t{backoffs[n][gram] * log10e:.6f}"
            lines.append(entry)
    lines += ["", "\\end\\", ""]
    write_text_atomic(path, "\n".join(lines))


LM_FILE_GLOB = "char_*gram.arpa"  # every lm_file_name(order)


def lm_file_name(order: int) -> str:
    """File name of the character `order`-gram that `gmot prepare` writes into the lang folder."""
    return f"char_{order}gram.arpa"


def train_char_lm(texts: Iterable[str], path: Path, order: int = 3) -> int:
    """Estimate a character `order`-gram on `texts` (one transcript each) and write it to `path` as ARPA.

    Returns the number of listed n-grams. Whitespace inside a transcript is dropped (units are characters),
    and each distinct transcript counts once: a sentence read by several speakers is one sentence.
    """
    unique = dict.fromkeys("".join(ch for ch in text if not ch.isspace()) for text in texts)
    sentences = [list(s) for s in unique if s]
    if not sentences:
        raise ValueError("no non-empty transcripts to estimate a language model from")
    probs, backoffs = kneser_ney(sentences, order)
    write_arpa(path, probs, backoffs)
    return sum(len(t) for t in probs)
