"""weft against transformers on a Hugging Face model, side by side in one run
(trainer/bench/hf runs this with the reference environment):

- loading a sharded checkpoint: seconds and peak memory, weft (`weft-trainer
  bench hf-load`) and `transformers` (`from_pretrained`);
- the tokenizer: tokens per second on one thread, the model's (weft reads it
  with the `tokenizers` crate) and weft's byte tokenizer, over the same text;
- training: tokens per second and peak memory of the same steps on one rank,
  the same batch sizes and threads, weft (`weft-trainer local --ranks 1`)
  against `transformers` with PyTorch eager (forward, backward, AdamW).

    hf.py OUT WEFT_TRAINER CORPUS_JSONL [--layers N] [--hidden N] [--steps N]
          [--tokens-per-step N] [--max-seq-len N] [--threads N]

Prints a JSON report on standard output.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM


def texts_of(corpus):
    return [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]


def make(out, texts, args):
    """A Llama-shaped model with a BPE tokenizer trained on the corpus,
    saved in shards."""
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=8192,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer.save(str(out / "tokenizer.json"))
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        vocab_size=tokenizer.get_vocab_size(),
        max_position_embeddings=max(4096, args.max_seq_len),
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).float()
    model.save_pretrained(out, max_shard_size="200MB")
    return tokenizer


def peak_gib_of_children():
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def transformers_load(directory):
    code = f"""
import json, time, torch
from transformers import AutoModelForCausalLM
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
# The peak from here on: what loading adds.
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
started = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained({str(directory)!r}, dtype=torch.float32)
print(json.dumps({{"load_s": time.perf_counter() - started,
                  "load_peak_gib": (status("VmHWM") - before) / 2**30}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def batches(docs, tokens_per_step, max_seq_len, steps):
    """Whole documents in corpus order (cut at max_seq_len), up to the step's
    tokens, as many steps as asked (round the corpus again when it ends)."""
    out, i = [], 0
    for _ in range(steps):
        batch, used = [], 0
        while True:
            doc = docs[i % len(docs)][:max_seq_len]
            if batch and used + len(doc) > tokens_per_step:
                break
            batch.append(doc[:tokens_per_step])
            used += len(batch[-1])
            i += 1
            if used >= tokens_per_step:
                break
        out.append(batch)
    return out


def transformers_train(directory, docs, args):
    """The steps, each document its own batch of one (transformers' way to keep
    documents apart on CPU without a packed-attention kernel)."""
    code = f"""
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads({args.threads})
model = AutoModelForCausalLM.from_pretrained({str(directory)!r}, dtype=torch.float32, attn_implementation="sdpa")
model.train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
batches = json.loads(sys.stdin.read())
times, tokens = [], []
for batch in batches:
    started = time.perf_counter()
    count = sum(len(d) - 1 for d in batch if len(d) > 1)
    for doc in batch:
        if len(doc) < 2:
            continue
        ids = torch.tensor(doc)[None]
        logits = model(input_ids=ids, position_ids=torch.arange(len(doc))[None]).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum") / count
        loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    times.append(time.perf_counter() - started)
    tokens.append(sum(len(d) for d in batch))
print(json.dumps({{"step_s": times, "tokens": tokens,
                  "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""
    plan = batches(docs, args.tokens_per_step, args.max_seq_len, args.steps)
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(plan), capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def weft_train(trainer, directory, data, args, out):
    metrics = out / "weft-metrics.jsonl"
    metrics.unlink(missing_ok=True)
    command = [
        "/usr/bin/time", "-f", "%M",
        str(trainer), "local", "--ranks", "1", "--model", str(directory), "--data", str(data),
        "--steps", str(args.steps), "--tokens-per-step", str(args.tokens_per_step),
        "--max-seq-len", str(args.max_seq_len), "--metrics", str(metrics),
    ]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"weft-trainer local failed: {run.stderr}")
    peak_kib = int(run.stderr.strip().splitlines()[-1])
    steps = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {
        "step_s": [m["step_time_s"] for m in steps],
        "tokens": [m["tokens"] for m in steps],
        "peak_gib": peak_kib / 2**20,
    }


def rate(run):
    """Tokens per second over the steps after the first (warm-up)."""
    steps = list(zip(run["tokens"], run["step_s"]))[1:] or list(zip(run["tokens"], run["step_s"]))
    return sum(t for t, _ in steps) / sum(s for _, s in steps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("trainer", type=Path)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tokens-per-step", type=int, default=1024)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    texts = texts_of(args.corpus)
    directory = args.out / "model"
    tokenizer = make(directory, texts, args)
    # Documents longer than a step, so that every step of both sides is one
    # document cut at --max-seq-len: the same shape of work, whatever order
    # each draws them in.
    pieces, piece = [], []
    for text in texts:
        piece.append(text)
        if len(tokenizer.encode("\n\n".join(piece)).ids) > args.max_seq_len:
            pieces.append("\n\n".join(piece))
            piece = []
    data = args.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "corpus.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in pieces))
    docs = [tokenizer.encode(p).ids + [2] for p in pieces]

    load = json.loads(
        subprocess.run(
            [str(args.trainer), "bench", "hf-load", "--model", str(directory), "--data", str(data)],
            capture_output=True, text=True, check=True,
        ).stdout
    )
    reference_load = transformers_load(directory)
    weft = weft_train(args.trainer, directory, data, args, args.out)
    reference = transformers_train(directory, docs, args)
    print(json.dumps({
        "config": vars(args) | {"out": str(args.out), "trainer": str(args.trainer), "corpus": str(args.corpus)},
        "params": load["params"],
        "weights_gib": load["weights_gib"],
        "shards": len(list(directory.glob("model-*.safetensors"))),
        "documents": len(pieces),
        "load": {"weft": {k: load[k] for k in ("load_s", "load_peak_gib")}, "transformers": reference_load},
        "tokenizers": load["tokenizers"],
        "corpus_bytes": load["corpus_bytes"],
        "train": {
            "weft": weft | {"tokens_per_s": rate(weft)},
            "transformers": reference | {"tokens_per_s": rate(reference)},
        },
    }, indent=2))


if __name__ == "__main__":
    main()
