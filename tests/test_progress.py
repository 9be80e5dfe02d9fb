"""The sweep's live progress block (lmtune.sweep.progress), driven by a fake clock."""

import io

from lmtune.sweep.progress import Progress, duration
from tests.helpers import Clock


def test_a_log_gets_the_running_trials_as_lines_every_interval_with_step_loss_rate_and_time_left():
    out, clock = io.StringIO(), Clock()
    p = Progress(out, 4, interval_s=30, clock=clock, tty=False)
    p.start("aaaa1111", 200)
    p.report("aaaa1111", {"step": 10, "loss": 4.5, "tokens_per_s": 12000.0})
    clock.t += 20
    p.report("aaaa1111", {"step": 50, "loss": 3.25, "tokens_per_s": 12345.6})
    p.tick()
    assert out.getvalue() == ""  # not yet 30 s since the start
    clock.t += 10
    p.tick()
    lines = out.getvalue().splitlines()
    assert lines[0] == "progress: 0/4 done, 1 running, 30s elapsed"
    # 40 steps in 30 s since its first report here: 150 steps left take 112 s
    assert lines[1] == "  aaaa1111  step 50/200  loss 3.250  12,346 tok/s  30s in, 1m 52s left"
    p.tick()
    assert len(out.getvalue().splitlines()) == 2  # once per interval
    p.end("aaaa1111")
    p.line("[1/4 done] ok       aaaa1111  val_loss=3.1")
    clock.t += 60
    p.tick()  # nothing running: no block
    assert out.getvalue().splitlines()[-1] == "[1/4 done] ok       aaaa1111  val_loss=3.1"
    assert "\x1b" not in out.getvalue()


def test_a_terminal_gets_the_block_redrawn_in_place_under_the_event_lines():
    out, clock = io.StringIO(), Clock()
    p = Progress(out, 2, clock=clock, tty=True)
    p.start("bbbb2222", 100)
    p.line("[0/2 done] start    bbbb2222  train.lr=0.001")
    text = out.getvalue()
    assert text.startswith("[0/2 done] start")
    assert "\x1b[2Kprogress: 0/2 done, 1 running" in text and "\x1b[2K  bbbb2222  step 0/100" in text
    out.truncate(0), out.seek(0)
    clock.t += 1
    p.report("bbbb2222", {"step": 20, "loss": 2.0})
    p.tick()
    # up over the two lines drawn, erase, draw again
    assert out.getvalue().startswith("\x1b[2F\x1b[J") and "step 20/100  loss 2.000" in out.getvalue()
    out.truncate(0), out.seek(0)
    p.tick()
    assert out.getvalue() == ""  # nothing changed: no redraw
    p.end("bbbb2222")
    p.close()
    assert out.getvalue() == "\x1b[2F\x1b[J"


def test_the_sweep_line_says_how_long_is_left_once_a_trial_finished():
    clock = Clock()
    p = Progress(io.StringIO(), 5, clock=clock, tty=False)
    clock.t += 120
    p.end("x")
    assert p.lines()[0] == "progress: 1/5 done, 0 running, 2m 00s elapsed, about 8m 00s left"
    assert [duration(s) for s in (0, 59.4, 61, 3600 * 2 + 600)] == ["0s", "59s", "1m 01s", "2h 10m"]


def test_a_run_sized_by_flops_shows_the_trainers_own_step_count():
    """train.flops (or tokens, epochs) sets a run's steps inside the trainer: its reports carry total_steps, which
    replace the config's train.steps (a ladder's run showed "step 7200/30")."""
    p = Progress(io.StringIO(), 1, clock=Clock(), tty=False)
    p.start("cccc3333", 30)
    p.report("cccc3333", {"step": 200, "total_steps": 8000, "loss": 1.9})
    assert p.lines()[1].startswith("  cccc3333  step 200/8000  loss 1.900")
