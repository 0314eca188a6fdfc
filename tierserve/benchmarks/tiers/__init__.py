"""`tierserve bench tiers`: every quantization tier, a plain transformers baseline and llama.cpp,
measured the same way on the same CPUs, speed against accuracy and against the memory-bandwidth floor.

    tierserve bench tiers --out bench-results/tiers.json [--tiers fp32,bf16] [--runs 5] [--new-tokens 64]

Modules: `run` orchestrates (and is the entry point of each path's subprocess, `python -m
tierserve.benchmarks.tiers --worker --spec FILE`); `measure` measures a torch path inside its
subprocess, `llamacpp` the llama.cpp peer inside its own; `floor` measures the machine's read
bandwidth and a model's bytes of weights per token; `report` computes the figures and writes the
table and plot. Each path runs in its own subprocess, one after the other, never two at once, pinned
to all CPUs this process may use, with torch (or llama.cpp) threads equal to their count.

Paths:

- `hf-eager-fp32`: a plain `AutoModelForCausalLM` in fp32 (no IPEX), wrapped in a `LoadedModel` and
  driven by the worker's own `Engine`, so it is timed exactly as the tiers are. Its accuracy card is
  measured against the fp32 reference like any tier's (expected: about zero).
- every tier: `prepare_tier` (the cached artifact and card; a tier whose artifact is missing is built
  first in a separate subprocess, so load time and memory always describe a start from the cache).
- `llamacpp-gguf-q4_1` (when `llama_cpp` imports, the `bench` extra): llama-cpp-python on the GGUF file
  the default model was converted from, fed the very same prompt token ids; its card is computed from
  `logits_all` scores of `eval()` on the same evaluation chunks, against the same fp32 reference. On
  CPUs with AMX its weights are not repacked (`use_extra_bufts = False`; said in the notes).

Figures:

- load_s: wall time of `prepare_tier` (baseline: `from_pretrained`; llama.cpp: `Llama(...)`).
- rss_mb: the process's resident memory after warm-up (the worker's warm-up, `tierserve.worker.warmup`,
  then one greedy run of each measured prompt).
- ttft_ms / ttft_256_ms: median over the runs of the first token's latency for a prompt of exactly
  32 / 256 tokens (cut from the evaluation text), prefill included.
- tpot_ms: median of every per-token latency except each run's first, over `--runs` greedy runs of
  `--new-tokens` tokens from the 32-token prompt; tokens_per_s: their tokens over their summed latencies.
- speedup_vs_hf_fp32: the baseline's tpot_ms divided by the path's.
- weight_mb, floor_ms, floor_pct ("% of floor" in the table): the bytes of weights one decode step
  reads, that divided by the read bandwidth measured on this machine, and floor_ms / tpot_ms x 100
  (see `floor`).
- ppl, ppl_delta_pct, kld, top1_agree: the path's accuracy card against the fp32 reference.
- cpu_share: CPU time used during the measured runs over wall time x CPUs; well below 1, something else
  competed for the CPUs and the latencies are inflated.
- dominated_by: the paths that are both faster (lower tpot_ms) and more accurate (ppl_delta_pct, a
  gain counted as zero, lower by more than ACCURACY_TIE_PCT points), or null.

Besides the JSON list (one object per path) it writes `<out>.meta.json` (machine, read bandwidth,
settings, notes), `<out>.md` (the table) and `<out>.png` (TPOT against perplexity delta), where <out>
is --out without its `.json` suffix.
"""
