"""Scale benchmarks: ``python -m pogdiff bench knn | sampling | data | metrics`` (BENCHMARKS.md "Scale").

- ``knn``: the caption kNN graph and psi table for N random 384-d captions; seconds and recall@5
  of the graph against brute-force numpy on a subsample of queries.
- ``sampling``: images/s of the tiny preset through :func:`pogdiff.model.sampling.generate` against the
  same UNet in a stock diffusers scheduler loop, batch size swept; DPM-Solver++ 20 steps and DDIM
  50 steps next to a 250-step DDIM reference; the time of the Compare tab's default generation.
- ``data``: a synthetic set of mixed-size / CMYK / alpha / EXIF-rotated images through load +
  prepare, cold and again from the cache; wall time and peak RSS of each pass.
- ``metrics``: the Compare tab's metrics for shipped checkpoints, timed, against the shipped tables.

The GPU benchmark is :mod:`pogdiff.bench.gpu`.

Every command prints one JSON line and writes it to ``--out``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pogdiff.bench.output import machine, write_result
from pogdiff.constants import REPO_ROOT
from pogdiff.constants import SHIPPED_DIR as SHIPPED

logger = logging.getLogger(__name__)

CAPTION_DIM = 384  # MiniLM's pooled dimension


# ---------------------------------------------------------------------------------------- knn
def random_captions(n: int, dim: int = CAPTION_DIM, *, seed: int = 0, clusters: int = 0) -> np.ndarray:
    """L2-normalised float32 [n, dim] vectors: isotropic Gaussian (``clusters=0``, the hardest
    case for an approximate index) or a mixture of ``clusters`` Gaussian blobs, closer to how
    real caption embeddings group."""
    if n < 2 or dim < 1:
        raise ValueError(f"need n >= 2 and dim >= 1, got n={n}, dim={dim}")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    if clusters > 0:
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        x = centres[rng.integers(0, clusters, n)] + 0.5 * x
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


@dataclasses.dataclass
class KnnBenchConfig:
    n: int = 100_000
    dim: int = CAPTION_DIM
    k: int = 5
    approx_above: int = 50_000  # flat (exact) index up to this many captions
    approx: str = "ivf"
    nprobe: int | None = None
    ef_search: int | None = None
    recall_queries: int = 500
    clusters: int = 0
    seed: int = 0


def bench_knn(cfg: KnnBenchConfig) -> dict[str, Any]:
    """Graph + psi table (:func:`pogdiff.method.neighbours.caption_graph` and ``build_neighbour_table``,
    ``pool="all"``, random image features) timed end to end; the graph alone timed separately;
    recall@k of both on ``recall_queries`` random rows against brute force. Every search uses the
    index settings of ``cfg`` (:class:`pogdiff.method.knn.KnnSearch`); ``recall_guard_fell_back_to_exact``
    is what the searches report (:class:`pogdiff.method.knn.KnnResult`)."""
    from pogdiff.method import knn
    from pogdiff.method import neighbours
    from pogdiff.config import PsiConfig

    if cfg.recall_queries < 1:
        raise ValueError(f"recall_queries must be >= 1, got {cfg.recall_queries}")
    pooled = random_captions(cfg.n, cfg.dim, seed=cfg.seed, clusters=cfg.clusters)
    feats = np.random.default_rng(cfg.seed + 1).standard_normal((cfg.n, 3 * 8 * 8), dtype=np.float32)
    psi_cfg = PsiConfig(k=cfg.k, pool="all", hnsw_above=cfg.approx_above)
    kind = knn.choose_index(cfg.n, cfg.approx_above, cfg.approx)
    search = knn.KnnSearch(approx=cfg.approx, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    graph = knn.knn_search(pooled, cfg.k, hnsw_above=cfg.approx_above, search=search)
    graph_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    table_graph = neighbours.caption_graph(pooled, psi_cfg, search=search)
    table = neighbours.build_neighbour_table(pooled, feats, psi_cfg, graph=table_graph)
    table_s = time.perf_counter() - t0
    rows = np.sort(np.random.default_rng(cfg.seed + 2).choice(cfg.n, min(cfg.recall_queries, cfg.n), replace=False))
    exact = knn.exact_knn_rows(pooled, rows, cfg.k)
    recall = knn.recall_at_k(table.indices[rows], exact, cfg.k)
    graph_recall = knn.recall_at_k(graph.idx[rows], exact, cfg.k)
    return {
        "n": cfg.n, "seconds": round(table_s, 3), f"recall_at_{cfg.k}": round(recall, 4),
        "graph_seconds": round(graph_s, 3), f"graph_recall_at_{cfg.k}": round(graph_recall, 4),
        "index": "ivf self-join" if kind == "ivf" else kind, "approx_above": cfg.approx_above,
        "nlist": knn.join_nlist(cfg.n) if kind == "ivf" else None,
        "nprobe": (cfg.nprobe or knn.JOIN_NPROBE) if kind == "ivf" else None, "ef_search": cfg.ef_search,
        "recall_guard_fell_back_to_exact": graph.exact_fallback or table_graph.exact_fallback,
        "dim": cfg.dim, "k": cfg.k,
        "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
        "data": f"{cfg.clusters} gaussian clusters" if cfg.clusters else "isotropic gaussian",
        "recall_queries": int(rows.size), "vectors_mib": round(pooled.nbytes / 2**20, 1), **machine(),
    }


# ----------------------------------------------------------------------------------- sampling
def _diffusers_loop(model, captions: list[str], seeds: list[int], steps: int, guidance: float,
                    batch_size: int) -> np.ndarray:
    """The stock loop of a diffusers pipeline: DDIM scheduler, classifier-free guidance by
    concatenating null and conditional contexts, ``unet(...).sample`` called directly."""
    import torch
    from diffusers import DDIMScheduler

    from pogdiff.model.sampling import initial_noise, to_uint8

    out = []
    with torch.no_grad():
        tokens, mask = model.encode_captions(captions)
        null_t, null_m = model.null_context(1)
        length = max(tokens.shape[1], null_t.shape[1])
        pad = lambda t, m: (torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[1])),  # noqa: E731
                            torch.nn.functional.pad(m, (0, length - m.shape[1]), value=False))
        tokens, mask = pad(tokens, mask)
        null_t, null_m = pad(null_t, null_m)
        noise = initial_noise(seeds, model.latent_shape)
        for start in range(0, len(captions), batch_size):
            sl = slice(start, start + batch_size)
            b = len(noise[sl])
            sched = DDIMScheduler.from_config(model.noise_scheduler.config, timestep_spacing="trailing",
                                              clip_sample=True, clip_sample_range=1.0)
            sched.set_timesteps(steps)
            x = noise[sl] * sched.init_noise_sigma
            ctx = torch.cat([null_t.expand(b, -1, -1), tokens[sl]])
            am = torch.cat([null_m.expand(b, -1), mask[sl]])
            for t in sched.timesteps:
                inp = sched.scale_model_input(torch.cat([x, x]), t)
                pred = model.unet(inp, t, encoder_hidden_states=ctx,
                                  encoder_attention_mask=am if model.uses_attention_mask else None).sample
                e_null, e_cond = pred.chunk(2)
                x = sched.step(e_null + guidance * (e_cond - e_null), t, x).prev_sample
            out.append(to_uint8(model.decode(x)))
    return np.concatenate(out)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def compare_default_subjects(limit: int = 6) -> list[str]:
    """The subjects the Compare tab pre-selects: the few-shot classes of the demo set, rarest first."""
    from pogdiff.config import DataConfig
    from pogdiff.data import ensure_demo, load_image_text_set, stats

    ds = load_image_text_set(ensure_demo() / "train", DataConfig())
    table = stats.class_table(ds).sort_values(["count", "subject"])
    return list(table.loc[table["shot"] == "few", "subject"])[:limit]


def compare_default_prompts(template: str = "a photo of {subject}", limit: int = 6) -> list[str]:
    """The prompts the Compare tab pre-selects (:func:`compare_default_subjects`)."""
    return [template.format(subject=s) for s in compare_default_subjects(limit)]


def bench_sampling(*, batch_sizes: tuple[int, ...] = (1, 8, 32), images: int = 32, steps: int = 25,
                   quality_images: int = 24, reference_steps: int = 250, compare_seeds: int = 4,
                   checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """See the module docstring. ``images`` per batch-size point; all timings in one process."""

    from pogdiff.model import checkpoints
    from pogdiff.config import SampleConfig
    from pogdiff.evaluation.demo_classifier import load_evaluator
    from pogdiff.model.sampling import generate

    ckpt = Path(checkpoint) if checkpoint else SHIPPED / "demo-pogdiff"
    model = checkpoints.load_model(ckpt)
    subjects = compare_default_subjects()
    prompts = compare_default_prompts()
    judge = load_evaluator(SHIPPED / "evaluator")
    caps = [prompts[i % len(prompts)] for i in range(images)]
    seeds = list(range(images))
    cfg = SampleConfig(scheduler="ddim", steps=steps, guidance_scale=3.0)
    sweep = []
    generate(model, caps[:2], seeds[:2], dataclasses.replace(cfg, steps=2))  # warm-up
    for bs in batch_sizes:
        t_ours, a = _timed(lambda: generate(model, caps, seeds, cfg, batch_size=bs))
        t_ref, b = _timed(lambda: _diffusers_loop(model, caps, seeds, steps, cfg.guidance_scale, bs))
        sweep.append({"batch_size": bs, "pogdiff_images_per_s": round(images / t_ours, 3),
                      "diffusers_loop_images_per_s": round(images / t_ref, 3),
                      "ratio": round(t_ref / t_ours, 3),
                      "max_abs_pixel_diff": int(np.abs(a.astype(int) - b.astype(int)).max())})
    # quality: distance to a long DDIM run from the same noise, and the shipped evaluator's
    # identity accuracy on the few-shot prompts (each prompt names its subject)
    qcaps = [prompts[i % len(prompts)] for i in range(quality_images)]
    qseeds = list(range(quality_images))
    qsubjects = [subjects[i % len(subjects)] for i in range(quality_images)]
    ref = generate(model, qcaps, qseeds, dataclasses.replace(cfg, steps=reference_steps)).astype(np.float64)

    def accuracy(images: np.ndarray) -> float:
        return float(np.mean([p == s for p, s in zip(judge.predict(images)["subject"], qsubjects)]))

    solvers = {f"ddim {reference_steps} (reference)": {"identity_accuracy": round(accuracy(ref.astype(np.uint8)), 3)}}
    for name, sc in {"dpm++ 20": dataclasses.replace(cfg, scheduler="dpm", steps=20),
                     "ddim 50": dataclasses.replace(cfg, steps=50),
                     f"ddim {steps}": cfg,
                     f"ddim {steps} bf16": dataclasses.replace(cfg, precision="bf16"),
                     "dpm++ 20 bf16": dataclasses.replace(cfg, scheduler="dpm", steps=20, precision="bf16")}.items():
        t, imgs = _timed(lambda sc=sc: generate(model, qcaps, qseeds, sc))
        solvers[name] = {"seconds": round(t, 3), "images_per_s": round(quality_images / t, 3),
                         "mean_abs_diff_to_ddim_ref": round(float(np.abs(imgs - ref).mean()), 3),
                         "identity_accuracy": round(accuracy(imgs), 3)}
    # the Compare tab's default: two shipped models, few-shot prompts x seeds 0..3, DDIM 25, guidance 3
    cmp_caps = [c for _ in range(compare_seeds) for c in prompts]
    cmp_seeds = [s for s in range(compare_seeds) for _ in prompts]
    compare_s = {}
    for precision in ("fp32", "bf16"):
        t0 = time.perf_counter()
        for name in ("demo-baseline", "demo-pogdiff"):
            generate(checkpoints.load_model(SHIPPED / name), cmp_caps, cmp_seeds, SampleConfig(precision=precision))
        compare_s[precision] = round(time.perf_counter() - t0, 3)
    return {"checkpoint": ckpt.name, "steps": steps, "guidance": cfg.guidance_scale, "images": images,
            "sweep": sweep, "solvers": solvers, "reference": f"ddim {reference_steps} steps, same noise",
            "pixel_scale": "uint8 0-255",
            "compare_default": {"images": 2 * len(cmp_caps), "prompts": len(prompts), "seeds": compare_seeds,
                                "sampler": f"{SampleConfig().scheduler} {SampleConfig().steps}",
                                "seconds_incl_loading": compare_s},
            "quality_images": quality_images, "load_average_after": round(os.getloadavg()[0], 2),
            **machine()}


# ------------------------------------------------------------------------------------ metrics
def bench_metrics(*, mode: str = "fast", names: tuple[str, ...] = ("demo-baseline", "demo-pogdiff"),
                  shipped: str | os.PathLike | None = None, write: bool = False) -> dict[str, Any]:
    """Time the Compare tab's metrics for two shipped checkpoints (loading, generating, scoring),
    and compare each per-class table with the one shipped beside the checkpoint; ``write``
    replaces the shipped tables with the recomputed ones (how they are made, fast mode)."""
    import pandas as pd

    from pogdiff.model import checkpoints
    from pogdiff.evaluation import protocol as evaluation
    from pogdiff.config import DataConfig
    from pogdiff.data import ensure_demo, load_image_text_set
    from pogdiff.evaluation.demo_classifier import load_evaluator

    folder = Path(shipped) if shipped else SHIPPED
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    root = ensure_demo()
    eval_set = evaluation.metric_eval_set(load_image_text_set(root / "eval", DataConfig()), mode)
    counts = pd.Series(load_image_text_set(root / "train", DataConfig()).subjects).value_counts().to_dict()
    evaluator = load_evaluator(folder / "evaluator")
    runs = {}
    for name in names:
        t1 = time.perf_counter()
        table, _, _ = evaluation.evaluate_model(checkpoints.load_model(folder / name), eval_set, evaluator, counts)
        entry: dict[str, Any] = {"seconds": round(time.perf_counter() - t1, 3),
                                 "few_shot_accuracy": round(float(table.loc[table["shot"] == "few", "accuracy"].mean()), 4)}
        shipped_csv = folder / name / "per_class.csv"
        if shipped_csv.is_file():
            ref = pd.read_csv(shipped_csv).set_index("subject").sort_index()
            got = table.set_index("subject").sort_index()
            cols = [c for c in ref.columns if c in got.columns and pd.api.types.is_numeric_dtype(ref[c])]
            diff = (got.loc[ref.index, cols] - ref[cols]).abs().max()
            entry["max_abs_diff_to_shipped"] = float(diff.max())
            entry["max_abs_diff_by_column"] = {c: float(v) for c, v in diff.items()}
        if write:
            if mode != "fast":
                raise ValueError("the shipped per-class tables are the fast mode's; run with --mode fast")
            table.to_csv(shipped_csv, index=False)
        runs[name] = entry
    return {"mode": mode, "images_per_model": len(eval_set.captions), "seconds": round(time.perf_counter() - t0, 3),
            "runs": runs, "sampler": f"{evaluation.EVAL_SAMPLE.scheduler} {evaluation.EVAL_SAMPLE.steps}",
            "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
            **machine()}


# --------------------------------------------------------------------------------------- data
def synth_image(rng: np.random.Generator, index: int) -> tuple[bytes, str]:
    """One encoded test image: RGB JPEG, CMYK JPEG (every 7th), RGBA PNG (every 5th), or a JPEG
    with EXIF orientation 6 (every 11th); sides 256-1024 px. Returns ``(bytes, suffix)``."""
    from PIL import Image

    w, h = (int(v) for v in rng.integers(256, 1025, 2))
    base = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = ((base[None, None, :] + (xx[..., None] * 3 + yy[..., None] * 5) // 8) % 256).astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    buf = io.BytesIO()
    if index % 5 == 0:
        rgba = im.convert("RGBA")
        rgba.putalpha(128)
        rgba.save(buf, "PNG", compress_level=1)
        return buf.getvalue(), ".png"
    if index % 7 == 0:
        im.convert("CMYK").save(buf, "JPEG", quality=85)
    elif index % 11 == 0:
        exif = Image.Exif()
        exif[0x0112] = 6
        im.save(buf, "JPEG", quality=85, exif=exif)
    else:
        im.save(buf, "JPEG", quality=85)
    return buf.getvalue(), ".jpg"


def write_synthetic_set(root: str | os.PathLike, n: int, *, seed: int = 0, classes: int = 50) -> Path:
    """``n`` images + ``metadata.jsonl`` with Zipf-like class sizes under ``root``."""
    if n < 2:
        raise ValueError(f"need at least 2 images, got {n}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, classes + 1)
    labels = rng.choice(classes, size=n, p=weights / weights.sum())
    with open(root / "metadata.jsonl", "w") as meta:
        for i in range(n):
            data, suffix = synth_image(rng, i)
            name = f"img_{i:06d}{suffix}"
            (root / name).write_bytes(data)
            meta.write(json.dumps({"file_name": name, "text": f"a photo of subject {labels[i]:03d}",
                                   "subject": f"subject {labels[i]:03d}"}) + "\n")
    return root


def content_hash(root: str | os.PathLike, resolution: int) -> str:
    """sha256 over the set's file names and bytes (files streamed, 1 MiB at a time) and the resolution."""
    h = hashlib.sha256(f"resolution={resolution}".encode())
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def load_prepared(root: str | os.PathLike, cache_dir: str | os.PathLike, *, resolution: int = 32):
    """Load + prepare with a cache of the resized arrays keyed by :func:`content_hash`.

    :return: ``(images uint8 [N,H,W,3], captions, subjects, hit)``.
    """
    from pogdiff.config import DataConfig
    from pogdiff.data import load_image_text_set

    cache = Path(cache_dir) / f"images-{content_hash(root, resolution)}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            return z["images"], [str(c) for c in z["captions"]], [str(s) for s in z["subjects"]], True
    ds = load_image_text_set(root, DataConfig(resolution=resolution))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, images=ds.images, captions=np.array(ds.captions, dtype=str), subjects=np.array(ds.subjects, dtype=str))
    os.replace(tmp, cache)
    return ds.images, list(ds.captions), list(ds.subjects), False


def data_pass(root: str, cache_dir: str) -> dict[str, Any]:
    """One load + prepare pass (images cached by content hash, captions by the caption cache)."""
    from types import SimpleNamespace

    from pogdiff.model import models
    from pogdiff.config import PsiConfig, model_preset
    from pogdiff.method.prepare import prepare_data

    t0 = time.perf_counter()
    images, captions, subjects, hit = load_prepared(root, cache_dir)
    load_s = time.perf_counter() - t0
    model = models.build_tiny(model_preset("tiny"))
    t1 = time.perf_counter()
    ds = SimpleNamespace(images=images, captions=captions, subjects=subjects)
    data = prepare_data(ds, model, PsiConfig(), cache_dir=Path(cache_dir) / "embeddings")
    prepare_s = time.perf_counter() - t1
    return {"images": len(captions), "cache_hit": hit, "load_seconds": round(load_s, 3),
            "prepare_seconds": round(prepare_s, 3), "seconds": round(load_s + prepare_s, 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "images_mib_in_memory": round(images.nbytes / 2**20, 1), "table_rows": len(data.table or [])}


def _pass_in_subprocess(root: Path, cache_dir: Path) -> dict[str, Any]:
    code = ("import json,sys; from pogdiff.bench.scale import data_pass; "
            "print('RESULT ' + json.dumps(data_pass(sys.argv[1], sys.argv[2])))")
    # The caption-embedding cache lives under cache_dir too, so the first pass is cold for it as well.
    env = {**os.environ, "POGDIFF_CACHE": str(cache_dir / "pogdiff-cache")}
    proc = subprocess.run([sys.executable, "-c", code, str(root), str(cache_dir)], capture_output=True,
                          text=True, cwd=REPO_ROOT, check=False, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"data pass failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def bench_data(*, n: int = 10_000, work_dir: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
    """Write the synthetic set (untimed), then two passes in fresh processes (own peak RSS)."""
    work = Path(work_dir)
    root, cache_dir = work / f"set-{n}-{seed}", work / "cache"
    if not (root / "metadata.jsonl").exists():
        t0 = time.perf_counter()
        write_synthetic_set(root, n, seed=seed)
        logger.info("wrote %d synthetic images in %.1f s", n, time.perf_counter() - t0)
    for stale in cache_dir.glob("**/*"):
        if stale.is_file():
            stale.unlink()
    on_disk = sum(p.stat().st_size for p in root.iterdir())
    first = _pass_in_subprocess(root, cache_dir)
    second = _pass_in_subprocess(root, cache_dir)
    return {"n": n, "on_disk_mib": round(on_disk / 2**20, 1), "first": first, "second": second,
            "second_over_first": round(second["seconds"] / first["seconds"], 4),
            "mix": "RGB JPEG; every 5th RGBA PNG, 7th CMYK JPEG, 11th EXIF-rotated JPEG; 256-1024 px",
            **machine()}


# ---------------------------------------------------------------------------------------- cli
def add_parsers(bench) -> None:
    """Register ``knn``, ``sampling``, ``data`` and ``metrics`` under ``python -m pogdiff bench``
    (README "Options of the other commands")."""
    p = bench.add_parser("knn", help="caption kNN graph + psi table at scale, with recall against brute force")
    p.add_argument("--n", type=int, default=100_000, help="random captions")
    p.add_argument("--dim", type=int, default=CAPTION_DIM, help="caption dimension")
    p.add_argument("--approx", choices=("ivf", "hnsw"), default="ivf", help="approximate index beyond the threshold")
    p.add_argument("--approx-above", type=int, default=KnnBenchConfig.approx_above,
                   help="exact flat index up to this many captions")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists visited per query")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search breadth")
    p.add_argument("--clusters", type=int, default=0, help="0: isotropic gaussian; >0: mixture of this many blobs")
    p.add_argument("--recall-queries", type=int, default=500, help="queries checked against brute force")
    p.add_argument("--out", default="results/knn.json", help="JSON output")
    p.set_defaults(fn=main)
    p = bench.add_parser("sampling", help="images/s vs a stock diffusers loop; DPM++ 20 vs DDIM 50; Compare default")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="batch sizes swept")
    p.add_argument("--images", type=int, default=32, help="images per sweep point")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps of the sweep")
    p.add_argument("--quality-images", type=int, default=24, help="images compared with the reference")
    p.add_argument("--reference-steps", type=int, default=250, help="DDIM steps of the reference")
    p.add_argument("--compare-seeds", type=int, default=4, help="seeds per prompt of the Compare default")
    p.add_argument("--out", default="results/sampling.json", help="JSON output")
    p.set_defaults(fn=main)
    p = bench.add_parser("data", help="synthetic image set through load + prepare, cold and cached")
    p.add_argument("--n", type=int, default=10_000, help="images")
    p.add_argument("--work-dir", default="results/runs/data_scale", help="where the set and cache are written")
    p.add_argument("--out", default="results/data_scale.json", help="JSON output")
    p.set_defaults(fn=main)
    p = bench.add_parser("metrics", help="the Compare tab's metrics for two shipped checkpoints, timed")
    p.add_argument("--mode", choices=("fast", "full"), default="fast", help="fast: 4 held-out captions per class")
    p.add_argument("--models", nargs="+", default=["demo-baseline", "demo-pogdiff"],
                   help="shipped checkpoints (folders of checkpoints/)")
    p.add_argument("--write-shipped", action="store_true",
                   help="replace each model's shipped per_class.csv with the recomputed table")
    p.add_argument("--out", default="results/metrics.json", help="JSON output")
    p.set_defaults(fn=main)


def main(args) -> int:
    cmd = args.bench_cmd
    if cmd == "knn":
        result = bench_knn(KnnBenchConfig(n=args.n, dim=args.dim, approx=args.approx, approx_above=args.approx_above,
                                          nprobe=args.nprobe, ef_search=args.ef_search, clusters=args.clusters,
                                          recall_queries=args.recall_queries))
    elif cmd == "sampling":
        result = bench_sampling(batch_sizes=tuple(args.batch_sizes), images=args.images, steps=args.steps,
                                quality_images=args.quality_images, reference_steps=args.reference_steps,
                                compare_seeds=args.compare_seeds)
    elif cmd == "data":
        result = bench_data(n=args.n, work_dir=args.work_dir)
    elif cmd == "metrics":
        result = bench_metrics(mode=args.mode, names=tuple(args.models), write=args.write_shipped)
    else:
        raise ValueError(f"unknown scale benchmark {cmd!r}")
    write_result(args.out, result)
    return 0
