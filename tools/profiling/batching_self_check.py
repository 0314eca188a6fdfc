"""The batching self-check a worker runs at start (`worker/batching/startup.py`), per tier of the
default model, outside a worker: whether it batches, the notice it would give (tokens agreed,
paged-path KL divergence from the one-request path) and how long the check took. A diagnostic,
not a benchmark of record.

    .venv/bin/python tools/profiling/batching_self_check.py --tiers bf16,int8-sq,int8-woq,int4-woq
        [--kernel native]   (force a kernel path, as `[tiers.NAME] kernel` does)
"""

from __future__ import annotations

import argparse
import time

from tierserve.domain.config import BatchingConfig, TierRecipe, default_config
from tierserve.worker.batching.startup import start_batching
from tierserve.worker.engine import Engine
from tierserve.worker.preparation import prepare_tier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiers", default="fp32,bf16,int8-sq,int8-woq,int4-woq")
    parser.add_argument("--kernel", choices=("auto", "ipex", "native"), default="auto")
    args = parser.parse_args()
    config = default_config([0, 1]).model_copy(
        update={"tiers": {tier: TierRecipe(kernel=args.kernel) for tier in args.tiers.split(",")}}
    )
    for tier in args.tiers.split(","):
        engine = Engine(prepare_tier(config, tier).loaded)
        started = time.perf_counter()
        with_batch, reason = start_batching(engine, BatchingConfig(), tier)
        seconds = time.perf_counter() - started
        print(f"{tier}: batches {with_batch is not None}, check {seconds:.1f} s: {reason}", flush=True)
        if with_batch is not None:
            with_batch.stop()


if __name__ == "__main__":
    main()
