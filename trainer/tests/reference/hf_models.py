"""Tiny Hugging Face models and what `transformers` computes with them: the
reference weft's Hugging Face tests compare with (trainer/tests/hf.rs).

    hf_models.py make OUT    writes OUT/<model>/ (config.json, safetensors,
                             reference.safetensors) for every model below
    hf_models.py loss DIR DOCS.json
                             prints the mean next-token loss of the model in
                             DIR over the documents (a JSON list of token
                             lists), each document alone from position 0
    hf_models.py corpus-loss DIR CORPUS [LONGEST]
                             the same over the .txt files of CORPUS, each
                             tokenized with DIR's tokenizer.json, closed by
                             the config's eos_token_id and cut at LONGEST
                             tokens, as weft reads them, and each document's
                             mean loss and tokens ("documents")

    hf_models.py parquet OUT CORPUS
                             writes the .txt documents of CORPUS (in path
                             order) as Parquet with `pyarrow`: OUT/corpus/
                             (column "content"), OUT/codecs/ (the same rows
                             in every codec weft reads), OUT/null/,
                             OUT/brotli/, OUT/number/ (what weft refuses);
                             prints {"texts": [...]}

OUT/llama-tokenized/ also has a tokenizer (BPE, trained here by the
`tokenizers` package on OUT/corpus/, the documents it is tested on) and
OUT/corpus-tokens.txt, the corpus's token count.

Nothing is downloaded: the configs are written here and the weights drawn
from a seeded generator. The loss is weft's: every document predicts its own
next tokens, summed over all documents, divided by the number predicted.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models as token_models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)
DOCUMENTS = [7, 12, 5, 1, 9, 100]
TEXTS = [
    "The quick brown fox jumps over the lazy dog, and the dog does not mind.",
    "Long context training spreads one sequence over many GPUs: ring attention passes keys and values around.",
    "A plan says which rank holds which tokens; every rank computes the same plan.",
    "Tokens, documents and batches.",
    "StreamBP backpropagates a layer in chunks along the sequence, keeping only its inputs.",
]


def train_tokenizer(directory):
    """A small BPE tokenizer trained on TEXTS: <s> opens every document."""
    tokenizer = Tokenizer(token_models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        TEXTS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer.save(str(directory / "tokenizer.json"))
    return tokenizer


def encode(tokenizer, text, end):
    """A document's tokens, as weft reads them: the tokenizer's, then `end`."""
    ids = tokenizer.encode(text).ids
    if end is not None and (not ids or ids[-1] != end):
        ids.append(end)
    return ids


def models():
    """(name, model class, config, whether to write the old rope form)."""
    return [
        ("llama-gqa", LlamaForCausalLM, LlamaConfig(**SHAPE, rope_theta=10000.0), False),
        (
            "llama3-tied",
            LlamaForCausalLM,
            LlamaConfig(
                **SHAPE,
                tie_word_embeddings=True,
                rope_parameters=dict(
                    rope_type="llama3",
                    rope_theta=500000.0,
                    factor=8.0,
                    low_freq_factor=1.0,
                    high_freq_factor=4.0,
                    # Wavelengths on both sides of 128 / 4 and one between
                    # (32.4): every branch of the scaling.
                    original_max_position_embeddings=128,
                ),
            ),
            False,
        ),
        (
            "llama-yarn",
            LlamaForCausalLM,
            LlamaConfig(
                **SHAPE,
                rope_parameters=dict(
                    # A factor other than max_position_embeddings / original.
                    rope_type="yarn",
                    rope_theta=10000.0,
                    factor=2.0,
                    original_max_position_embeddings=32,
                ),
            ),
            False,
        ),
        (
            "llama-yarn-mscale",
            LlamaForCausalLM,
            LlamaConfig(
                **SHAPE,
                rope_parameters=dict(
                    rope_type="yarn",
                    rope_theta=10000.0,
                    factor=8.0,
                    original_max_position_embeddings=16,
                    beta_fast=16.0,
                    beta_slow=2.0,
                    mscale=1.0,
                    mscale_all_dim=0.5,
                    truncate=False,
                ),
            ),
            False,
        ),
        (
            "llama-linear-old-form",
            LlamaForCausalLM,
            LlamaConfig(**SHAPE, rope_parameters=dict(rope_type="linear", rope_theta=20000.0, factor=2.0)),
            True,
        ),
        (
            # Positions past 8 grow the base: documents of 9, 12 and 100
            # tokens each by their own length.
            "llama-dynamic",
            LlamaForCausalLM,
            LlamaConfig(
                **{**SHAPE, "max_position_embeddings": 8},
                rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0),
            ),
            False,
        ),
        (
            "mistral",
            MistralForCausalLM,
            MistralConfig(**SHAPE, sliding_window=None, rope_theta=1000000.0),
            False,
        ),
        (
            "qwen2-bias-tied",
            Qwen2ForCausalLM,
            Qwen2Config(**SHAPE, tie_word_embeddings=True, rope_theta=1000000.0),
            False,
        ),
    ]


def doc_loss(model, docs):
    """weft's loss over `docs`, each document alone from position 0, and the
    logits of every token in order."""
    total, count, logits = 0.0, 0, []
    rotary = model.model.rotary_emb
    for ids in docs:
        if "dynamic" in str(rotary.rope_type):
            # Each document alone: dynamic scaling from its own length, not
            # from the longest document the model saw before it.
            rotary.register_buffer("inv_freq", rotary.original_inv_freq.clone(), persistent=False)
            rotary.max_seq_len_cached = rotary.original_max_seq_len
        ids = torch.tensor(ids, dtype=torch.long)[None]
        positions = torch.arange(ids.shape[1])[None]
        out = model(input_ids=ids, position_ids=positions).logits[0]
        logits.append(out)
        if ids.shape[1] > 1:
            total = total + torch.nn.functional.cross_entropy(out[:-1], ids[0, 1:], reduction="sum")
            count += ids.shape[1] - 1
    return total / count, torch.cat(logits, 0)


def old_rope_form(path):
    """Rewrites config.json in the form older `transformers` wrote:
    `rope_theta` at the top and `rope_scaling` beside it."""
    config = json.loads(path.read_text())
    parameters = config.pop("rope_parameters")
    config["rope_theta"] = parameters.pop("rope_theta")
    parameters["type"] = parameters.pop("rope_type")
    config["rope_scaling"] = parameters
    path.write_text(json.dumps(config, indent=2))


def make_tokenized(out):
    """Three models with their own tokenizer (one trained here), and the
    corpus they are tested on: a Llama (Llama 3 rope, tied embeddings), a
    Llama with dynamic NTK scaling and a Qwen2 (biases, tied embeddings)."""
    corpus = out / "corpus"
    corpus.mkdir(exist_ok=True)
    llama3 = dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=128,
    )
    shape = {**SHAPE, "vocab_size": 128}
    for seed, name, cls, config in [
        (
            99,
            "llama-tokenized",
            LlamaForCausalLM,
            LlamaConfig(**shape, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rope_parameters=llama3),
        ),
        (
            97,
            "llama-dynamic-tokenized",
            LlamaForCausalLM,
            # Dynamic NTK scaling past 16 positions: most documents are longer.
            LlamaConfig(
                **{**shape, "max_position_embeddings": 16},
                bos_token_id=1,
                eos_token_id=2,
                rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=4.0),
            ),
        ),
        (
            98,
            "qwen2-tokenized",
            Qwen2ForCausalLM,
            Qwen2Config(**shape, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rope_theta=1000000.0),
        ),
    ]:
        torch.manual_seed(seed)
        config._attn_implementation = "eager"
        model = cls(config).float()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        directory = out / name
        model.save_pretrained(directory)
        tokenizer = train_tokenizer(directory)
        print(directory)
    total = 0
    for i, text in enumerate(TEXTS):
        (corpus / f"doc{i}.txt").write_text(text)
        total += len(encode(tokenizer, text, 2))
    (out / "corpus-tokens.txt").write_text(str(total))


def make(out):
    out.mkdir(parents=True, exist_ok=True)
    make_tokenized(out)
    for i, (name, cls, config, old_form) in enumerate(models()):
        torch.manual_seed(100 + i)
        config._attn_implementation = "eager"
        model = cls(config).float()
        # Every weight drawn away from its initial value (norms of ones,
        # biases of zeros), so a weight read into the wrong place shows.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        directory = out / name
        # Small shards: the first model is read from several files.
        model.save_pretrained(directory, max_shard_size="40KB" if i == 0 else "50MB")
        if old_form:
            old_rope_form(directory / "config.json")
        generator = torch.Generator().manual_seed(7 + i)
        docs = [torch.randint(0, SHAPE["vocab_size"], (n,), generator=generator).tolist() for n in DOCUMENTS]
        model.zero_grad()
        loss, logits = doc_loss(model, docs)
        loss.backward()
        reference = {
            "tokens": torch.tensor([t for d in docs for t in d], dtype=torch.long),
            "documents": torch.tensor(DOCUMENTS, dtype=torch.long),
            "logits": logits.detach().contiguous(),
            "loss": loss.detach().reshape(1),
        }
        for pname, p in model.named_parameters():
            reference["grad." + pname] = p.grad.detach().contiguous()
        save_file(reference, str(directory / "reference.safetensors"))
        print(directory)


def loss(directory, docs_file):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    docs = json.loads(Path(docs_file).read_text())
    with torch.no_grad():
        value, _ = doc_loss(model, docs)
    print(json.dumps({"loss": value.item()}))


def corpus_loss(directory, corpus, longest=None):
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    end = json.loads((directory / "config.json").read_text()).get("eos_token_id")
    docs = [encode(tokenizer, path.read_text(), end)[:longest] for path in sorted(corpus.glob("*.txt"))]
    with torch.no_grad():
        value, _ = doc_loss(model, docs)
        each = [
            {"loss": doc_loss(model, [d])[0].item() if len(d) > 1 else None, "tokens": len(d)} for d in docs
        ]
    print(json.dumps({"loss": value.item(), "tokens": sum(len(d) for d in docs), "documents": each}))


def parquet(out, corpus):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [path.read_text() for path in sorted(corpus.glob("*.txt"))]
    ids = list(range(len(texts)))

    def write(directory, name, table, **options):
        (out / directory).mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / directory / name, **options)

    # The corpus of the trainer's tests: an id beside the text, small row groups.
    table = pa.table({"id": ids, "content": texts})
    write("corpus", "part-0.parquet", table, compression="snappy", row_group_size=3)
    for codec in ["snappy", "zstd", "gzip", "lz4", "none"]:
        kind = pa.large_string() if codec == "zstd" else pa.string()
        table = pa.table({"content": pa.array(texts, type=kind), "id": ids})
        write("codecs", f"{codec}.parquet", table, compression=codec, row_group_size=2)
    write("null", "with-null.parquet", pa.table({"content": ["one", None, "three"]}))
    write("brotli", "b.parquet", pa.table({"content": texts}), compression="brotli")
    write("number", "n.parquet", pa.table({"content": ids}))
    print(json.dumps({"texts": texts}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["make"] and len(sys.argv) == 3:
        make(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["loss"] and len(sys.argv) == 4:
        loss(Path(sys.argv[2]), sys.argv[3])
    elif sys.argv[1:2] == ["corpus-loss"] and len(sys.argv) in (4, 5):
        corpus_loss(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) == 5 else None)
    elif sys.argv[1:2] == ["parquet"] and len(sys.argv) == 4:
        parquet(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)
