"""The llama.cpp peer, measured inside its own subprocess: llama-cpp-python (the `bench` extra) on the
GGUF file the default model was converted from, fed the very same prompt token ids as the torch paths;
its accuracy card comes from `logits_all` scores of `eval()` on the same evaluation chunks, against
the same fp32 reference.

On CPUs with AMX, ggml repacks Q4_1 weights for its AMX kernels and crashes at the first decode, so
there the model loads with weight repacking off (`use_extra_bufts = False`, `llama_model_params`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import math
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierserve.benchmarks.tiers.measure import (
    WARMUP_RUNS,
    WorkerSpec,
    cpu_share,
    eval_token_chunks,
    log,
    rss_mb,
)
from tierserve.domain.config import parse_config
from tierserve.worker.warmup import WARMUP_NEW_TOKENS

if TYPE_CHECKING:
    import torch

    from tierserve.worker.accuracy import AccuracyCard

LLAMACPP = "llamacpp-gguf-q4_1"
LLAMACPP_CONTEXT_TOKENS = 1024
# CPU flags under which ggml puts weights in its AMX buffer type (repacked for AMX tiles).
AMX_FLAGS = frozenset({"amx_tile", "amx_int8"})


def llama_model_params(flags: Collection[str]) -> dict[str, bool]:
    """llama.cpp model parameters for a CPU with these flags: with AMX, no extra buffer types, so
    ggml does not repack the weights for AMX (its AMX repacking of Q4_1 crashes the first decode)."""
    return {"use_extra_bufts": False} if AMX_FLAGS & set(flags) else {}


def llama_params_note(params: Mapping[str, bool]) -> str | None:
    if params.get("use_extra_bufts") is False:
        return (
            "llama.cpp peer: weight repacking off (use_extra_bufts = False) on this AMX CPU, as ggml's "
            "AMX repacking of Q4_1 weights crashes at the first decode; it runs ggml's plain CPU kernels"
        )
    return None


@contextlib.contextmanager
def model_params_set(llama_cpp: Any, params: Mapping[str, bool]) -> Iterator[None]:
    """While a model loads, llama_model_default_params() returns these fields set. llama-cpp-python's
    `Llama` builds its model parameters from that function and names only a few of them as keywords
    (not use_extra_bufts; any other keyword it drops silently)."""
    low_level = llama_cpp.llama_cpp
    default = low_level.llama_model_default_params

    def with_params() -> Any:
        model_params = default()
        fields = {name for name, *_ in type(model_params)._fields_}
        for name, value in params.items():
            if name not in fields:
                raise RuntimeError(f"this llama-cpp-python has no model parameter {name}")
            setattr(model_params, name, value)
        return model_params

    low_level.llama_model_default_params = with_params
    try:
        yield
    finally:
        low_level.llama_model_default_params = default


def open_llama(llama_cpp: Any, params: Mapping[str, bool], **kwargs: Any) -> Any:
    """llama_cpp.Llama(**kwargs) with these model parameters set."""
    with model_params_set(llama_cpp, params):
        return llama_cpp.Llama(**kwargs)


def _llama_generate(
    llm: Any, prompt_ids: Sequence[int], max_tokens: int, eos_ids: set[int], sampled: bool = False
) -> tuple[list[int], list[int]]:
    """One generation through llama-cpp-python's token stream, each token timestamped as it arrives
    (and detokenized, as a streaming client's text would be): (latencies in us, token ids)."""
    if sampled:
        llm.set_seed(1)
        sampling: dict[str, Any] = {"temp": 0.8, "top_p": 0.9, "top_k": 40, "repeat_penalty": 1.0}
    else:
        sampling = {"temp": 0.0, "repeat_penalty": 1.0}
    llm.reset()  # no reuse of the previous run's KV cache: every run pays its full prefill
    latencies: list[int] = []
    tokens: list[int] = []
    last = time.perf_counter()
    for token in llm.generate(list(prompt_ids), reset=True, **sampling):
        now = time.perf_counter()
        latencies.append(int((now - last) * 1e6))
        last = now
        tokens.append(int(token))
        llm.detokenize([token])
        if token in eos_ids or len(tokens) >= max_tokens:
            break
    return latencies, tokens


def llamacpp_worker(spec: WorkerSpec) -> dict[str, Any]:
    """llama-cpp-python on the GGUF file: timed first (with no torch imported, so its memory is its
    own), then scored against the fp32 reference."""
    from tierserve.ops.pinning import OsAffinity, plan_pinning

    pinning = plan_pinning(spec.cpus, OsAffinity().get())
    os.sched_setaffinity(0, set(pinning.cpus))
    llama_cpp = importlib.import_module("llama_cpp")
    threads = pinning.threads
    eos_ids = set(spec.eos_ids)

    started = time.perf_counter()
    llm = open_llama(
        llama_cpp,
        spec.llama_params,
        model_path=spec.gguf_file,
        n_ctx=LLAMACPP_CONTEXT_TOKENS,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    load_s = time.perf_counter() - started
    # The worker's warm-up rounds (greedy and sampled), on the measured prompt's ids.
    for _ in range(WARMUP_RUNS):
        for sampled in (False, True):
            _llama_generate(llm, spec.short_ids, WARMUP_NEW_TOKENS, eos_ids, sampled)
    _llama_generate(llm, spec.short_ids, spec.new_tokens, eos_ids)
    _llama_generate(llm, spec.long_ids, 1, eos_ids)
    memory_mb = rss_mb()

    runs_us: list[list[int]] = []
    ttft_256_us: list[int] = []
    tokens: list[int] = []
    share: list[float] = []
    with cpu_share(threads, share):
        for _ in range(spec.runs):
            latencies, tokens = _llama_generate(llm, spec.short_ids, spec.new_tokens, eos_ids)
            runs_us.append(latencies)
            ttft_256_us.append(_llama_generate(llm, spec.long_ids, 1, eos_ids)[0][0])
    log(LLAMACPP, f"measured {spec.runs} run(s); CPU share {share[0]:.0%}")
    text = llm.detokenize(tokens).decode("utf-8", errors="replace")
    system_info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()
    version = str(llama_cpp.__version__)
    del llm
    gc.collect()

    log(LLAMACPP, "measuring the accuracy card")
    card, tokenization = _llamacpp_card(spec, llama_cpp, threads)
    repacking = ", weight repacking off" if spec.llama_params.get("use_extra_bufts") is False else ""
    return {
        "status": "measured",
        "tier": LLAMACPP,
        "backend": f"llama-cpp-python {version}",
        "kernel": (
            f"llama.cpp via llama-cpp-python {version}, GGUF {Path(spec.gguf_file).name}, "
            f"{threads} thread(s), n_ctx {LLAMACPP_CONTEXT_TOKENS}{repacking}"
        ),
        "load_s": load_s,
        "rss_mb": memory_mb,
        "threads": threads,
        "cpus": sorted(os.sched_getaffinity(0)),
        "runs_us": runs_us,
        "ttft_256_us": ttft_256_us,
        "cpu_share": share[0],
        "text": text,
        "card": asdict(card),
        # A decode step reads the whole file's weights (its tied embedding is the output head too).
        "weight_bytes": Path(spec.gguf_file).stat().st_size,
        "extra": {"tokenization": tokenization, "llamacpp_system_info": system_info},
    }


def _llamacpp_card(spec: WorkerSpec, llama_cpp: Any, threads: int) -> tuple[AccuracyCard, dict[str, Any]]:
    import torch
    from transformers import AutoTokenizer

    from tierserve.domain.textsets import eval_path, read_paragraphs
    from tierserve.worker.accuracy import reference_log_probs

    config = parse_config(spec.config, source="benchmark spec")
    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    chunks = eval_token_chunks(config, tokenizer)
    scorer = open_llama(
        llama_cpp,
        spec.llama_params,
        model_path=spec.gguf_file,
        n_ctx=max(LLAMACPP_CONTEXT_TOKENS, config.data.eval_chunk_tokens),
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        verbose=False,
    )
    # llama.cpp is fed the Hugging Face token ids (prompts and eval chunks, special tokens included);
    # check that both tokenizers turn the same text into the same ids, and which special tokens each adds.
    tokenization = compare_tokenizations(
        lambda text, special: list(tokenizer(text, add_special_tokens=special)["input_ids"]),
        lambda text, special: [
            int(t) for t in scorer.tokenize(text.encode("utf-8"), add_bos=special, special=False)
        ],
        ["\n\n".join(read_paragraphs(eval_path(config.data))), spec.short_prompt, spec.long_prompt],
    )
    log(LLAMACPP, f"tokenization, Hugging Face against GGUF: {json.dumps(tokenization)}")

    reference = reference_log_probs(Path(spec.model_dir), chunks)
    if int(scorer.n_vocab()) != int(reference[0].shape[-1]):
        raise RuntimeError(f"GGUF vocabulary {scorer.n_vocab()} != model vocabulary {reference[0].shape[-1]}")
    mine = []
    for chunk in chunks:
        scorer.reset()
        scorer.eval(chunk)
        logits = torch.from_numpy(scorer.scores[: len(chunk) - 1].copy())
        mine.append(torch.log_softmax(logits.float(), dim=-1))
    return card_from_log_probs(chunks, mine, reference), tokenization


def card_from_log_probs(
    chunks: Sequence[Sequence[int]],
    mine: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor],
) -> AccuracyCard:
    """An accuracy card from another runtime's log-probabilities, with worker.accuracy.measure_card's
    arithmetic (that function scores a LoadedModel through `generate`, which llama.cpp is not)."""
    import torch

    from tierserve.worker.accuracy import AccuracyCard

    total = sum(len(c) - 1 for c in chunks)
    nll = ref_nll = kl = agree = 0.0
    for chunk, my_lp, ref in zip(chunks, mine, reference, strict=True):
        targets = torch.tensor(list(chunk[1:]))
        nll -= my_lp.gather(1, targets[:, None]).sum().item()
        ref_nll -= ref.gather(1, targets[:, None]).sum().item()
        kl += (ref.exp() * (ref - my_lp)).sum().item()
        agree += (ref.argmax(-1) == my_lp.argmax(-1)).sum().item()
    perplexity, reference_perplexity = math.exp(nll / total), math.exp(ref_nll / total)
    return AccuracyCard(
        perplexity=perplexity,
        perplexity_delta_pct=100.0 * (perplexity - reference_perplexity) / reference_perplexity,
        kl_divergence=max(0.0, kl / total),
        top1_agreement=agree / total,
        eval_tokens=total,
        reference_perplexity=reference_perplexity,
    )


def compare_tokenizations(
    hf: Callable[[str, bool], list[int]], gguf: Callable[[str, bool], list[int]], texts: Sequence[str]
) -> dict[str, Any]:
    """Whether two tokenizers give the same ids for each text (without special tokens), and the special
    tokens each prepends on its own (its ids with special tokens, minus the text's)."""
    mismatches: list[dict[str, Any]] = []
    for index, text in enumerate(texts):
        a, b = hf(text, False), gguf(text, False)
        if a != b:
            first = next(
                (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
            )
            mismatches.append(
                {"text": index, "hf_tokens": len(a), "gguf_tokens": len(b), "first_mismatch": first}
            )

    def prefix(tokenize: Callable[[str, bool], list[int]]) -> list[int]:
        plain, special = tokenize(texts[0], False), tokenize(texts[0], True)
        return special[: len(special) - len(plain)]

    return {
        "matches": not mismatches,
        "texts_compared": len(texts),
        "tokens_compared": sum(len(hf(text, False)) for text in texts),
        "mismatches": mismatches,
        "hf_special_prefix": prefix(hf),
        "gguf_special_prefix": prefix(gguf),
    }


def tokenization_note(tokenization: Mapping[str, Any]) -> str:
    hf_prefix, gguf_prefix = tokenization["hf_special_prefix"], tokenization["gguf_special_prefix"]
    verdict = (
        f"identical token ids from both tokenizers on the eval text and both prompts "
        f"({tokenization['tokens_compared']} tokens)"
        if tokenization["matches"]
        else f"the tokenizers DIFFER: {json.dumps(tokenization['mismatches'])}"
    )
    prefixes = (
        "both prepend the same special tokens"
        if hf_prefix == gguf_prefix
        else f"the Hugging Face tokenizer prepends {hf_prefix}, the GGUF one {gguf_prefix}"
    )
    return f"llama.cpp tokenization: {verdict}; {prefixes}; llama.cpp is fed the Hugging Face ids"
