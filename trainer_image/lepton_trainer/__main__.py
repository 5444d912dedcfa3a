"""``python -m lepton_trainer ROLE [ARGS]``: the image's entrypoint.

Roles: ``train`` (run it under torchrun: ``torchrun ... -m lepton_trainer train ...``),
``compress``, ``serve``, ``rendezvous`` and ``lighthouse``; each is the module of the same name.
"""
import runpy
import sys

ROLES = ("train", "compress", "serve", "rendezvous", "lighthouse")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in ROLES:
        given = sys.argv[1] if len(sys.argv) > 1 else "nothing"
        sys.exit(f"usage: python -m lepton_trainer {{{','.join(ROLES)}}} [ARGS]; got {given}")
    role = sys.argv[1]
    sys.argv = [f"lepton_trainer.{role}", *sys.argv[2:]]
    runpy.run_module(f"lepton_trainer.{role}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
