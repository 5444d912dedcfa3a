"""``python -m lepton_operator`` / ``lepton-operator``: run the operator.

Flags override the environment (see ``lepton_operator.config``)::

    lepton-operator --all-namespaces --metrics-port 8000 --health-port 8080
    lepton-operator --namespace team-a --namespace team-b
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

import kopf

from . import config, metrics
from .core import kube


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, config.Settings]:
    parser = argparse.ArgumentParser(prog="lepton-operator", description=__doc__.splitlines()[0])
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                       help="watch this namespace (repeatable); default: $LEPTON_NAMESPACES or all")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch all namespaces")
    flags = [s for s in config.SETTINGS if s.flag]
    for s in flags:                                      # one flag per setting that has one
        parser.add_argument(s.flag, dest=s.name, help=f"{s.help} (${s.env})")
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
    if not args.verbose:   # one line per watch event is noise; keep warnings and errors
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kube.load(args.kubeconfig)
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
    from . import handlers  # noqa: F401  (registers the kopf handlers)
    kopf.run(
        standalone=True,
        clusterwide=settings.all_namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
