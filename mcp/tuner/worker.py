"""One worker of a study that any number of workers share, on one machine or many: the
search's coordination, apart from any tracking.

- The study's total (``trials``) holds whatever the number of workers: each trial needs a
  ticket (``ticket-<i>``, i < the total) that one worker alone can claim.
- Work done once per study (the uniform starting trials, the winners) is done by whichever
  worker asks first, and taken over when that worker's heartbeat stops.
- Each worker holds a slot (``worker-<k>``) while it works. The first (k = 0) samples with
  the study's seed, so a lone worker's study is reproducible; the others reseed their
  sampler (Optuna's ``reseed_rng``, what it does for threads of one process): workers
  seeded alike would propose the same parameters when they ask together.
- Trials a dead worker left running are failed and queued once more; what it left for
  the outside world (an MLflow run, say) is ended by the :class:`Recorder`.
- The winners (the best feasible trial, or the ``finalists`` best, or the feasible
  Pareto front) are rebuilt from the starting model and fine-tuned once, for all workers.

What the outside world sees goes through a :class:`Recorder`: the ``mcp search`` stage's
logs each trial and winner as MLflow runs and registers the winners; the Python API's
(:func:`mcp.search`) keeps the rebuilt models in memory.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Protocol

import optuna

from mcp.config import SearchConfig
from mcp.errors import McpError
from mcp.evaluation.benchmark import non_dominated
from mcp.tuner.claims import Claims, Heartbeat
from mcp.tuner.objective import (
    Rebuilt,
    SearchProblem,
    TrialLog,
    best_trials,
    enqueue_uniform,
    finalist_rank,
    latency_key,
    make_objective,
    no_log,
    rebuild,
    start_note,
    trial_table,
)
from mcp.tuner.progress import TrialProgress
from mcp.tuner.study import STALE_HEARTBEATS, _storage, fail_stale_trials

RUN_ATTR = "mlflow_run_id"  # a trial's user attribute: the id of the log its recorder opened for it
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class Recorder(Protocol):
    """What a worker tells the outside world."""

    def trial_log(self, trial) -> ContextManager[TrialLog]:
        """One trial's log (its id, if any, set as the trial's ``RUN_ATTR``)."""

    def end_dead(self, log_id: str) -> list[str]:
        """End what a dead worker left open under ``log_id``; the ids ended."""

    def say(self, line: str) -> None:
        """One line for the user (a notice, or a warning starting ``warning:``)."""

    def note(self, key: str, value: str) -> None:
        """A fact about the study: how it started (``uniform_start``, ``uniform_warning``)."""

    def known_winners(self) -> dict[int, dict[str, Any]]:
        """Winners an earlier call or another worker already recorded, by trial number."""

    def winner(self, row: dict[str, Any], build: Callable[[], Rebuilt]) -> dict[str, Any]:
        """Rebuild one winner (``build()``: trial ``row`` rebuilt and fine-tuned) and record
        it; its record (JSON): at least ``trial``, ``val_accuracy`` and ``within_budget``."""

    def challenger(self, winner: dict[str, Any]) -> None:
        """The most accurate winner within the budget."""

    def after(self, winners: list[dict[str, Any]]) -> None:
        """Once, after the winners: what follows them (export, benchmark)."""

    def discard(self, winners: list[dict[str, Any]]) -> str:
        """Undo what recording ``winners`` left in the registry (a later check failed);
        says, in a few words, what is left."""


class Quiet:
    """A recorder that keeps the rebuilt winners in memory and says nothing but warnings."""

    def __init__(self, say: Callable[[str], None] | None = None):
        self.models: dict[int, Rebuilt] = {}
        self._say = say

    def trial_log(self, trial) -> ContextManager[TrialLog]:
        return no_log(trial)

    def end_dead(self, log_id: str) -> list[str]:
        return []

    def say(self, line: str) -> None:
        if self._say is not None:
            self._say(line)

    def note(self, key: str, value: str) -> None:
        pass

    def known_winners(self) -> dict[int, dict[str, Any]]:
        return {}

    def winner(self, row: dict[str, Any], build: Callable[[], Rebuilt]) -> dict[str, Any]:
        rebuilt = self.models[row["number"]] = build()
        return {"trial": rebuilt.number, "within_budget": True, **rebuilt.metrics}

    def challenger(self, winner: dict[str, Any]) -> None:
        pass

    def after(self, winners: list[dict[str, Any]]) -> None:
        pass

    def discard(self, winners: list[dict[str, Any]]) -> str:
        return "nothing was registered"


@dataclass(frozen=True)
class Plan:
    """How the study runs: its name and storage, its total, and how its winners are chosen."""

    name: str
    storage: str
    trials: int
    heartbeat: float = 30.0
    timeout: float = 0.0
    pareto: bool = False
    latency: bool = False  # pareto: latency is a third objective
    finalists: int = 1
    final_epochs: int = 0
    final_prune_epochs: int = 0
    sampler: str = "tpe"
    once_key: str = ""  # what else makes the winners of one call differ from another's (registering, exporting)

    @classmethod
    def of(cls, cfg: SearchConfig) -> "Plan":
        """The plan of a ``mcp search`` configuration."""
        return cls(cfg.name(), cfg.storage, cfg.trials, cfg.heartbeat, cfg.timeout, cfg.mode == "pareto", cfg.latency,
                   cfg.finalists, cfg.final_epochs, cfg.final_prune_epochs, cfg.sampler,
                   f"-register-{cfg.register}-export-{cfg.export}-benchmark-{cfg.benchmark}")


class StudyWorker:
    """One worker of the study ``plan`` names, running trials of ``problem`` until the
    study has its total, then the winners (see the module docstring)."""

    def __init__(self, problem: SearchProblem | None, plan: Plan, study, recorder: Recorder, show: bool | None = None):
        """``problem`` may come later (set it before :meth:`run`): when its starting model is
        itself work done once for the study (a baseline trained by the first worker)."""
        self.problem, self.plan, self.study, self.recorder, self.show = problem, plan, study, recorder, show
        self.claims = Claims(plan.storage, plan.name, heartbeat=plan.heartbeat,
                             grace=STALE_HEARTBEATS * plan.heartbeat)
        self.slot = take_slot(self.claims)
        if self.slot:  # another worker holds slot 0 and samples with the study's seed
            self.study.sampler.reseed_rng()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a lost database: the slot goes stale and is taken over
            self.claims.release(f"worker-{self.slot}")
        self.claims.close()

    def once(self, what: str, work: Callable[[], Any], doing: str) -> tuple[Any, bool]:
        """``work()`` done once for the study (see :meth:`Claims.once`): taken over, in one
        line, from a worker that stopped; waited for, in one line, while another does it."""
        def taken_over(dead: str) -> None:
            ended = self.recorder.end_dead(dead)
            self.recorder.say(f"warning: the worker that was to {doing} for study {self.plan.name!r} stopped; this "
                              f"one does it" + (f" (runs ended KILLED: {', '.join(ended)})" if ended else ""))

        def waiting(row: dict[str, Any]) -> None:
            self.recorder.say(f"study {self.plan.name!r}: waiting for worker {row['owner']} to {doing}")

        return self.claims.once(what, work, taken_over=taken_over, waiting=waiting)

    def run(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
        """(the study's trials, the winners' records, why no strictly uniform start was possible)."""
        self.once("tickets-of-earlier-trials", self._ticket_earlier_trials, "count the earlier trials")
        warning, _ = self.once("uniform-start", self._start_uniform, "queue the uniform starting trials")
        self._optimize()
        trials = trial_table(self.study, self.problem.budget_on)
        p = self.plan
        what = (f"winners-of-{len(trials)}-trials-final-epochs-{p.final_epochs}"
                + (f"-prune-{p.final_prune_epochs}" if p.final_prune_epochs else "") + p.once_key
                + (f"-finalists-{p.finalists}" if p.finalists > 1 else ""))
        winners, _ = self.once(what, lambda: self._winners(trials), "register the winners")
        return trials, winners, warning

    # -- the start ----------------------------------------------------------------------------------------------

    def _ticket_earlier_trials(self) -> int:
        """A study made before tickets existed: its finished trials hold tickets, so that the
        total counts them. Returns how many (0 for a new study)."""
        done = self.study.get_trials(deepcopy=False, states=DONE)
        for i, trial in enumerate(done):
            self.claims.claim(f"ticket-{i}", str(trial.number))
        return len(done)

    def _start_uniform(self) -> str:
        """Seed a new study with the uniform configuration(s) that fill the budget and say so;
        when no strictly uniform one can be seeded, say why in one warning line (the study
        then starts from the closest uniform-where-allowed configuration, if any)."""
        start = enqueue_uniform(self.study, self.problem, not self.plan.pareto, limit=self.plan.trials)
        if start.queued:
            self.recorder.note("uniform_start", start.describe())
            if self.show is not False:
                self.recorder.say(f"study {self.plan.name!r}: {start_note(start, self.plan.trials, self.plan.sampler)}")
        if start.warning:
            self.recorder.note("uniform_warning", start.warning)
            self.recorder.say(f"warning: {start.warning}")
        return start.warning

    # -- the trials ---------------------------------------------------------------------------------------------

    def _done(self) -> int:
        return len(self.study.get_trials(deepcopy=False, states=DONE))

    def _optimize(self) -> None:
        """Run trials until the study has its total, however many workers share it; then
        wait for the other workers' running trials, so that every worker chooses the
        winners from the same finished study."""
        p, problem = self.plan, self.problem
        progress = TrialProgress(p.name, p.trials, self._done(), problem.budget, problem.budget_on, problem.budget_ms,
                                 latency_key(problem.budget_batch), self.show)
        objective = make_objective(problem, self.recorder.trial_log)
        started, attempts, waited = time.monotonic(), 0, False
        while True:
            self._sweep()
            out_of_time = bool(p.timeout) and time.monotonic() - started > p.timeout
            ticket = None if out_of_time or attempts >= p.trials else self._take_ticket()
            if ticket is not None:
                attempts += 1  # a worker tries at most `trials` trials per call, whatever fails
                finished = self._run_trial(ticket, objective)
                if finished is not None:
                    progress.trial(self.study._storage.get_trial(finished._trial_id), self._done())
                continue
            if not self._unfinished():
                break
            if not waited and self.show is not False:
                self.recorder.say(f"study {p.name!r}: waiting for other workers' running trials")
                waited = True
            time.sleep(min(2.0, p.heartbeat))
        progress.close()

    def _take_ticket(self) -> str | None:
        return take_ticket(self.claims, self.plan.trials)

    def _unfinished(self) -> bool:
        """Whether some worker still works on the study: a trial runs, or a ticket is held for
        a trial not yet asked for (or one that failed and is about to be freed)."""
        states = {t.number: t.state for t in self.study.get_trials(deepcopy=False)}
        if optuna.trial.TrialState.RUNNING in states.values():
            return True
        return any(not row["value"] or states.get(int(row["value"])) not in DONE
                   for row in self.claims.rows("ticket-"))

    def _run_trial(self, ticket: str, objective):
        """Ask Optuna for the next trial (a queued one first), run it under ``ticket`` and tell
        Optuna how it ended; the trial when it finished (complete, pruned or infeasible)."""
        study, claims, p = self.study, self.claims, self.plan
        # Optuna says heartbeats are meant for study.optimize: this loop beats the trial itself
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used", category=UserWarning)
        try:
            for _ in range(5):
                trial = study.ask()
                if claims.claim(f"run-{trial.number}"):
                    break
                # two workers popped the same queued trial at once (SQLite reads without locking): the other runs it
            else:
                claims.release(ticket)
                return None
            claims.set_value(ticket, str(trial.number))
        except BaseException:  # a signal (or a lost database) before the trial started: its ticket is free again
            claims.release(ticket)
            raise
        # beat the trial in Optuna's storage, as study.optimize does: a worker that dies leaves a stale trial
        storage = _storage(p.storage, p.heartbeat)
        beat = Heartbeat(lambda: storage.record_heartbeat(trial._trial_id), p.heartbeat, "mcp-trial-heartbeat")
        try:
            values = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
            return trial
        except (RuntimeError, ValueError, McpError) as exc:
            study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            claims.release(ticket)  # another trial takes its place
            self.recorder.say(f"warning: trial {trial.number} of study {p.name!r} failed: "
                              f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]}")
            return None
        except BaseException:  # Ctrl-C, SIGTERM: the trial ends FAIL (its log KILLED) and its ticket is free again
            try:
                study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            finally:
                claims.release(ticket)
            raise
        finally:
            beat.stop()
        study.tell(trial, values, skip_if_finished=True)
        return trial

    def _sweep(self) -> None:
        sweep(self.study, self.plan, self.claims, self.recorder)

    # -- the winners --------------------------------------------------------------------------------------------

    def chosen(self, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The trials to rebuild: the best feasible (or the ``finalists`` best), or the
        feasible Pareto front, most accurate first."""
        problem = self.problem
        if not self.plan.pareto:
            return best_trials(trials, self.plan.finalists, problem.budget_ms, problem.budget_batch)
        done = [t for t in trials if t["state"] == "complete" and t["feasible"]]
        points = [(-t["val_accuracy"], t["size_bytes"]) + ((t["latency_ms_p50_cpu"],) if self.plan.latency else ())
                  for t in done]
        return sorted((done[i] for i in non_dominated(points)), key=lambda t: -t["val_accuracy"])

    def _winners(self, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rebuild, fine-tune and record the chosen trials (those an earlier call recorded are
        reused); finalists are ranked again on the validation split after the full
        fine-tuning. The first within the budget is the challenger."""
        known = self.recorder.known_winners()
        def build(row: dict[str, Any]) -> Callable[[], Rebuilt]:
            return lambda: rebuild(self.problem, row, self.plan.final_epochs, self.plan.final_prune_epochs)

        winners: list[dict[str, Any]] = []
        try:
            for t in self.chosen(trials):
                winners.append(known.get(t["number"]) or self.recorder.winner(t, build(t)))
            if len(winners) > 1 and not self.plan.pareto:
                problem = self.problem
                winners.sort(key=lambda w: finalist_rank(w, problem.budget_ms, problem.budget_batch))
            first = next((w for w in winners if w["within_budget"]), None)  # the most accurate that still fits
            if first is not None:
                self.recorder.challenger(first)
            self.recorder.after(winners)
        except McpError as exc:  # a winner failed a check: what this call registered goes
            left = self.recorder.discard([w for w in winners if not w.get("reused")])
            raise McpError(f"{exc}; {left}") from None
        return winners


def take_slot(claims: Claims) -> int:
    """Claim the lowest free worker slot (``worker-<k>``; a dead worker's slot is free once
    its heartbeat is stale) and return k: 0 for a worker alone on its study."""
    for k in itertools.count():
        row = claims.get(f"worker-{k}")
        if (claims.claim(f"worker-{k}") if row is None else claims.stale(row) and claims.take_over(row)):
            return k


def take_ticket(claims: Claims, total: int) -> str | None:
    """Claim the lowest free ticket below the study's ``total``, or None when all are held."""
    held = {row["key"] for row in claims.rows("ticket-")}
    for i in range(total):
        key = f"ticket-{i}"
        if key not in held and claims.claim(key):
            return key
    return None


def sweep(study, plan: Plan, claims: Claims, recorder: Recorder) -> None:
    """Trials a killed worker left running: failed (and queued once more), their logs ended
    by the recorder. The tickets of failed trials (and of a worker that died holding one
    before its trial started) are released, so that the study still reaches its total."""
    def warn(trial, what: str) -> None:
        ended = recorder.end_dead(trial.user_attrs.get(RUN_ATTR, ""))
        recorder.say(f"warning: trial {trial.number} of study {plan.name!r} was left running by a worker that "
                     f"stopped; it is {what}" + (f" (runs ended KILLED: {', '.join(ended)})" if ended else ""))

    for trial in fail_stale_trials(study, plan.storage, plan.heartbeat, claims.claim):
        warn(trial, "failed and queued once more")
    # A worker killed before its trial's first heartbeat leaves a running trial Optuna never
    # calls stale; the claim on the trial (kept fresh by the worker's own heartbeat) tells.
    # Twice the grace: Optuna's own check (which also queues the trial again) comes first.
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        row = claims.get(f"run-{trial.number}")
        since = claims.now() - row["beat"] if row else (datetime.datetime.now() - trial.datetime_start).total_seconds()
        if since > 2 * claims.grace and claims.claim(f"fail-{trial.number}"):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            warn(trial, "failed")
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    for row in claims.rows("ticket-"):
        if row["value"] == "" and claims.stale(row):
            claims.release(row["key"], row)
        elif row["value"] and states.get(int(row["value"])) == optuna.trial.TrialState.FAIL:
            claims.release(row["key"], row)


@contextlib.contextmanager
def working(problem: SearchProblem | None, plan: Plan, study, recorder: Recorder, show: bool | None = None):
    """A :class:`StudyWorker`, closed (its heartbeat stopped) on the way out."""
    worker = StudyWorker(problem, plan, study, recorder, show)
    try:
        yield worker
    finally:
        worker.close()
