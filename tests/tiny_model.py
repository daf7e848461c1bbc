"""A tiny ConformerCTC checkpoint for decode / plot-alignment tests, fitted for a few seconds on the
`tiny_prepared` folder (tests/conftest.py) with plain CTC, saved through
models.engine.checkpoint.save_checkpoint with the folder's vocabulary and CMVN. It does not depend on the
training engine."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from data.store import SplitReader, read_cmvn, read_frontend, read_plm_info, read_vocab
from models.engine.checkpoint import save_checkpoint
from models.nn.encoder import PRESETS, ConformerCTC
from models.tasks.decoding import padded_batch

TINY_GMOT = {"mode": "fgw", "alpha": 0.5, "epsilon": 0.1}


def build_tiny_checkpoint(
    prepared: Path,
    exp_dir: Path,
    steps: int = 60,
    seed: int = 0,
    ctc_from: str = "encoder",
    subsampling: int = 4,
) -> Path:
    """Fit a tiny model (preset `tiny`, with an adapter to the PLM width, its CTC head reading `ctc_from`) on
    prepared/train for `steps` full-batch CTC steps and save it as exp_dir/avg.pt; returns exp_dir."""
    torch.manual_seed(seed)
    lang = prepared / "lang"
    vocab = read_vocab(lang)
    mean, std = (torch.from_numpy(a) for a in read_cmvn(lang))
    plm = read_plm_info(lang)
    cfg = dataclasses.replace(PRESETS["tiny"], ctc_from=ctc_from, subsampling=subsampling)
    model = ConformerCTC(cfg, len(vocab), plm.width if plm else None)
    reader = SplitReader(prepared / "train")
    feats = [reader.features(r) for r in reader.records]
    targets = [torch.tensor(r.token_ids) for r in reader.records]
    x, lengths = padded_batch(feats, mean, std, "cpu")
    ys = torch.cat(targets)
    y_lens = torch.tensor([len(t) for t in targets])
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    ctc = torch.nn.CTCLoss(blank=0, zero_infinity=True)
    model.train()
    for _ in range(steps):
        out = model(x, lengths)
        loss = ctc(out["log_probs"].transpose(0, 1), ys, out["lengths"], y_lens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    state = {
        "model": model.state_dict(),
        "config": {"model": cfg.to_dict(), "gmot": dict(TINY_GMOT)},
        "vocab": vocab,
        "cmvn": {"mean": mean.float(), "std": std.float(), "frontend": read_frontend(lang)},
        "plm": plm.to_json() if plm else None,
        "epoch": 1,
        "step": steps,
    }
    save_checkpoint(exp_dir / "avg.pt", state)
    return exp_dir
