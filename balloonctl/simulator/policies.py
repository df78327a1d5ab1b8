"""The policies the simulator compares, and the registry of their names.

``balloonctl`` runs ``balloonctl.policy.decide``, the code the controller
runs. ``seed`` and ``oracle`` are references: the release-only rule
balloonctl started from, and a policy that reads the future demand from the
trace. ``mom`` and ``proxmox`` live in ``balloonctl.simulator.hostpolicies``.
"""

import dataclasses
from collections.abc import Callable, Sequence

from balloonctl.config import Settings
from balloonctl.domain_policy import global_params
from balloonctl.policy import (
    Action,
    History,
    Metric,
    Params,
    Sample,
    decide,
    is_foreign_change,
    note_manual_change,
)
from balloonctl.simulator.hostpolicies import MomPolicy, ProxmoxPolicy
from balloonctl.simulator.views import HostView, Policy, RunContext


def balloonctl_params(period: int, metric: Metric | None = None) -> Params:
    """Return the parameters the simulator runs ``balloonctl.policy`` with.

    These are the controller's defaults, built the way the controller builds
    them from its settings, for a stats period of ``period`` seconds. The
    seed and oracle policies take their buffer and step sizes from here too,
    so that every policy is measured against the same buffer.
    """
    params = global_params(Settings(stats_period=period))
    if metric is not None:
        params = dataclasses.replace(params, metric=metric)
    return params


class SeedPolicy:
    """The base rule alone: release ``min(unused - buffer, max_release)``.

    It never grows a guest. It releases on every report because in the model
    the balloon reaches a release of ``max_release`` well within one period,
    so waiting for the previous target would change nothing.
    """

    def __init__(self, params: Params) -> None:
        self.params = params

    def targets(self, view: HostView) -> dict[str, int]:
        params = self.params
        targets = {}
        for guest in view.guests:
            unused = guest.stats.unused
            if unused <= params.min_unused:
                continue
            release = min(unused - params.min_unused, params.max_release)
            if release >= params.min_release:
                targets[guest.name] = guest.stats.actual - release
        return targets


class BalloonctlPolicy:
    """``balloonctl.policy.decide`` per guest and period, as the controller calls it.

    Each guest keeps its own History. As in ``DomainWorker._step``, a balloon
    move that balloonctl did not request starts the manual-change grace
    period first. A release, grant or reset then sets the decision's target,
    and a keep leaves the target alone.
    """

    def __init__(self, params: Params) -> None:
        self.params = params
        self.histories: dict[str, History] = {}

    def targets(self, view: HostView) -> dict[str, int]:
        targets = {}
        for guest in view.guests:
            stats = guest.stats
            sample = Sample(
                actual=stats.actual,
                unused=stats.unused,
                maximum=guest.maximum,
                last_update=stats.last_update,
                taken_at=view.time,
                usable=stats.usable,
                available=stats.available,
                swap_in=stats.swap_in,
                major_fault=stats.major_fault,
            )
            history = self.histories.get(guest.name, History())
            if is_foreign_change(history, stats.actual):
                history = note_manual_change(
                    history, view.time, self.params, stats.actual
                )
            decision, history = decide(sample, history, self.params, view.available)
            self.histories[guest.name] = history
            if decision.action is not Action.KEEP and decision.target is not None:
                targets[guest.name] = decision.target
        return targets


class OraclePolicy:
    """Keep each guest at what it will need: overhead, demand and the buffer.

    The target at each step is the allocation the guest needs at the next
    step. Where demand rises faster than the balloon deflates, the oracle
    starts early enough to arrive in time. It is an upper bound on what a
    policy can release without letting free memory fall under the buffer.
    Page cache counts as free, since dropping it costs no swap in the model.
    """

    def __init__(self, context: RunContext, buffer: int) -> None:
        reach = int(context.model.balloon_rate * context.period)
        self.required = {
            name: required_allocation(
                [
                    min(context.maxima[name], context.model.overhead + need + buffer)
                    for need in demand
                ],
                reach,
            )
            for name, demand in context.demand.items()
        }

    def targets(self, view: HostView) -> dict[str, int]:
        targets = {}
        for guest in view.guests:
            required = self.required[guest.name]
            targets[guest.name] = required[min(view.step + 1, len(required) - 1)]
        return targets


def required_allocation(needs: Sequence[int], reach: int) -> list[int]:
    """Return the lowest allocation per step that meets every later need.

    The balloon grows by at most ``reach`` KiB a step, so each step must
    already hold the next step's requirement minus ``reach``.
    """
    required = list(needs)
    for k in range(len(required) - 2, -1, -1):
        required[k] = max(required[k], required[k + 1] - reach)
    return required


PolicyFactory = Callable[[RunContext], Policy]

POLICIES: dict[str, PolicyFactory] = {
    "seed": lambda context: SeedPolicy(balloonctl_params(context.period)),
    "mom": lambda context: MomPolicy(),
    "proxmox": lambda context: ProxmoxPolicy(),
    "oracle": lambda context: OraclePolicy(
        context, balloonctl_params(context.period).min_unused
    ),
    "balloonctl": lambda context: BalloonctlPolicy(balloonctl_params(context.period)),
    # The same code with the usable (MemAvailable) metric, which counts page
    # cache as free.
    "balloonctl-usable": lambda context: BalloonctlPolicy(
        balloonctl_params(context.period, Metric.USABLE)
    ),
}

ORACLE = "oracle"
