"""recipes/aishell1: the config resolves to the aishell1 preset, the README's commands are the recipe's, and
run.sh runs every stage end to end on a miniature AISHELL-1 tree with a tiny BERT as `bert-base-chinese`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prepare_helpers import write_wav

from models.engine.config import config_to_dict, preset_config, resolve_config

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "aishell1"

# Transcripts as AISHELL-1 writes them (words separated by spaces), over characters the tiny BERT knows.
TEXTS = ["我们 是 学生", "今天 天气 很 好", "老师 喜欢 喝茶", "你 好 朋友"]
TEXTS += ["明天 再见", "他 不 在 家", "爸妈 吃饭 了"]


def _command_lines(text: str, start: re.Pattern[str]) -> list[str]:
    """Shell command lines (continuations joined, whitespace collapsed) whose first word matches `start`."""
    joined = re.sub(r"\\\n\s*", " ", text)
    lines = [" ".join(line.split()) for line in joined.splitlines()]
    return [line for line in lines if start.match(line)]


def _expand(line: str, defaults: dict[str, str]) -> str:
    """Replace "$VAR" / ${VAR} / $VAR by run.sh's default value and drop the double quotes."""
    line = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m.group(1) or m.group(2), m.group(0)), line)
    return line.replace('"', "")


def _pattern(line: str) -> re.Pattern[str]:
    """A run.sh command line (defaults already expanded) as a regex: each variable left (loop variables, NGPU,
    WARMUP) matches one word, the same word at each of its occurrences; the rest matches literally."""
    parts, seen, pos = [], set(), 0
    for m in re.finditer(r"\$\{(\w+)\}|\$(\w+)", line):
        name = m.group(1) or m.group(2)
        parts.append(re.escape(line[pos : m.start()]))
        parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>[^ /]+(?:/[^ /]+)*?)")
        seen.add(name)
        pos = m.end()
    parts.append(re.escape(line[pos:]))
    return re.compile("".join(parts))


def _run_sh_defaults(script: str) -> dict[str, str]:
    """The VAR=${VAR:-default} and plain VAR=value assignments of run.sh, expanded in order; NGPU and WARMUP
    stay variables (the README shows one GPU and torchrun on several)."""
    values: dict[str, str] = {}
    for line in script.splitlines():
        m = re.match(r"^(\w+)=\$\{\1:-([^}]*)\}", line) or re.match(r"^(\w+)=(\S+)\s*$", line)
        if m and m.group(1) not in ("NGPU", "WARMUP"):
            values[m.group(1)] = _expand(m.group(2), values)
    values["DEVICE"] = "cuda"  # the GPU default
    return values


def _docs_page() -> str:
    """docs/aishell1.md, the recipe's page in the documentation (moved there from the top README.md)."""
    return (ROOT / "docs" / "aishell1.md").read_text(encoding="utf-8")


def test_readme_commands_are_the_recipe_commands() -> None:
    script = (RECIPE / "run.sh").read_text(encoding="utf-8")
    readme = (RECIPE / "README.md").read_text(encoding="utf-8")
    defaults = _run_sh_defaults(script)
    assert (defaults["PLM"], defaults["PRESET"], defaults["CONFIG"]) == (
        "bert-base-chinese",
        "aishell1",
        "recipes/aishell1/conf.yaml",
    )
    start = re.compile(r"(gmot|torchrun) ")
    recipe = [_pattern(_expand(line, defaults)) for line in _command_lines(script, start)]
    shown = _command_lines(readme, start)
    for cmd in ("prepare", "pretrain", "distill", "decode", "score", "plot-alignment"):
        assert any(f"gmot {cmd} " in line for line in shown), f"README shows no `gmot {cmd}`"
    for cmd in ("pretrain", "distill"):
        torchrun = f"torchrun --standalone --nproc_per_node 4 -m gmot_cli {cmd} "
        assert any(line.startswith(torchrun) for line in shown), f"README shows no `{torchrun}`"
    missing = [line for line in shown if not any(p.fullmatch(line) for p in recipe)]
    assert not missing, "README commands that run.sh does not run:\n" + "\n".join(missing)
    # and the other way round: every command of run.sh is shown in the README
    unshown = [p.pattern for p in recipe if not any(p.fullmatch(line) for line in shown)]
    assert not unshown, "run.sh commands missing from the README:\n" + "\n".join(unshown)
    # docs/aishell1.md shows a subset of the same commands
    page = _command_lines(_docs_page(), start)
    drifted = [line for line in page if not any(p.fullmatch(line) for p in recipe)]
    assert page and not drifted, "docs/aishell1.md commands that run.sh does not run:\n" + "\n".join(drifted)


def test_conf_yaml_is_the_aishell1_preset() -> None:
    cfg = resolve_config("aishell1", RECIPE / "conf.yaml")
    assert config_to_dict(cfg) == config_to_dict(preset_config("aishell1"))
    model = cfg.model
    assert (model.num_layers, model.d_model, model.ffn_dim, cfg.gmot.mode) == (12, 256, 2048, "fgw")


def _mini_aishell(root: Path) -> Path:
    """data_aishell/wav/{train,dev,test}/S*/*.wav (16 kHz) plus transcript/aishell_transcript_v0.8.txt."""
    base = root / "data_aishell"
    layout = {"train": ["S0002", "S0003"], "dev": ["S0724"], "test": ["S0764"]}
    per_speaker = {"train": 4, "dev": 6, "test": 6}
    lines, k = [], 0
    for split, speakers in layout.items():
        for spk in speakers:
            for j in range(per_speaker[split]):
                uid = f"BAC009{spk}W{j:04d}"
                write_wav(base / "wav" / split / spk / f"{uid}.wav", 0.8 + 0.1 * (j % 3), seed=k)
                lines.append(f"{uid} {TEXTS[k % len(TEXTS)]}")
                k += 1
    (base / "transcript").mkdir(parents=True)
    transcript = base / "transcript" / "aishell_transcript_v0.8.txt"
    transcript.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _fake_hf_home(root: Path) -> Path:
    """A Hugging Face cache holding a tiny random BERT under the hub id `bert-base-chinese`."""
    from tiny_plm import make_tiny_bert_dir

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / "models--bert-base-chinese"
    make_tiny_bert_dir(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return root


@pytest.mark.slow
def test_run_sh_end_to_end_on_a_miniature_aishell1(tmp_path: Path) -> None:
    corpus = _mini_aishell(tmp_path / "aishell")
    hf_home = _fake_hf_home(tmp_path / "hf")
    conf = tmp_path / "tiny.yaml"  # stands in for conf.yaml: the tiny preset with a few recipe-like options
    conf.write_text("train:\n  num_workers: 0\n  average_best: 2\n  keep_last: 2\n  max_utts: 4\n")
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CORPUS": str(corpus),
        "OUT": str(out),
        "JOBS": "1",
        "NGPU": "0",
        "PRESET": "tiny",
        "CONFIG": str(conf),
        "EPOCHS": "1",
        "DISTILL_EPOCHS": "1",
        "BEAM": "4",
        "SPLITS": "test",  # dev runs the same commands; the training stages still score dev every epoch
    }
    assert shutil.which("gmot", path=env["PATH"]) is not None
    res = subprocess.run(
        ["bash", str(RECIPE / "run.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    data = out / "data"
    for split in ("train", "dev", "test"):
        assert (data / split / "manifest.jsonl").is_file(), split
        assert list((data / split / "plm").glob("shard-*.npy")), split
    train_ids = [json.loads(x)["id"] for x in (data / "train" / "manifest.jsonl").read_text().splitlines()]
    dev_ids = [json.loads(x)["id"] for x in (data / "dev" / "manifest.jsonl").read_text().splitlines()]
    originals = [i for i in train_ids if not i.startswith("sp")]
    assert sorted(train_ids) == sorted(originals + [f"sp{f}-{i}" for f in ("0.9", "1.1") for i in originals])
    assert not any(i.startswith("sp") for i in dev_ids)  # speed perturbation (on by default) is train only
    plm_name = (data / "lang" / "plm.json").read_text(encoding="utf-8")
    assert '"bert-base-chinese"' in plm_name  # the teacher came from the (fake) Hugging Face cache
    for exp in (out / "pretrain", out / "gmot_fgw", out / "baseline"):
        assert (exp / "avg.pt").is_file() and list(exp.glob("ckpt-*.pt")) and (exp / "config.yaml").is_file()
    for exp in ("gmot_fgw", "baseline"):  # both start from the averaged pretrain model
        assert "pretrain/avg.pt" in (out / exp / "command.txt").read_text(encoding="utf-8")
    decodes = [out / "baseline" / "decode_test_greedy"]
    decodes += [out / "gmot_fgw" / f"decode_test_{m}" for m in ("greedy", "beam")]
    for dec in decodes:
        ids = [line.split(" ", 1)[0] for line in (dec / "text").read_text(encoding="utf-8").splitlines()]
        assert len(ids) == 6 and all(i.startswith("BAC009S07") for i in ids), dec
        assert re.search(r"%CER [0-9.]+ \[", (dec / "score.txt").read_text(encoding="utf-8")), dec
    plots = list((out / "gmot_fgw" / "alignments").glob("*.png"))
    assert len(plots) == 3 and all(p.stat().st_size > 1000 for p in plots)
    # the final table has a CER for every row the recipe trained and decoded
    table = res.stdout[res.stdout.index("AISHELL-1 CER (%)") :]
    for row in ("baseline, no transfer (1 + 1 ep.), greedy", "GM-OT fgw (1 + 1 ep.), greedy", "beam 4"):
        line = next(x for x in table.splitlines() if row in x)
        assert re.search(r"\s-\s+\d+\.\d+$", line), line  # dev not decoded here: "-"
