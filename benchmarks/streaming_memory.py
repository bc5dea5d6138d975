"""Peak memory of `ressvd compress` with layer streaming: bounded by one layer, not by the model.

Writes synthetic Llama checkpoints (random weights, one safetensors shard per decoder layer plus
an index, a small byte-level BPE tokenizer) of one width and two depths (DEPTH and FACTOR x DEPTH
layers), compresses each with the same settings in a fresh process, and reports that process's
peak RSS (os.wait4's ru_maxrss of the child alone) next to the size of the model on disk. A
whole-model run (--no-stream) of the deep model is the contrast.

    python benchmarks/streaming_memory.py --hidden 1024 --intermediate 2816 --layers 4 --factor 4
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 +
        "Low-rank factors make weight matrices smaller; calibration data makes them accurate. " * 3)


def build_tokenizer(vocab: int):
    """A byte-level BPE trained in memory on TEXT (also the tests' tiny tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 4, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def write_tokenizer(path: Path, vocab: int) -> None:
    build_tokenizer(vocab).save_pretrained(path)


def write_synthetic_llama(path: str | Path, layers: int, hidden: int, intermediate: int, heads: int = 8,
                          kv_heads: int = 4, vocab: int = 320, seed: int = 0) -> int:
    """A random float32 Llama checkpoint written tensor by tensor (never whole in memory);
    returns its safetensors bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, tie_word_embeddings=False, dtype="float32")
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    names = {name: tuple(p.shape) for name, p in skeleton.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)

    def tensor(name, shape):
        if len(shape) == 1:
            return torch.ones(shape)
        t = torch.randn(shape, generator=generator) / shape[1] ** 0.5
        if "embed" not in name:
            t *= torch.linspace(0.2, 3.0, shape[1])  # unequal column norms: truncation has something to choose
        return t

    shards: dict[str, list[str]] = {}
    for name in names:
        key = f"layer-{int(name.split('.')[2]):05d}" if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, []).append(name)
    weight_map, total = {}, 0
    for k, (key, members) in enumerate(sorted(shards.items())):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: tensor(n, names[n]) for n in members}
        save_file(tensors, str(path / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: file for n in members})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(path)
    write_tokenizer(path, vocab)
    (path / "corpus.txt").write_text((TEXT + "\n") * 200)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def peak_rss(argv: list[str], env: dict | None = None) -> tuple[int, int, float]:
    """(return code, peak RSS in bytes of that process alone, seconds)."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.stderr.write(process.stderr.read().decode()[-3000:])
    process.stderr.close()
    return process.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start


def compress_argv(model: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "ressvd.cli", "compress", str(model), "--calib", str(model / "corpus.txt"),
            "--out", str(out), "--device", "cpu", "--profile", "none", *extra]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4, help="layers of the shallow model")
    parser.add_argument("--factor", type=int, default=4, help="the deep model has FACTOR x LAYERS layers")
    parser.add_argument("--method", default="svd-llm")
    parser.add_argument("--ratio", default="0.4")
    parser.add_argument("--nsamples", default="8")
    parser.add_argument("--seqlen", default="128")
    parser.add_argument("--extra", default="", help="more compress arguments, space separated")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole-model contrast run")
    parser.add_argument("--workdir", default=None, help="where to write the models (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the compress processes")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}

    settings = ["--method", args.method, "--ratio", args.ratio, "--nsamples", args.nsamples, "--seqlen", args.seqlen,
                *args.extra.split()]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        for label, layers, extra in [("shallow", args.layers, []), ("deep", args.layers * args.factor, []),
                                     ("deep, --no-stream", args.layers * args.factor, ["--no-stream"])]:
            if extra and args.no_whole:
                continue
            model = tmp / f"llama-{layers}"
            if not model.exists():
                disk = write_synthetic_llama(model, layers, args.hidden, args.intermediate)
            disk = sum(f.stat().st_size for f in model.glob("*.safetensors"))
            out = tmp / f"out-{label.replace(' ', '').replace(',', '-')}"
            code, rss, seconds = peak_rss(compress_argv(model, out, [*settings, *extra]), env)
            if code != 0:
                print(f"{label}: compress failed ({code})", file=sys.stderr)
                return 1
            report = json.loads((out / "ressvd_report.json").read_text())
            rows.append({"model": label, "layers": layers, "disk_bytes": disk, "peak_rss_bytes": rss,
                         "seconds": seconds, "loading": report["loading"],
                         "achieved_ratio": report["achieved_ratio"]["decoder_linears"]})
            print(f"{label:>18s}: {layers:3d} layers, {disk / 2**20:8.1f} MiB on disk, peak RSS "
                  f"{rss / 2**20:8.1f} MiB, {seconds:6.1f} s ({report['loading']})", flush=True)
            import shutil
            shutil.rmtree(out, ignore_errors=True)

    shallow, deep = rows[0], rows[1]
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print(f"settings: {' '.join(settings)}; hidden {args.hidden}, intermediate {args.intermediate}, float32")
    print("| model | layers | safetensors on disk | peak RSS | RSS / disk | seconds | loading |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['layers']} | {r['disk_bytes'] / 2**20:.0f} MiB | {r['peak_rss_bytes'] / 2**20:.0f} MiB"
              f" | {r['peak_rss_bytes'] / r['disk_bytes']:.2f} | {r['seconds']:.0f} | {r['loading']} |")
    print(f"deep/shallow: disk x{deep['disk_bytes'] / shallow['disk_bytes']:.2f}, "
          f"peak RSS x{deep['peak_rss_bytes'] / shallow['peak_rss_bytes']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": settings, "hidden": args.hidden,
                                               "intermediate": args.intermediate, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
