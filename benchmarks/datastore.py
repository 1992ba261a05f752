"""Datastore benchmark: build throughput of the caption encoders, and per index type the build time, search
latency, recall@4 against exact search and peak memory at 100k and 1M captions.

    PYTHONPATH=src python benchmarks/datastore.py            # writes benchmarks/results/datastore.{json,md}

Index measurements use synthetic 512-d caption embeddings with the structure of real ones (see `synthesize`),
because no real CLIP weights are available offline and embedding 1M captions on CPU would take hours. Each
index is built in its own process and searched from another one that opens the datastore memory-mapped, as
a user would, so peak memory (ru_maxrss) is per step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMALLCAP_SHARED", ROOT.parent / "shared"))
COCO_VAL_CAPTIONS = SHARED / "data" / "coco" / "captions_val2017.json"
GPT2_TOKENIZER_DIR = SHARED / "data" / "tokenizers" / "gpt2"
CLIP_TOKENIZER_DIR = SHARED / "data" / "tokenizers" / "clip"
RESULTS = ROOT / "benchmarks" / "results"
DIM, K, QUERIES, SINGLE_QUERIES = 512, 4, 1000, 30
# Spreads of the synthetic data, relative to a topic centre's: images within a topic, captions of one image,
# and the query offset (modality gap). Chosen for mean cosines near CLIP text embeddings' (see synthesize).
IMAGE_SPREAD, CAPTION_SPREAD, GAP = 0.8, 0.55, 0.8


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would include the parent's peak, kept over exec)."""
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM")) / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ---------------------------------------------------------------- synthetic caption embeddings
def synthesize(path: Path, n: int, queries_path: Path, seed: int = 0) -> dict:
    """Write n unit-length 512-d "caption embeddings" and QUERIES "image embeddings" with real structure.

    Real CLIP caption embeddings are (1) anisotropic: a few directions carry most variance, all vectors share
    a common mean direction (pairwise cosines are mostly positive); (2) clustered at two levels: captions of
    one image are near-duplicates, and images fall into topics (many "a man riding a wave on a surfboard").
    So: a power-law spectrum (variance of direction j ~ 1/(j+1)) in a random rotation, plus a mean direction;
    n/200 topics, 40 images per topic, 5 captions per image, each level a Gaussian perturbation of the one
    above. Queries are new images of existing topics, shifted by a fixed "modality gap" vector as CLIP image
    embeddings are relative to text ones, so they are not copies of stored vectors.
    """
    rng = np.random.default_rng(seed)
    scale = ((1.0 / np.arange(1, DIM + 1)) ** 0.5).astype(np.float32)
    rotation = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)
    mean = rng.standard_normal(DIM).astype(np.float32)
    mean *= 1.2 * np.linalg.norm(scale) / np.linalg.norm(mean)
    topics = max(1, n // 200)
    topic_centres = rng.standard_normal((topics, DIM), dtype=np.float32) * scale
    gap = rng.standard_normal(DIM, dtype=np.float32) * scale * GAP

    def embed(spectral: np.ndarray) -> np.ndarray:
        vectors = spectral @ rotation.T + mean
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, DIM))
    chunk = 100_000  # a multiple of 200 captions (= 40 images x 5) so topics stay whole within a chunk
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        image = rows // 5
        topic = (image // 40) % topics
        image_offset = rng.standard_normal((len(rows) // 5 + 1, DIM), dtype=np.float32) * scale * IMAGE_SPREAD
        noise = rng.standard_normal((len(rows), DIM), dtype=np.float32) * scale * CAPTION_SPREAD
        out[rows] = embed(topic_centres[topic] + image_offset[image - image[0]] + noise)
    out.flush()
    query_topics = rng.integers(0, topics, QUERIES)
    queries = embed(topic_centres[query_topics] + rng.standard_normal((QUERIES, DIM), dtype=np.float32) * scale
                    * IMAGE_SPREAD + gap)
    np.save(queries_path, queries)
    sample = np.asarray(out[:20_000])
    store = np.asarray(out[:min(n, 200_000)])
    # Only queries whose topic lies inside that prefix of the store (rows 200t..200t+199 are topic t).
    return structure_stats(sample, queries[query_topics < len(store) // 200], store)


def structure_stats(sample: np.ndarray, queries: np.ndarray, store: np.ndarray) -> dict:
    """Mean cosines that characterise the data: same image, same topic, unrelated; and query to its best match
    (a query is a new image of a stored topic, so its best match is a caption of another image of that topic)."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, len(sample), 5000)
    b = rng.integers(0, len(sample), 5000)
    same_image = (sample[0:5000:5] * sample[1:5000:5]).sum(1).mean()
    same_topic = (sample[0:20000:200][:, None, :] * sample[5:20000:200][:, None, :]).sum(-1).mean()
    best = (queries[:200] @ store.T).max(1).mean()
    return {"cos_same_image": round(float(same_image), 3), "cos_same_topic": round(float(same_topic), 3),
            "cos_random_pair": round(float((sample[a] * sample[b]).sum(1).mean()), 3),
            "cos_query_to_nearest": round(float(best), 3)}


# ---------------------------------------------------------------- workers (each its own process)
def worker_build(args) -> dict:
    import faiss

    from smallcap.retrieval.build import write_datastore
    from smallcap.retrieval.datastore import FORMAT, FORMAT_VERSION
    from smallcap.retrieval.index import build_index, choose_index, describe, train_sample_size

    vectors = np.load(args.data, mmap_mode="r")
    n = len(vectors)
    spec = choose_index(n, DIM, args.kind)
    started = time.perf_counter()
    size = train_sample_size(spec, n)
    sample = np.asarray(vectors[np.sort(np.random.default_rng(0).choice(n, size, replace=False))]) if size else None
    index = build_index(spec, DIM, lambda: (vectors[s:s + 100_000] for s in range(0, n, 100_000)), sample)
    build_s = time.perf_counter() - started
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "encoder": {"name": "synthetic", "dim": DIM,
                "normalisation": "l2"}, "count": n, "index": {"type": spec.type, "faiss": describe(index),
                "metric": "inner_product", "params": spec.params, "file": "index.faiss"},
                "inputs": [{"path": "synthetic", "sha256": "", "records": n}], "max_captions_per_source": 5}
    write_datastore(Path(args.out), True, manifest, lambda path: faiss.write_index(index, str(path)),
                    (f"synthetic caption {i}" for i in range(n)), (str(i // 5) for i in range(n)),
                    np.zeros(n, np.int32))
    return {"build_s": round(build_s, 2), "build_peak_rss_mib": round(peak_rss_mib()),
            "index_file_mib": round((Path(args.out) / "index.faiss").stat().st_size / 2**20, 1),
            "params": spec.params}


def worker_search(args) -> dict:
    from smallcap.retrieval.datastore import Datastore

    queries = np.load(args.queries)
    baseline = current_rss_mib()  # python + numpy + torch (imported by smallcap) before the datastore
    before = current_rss_mib()
    store = Datastore.load(args.out, mmap=True)
    opened_rss = current_rss_mib() - before
    store.search(queries[:1], K)  # warm-up: first touch of the mapped pages
    single = []
    for q in queries[:SINGLE_QUERIES]:
        started = time.perf_counter()
        store.search(q[None], K)
        single.append(time.perf_counter() - started)
    started = time.perf_counter()
    hits = store.search(queries, K)
    batch_s = time.perf_counter() - started
    peak = peak_rss_mib()
    found = np.asarray([[int(caption.rsplit(" ", 1)[1]) for caption in row] for row in hits.captions])
    result = {"baseline_rss_mib": round(baseline), "open_rss_mib": round(opened_rss, 1),
              "search_peak_rss_mib": round(peak),
              "latency_1_query_ms": round(1000 * float(np.median(single)), 2),
              "latency_1000_queries_s": round(batch_s, 3)}
    if args.save_truth:  # the exact (flat) results are the reference for the other index types
        np.save(args.save_truth, found)
    truth = np.load(args.truth or args.save_truth)
    vectors = np.load(args.data, mmap_mode="r")

    def mean_similarity(rows: np.ndarray) -> float:
        return float(np.mean([vectors[np.sort(r)] @ q for r, q in zip(rows, queries)]))

    result["recall_at_4"] = round(float(np.mean([len(set(a) & set(b)) / K for a, b in zip(truth, found)])), 4)
    # How much less similar the returned captions are than the exact top 4 (1.0 = as similar).
    result["similarity_vs_exact"] = round(mean_similarity(found) / mean_similarity(truth), 5)
    return result


def run_worker(*argv: str) -> dict:
    # One thread: the cores are shared, and OpenMP threads spin under contention (2-5x slower measured).
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, __file__, "--worker", *argv], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- encoders
def encoder_throughput(work: Path, captions: int) -> list[dict]:
    """Full `build_datastore` on real COCO captions (read, GPT-2 length filter, embed, index, write)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from smallcap.retrieval.build import build_datastore, load_length_tokenizer
    from smallcap.retrieval.encoders import HFCLIPEncoder

    texts = [a["caption"] for a in json.loads(COCO_VAL_CAPTIONS.read_text())["annotations"]]
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_DIR)
    gpt2 = load_length_tokenizer(str(GPT2_TOKENIZER_DIR))
    configs = {
        "tiny CLIP (test fixture: text 2x32, proj 32)": (CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
            vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
            projection_dim=32), len(texts)),
        "CLIP ViT-B/32 size (CLIPConfig() defaults: text 12x512, proj 512), random weights": (CLIPConfig(), captions),
    }
    rows = []
    for name, (config, count) in configs.items():
        torch.manual_seed(0)
        encoder = HFCLIPEncoder(CLIPModel(config), None, tokenizer, name="bench")
        path = work / "captions.json"
        path.write_text(json.dumps(texts[:count]))
        for threads in (1, 2):
            torch.set_num_threads(threads)
            started = time.perf_counter()
            store = build_datastore([path], work / f"store-{threads}", encoder, tokenizer=gpt2, overwrite=True,
                                    progress=False)
            elapsed = time.perf_counter() - started
            started = time.perf_counter()
            encoder.embed_texts(texts[:1000], batch_size=256)
            embed_only = 1000 / (time.perf_counter() - started)
            rows.append({"encoder": name, "torch_threads": threads, "captions": count, "kept": len(store),
                         "build_s": round(elapsed, 2), "build_captions_per_s": round(count / elapsed),
                         "embed_only_captions_per_s": round(embed_only)})
            print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["build", "search"])
    parser.add_argument("--data"), parser.add_argument("--queries"), parser.add_argument("--out")
    parser.add_argument("--kind"), parser.add_argument("--truth"), parser.add_argument("--save-truth")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--kinds", default="flat,ivf,ivfpq,hnsw")
    parser.add_argument("--hnsw-max", type=int, default=1_000_000, help="skip HNSW above this many captions")
    parser.add_argument("--summary-only", action="store_true", help="re-render datastore.md from datastore.json")
    parser.add_argument("--encoder-captions", type=int, default=2000,
                        help="captions embedded with the ViT-B/32-size text tower; 0 skips the encoder part")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker_build(args) if args.worker == "build" else worker_search(args)))
        return
    if args.summary_only:
        (RESULTS / "datastore.md").write_text(summary(json.loads((RESULTS / "datastore.json").read_text())))
        return

    started = time.perf_counter()
    results = {"machine": {"cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0]},
               "arguments": {k: v for k, v in vars(args).items() if v is not None and k != "summary_only"},
               "data": {}, "indexes": [], "encoders": []}
    with tempfile.TemporaryDirectory(prefix="datastore-bench-") as tmp:
        work = Path(tmp)
        if args.encoder_captions:
            results["encoders"] = encoder_throughput(work, args.encoder_captions)
        for n in map(int, args.sizes.split(",")):
            data, queries, truth = work / f"emb-{n}.npy", work / f"queries-{n}.npy", work / f"truth-{n}.npy"
            t0 = time.perf_counter()
            results["data"][str(n)] = {**synthesize(data, n, queries), "generate_s": round(time.perf_counter() - t0, 1)}
            print(n, results["data"][str(n)], file=sys.stderr)
            for kind in args.kinds.split(","):
                if kind == "hnsw" and n > args.hnsw_max:
                    continue
                out = work / f"store-{kind}-{n}"
                row = {"captions": n, "index": kind, **run_worker("build", "--data", str(data), "--kind", kind,
                                                                  "--out", str(out))}
                extra = ["--truth", str(truth)] if kind != "flat" else ["--save-truth", str(truth)]
                row.update(run_worker("search", "--queries", str(queries), "--out", str(out), "--data", str(data),
                                      *extra))
                row["per_query_in_batch_ms"] = round(row["latency_1000_queries_s"] * 1000 / QUERIES, 3)
                results["indexes"].append(row)
                print(row, file=sys.stderr)
                subprocess.run(["rm", "-rf", str(out)], check=True)
            data.unlink()
    results["machine"]["load_average_at_end"] = os.getloadavg()[0]
    results["total_s"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "datastore.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / "datastore.md").write_text(summary(results))
    print(summary(results))


def summary(results: dict) -> str:
    machine = results["machine"]
    lines = ["# Datastore benchmark", "",
             f"Produced by `benchmarks/datastore.py` in {results['total_s'] / 60:.0f} min on {machine['cpus']} CPU cores "
             f"shared with other jobs (load average {machine['load_average_at_start']:.1f} at start, "
             f"{machine['load_average_at_end']:.1f} at end), so timings are noisy. Index workers ran with one "
             "thread: under contention OpenMP threads spin, and 2 threads ran 1.4-5x slower than 1.", "",
             "## Build throughput (full `build_datastore` on real COCO val captions)", "",
             "Read, GPT-2 length filter, embed (batches of 256, length-sorted within a shard), index, write. "
             "\"Embedding only\" embeds 1000 captions in file order (no length sorting).", "",
             "| encoder | torch threads | captions | build captions/s | embedding only captions/s |",
             "|---|---|---|---|---|"]
    for row in results["encoders"]:
        lines.append(f"| {row['encoder']} | {row['torch_threads']} | {row['captions']} | {row['build_captions_per_s']} "
                     f"| {row['embed_only_captions_per_s']} |")
    lines += ["", "## Index types (synthetic clustered 512-d embeddings, k=4, 1000 queries)", "",
              "Embeddings (`synthesize`): a power-law variance spectrum in a random rotation plus a shared mean "
              "direction (CLIP embeddings are anisotropic, pairwise cosines mostly positive); n/200 topics x 40 "
              "images x 5 near-duplicate captions, each level a Gaussian perturbation of the one above. Queries are "
              "new images of stored topics shifted by a fixed \"modality gap\" vector. Each index is built in one "
              "process and searched from another that opens the datastore memory-mapped.", "",
              "| captions | index | build s | index file MiB | 1 query ms | 1000 queries s | recall@4 | "
              "similarity vs exact | build peak RSS MiB | RSS after open MiB | search peak RSS MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in results["indexes"]:
        lines.append(f"| {row['captions']:,} | {row['index']} | {row['build_s']} | {row['index_file_mib']} | "
                     f"{row['latency_1_query_ms']} | {row['latency_1000_queries_s']} | {row['recall_at_4']} | "
                     f"{row['similarity_vs_exact']} | {row['build_peak_rss_mib']} | {row['open_rss_mib']} | "
                     f"{row['search_peak_rss_mib']} |")
    baseline = max((row["baseline_rss_mib"] for row in results["indexes"]), default=0)
    lines += ["",
              "- recall@4: share of the exact top 4 that the index returns; similarity vs exact: mean cosine of the "
              "returned 4 over that of the exact 4 (what a caption prompt loses).",
              f"- Memory is whole-process RSS. A search process holds ~{baseline} MiB (python, numpy, torch) before "
              "opening; `RSS after open` is what opening adds (files are memory-mapped, read lazily). Peaks count "
              "the file pages the searches touched (with kernel read-ahead); those are page cache the kernel can "
              "drop, not memory the process needs.",
              "- Build peaks include the embeddings, memory-mapped from disk as the build reads its shards.",
              "- Data: " + "; ".join(f"{int(n):,} captions: " + ", ".join(f"{k} {v}" for k, v in stats.items())
                                   for n, stats in results["data"].items()), ""]
    if results.get("notes"):
        lines += [f"- Note: {results['notes']}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
