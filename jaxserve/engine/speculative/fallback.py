"""Auto fallback: a sequence whose proposals do not pay for themselves stops speculating.

Break-even, from measured costs: a step in which sequences verify proposals costs t_verify
(the target's step, read back) plus t_draft (the proposer's round before it); a plain step
costs t_plain. A sequence that gains tau tokens per verifying step comes out ahead iff
tau / (t_draft + t_verify) > 1 / t_plain, so the break-even is

    tau* = (t_draft + t_verify) / t_plain   (tokens per step),

each time a moving average over the engine's recent steps (the costs are the batch's: one
sequence's proposals add rows to a shared step; judging each sequence against the batch's
costs is the per-request approximation). A sequence is judged at every step once it has
verified proposals in MIN_RUNS steps, by its tokens per verifying step so far: below
MARGIN x tau* (step times are noisy; a marginal case keeps speculating), or having kept
nothing, it gets no proposals for the rest of its request, and `spec_fallback_sequences`
counts it. Plain steps happen by themselves (no proposal found, a sequence near max_tokens);
until MIN_PLAIN were measured, a sequence due for judgement asks for probe steps without
proposals (`wants_probe`).

Judging each request afresh costs each one MIN_RUNS speculative steps, which a useless
proposer makes several times dearer than plain ones: on short requests that alone loses more
than the fallback saves. So the engine remembers its verdicts: after a sequence falls back,
only every `trial_every`-th new greedy sequence speculates (a trial), the others start
without proposals (`spec_fallback_untried`). Each further fall-back doubles `trial_every` (up
to MAX_TRIAL_EVERY). A trial is judged as above but after MIN_TRIAL_RUNS verifying steps, not
MIN_RUNS: the break-even is measured by then, and 4 steps of k proposals tell a useless
proposer from a useful one (with acceptance 0.02 and k = 4, 16 proposals keep one or two, far
below any break-even above 1; a useful one keeps about half), so the trials then cost about
MIN_TRIAL_RUNS x (tau* - 1) / 64 plain steps per request. A trial that clearly passes a
judgement (at least max(tau*, 1) / MARGIN tokens per step) resets `trial_every` to 1, so a
proposer that becomes useful again (another workload) is taken up again within a few
requests. A marginal trial keeps
speculating but resets nothing: one sequence's proposals among many plain rows barely change
the batch's step time, so tau* is then near 1 and useless proposals would pass a bare
comparison. Sampled requests are always judged on their own: whether a step speculates changes
a sampled draft's tokens, and a seeded request's tokens must not depend on the requests
before it.

Greedy tokens and point-mass proposals are unaffected (the target keeps its own tokens either
way); sampled drafts keep the target's distribution exactly, though once a request is judged,
which of its steps speculate depends on measured time. Host only, no device.
"""

from __future__ import annotations

MIN_RUNS = 16  # verifying steps a sequence has before it is judged
MIN_TRIAL_RUNS = 4  # the same for a trial, after fall-backs
MIN_PLAIN = 4  # plain steps measured before the break-even is trusted
SMOOTHING = 0.2  # weight of the newest measurement in the moving averages
MARGIN = 0.9  # a sequence falls back below MARGIN x the break-even
MAX_TRIAL_EVERY = 64  # after fall-backs, at least one new greedy sequence in this many tries


class _Average:
    def __init__(self):
        self.value: float | None = None
        self.count = 0

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + SMOOTHING * (x - self.value)
        self.count += 1


class Fallback:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.draft_s, self.verify_s, self.plain_s = _Average(), _Average(), _Average()
        self.runs: dict[object, list[int]] = {}  # sequence -> [verifying steps, kept proposals]
        self.fallen: set = set()  # sequences judged not worth proposing for
        self.num_fallen = 0
        self.seen: set = set()  # running sequences already admitted or turned away
        self.passed: set = set()  # trials whose first judgement kept them speculating
        self.trials: set = set()  # running sequences admitted as trials (after fall-backs)
        self.trial_every = 1  # 1: every new sequence speculates
        self.since_trial = 0  # new greedy sequences turned away since the last trial
        self.num_untried = 0

    # ---- measurements ----
    def record_draft(self, seconds: float) -> None:
        self.draft_s.add(seconds)

    def record_step(self, seconds: float, verified: bool) -> None:
        """A decode step, dispatch to read back: one that verified proposals, or a plain one."""
        (self.verify_s if verified else self.plain_s).add(seconds)

    def record_run(self, seq, kept: int) -> None:
        runs = self.runs.setdefault(seq, [0, 0])
        runs[0] += 1
        runs[1] += kept

    @property
    def break_even(self) -> float | None:
        """tau*, tokens per verifying step (None until every cost was measured)."""
        if None in (self.draft_s.value, self.verify_s.value) \
                or self.plain_s.count < MIN_PLAIN or self.plain_s.value <= 0:
            return None
        return (self.draft_s.value + self.verify_s.value) / self.plain_s.value

    # ---- decisions ----
    def _due(self, seq) -> bool:
        return self.enabled and seq not in self.fallen and self.runs.get(seq, (0, 0))[0] >= (
            MIN_TRIAL_RUNS if seq in self.trials else MIN_RUNS)

    def wants_probe(self, seqs: list) -> bool:
        """A step without proposals would measure t_plain that a judgement needs."""
        return self.plain_s.count < MIN_PLAIN and any(self._due(s) for s in seqs)

    def proposing(self, seqs: list, running: list | None = None) -> list:
        """Of the decoding sequences `seqs`, those still worth proposing for (judging those
        that are due). Sequences not `running` (default: `seqs`) are forgotten, at the latest
        when a sequence that has not fallen back decodes."""
        if all(seq in self.fallen for seq in seqs):  # at every step of a fallen-back engine
            return []
        running = set(seqs if running is None else running)
        for gone in [s for s in self.runs if s not in running]:
            del self.runs[gone]
        self.fallen &= running
        self.seen &= running
        self.passed &= running
        self.trials &= running
        for seq in seqs:
            if seq not in self.seen:
                self.seen.add(seq)
                self._admit(seq)
        tau_star = self.break_even
        for seq in seqs:
            if not self._due(seq):
                continue
            runs, kept = self.runs[seq]
            if kept == 0 or (tau_star is not None and (runs + kept) / runs < MARGIN * tau_star):
                self.fallen.add(seq)
                self.passed.discard(seq)
                self.num_fallen += 1
                self.trial_every = min(2 * self.trial_every, MAX_TRIAL_EVERY)
            elif tau_star is not None and seq not in self.passed \
                    and (runs + kept) / runs >= max(tau_star, 1.0) / MARGIN:
                self.passed.add(seq)
                self.trial_every = 1
        return [s for s in seqs if s not in self.fallen]

    def _admit(self, seq) -> None:
        """A new sequence: a trial, or (greedy, after fall-backs) turned away untried."""
        if not self.enabled or self.trial_every == 1 or not _greedy(seq):
            return
        self.since_trial += 1
        if self.since_trial >= self.trial_every:
            self.since_trial = 0
            self.trials.add(seq)
            return
        self.fallen.add(seq)
        self.num_fallen += 1
        self.num_untried += 1

    def stats(self, running: list) -> dict:
        """Costs in seconds per step (moving averages), the break-even, sequences fallen back
        (since the start, those turned away untried among them; `spec_fallback_running`:
        among those `running` now), and how many new greedy sequences one trial stands for."""
        tau_star = self.break_even
        return {"spec_auto_fallback": self.enabled,
                "spec_draft_step_s": self.draft_s.value, "spec_verify_step_s": self.verify_s.value,
                "spec_plain_step_s": self.plain_s.value,
                "spec_break_even_tokens_per_step": None if tau_star is None
                else round(tau_star, 4),
                "spec_fallback_sequences": self.num_fallen,
                "spec_fallback_untried": self.num_untried,
                "spec_trial_every": self.trial_every,
                "spec_fallback_running": len(self.fallen & set(running))}


def _greedy(seq) -> bool:
    params = getattr(seq, "params", None)
    return params is not None and params.greedy
