"""The model factory's tokenizer: byte-level BPE trained locally on a synthetic English-like corpus.

No model hub is reachable, so test and demo models need a tokenizer made here. The corpus is
generated in code from a fixed seed (common English function words plus pseudo-words built from
syllables, Zipf-distributed, in sentences with punctuation and numbers), and BPE is trained once
per process on it (`trained_tokenizer_json`, cached). A model's `vocab_size` rarely equals the
trained size: `tokenizer_json(vocab_size)` truncates the vocabulary and merges (a merge's parts
always have lower ids than its result, so cutting at an id keeps the rest consistent) or pads it
with unused pseudo-word tokens that have no merge leading to them, as real checkpoints pad their
vocabularies. Every id below `vocab_size` decodes to text.

Invariants: ids 0..3 are `<unk>`, `<s>`, `</s>`, `<pad>`; encoding prepends `<s>`; the output is
a pure function of `vocab_size` (byte-identical files across runs and processes).
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import random
from typing import Any

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
TRAINED_VOCAB_SIZE = 1000
_CORPUS_SEED = 20240601

# Zephyr / TinyLlama-chat style; the tokenizer itself prepends <s>, so the template does not.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_FUNCTION_WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this "
    "from or had by not word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line"
).split()
_ONSETS = ("", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w")
_ONSETS2 = ("br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "th", "tr", "wh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "y")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck", "rt")
_SUFFIXES = ("", "", "", "", "s", "ed", "ing", "er", "ly", "tion", "ness")


def _syllables() -> list[str]:
    return [o + v + c for o in _ONSETS + _ONSETS2 for v in _VOWELS for c in _CODAS]


def synthetic_corpus(n_sentences: int = 4000, seed: int = _CORPUS_SEED) -> list[str]:
    """Deterministic English-like text: one paragraph of several sentences per item."""
    rng = random.Random(seed)
    syl = _syllables()
    pseudo = sorted({"".join(rng.choices(syl, k=rng.choice((1, 2, 2, 3)))) for _ in range(3000)})
    rng.shuffle(pseudo)
    words = list(_FUNCTION_WORDS) + pseudo
    weights = [1.0 / (rank + 1) ** 1.05 for rank in range(len(words))]  # Zipf-like
    paragraphs: list[str] = []
    sentences: list[str] = []
    for _ in range(n_sentences):
        n = rng.randint(4, 16)
        ws = rng.choices(words, weights=weights, k=n)
        ws = [w + rng.choice(_SUFFIXES) if len(w) > 3 and rng.random() < 0.3 else w for w in ws]
        if rng.random() < 0.15:
            ws.insert(rng.randrange(len(ws)), str(rng.randint(0, 2030)))
        if rng.random() < 0.2:
            ws[rng.randrange(len(ws))] += ","
        text = " ".join(ws)
        text = text[0].upper() + text[1:] + rng.choice((".", ".", ".", "?", "!"))
        if rng.random() < 0.1:
            text = f'"{text}"'
        sentences.append(text)
        if rng.random() < 0.2:
            paragraphs.append(" ".join(sentences))
            sentences = []
    paragraphs.append(" ".join(sentences))
    return paragraphs


@functools.lru_cache(maxsize=1)
def trained_tokenizer_json() -> str:
    """Train byte-level BPE on the synthetic corpus once per process; return tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TRAINED_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(), trainer=trainer)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, BOS_ID)],
            ),
        ]
    )
    for token, want in zip(SPECIAL_TOKENS, (UNK_ID, BOS_ID, EOS_ID, PAD_ID), strict=True):
        assert tok.token_to_id(token) == want, (token, tok.token_to_id(token))
    return tok.to_str()


def _filler_tokens(count: int, taken: set[str]) -> list[str]:
    """`count` unused word-like tokens in byte-level form ("Ġ" marks a leading space)."""
    syl = sorted({o + v for o in _ONSETS + _ONSETS2 for v in _VOWELS} - {""})
    out: list[str] = []
    for k in itertools.count(2):
        for combo in itertools.product(syl, repeat=k):
            token = "\u0120" + "".join(combo)
            if token not in taken:
                out.append(token)
                if len(out) == count:
                    return out
    raise AssertionError("unreachable")


def tokenizer_json(vocab_size: int) -> str:
    """tokenizer.json text whose vocabulary holds exactly ids 0..vocab_size-1."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={vocab_size} is below the byte-level minimum of 260")
    data: dict[str, Any] = copy.deepcopy(json.loads(trained_tokenizer_json()))
    vocab: dict[str, int] = data["model"]["vocab"]
    if vocab_size <= len(vocab):
        kept = {t: i for t, i in vocab.items() if i < vocab_size}
        merges = []
        for m in data["model"]["merges"]:
            a, b = m if isinstance(m, list) else m.split(" ", 1)
            if a + b in kept:
                merges.append(m)
        data["model"]["vocab"] = kept
        data["model"]["merges"] = merges
    else:
        start = len(vocab)
        for i, token in enumerate(_filler_tokens(vocab_size - start, set(vocab))):
            vocab[token] = start + i
    return json.dumps(data, ensure_ascii=False, indent=1)


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json contents for `PreTrainedTokenizerFast`."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": PAD,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }


def special_tokens_map() -> dict[str, str]:
    return {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
