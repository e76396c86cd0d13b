"""Learning-rate schedules (llm.c's llmc/schedulers.h) against hand-computed values."""

import math

import pytest

from llmcu.schedule import SCHEDULES, check_schedule, grad_accum_steps, learning_rate

# max_steps=10, warmup=2, final_frac=0.1, base_lr=1.0 unless a case says otherwise.
# warmup: lr*(step+1)/warmup -> 0.5, 1.0; decay ratio = (step-2)/8 after it.
CASES = [
    # cosine: 0.1 + 0.9 * 0.5*(1+cos(pi*ratio))
    ("cosine", 0, 0.5), ("cosine", 1, 1.0), ("cosine", 2, 1.0),
    ("cosine", 6, 0.55),                      # ratio 1/2: coeff 0.5
    ("cosine", 9, 0.1342542103),              # ratio 7/8: coeff 0.5*(1-0.9238795325)=0.0380602337
    # linear: 1 - ratio*0.9
    ("linear", 0, 0.5), ("linear", 4, 0.775), ("linear", 6, 0.55), ("linear", 9, 0.2125),
    # constant: base lr throughout (llm.c ignores warmup and final_frac here)
    ("constant", 0, 1.0), ("constant", 5, 1.0), ("constant", 9, 1.0),
    # wsd: decay from int(0.8*10)=8 over 2 steps, 0.1 + 0.9*(1-sqrt(ratio))
    ("wsd", 0, 0.5), ("wsd", 1, 1.0), ("wsd", 7, 1.0), ("wsd", 8, 1.0),
    ("wsd", 9, 0.3636038969),                 # ratio 1/2: 1-sqrt(0.5) = 0.2928932188
]


@pytest.mark.parametrize("schedule,step,expected", CASES)
def test_schedule_values(schedule, step, expected):
    assert learning_rate(schedule, step, 10, 1.0, warmup=2, final_frac=0.1) == pytest.approx(
        expected, abs=1e-9)


def test_base_lr_scales_every_schedule():
    for schedule in SCHEDULES:
        for step in range(10):
            assert learning_rate(schedule, step, 10, 3e-4, 2, 0.1) == pytest.approx(
                3e-4 * learning_rate(schedule, step, 10, 1.0, 2, 0.1), rel=1e-12)


def test_default_final_frac_means_no_decay():
    for schedule in SCHEDULES:
        assert [learning_rate(schedule, s, 10, 1.0) for s in range(10)] == [1.0] * 10


def test_wsd_decay_point_truncates_like_llmc():
    # max_steps=7: int(0.8*7) = int(5.6) = 5, so step 5 starts the decay (ratio 0), step 6 has ratio 1/2
    assert learning_rate("wsd", 4, 7, 1.0, 0, 0.0) == 1.0
    assert learning_rate("wsd", 5, 7, 1.0, 0, 0.0) == 1.0
    assert learning_rate("wsd", 6, 7, 1.0, 0, 0.0) == pytest.approx(1 - 0.5 ** 0.5, abs=1e-12)


def test_cosine_without_warmup_starts_at_base_lr_and_decays_to_final():
    lrs = [learning_rate("cosine", s, 100, 1.0, 0, 0.0) for s in range(100)]
    assert lrs[0] == 1.0
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))


def test_unknown_schedule_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        learning_rate("exponential", 0, 10, 1.0)
    for name in ("exponential", "cosine", "linear", "constant", "wsd"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="cosine, linear, constant, wsd"):
        check_schedule("Cosine")


def test_step_out_of_range():
    with pytest.raises(ValueError, match="step must be in"):
        learning_rate("cosine", 10, 10, 1.0)


def test_grad_accum_steps():
    assert grad_accum_steps(-1, 4, 64) == 1
    assert grad_accum_steps(4 * 64, 4, 64) == 1
    assert grad_accum_steps(8 * 64 * 3, 4, 64) == 6
    assert grad_accum_steps(4 * 64 * 2 * 4, 4, 64, num_processes=2) == 4


@pytest.mark.parametrize("total", [100, 0, -2, 4 * 64 + 1])
def test_grad_accum_steps_rejects_non_multiples(total):
    with pytest.raises(ValueError) as e:
        grad_accum_steps(total, 4, 64)
    msg = str(e.value)
    assert str(total) in msg and "256" in msg and "multiple" in msg, msg
