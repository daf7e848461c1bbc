r"""Which layer of the teacher carries the spoken sentence rather than "a sentence"?

    python recipes/transfer_study/teacher_layers.py DATA [--plm e5-small] [--sentences 1000] [--seed 0] \
        [--layers 0,1,...] [--json OUT.json] [--threads 1]

DATA is a prepared folder (its train/manifest.jsonl gives the transcripts). The attribution study found
that another sentence's teacher features (`gmot.teacher=shuffle`) gain as much as the utterance's own, at
the last layer of e5-small. Before training a model on another layer, this script measures, layer by layer,
how different the real target is from the shuffle control's, in the form the transfer sees it: each
layer's features standardised per dimension over the sample (as `gmot.standardise` does with plm.json's
statistics) and centred per sentence (`gmot.centre`).

For a sample of distinct training sentences (seeded), each paired with another sentence of the same token
count (data.teacher_controls.shuffle_sources, the control's own rule; the few whose count no other sentence
has are left out of the two shuffle columns), it reports per layer:

- distance: mean pairwise cosine distance between the standardised (not centred) tokens of one sentence;
  small when the layer says "this sentence" more than "this token";
- token_r2: share of the centred features' variance explained by the token's identity (pieces seen at
  least twice in the sample); high when a token means the same wherever it occurs;
- position_r2: share explained by the token's position and the sentence's token count alone (what any
  sentence of that length has in common, which the shuffle control keeps);
- shuffle_cos: mean cosine, position by position, between a sentence's centred tokens and its shuffle
  partner's: what the Wasserstein term under the temporal-order prior cannot tell apart (1 = the control
  is the real target);
- gw_corr: mean correlation between the sentence's and its partner's token-token cosine-distance
  matrices (sentences of 3+ tokens): what the Gromov term cannot tell apart.

A layer where the knowledge could matter has a low shuffle_cos and gw_corr (the control differs from the
real target) and a token_r2 above position_r2. Output: a markdown table on stdout, the same numbers as JSON
with `--json` (written atomically).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data.store import StoreError, read_manifest, write_text_atomic  # noqa: E402
from data.teacher_controls import shuffle_sources  # noqa: E402


@dataclass
class LayerStats:
    """The numbers of one layer (see the module docstring)."""

    layer: int
    distance: float
    token_r2: float
    position_r2: float
    shuffle_cos: float
    gw_corr: float


def read_sentences(data: Path, limit: int, seed: int) -> list[str]:
    """Distinct transcripts of DATA/train/manifest.jsonl in first-seen order, a seeded sample of `limit`
    (all when limit <= 0 or there are fewer). Raises data.store.StoreError naming the manifest (and line)."""
    texts = list(dict.fromkeys(entry.text for entry in read_manifest(data / "train")))
    if 0 < limit < len(texts):
        pick = np.random.default_rng(seed).choice(len(texts), size=limit, replace=False)
        texts = [texts[i] for i in sorted(pick)]
    return texts


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _cos_dist(x: np.ndarray) -> np.ndarray:
    u = _unit(x)
    return 1.0 - u @ u.T


def _r2(rows: np.ndarray, groups: list, min_count: int = 2) -> float:
    """Share of the variance of `rows` (K, D) explained by the group means, over groups with at least
    `min_count` rows (the others would explain themselves perfectly)."""
    index: dict = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    keep = [ix for ix in index.values() if len(ix) >= min_count]
    if not keep:
        return float("nan")
    sel = np.concatenate(keep)
    x = rows[sel]
    total = float(((x - x.mean(0)) ** 2).sum())
    within = sum(float(((rows[ix] - rows[ix].mean(0)) ** 2).sum()) for ix in keep)
    return 1.0 - within / total if total > 0 else float("nan")


def layer_stats(
    layer: int, tokens: list[list[str]], feats: list[np.ndarray], partner: list[int]
) -> LayerStats:
    """The statistics of one layer. tokens[i] (M_i strings) and feats[i] (M_i, D) per sentence; partner[i]
    the index of the sentence whose features the shuffle control gives sentence i (same M)."""
    flat = np.concatenate(feats)
    mean, std = flat.mean(0), np.maximum(flat.std(0), 1e-5)
    std_feats = [(f - mean) / std for f in feats]
    centred = [f - f.mean(0, keepdims=True) for f in std_feats]

    distances = [_cos_dist(f)[np.triu_indices(len(f), 1)].mean() for f in std_feats if len(f) >= 2]
    rows = np.concatenate(centred)
    pieces = [t for ts in tokens for t in ts]
    positions = [(len(ts), j) for ts in tokens for j in range(len(ts))]

    shuffle_cos, gw_corr = [], []
    for i, j in enumerate(partner):
        a, b = centred[i], centred[j]
        if len(a) < 2 or len(a) != len(b):  # one token centres to zero; a lonely count borrows another's
            continue
        shuffle_cos.append(float((_unit(a) * _unit(b)).sum(-1).mean()))
        if len(a) >= 3:
            iu = np.triu_indices(len(a), 1)
            da, db = _cos_dist(a)[iu], _cos_dist(b)[iu]
            if da.std() > 0 and db.std() > 0:
                gw_corr.append(float(np.corrcoef(da, db)[0, 1]))
    return LayerStats(
        layer=layer,
        distance=float(np.mean(distances)),
        token_r2=_r2(rows, pieces),
        position_r2=_r2(rows, positions),
        shuffle_cos=float(np.mean(shuffle_cos)) if shuffle_cos else float("nan"),
        gw_corr=float(np.mean(gw_corr)) if gw_corr else float("nan"),
    )


def measure(texts: list[str], teacher, layers: list[int], seed: int) -> list[LayerStats]:
    """Encode `texts` with `teacher` (models.nn.plm.PLMTeacher) at each of `layers` and return their
    statistics. The shuffle partners come from the first layer's token counts (the same at every layer)."""
    stats: list[LayerStats] = []
    partner: list[int] | None = None
    for layer in layers:
        teacher.layer = layer
        encoded = teacher.encode(texts)
        tokens = [t for t, _ in encoded]
        feats = [f for _, f in encoded]
        if partner is None:
            partner = shuffle_sources(texts, [len(t) for t in tokens], seed).source
        stats.append(layer_stats(layer, tokens, feats, partner))
    return stats


def markdown(stats: list[LayerStats], name: str, n: int) -> str:
    """The table printed on stdout."""
    lines = [
        f"{name}, {n} training sentences (standardised over the sample, centred per sentence):",
        "",
        "| layer | distance | token_r2 | position_r2 | shuffle_cos | gw_corr |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stats:
        lines.append(
            f"| {s.layer} | {s.distance:.3f} | {s.token_r2:.3f} | {s.position_r2:.3f} "
            f"| {s.shuffle_cos:+.3f} | {s.gw_corr:+.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("data", type=Path, help="a folder made by gmot prepare")
    p.add_argument("--plm", default=None, help="teacher spec as for gmot prepare --plm (default e5-small)")
    p.add_argument(
        "--sentences", type=int, default=1000, help="distinct training sentences to sample (0 = all)"
    )
    p.add_argument("--seed", type=int, default=0, help="sample and shuffle-partner seed")
    p.add_argument("--layers", default="", help="comma-separated hidden-state indices (default: every one)")
    p.add_argument("--json", type=Path, help="write the numbers here too")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)

    import torch

    from models.nn.plm import PLMError, load_teacher

    torch.set_num_threads(args.threads)
    try:
        texts = read_sentences(args.data, args.sentences, args.seed)
        teacher = load_teacher(args.plm, -1)
    except (StoreError, PLMError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        layers = [int(x) for x in args.layers.split(",") if x.strip()] or list(range(teacher.num_layers + 1))
    except ValueError:
        print(f"error: --layers wants comma-separated integers, got {args.layers!r}", file=sys.stderr)
        return 2
    if len(texts) < 2:
        print(f"error: {args.data} has fewer than two distinct training sentences", file=sys.stderr)
        return 2
    stats = measure(texts, teacher, layers, args.seed)
    print(markdown(stats, teacher.name, len(texts)))
    if args.json:
        payload = {
            "data": str(args.data),
            "teacher": teacher.name,
            "sentences": len(texts),
            "seed": args.seed,
        }
        payload["layers"] = [asdict(s) for s in stats]
        write_text_atomic(args.json, json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
