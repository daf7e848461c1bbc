"""A tiny randomly initialised BERT teacher for tests (no downloaded weights).

`make_tiny_bert_dir(path)` writes a standard Hugging Face model folder (config.json, weights, fast tokenizer)
that `models.nn.plm.load_teacher(str(path))` loads like any real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

# A few hundred frequent CJK characters (U+4E00 .. U+4FFF covers most of the HSK 1 inventory we need in tests)
# plus the characters of the sentences other tests use, Latin letters and digits.
_EXTRA = "我你他她们是的了不在有这个人大小中国学生老师喜欢吃饭喝茶水今天明天好很多少谢再见朋友家爸妈吗呢吧"
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _characters() -> list[str]:
    """The tokenizer's character vocabulary (without specials), deterministic order."""
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 300)]
    chars += list(_EXTRA)
    chars += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    chars += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    chars += [str(d) for d in range(10)]
    seen: set[str] = set()
    out = []
    for ch in chars:
        if ch not in seen:
            seen.add(ch)
            out.append(ch)
    return out


def make_tiny_bert_dir(path: Path, width: int = 16) -> Path:
    """Save a tiny BertModel (2 layers, `width` hidden units, 2 heads) and a character-level fast tokenizer.

    Every character of the input becomes one token ([UNK] if outside the vocabulary); whitespace separates
    nothing extra. The tokenizer wraps each text as [CLS] ... [SEP]. Returns `path` (created if needed).
    """
    import torch
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab_list = _SPECIALS + _characters()
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split("", behavior="isolated")]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    fast.save_pretrained(str(path))

    config = BertConfig(
        vocab_size=len(vocab_list),
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * width,
        max_position_embeddings=128,
        pad_token_id=vocab["[PAD]"],
    )
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False)
    model.eval()
    model.save_pretrained(str(path))
    return path
