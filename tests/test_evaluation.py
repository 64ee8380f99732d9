"""When the round loop evaluates (node/evaluation.py): by default after the first round,
then within 5 % of the time; `--eval-every N` every N rounds; 0 never before the end."""

import pytest

from locoswarm.node.evaluation import EVAL_SHARE, EvalSchedule, timed


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(schedule: EvalSchedule, clock: Clock, *, rounds: int, round_s: float, eval_s: float) -> list[int]:
    """The rounds (1-based counts) after which `schedule` evaluated, with rounds of
    `round_s` and evaluations of `eval_s` on one clock; the evaluations' share of the time."""
    evaluated = []
    for done in range(1, rounds + 1):
        clock.now += round_s
        if schedule.due(done):
            clock.now += eval_s
            schedule.took(eval_s)
            evaluated.append(done)
    return evaluated


def test_the_default_evaluates_after_the_first_round_then_within_its_share_of_the_time():
    clock = Clock()
    # The tiny spec on 2 cores: a round 0.36 s of training, an evaluation 0.19 s.
    evaluated = run(EvalSchedule(None, clock=clock), clock, rounds=200, round_s=0.36, eval_s=0.19)
    assert evaluated[0] == 1
    total_s = 200 * 0.36 + len(evaluated) * 0.19
    share = len(evaluated) * 0.19 / total_s
    assert 0.8 * EVAL_SHARE < share <= EVAL_SHARE, (share, evaluated)
    gaps = {b - a for a, b in zip(evaluated, evaluated[1:])}
    assert gaps <= {10, 11}, gaps  # 19 × 0.19 s = 3.61 s of rounds between two evaluations


def test_an_evaluation_cheap_beside_a_round_runs_every_round():
    clock = Clock()
    assert run(EvalSchedule(None, clock=clock), clock, rounds=20, round_s=30.0, eval_s=0.5) == list(range(1, 21))


def test_a_fixed_interval_ignores_the_time_and_zero_never_evaluates():
    clock = Clock()
    assert run(EvalSchedule(3, clock=clock), clock, rounds=10, round_s=0.1, eval_s=5.0) == [3, 6, 9]
    assert run(EvalSchedule(1, clock=clock), clock, rounds=4, round_s=0.1, eval_s=5.0) == [1, 2, 3, 4]
    assert run(EvalSchedule(0, clock=clock), clock, rounds=10, round_s=0.1, eval_s=5.0) == []


@pytest.mark.parametrize("every, share", [(-1, EVAL_SHARE), (None, 0.0), (None, 1.0), (None, float("nan"))])
def test_a_bad_schedule_is_refused(every, share):
    with pytest.raises(ValueError, match="eval schedule"):
        EvalSchedule(every, share=share)


def test_timed_returns_the_result_and_the_seconds_the_work_took():
    result, seconds = timed(lambda: sum(range(100_000)))
    assert result == sum(range(100_000)) and 0 < seconds < 10
