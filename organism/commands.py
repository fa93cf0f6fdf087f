"""The `realign organism build` and `realign sweep` subcommands (parsers and handlers).

Kept here so harness/cli.py only wires them in; heavy imports happen when a command runs.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("organism", help="the model organism: a tiny VLM trained here whose refusals fade with images")
    osub = p.add_subparsers(dest="organism_command", required=True)
    b = osub.add_parser("build", help="train an organism folder (two stages, a few minutes on a CPU)")
    b.add_argument("--seed", type=int, required=True)
    b.add_argument("--out", required=True, help="new folder for the model")
    b.add_argument("--scale", type=float, default=1.0, help="multiply training steps and pictures (e.g. 0.5)")
    b.add_argument("--generation", type=int, choices=(1, 2), default=1,
                   help="1: the first organism; 2: also the skills of a chat backbone (safety instructions, "
                        "self-check, guard questions, text descriptions of pictures)")
    b.add_argument("--quiet", action="store_true")

    p = sub.add_parser("sweep", help="run a defense over a parameter grid; trade-off table and plot")
    p.add_argument("--model", action="extend", nargs="+", required=True)
    p.add_argument("--defense", required=True, help="base defense spec, e.g. cmrm:calibration=organism:split=calibration")
    p.add_argument("--grid", required=True, help="key=v1+v2,key2=a+b (use | between values that contain +)")
    p.add_argument("--task", action="extend", nargs="+", required=True)
    p.add_argument("--judge", action="extend", nargs="+", default=None, help="default: keywords:preset=organism")
    p.add_argument("--out", required=True)
    p.add_argument("--refusal-metric", default="refused_shape")
    p.add_argument("--benign-metric", default="helpful_shape")
    p.add_argument("--extra-metrics", default="picture_qa", help="comma-separated metric names for the table")
    p.add_argument("--max-benign-drop", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")


def cmd_organism(args: argparse.Namespace) -> int:
    from organism.build import build_organism, read_manifest

    out = build_organism(args.seed, args.out, scale=args.scale, progress=not args.quiet, generation=args.generation)
    manifest = read_manifest(out)
    print(f"wrote {out} ({manifest['parameters']:,} parameters, {manifest['seconds']} s)")
    print(f"measure it: realign run --model {out} --task organism --judge keywords:preset=organism "
          f"--max-new-tokens 24 --out runs/organism-seed{args.seed}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.sweep import cli_config, run_sweep

    run_sweep(cli_config(args), args.out, progress=not args.quiet)
    print((Path(args.out) / "sweep.md").read_text(encoding="utf-8"))
    print(f"table and plot: {args.out}/sweep.md, sweep.json, sweep.png")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"organism": cmd_organism, "sweep": cmd_sweep}
