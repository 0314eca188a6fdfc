"""Live figures and prediction on synthetic token streams: warm-up first, then live; prefill
fits; TPOT by concurrency measured, with a named fallback; queue wait from the work ahead."""

import pytest
from tierserve_client.v1 import worker_pb2

from tierserve.domain.prefill import fit_prefill
from tierserve.router.live import LiveStats, PromptTokenEstimator
from tierserve.router.prediction import (
    UNKNOWN,
    Prediction,
    PredictionErrors,
    Ticket,
    WorkerLoad,
    batch_wait_us,
    budget_slots,
    next_free_us,
    predict,
    queued_prefills,
    stalled_budgets,
)


def warm_info(ttft_us: int = 40_000, tpot_us: int = 10_000, prompt_tokens: int = 40) -> worker_pb2.WorkerInfo:
    return worker_pb2.WorkerInfo(
        warmup_latency=worker_pb2.LatencyStats(ttft_p50_us=ttft_us, tpot_p50_us=tpot_us, samples=16),
        warmup_prompt_tokens=prompt_tokens,
        chars_per_token=3.5,
    )


def test_prefill_fit_is_a_line_when_lengths_vary_and_through_the_origin_otherwise() -> None:
    # 20 ms fixed plus 1.5 ms per prompt token, with a little noise.
    fit = fit_prefill([(32, 68_500.0), (256, 404_000.0), (128, 211_500.0)])
    assert fit is not None
    assert fit.per_token_us == pytest.approx(1500, rel=0.02) and fit.base_us == pytest.approx(20_000, rel=0.1)
    single = fit_prefill([(40, 40_000.0)])
    assert single is not None and (single.base_us, single.per_token_us) == (0.0, 1000.0)
    # A noisy negative slope is no model of prefill: fall back to a ratio.
    falling = fit_prefill([(10, 50_000.0), (20, 40_000.0)])
    assert falling is not None and falling.base_us == 0.0 and falling.per_token_us > 0
    assert fit_prefill([]) is None


def test_before_traffic_the_workers_warm_up_figures_stand_in() -> None:
    stats = LiveStats()
    assert stats.basis == "none" and predict(stats, WorkerLoad(), 1, 10).known is False
    stats.seed(warm_info())
    assert stats.basis == "warm-up"
    prediction = predict(stats, WorkerLoad(), 1, 80)
    assert prediction.ttft_us == pytest.approx(80_000)  # 1 ms per prompt token, from 40 tokens in 40 ms
    assert prediction.tpot_us == 10_000 and prediction.wait_us == 0
    assert prediction.basis == "worker's warm-up figure"


def test_live_tokens_replace_warm_up_and_tpot_is_kept_per_concurrency() -> None:
    stats = LiveStats(alpha=0.5)
    stats.seed(warm_info())
    stats.record_first_token(30_000)
    for latency in (8_000, 8_000, 8_000):
        stats.record_token(latency, streams=1)
    assert stats.basis == "live"
    assert stats.tpot_us(1) == (8_000, "measured at 1 stream")
    # Two streams on the cores not yet seen: the one-stream figure doubled (no batching gain
    # assumed until measured), and the prediction says so.
    tpot, note = stats.tpot_us(2)
    assert tpot == 16_000 and "2 streams unmeasured" in note and "measured at 1 stream" in note
    for latency in (12_000, 12_000):
        stats.record_token(latency, streams=2)
    assert stats.tpot_us(2) == (12_000, "measured at 2 streams")
    # Four: scaled from the highest concurrency measured below it.
    tpot, note = stats.tpot_us(4)
    assert tpot == 24_000 and "measured at 2 streams" in note and "scaled by 4/2" in note
    figures = stats.to_proto()
    assert [(c.streams, c.samples) for c in figures.tpot_by_concurrency] == [(1, 3), (2, 2)]
    assert figures.ttft_ewma_us == 30_000 and figures.basis == "live" and figures.tokens_relayed == 6
    assert 8_000 < figures.tpot_ewma_us < 12_000


def test_queue_wait_is_the_remaining_work_of_the_requests_ahead() -> None:
    stats = LiveStats()
    stats.seed(warm_info(ttft_us=20_000, tpot_us=10_000, prompt_tokens=20))  # 1 ms per prompt token
    load = WorkerLoad()
    running = load.begin(prompt_tokens=50, new_tokens=30)
    running.tokens = 10  # 20 tokens to go: 200 ms
    load.begin(prompt_tokens=100, new_tokens=5)  # waiting: 100 ms prefill + 4 tokens = 140 ms
    prediction = predict(stats, load, 1, prompt_tokens=30)
    assert prediction.wait_us == pytest.approx(340_000)
    assert prediction.ttft_us == pytest.approx(370_000)
    assert prediction.total_us(new_tokens=11) == pytest.approx(470_000)
    assert next_free_us(stats, load, 1) == pytest.approx(200_000)
    assert load.outstanding == 2 and load.queued == 1
    load.end(running)
    assert load.queued == 0 and predict(stats, load, 1, 30).wait_us == pytest.approx(140_000)


def test_prompt_tokens_are_estimated_from_characters_then_learned() -> None:
    estimator = PromptTokenEstimator(alpha=1.0)
    assert estimator.estimate("x" * 40) == 10  # 4 characters per token until told
    estimator.report(5.0)
    assert estimator.estimate("x" * 40) == 8
    estimator.learn(prompt_chars=60, prompt_tokens=20)
    assert estimator.chars_per_token == 3.0 and estimator.estimate("x" * 30) == 10
    assert estimator.estimate("") == 1


def test_prefill_before_varied_traffic_keeps_the_warm_up_slope_at_the_live_level() -> None:
    info = warm_info()
    info.warmup_prefill.add(prompt_tokens=32, ttft_us=60_000)  # 20 ms + 1.25 ms per token
    info.warmup_prefill.add(prompt_tokens=128, ttft_us=180_000)
    stats = LiveStats()
    stats.seed(info)
    fit = stats.prefill()
    assert fit is not None and (fit.base_us, fit.per_token_us) == pytest.approx((20_000, 1_250))
    # Live prompts of one length (6 tokens, 40 ms): the level moves, the warm-up slope stays.
    for _ in range(3):
        stats.record_prefill(6, 40_000)
    fit = stats.prefill()
    assert fit is not None and fit.per_token_us == pytest.approx(1_250)
    assert fit.ttft_us(6) == pytest.approx(40_000)
    # Lengths a factor of two apart: the live line alone.
    stats.record_prefill(60, 100_000)
    fit = stats.prefill()
    assert fit is not None and fit.per_token_us == pytest.approx(60_000 / 54, rel=0.01)


def test_prediction_errors_correct_later_predictions_by_their_median() -> None:
    errors = PredictionErrors()
    predicted = Prediction(wait_us=1000.0, ttft_us=2000.0, tpot_us=10_000.0)
    for _ in range(3):  # too few samples: no correction yet
        errors.record(predicted, ttft_us=4000.0, tpot_us=15_000.0)
    assert errors.correct(predicted) == predicted
    for _ in range(7):
        errors.record(predicted, ttft_us=4000.0, tpot_us=15_000.0)
    corrected = errors.correct(predicted)
    assert corrected.ttft_us == pytest.approx(4000.0) and corrected.wait_us == pytest.approx(2000.0)
    assert corrected.tpot_us == pytest.approx(15_000.0)
    assert "corrected by measured error x2.00 TTFT, x1.50 TPOT" in corrected.basis
    # An unknown prediction stays unknown, and a wild outlier is bounded.
    assert errors.correct(UNKNOWN) is UNKNOWN
    for _ in range(32):
        errors.record(predicted, ttft_us=2000.0 * 100, tpot_us=10_000.0 * 100)
    assert errors.ttft_factor == 2.0 and errors.tpot_factor == 2.0
    # The median, not a pessimistic tail: three slow requests in ten do not inflate every prediction.
    mostly_right = PredictionErrors()
    for actual in [2000.0] * 7 + [3000.0] * 3:
        mostly_right.record(predicted, ttft_us=actual, tpot_us=10_000.0)
    assert mostly_right.ttft_factor == 1.0 and mostly_right.correct(predicted) == predicted


def test_prediction_errors_expire_so_an_avoided_worker_is_not_shut_out() -> None:
    now = [0.0]
    errors = PredictionErrors(clock=lambda: now[0])
    predicted = Prediction(wait_us=0.0, ttft_us=1000.0, tpot_us=10_000.0)
    for _ in range(8):
        errors.record(predicted, ttft_us=1800.0, tpot_us=10_000.0)
    assert errors.ttft_factor == pytest.approx(1.8)
    now[0] = 31.0  # no traffic since: the old streak no longer counts
    assert errors.ttft_factor == 1.0 and errors.correct(predicted) == predicted


def test_over_predicting_workers_are_corrected_down() -> None:
    errors = PredictionErrors()
    predicted = Prediction(wait_us=0.0, ttft_us=1000.0, tpot_us=10_000.0)
    for actual in (500.0, 520.0, 540.0, 560.0, 580.0):
        errors.record(predicted, ttft_us=actual, tpot_us=8_000.0)
    assert errors.ttft_factor == pytest.approx(0.54)  # the median
    assert errors.tpot_factor == pytest.approx(0.8)


def test_a_batching_worker_starts_a_request_at_once_while_it_has_a_free_slot() -> None:
    stats = LiveStats(alpha=1.0)
    stats.seed(warm_info())
    for _ in range(3):
        stats.record_token(9_000, streams=3)
    load = WorkerLoad()
    for _ in range(2):
        load.begin(prompt_tokens=40, new_tokens=100).tokens = 10
    # Two streams decoding, batch of 4: no wait, and the TPOT measured with three in the batch.
    free = predict(stats, load, 3, 80, batch_slots=4)
    assert free.wait_us == 0 and free.ttft_us == pytest.approx(80_000)
    assert (free.tpot_us, free.basis) == (9_000, "measured at 3 streams")
    # The same load on a worker serving one at a time: it waits for both.
    serial = predict(stats, load, 3, 80)
    assert serial.wait_us > 0
    # A full batch: the request starts when the first running request finishes.
    load.begin(prompt_tokens=40, new_tokens=100).tokens = 95
    load.begin(prompt_tokens=40, new_tokens=100).tokens = 50
    full = predict(stats, load, 4, 80, batch_slots=4)
    # Four in the batch is unmeasured: three streams' 9 ms scaled by 4/3, for its 5 tokens left.
    assert full.wait_us == pytest.approx(5 * 12_000)


def test_a_batching_worker_prefills_the_prompts_queued_before_a_newcomer_first() -> None:
    stats = LiveStats(alpha=1.0)
    stats.seed(warm_info(ttft_us=400_000, prompt_tokens=40))  # prefill: 10 ms per prompt token
    stats.record_token(10_000, streams=3)
    load = WorkerLoad()
    load.begin(prompt_tokens=40, new_tokens=100).tokens = 10  # decoding
    # Two relayed prompts without a first token yet, due before the newcomer, one due after it.
    load.begin(prompt_tokens=30, new_tokens=50, deadline=5.0)
    load.begin(prompt_tokens=20, new_tokens=50, deadline=6.0)
    load.begin(prompt_tokens=90, new_tokens=50, deadline=20.0)
    assert queued_prefills(load.tickets, 10.0) == load.tickets[1:3]
    # A free slot, but the worker prefills one prompt at a time, earliest deadline first: the
    # newcomer's 80-token prefill comes after 0.3 s and 0.2 s of theirs.
    newcomer = predict(stats, load, 3, 80, deadline=10.0, batch_slots=8)
    assert newcomer.wait_us == pytest.approx(500_000)
    assert newcomer.ttft_us == pytest.approx(500_000 + 800_000)
    assert "behind 2 queued prefills" in newcomer.basis
    # Due first, it is prefilled first.
    first = predict(stats, load, 3, 80, deadline=1.0, batch_slots=8)
    assert first.wait_us == 0 and first.ttft_us == pytest.approx(800_000)


def test_a_batching_worker_keeps_a_request_waiting_until_the_batch_is_small_enough_for_its_budget() -> None:
    stats = LiveStats(alpha=1.0)
    stats.seed(warm_info())
    stats.record_token(10_000, streams=1)
    stats.record_token(30_000, streams=2)
    assert budget_slots(stats, 8, 0, 0.0) == 8
    assert budget_slots(stats, 8, 0, 35_000.0) == 2
    # Even alone it misses: its budget is lost whatever the batch, so it holds nobody back.
    assert budget_slots(stats, 8, 0, 5_000.0) == 8
    assert budget_slots(stats, 8, 0, 0.0, ahead_budgets_us=[5_000.0, 35_000.0]) == 2
    load = WorkerLoad()
    load.begin(prompt_tokens=40, new_tokens=100).tokens = 90  # 10 tokens left
    # No per-token budget: a free slot, no wait, two streams' TPOT.
    free = predict(stats, load, 2, 80, batch_slots=8)
    assert free.wait_us == 0 and free.tpot_us == 30_000
    # 20 ms per token: two in the batch would be 30 ms, so it waits for the running one, then runs
    # alone at one stream's 10 ms.
    tight = predict(stats, load, 2, 80, batch_slots=8, token_budget_us=20_000.0)
    assert tight.wait_us == pytest.approx(10 * 10_000)
    assert tight.tpot_us == 10_000
    # 35 ms per token allows a batch of two: no wait.
    assert predict(stats, load, 2, 80, batch_slots=8, token_budget_us=35_000.0).wait_us == 0


def test_a_batching_worker_holds_by_its_own_step_figures_when_it_publishes_them() -> None:
    stats = LiveStats(alpha=1.0)
    stats.seed(warm_info())
    stats.record_token(40_000, streams=1)
    stats.record_token(60_000, streams=2)  # the router saw 60 ms tokens with two streams
    # The worker measured a 2-row step of 95 ms (e.g. with another worker busy on its cores): over
    # an 88 ms budget, so it holds a second request; the router predicts that hold.
    worker_steps = {1: 40_000.0, 2: 95_000.0}
    assert budget_slots(stats, 8, 0, 88_000.0) == 2
    assert budget_slots(stats, 8, 0, 88_000.0, worker_steps) == 1
    load = WorkerLoad()
    load.begin(prompt_tokens=40, new_tokens=100).tokens = 90  # 10 tokens left
    held = predict(stats, load, 2, 80, batch_slots=8, token_budget_us=88_000.0, worker_steps_us=worker_steps)
    assert held.wait_us == pytest.approx(10 * 40_000)
    assert predict(stats, load, 2, 80, batch_slots=8, token_budget_us=88_000.0).wait_us == 0
    # The running request's own tight budget holds a newcomer that has none, as the worker's does.
    load.tickets[0].token_budget_us = 50_000.0
    assert predict(stats, load, 2, 80, batch_slots=8, worker_steps_us=worker_steps).wait_us > 0
    # Sizes are reached one admission at a time: a cheap 4-row step does not skip a costly 2-row one.
    assert budget_slots(stats, 8, 0, 88_000.0, {1: 40_000.0, 2: 95_000.0, 4: 80_000.0}) == 1
    # Unmeasured sizes scale from the most rows measured: 3 rows at 3/2 of 2 rows' 50 ms.
    assert budget_slots(stats, 8, 0, 76_000.0, {1: 40_000.0, 2: 50_000.0}) == 3


def test_a_batching_worker_holds_a_newcomer_whose_prefill_would_break_a_running_budget() -> None:
    stats = LiveStats(alpha=1.0)
    stats.seed(warm_info(ttft_us=400_000, prompt_tokens=40))  # prefill: 10 ms per prompt token
    stats.record_token(10_000, streams=1)
    stats.record_token(12_000, streams=2)
    load = WorkerLoad()
    # Running for 0.5 s since its first token, 50 of 100 tokens made, 15 ms per token budget: its 99
    # gaps may take 1.485 s; 0.5 s so far and 50 more tokens at two streams' 12 ms leave 0.385 s.
    running = load.begin(prompt_tokens=40, new_tokens=100, token_budget_us=15_000.0)
    running.tokens, running.first_token_at = 50, 10.0
    # A 20-token prompt (0.2 s of prefill) fits in what is left: it starts at once.
    short = predict(stats, load, 2, 20, now_s=10.5, batch_slots=8)
    assert short.wait_us == 0 and stalled_budgets(load.tickets, 200_000, 12_000, 10.5) == []
    # An 80-token prompt (0.8 s) does not: it waits for the running request's 50 tokens.
    long = predict(stats, load, 2, 80, now_s=10.5, batch_slots=8)
    assert stalled_budgets(load.tickets, 800_000, 12_000, 10.5) == [running]
    assert long.wait_us == pytest.approx(50 * 12_000)
    assert long.ttft_us == pytest.approx(50 * 12_000 + 800_000)
    assert "cannot absorb its prefill" in long.basis
    # A running request without a per-token budget holds nobody.
    running.token_budget_us = 0.0
    assert predict(stats, load, 2, 80, now_s=10.5, batch_slots=8).wait_us == 0


def test_requests_waiting_for_a_batch_slot_run_before_a_newcomer_due_later() -> None:
    load = WorkerLoad()
    for left in (3, 5):  # two running with 3 and 5 units of work left
        load.begin(prompt_tokens=1, new_tokens=100).tokens = 100 - left
    queued = load.begin(prompt_tokens=1, new_tokens=4, deadline=1.0)  # 4 units, due first

    def work(ticket: Ticket) -> float:
        return float(100 - ticket.tokens) if ticket.tokens else 4.0

    # Two slots: the queued request takes the first freed (at 3) until 7; the newcomer gets the
    # next slot freed, at 5. Counting the running finishes alone said 3.
    assert batch_wait_us(load.tickets, 2, deadline=2.0, remaining=work) == 5.0
    # One slot (the newcomer's budget allows no company): each runs in turn, 3, 5 ... then 9.
    assert batch_wait_us(load.tickets, 1, deadline=2.0, remaining=work) == 9.0
    # A newcomer due before the queued one goes ahead of it.
    assert batch_wait_us(load.tickets, 2, deadline=0.5, remaining=work) == 3.0
    # A free slot: no wait.
    load.end(queued)
    assert batch_wait_us(load.tickets, 3, deadline=2.0, remaining=work) == 0.0
