"""``python -m lepton_operator`` / ``lepton-operator``: run the operator.

Flags override the environment (see ``lepton_operator.config``)::

    lepton-operator --all-namespaces --metrics-port 8000 --health-port 8080
    lepton-operator --namespace team-a --namespace team-b
    lepton-operator --leader-elect --leader-election-namespace lepton-system

With ``--leader-elect`` several replicas can run: each waits (serving ``/healthz`` and
``/metrics``) until it holds the Lease (``core.leader``), and only the holder runs the
handlers. A holder that cannot renew the Lease exits with status 1 at once, without
finishing its reconciles, so that it never acts beside a new leader; a holder stopped by
SIGTERM releases the Lease after kopf has stopped.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import kopf

from . import config, metrics
from .core import kube, leader


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, config.Settings]:
    parser = argparse.ArgumentParser(prog="lepton-operator", description=__doc__.splitlines()[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                       help="watch this namespace (repeatable); default: $LEPTON_NAMESPACES or all")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces")
    flags = [s for s in config.SETTINGS if s.flag]
    for s in flags:                                      # one flag per setting that has one
        switch = {"nargs": "?", "const": "true", "metavar": "BOOL"} if s.is_switch else {}
        parser.add_argument(s.flag, dest=s.name, help=f"{s.help} (${s.env})", **switch)
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    overrides = {}
    for s in flags:
        raw = getattr(args, s.name)
        if raw is not None:
            try:
                overrides[s.name] = s.parse(raw)
            except ValueError as exc:
                parser.error(f"{s.flag} {exc}, got {raw!r}")
    try:
        settings = config.from_env(
            namespaces=() if args.all_namespaces else (tuple(args.namespaces) if args.namespaces else None),
            **overrides)
    except ValueError as exc:
        parser.error(str(exc))
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    config.configure(settings)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig   # kopf's own login reads it too
    kopf.configure(verbose=args.verbose)
    if not args.verbose:   # one line per watch event or liveness probe is noise; keep warnings and errors
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("lepton_operator").info(
        "lepton-operator: watching %s; trainer image %s; Prometheus %s",
        "all namespaces" if settings.all_namespaces else ", ".join(settings.namespaces),
        settings.trainer_image,
        settings.prometheus_url or "none (autoscaling from Prometheus and canary analysis are off)")
    kube.load(args.kubeconfig)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    from . import handlers  # noqa: F401  (registers the kopf handlers)
    elector = None
    if settings.leader_election:
        elector = _lead(settings)
        if elector is None:
            return 0
    metrics.LEADER.set(1)
    try:
        kopf.run(
            standalone=True,
            clusterwide=settings.all_namespaces,
            namespaces=list(settings.namespaces),
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
        )
    finally:
        if elector is not None:
            elector.release()
    return 0


def _lead(settings: config.Settings) -> leader.LeaderElector | None:
    """Wait as a standby until this replica holds the Lease, then keep it renewed; None if
    interrupted while waiting."""
    elector = leader.LeaderElector(leader.LeaseConfig(
        name=settings.leader_election_name,
        namespace=settings.leader_election_namespace or "default",
        identity=leader.new_identity(settings.leader_election_identity)))
    metrics.LEADER.set(0)
    health = leader.StandbyHealth(settings.health_port, elector) if settings.health_port else None
    try:
        if not elector.acquire():
            return None
    except KeyboardInterrupt:
        return None
    finally:
        if health is not None:
            health.close()          # kopf's liveness endpoint takes the port
    elector.keep_leading(_exit_lost)
    return elector


def _exit_lost(reason: str) -> None:
    """Leadership is gone: stop this process now, as controller-runtime does. Another
    replica may already be taking over, so nothing more is reconciled or written here."""
    logging.getLogger("lepton_operator").critical("stopped leading: %s; exiting so that a standby takes over",
                                                  reason)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
