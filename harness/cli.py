"""The `realign` command: run, list, report, demo."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from harness.errors import RealignError
from harness.quiet import quiet
from organism import commands as organism_commands
from harness.registry import REGISTRIES
from harness.analysis.report import render, report_tables
from harness.schema import ORDERS, RunConfig
from harness.spec import SpecError, describe_params
from harness.store import RunDir
from harness.tables import show

log = logging.getLogger("realign")


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=None, help="at most N samples per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (HF models)")
    p.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16 (HF models)")
    p.add_argument("--quiet", action="store_true", help="nothing on stderr but errors (no progress, no warnings)")
    p.add_argument("--no-retry-errors", dest="retry_errors", action="store_false",
                   help="keep generations and verdicts that failed before instead of trying them again")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realign", description="Evaluate inference-time safety defenses of VLMs.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="generate, judge and score; resumable")
    p.add_argument("--model", action="extend", nargs="+", required=True, help="hub id, path, or backend spec")
    p.add_argument("--defense", action="extend", nargs="+", default=None, help="defense spec (default: none)")
    p.add_argument("--task", action="extend", nargs="+", required=True, help="task spec")
    p.add_argument("--judge", action="extend", nargs="+", default=None, help="judge spec (default: keywords)")
    p.add_argument("--attack", action="extend", nargs="+", default=None,
                   help="attack spec applied to attackable tasks (default: none, the tasks as released)")
    p.add_argument("--out", required=True, help="run directory (resumed if it holds the same configuration)")
    p.add_argument("--order", choices=ORDERS, default="length",
                   help="generation order of pending samples: longest prompts first in similar-length batches "
                        "(default), or the task's own order; outputs are the same either way")
    _add_generation_options(p)

    p = sub.add_parser("fit", help="precompute defense state: CMRM shift vectors, ShiftDC safety directions")
    p.add_argument("--model", required=True)
    p.add_argument("--defense", required=True, help="e.g. cmrm:level=dataset or shiftdc")
    p.add_argument("--calibration", help="anchor task spec (cmrm)")
    p.add_argument("--calibration-unsafe", help="harmful text task spec (shiftdc)")
    p.add_argument("--calibration-safe", help="harmless text task spec (shiftdc), e.g. requests:set=benign")
    p.add_argument("--limit", type=int, default=None, help="at most N samples per calibration set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--out", required=True, help="output .safetensors file (a .json manifest is written beside it)")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("list", help="list registered components and their parameters")
    p.add_argument("kind", nargs="?", choices=sorted(REGISTRIES), help="only this kind")

    p = sub.add_parser("report", help="print the results table of a run directory")
    p.add_argument("dir")
    p.add_argument("--format", choices=("md", "json"), default="md")
    p.add_argument("--detail", action="store_true", help="also per-category metrics")
    p.add_argument("--plot", metavar="FILE.png", help="also write a safety vs utility scatter per defense "
                   "(with --matrix: the attack x defense heatmap)")
    p.add_argument("--x", metavar="COLUMN", help="--plot: x axis column (key or metric name; default: the headline "
                   "safety metric with an image)")
    p.add_argument("--y", metavar="COLUMN", help="--plot: y axis column (default: the headline utility metric)")
    p.add_argument("--matrix", action="store_true", help="attack x defense tables of the headline safety metric, "
                   "one per (model, task, judge); also written as JSON (DIR/matrix.json unless --json)")
    p.add_argument("--json", metavar="FILE.json", help="with --matrix: write the matrix JSON here instead")

    p = sub.add_parser("judge", help="judge saved generations again (no regeneration); updates results.json")
    p.add_argument("dir", help="run directory")
    p.add_argument("--judge", action="extend", nargs="+", required=True, help="judge spec")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--no-retry-errors", dest="retry_errors", action="store_false",
                   help="keep verdicts that ended as errors instead of asking again")

    p = sub.add_parser("agree", help="agreement of two judges on a run: Cohen's kappa, confusion matrix")
    p.add_argument("dir", help="run directory")
    p.add_argument("--judges", required=True, help="two judge specs separated by a comma: A,B")
    p.add_argument("--format", choices=("text", "json"), default="text")

    p = sub.add_parser("leaderboard", help="merge run directories into leaderboard.json (+ the static page)")
    p.add_argument("dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="folder for leaderboard.json (index.html is copied if absent)")
    p.add_argument("--note", default=None, help="text shown above the table, e.g. 'demo data'")

    p = sub.add_parser("compare", help="paired differences of two runs per task: bootstrap interval, McNemar p")
    p.add_argument("dir_a", metavar="DIR_A")
    p.add_argument("dir_b", metavar="DIR_B")
    for side in ("a", "b"):
        p.add_argument(f"--model-{side}", default=None, help=f"only this model spec of DIR_{side.upper()}")
        p.add_argument(f"--defense-{side}", default=None, help=f"only this defense spec of DIR_{side.upper()}")
        p.add_argument(f"--attack-{side}", default=None, help=f"only this attack spec of DIR_{side.upper()}")
    p.add_argument("--format", choices=("md", "json"), default="md")

    p = sub.add_parser("gate", help="exit 1 if a run regresses against a baseline (CI)")
    p.add_argument("--baseline", required=True, metavar="FILE", help="results.json or leaderboard.json")
    p.add_argument("--run", required=True, metavar="DIR", help="run directory to check")
    p.add_argument("--max-asr-increase", type=float, default=None, metavar="PP",
                   help="largest allowed worsening of a safety metric, percentage points")
    p.add_argument("--max-utility-drop", type=float, default=None, metavar="PP",
                   help="largest allowed worsening of a utility metric, percentage points of full scale")
    p.add_argument("--rule", choices=("point", "interval"), default="point",
                   help="point: the estimate decides; interval: only a difference whose whole 95%% CI is beyond")

    p = sub.add_parser("demo", help="the shipped model organism: its degradation and what each defense recovers")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quiet", action="store_true")
    organism_commands.add_parsers(sub)  # `organism build`, `sweep`
    sub.add_parser("lm-eval", add_help=False,  # main() hands everything after it to lm-eval's own CLI
                   help="lm-eval's own CLI with the `realign` model registered (realign lm-eval --model realign ...)")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from harness.distributed import is_main
    from harness.runner import run

    config = RunConfig(
        models=args.model,
        defenses=args.defense or ["none"],
        tasks=args.task,
        judges=args.judge if args.judge is not None else ["keywords"],
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        attacks=args.attack or ["none"],
        order=args.order,
    )
    records = [r.to_json() for r in run(config, args.out, progress=not args.quiet, retry_errors=args.retry_errors)]
    if not is_main():  # a data-parallel run: rank 0 alone reports
        return 0
    show(report_tables(records))
    print(f"\nrun directory: {args.out}")
    return error_summary(records)


def error_summary(records: list[dict]) -> int:
    """Exit status of a finished command: 0 when every generation and verdict succeeded, 1 when the
    run finished with errors (counted per cell on stderr; re-running retries them)."""
    failed = [r for r in records if r.get("generation_errors") or r.get("judge_errors")]
    if not failed:
        return 0
    print(f"realign: finished with errors in {len(failed)} of {len(records)} result(s); re-run the same "
          "command to retry them:", file=sys.stderr)
    for r in failed:
        attack = f"{r['attack']} | " if r.get("attack", "none") != "none" else ""
        print(f"  {r['model']} | {attack}{r['defense']} | {r['task']} | {r['judge'] or '-'}: "
              f"{r.get('generation_errors', 0)} generation error(s), {r.get('judge_errors', 0)} judge error(s) "
              f"of {r['n']}", file=sys.stderr)
    return 1


def cmd_fit(args: argparse.Namespace) -> int:
    from harness.fit import fit_defense

    calibration = {
        role: spec
        for role, spec in (("anchor", args.calibration), ("unsafe", args.calibration_unsafe), ("safe", args.calibration_safe))
        if spec
    }
    path = fit_defense(args.model, args.defense, calibration, args.out, args.limit, args.batch_size,
                       args.device, args.dtype, progress=not args.quiet)
    print(f"wrote {path} and {path.name}.json")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else sorted(REGISTRIES)
    for kind in kinds:
        print(f"{kind}:")
        for entry in REGISTRIES[kind].entries():
            print(f"  {entry.name:<16} {entry.summary}")
            if kind == "attacks":  # what the attack itself costs, beside the evaluated model's answer
                print(f"      (cost with default parameters: {_attack_cost(entry)})")
            for name, tp, default in describe_params(entry.cls.Params):
                print(f"      {name}: {tp} = {default}")
    return 0


def _attack_cost(entry: Any) -> str:
    """What an attack costs with its defaults: helper-model calls per sample, or a white-box attack's
    optimisation passes (attacks load models lazily, so building one is cheap); the class's declared
    calls if it cannot be built without parameters."""
    try:
        return str(REGISTRIES["attacks"].build(entry.name).cost())
    except Exception:  # noqa: BLE001 - listing must never fail on one component
        return f"{int(getattr(entry.cls, 'calls_per_sample', 0))} model calls of its own per sample"


def cmd_report(args: argparse.Namespace) -> int:
    from harness.analysis.leaderboard import check_records

    rundir = RunDir(Path(args.dir))
    records = check_records(rundir.read_results(), rundir.results_json)  # odd values: an error naming the file
    if args.matrix:
        return report_matrix(records, rundir, args)
    if args.json:
        raise SpecError("--json writes the attack x defense matrix: give --matrix too")
    if args.format == "json":
        print(render(records, args.format))
    else:
        show(report_tables(records, args.detail))
        from harness.analysis.regimes import summary

        if text := summary(records):
            print(text)
    if args.plot:
        from harness.analysis.plot import plot_run

        print(f"wrote {plot_run(args.dir, args.plot, args.x, args.y)}", file=sys.stderr)
    return 0


def report_matrix(records: list[dict], rundir: RunDir, args: argparse.Namespace) -> int:
    """`report --matrix`: print the tables (or their JSON), write the JSON, draw the heatmap."""
    from harness.analysis.matrix import build_matrix, encode, markdown, matrix_json
    from harness.store import atomic_write

    tables, skipped = build_matrix(records)
    doc = encode(matrix_json(tables, skipped))
    print(doc if args.format == "json" else markdown(tables, skipped), end="" if args.format == "json" else "\n")
    target = Path(args.json) if args.json else rundir.root / "matrix.json"
    atomic_write(target, doc)
    print(f"wrote {target}", file=sys.stderr)
    if args.plot:
        from harness.analysis.matrix_plot import plot_matrix

        print(f"wrote {plot_matrix(tables, args.plot)}", file=sys.stderr)
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from harness.analysis.leaderboard import build, read_run, summary, write

    doc = build([read_run(d) for d in args.dirs], args.note)
    print(f"wrote {write(doc, args.out)}: {summary(doc)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from harness.analysis.compare import compare, comparison_table, format_json

    found = compare(args.dir_a, args.dir_b, args.model_a, args.defense_a, args.model_b, args.defense_b,
                    attack_a=args.attack_a, attack_b=args.attack_b)
    if args.format == "json":
        print(format_json(found))
    else:
        show([comparison_table(found)])
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from harness.analysis.gate import format_report, run_gate

    result = run_gate(args.baseline, args.run, args.max_asr_increase, args.max_utility_drop, args.rule)
    print(format_report(result, args.baseline, args.run, args.rule))
    return 0 if result.passed else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from organism.demo import run_demo

    run_demo(Path(args.out), progress=not args.quiet)
    return 0


def cmd_judge(args: argparse.Namespace) -> int:
    from harness.rejudge import rejudge

    records = rejudge(args.dir, args.judge, progress=not args.quiet, retry_errors=args.retry_errors)
    show(report_tables(records))
    return error_summary(records)


def cmd_agree(args: argparse.Namespace) -> int:
    import json

    from harness.agreement import agreement, format_agreement, split_judge_list

    specs = split_judge_list(args.judges)
    if len(specs) != 2:
        raise SpecError(f"--judges needs exactly two judge specs separated by a comma, got {len(specs)}: {specs}")
    report = agreement(args.dir, specs[0], specs[1])
    print(json.dumps(report, indent=2) if args.format == "json" else format_agreement(report))
    return 0


COMMANDS = {"run": cmd_run, "fit": cmd_fit, "list": cmd_list, "report": cmd_report, "demo": cmd_demo,
            "judge": cmd_judge, "agree": cmd_agree,
            "leaderboard": cmd_leaderboard, "compare": cmd_compare, "gate": cmd_gate,
            **organism_commands.COMMANDS}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # every later argument is lm-eval's, unparsed here
        from harness.lm_eval_cli import main as lm_eval_main

        return lm_eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, _terminate)  # a kill by a scheduler: stop like Ctrl-C
    try:
        with quiet() if getattr(args, "quiet", False) else contextlib.nullcontext():  # stderr: errors only
            status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe must fail here, inside the handlers, not at interpreter exit
        return status
    except (RealignError, SpecError) as exc:
        return _error(str(exc))
    except BrokenPipeError:
        # The reader went away (`realign report DIR | head -1`): what it wanted it has. Exit like a
        # Unix tool killed by SIGPIPE (128 + 13), with no message, and point stdout at /dev/null so
        # the interpreter's final flush has nowhere to fail ("Exception ignored ... BrokenPipeError").
        _silence_stdout()
        return 141
    except OSError as exc:  # last: an unreadable file, a full disk, a path that is a folder...
        return _error(os_error_message(exc))
    except Terminated:
        print("realign: terminated; re-run the same command to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("realign: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _error(message: str) -> int:
    """Bad input or an unusable file: one line on stderr, exit status 2 (what was written stays)."""
    print(f"realign: error: {message}", file=sys.stderr)
    return 2


def os_error_message(exc: OSError) -> str:
    """`path: reason` for an OSError from any layer that did not convert it itself."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (a captured or replaced stdout)
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so the run is marked `interrupted` like after Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
