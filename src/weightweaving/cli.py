"""The command line: parse, call the API, print one line on a user's mistake. No logic of its own."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import typing
from collections.abc import Sequence
from typing import Any, Literal, NoReturn

import yaml
from pydantic import BaseModel

from . import __version__
from .config import (
    MergeOptions,
    WeaveOptions,
    default_text,
    field_extra,
    load_yaml,
    option_flag,
    plain_type,
    reserved_names,
    run_options,
    validate,
)
from .engine.resources import ADVICE, is_out_of_memory
from .errors import OptionError, WeightWeavingError
from .files import problem
from .inspection import add_inspect_parser, run_inspect
from .signals import INTERRUPTED, InterruptedAfterOutput, interrupts_raise
from .verify import add_verify_parser, run_verify

MERGE_EPILOG = """examples:
  weightweaving merge --base pre/ --models ft1/ ft2/ --method task_arithmetic --lambda 0.3 --out merged/
  weightweaving merge --base pre.safetensors --models a.safetensors b.safetensors \\
      --method ties --set k=0.2 --weave --lambdas 0.1:1.5:0.1 --pool mean --out woven/
  weightweaving merge --base pre/ --models ft*/ --method ties --weave --search k=0.1,0.2,0.3 --out woven/
  weightweaving merge config.yaml            (same options as YAML; flags given override it)
  weightweaving merge mergekit.yaml --out merged/   (a mergekit config, unchanged)
  weightweaving merge merged/weightweaving_config.yaml --out again/   (rerun an output to the same bytes)
"""


def _parse_assignment(text: str, option: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise OptionError(f"{option} '{text}' must look like NAME=VALUE")
    return name.strip(), value


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error:`` line like every other mistake (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="weightweaving",
        description="Merge fine-tuned models into their pre-trained base without data, with Weight Weaving.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'weightweaving COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"weightweaving {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser(
        "merge",
        help="merge checkpoints (one λ, or Weight Weaving with --weave)",
        description="Merge fine-tuned checkpoints into their pre-trained base, tensor by tensor.",
        epilog=MERGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument(
        "config",
        nargs="?",
        help="a YAML config with the same options, or a mergekit config (flags override it)",
    )
    add_option_flags(m, MergeOptions)
    w = m.add_argument_group("Weight Weaving (--weave)")
    add_option_flags(w, WeaveOptions)
    _common(m)

    _common(add_verify_parser(sub))
    _common(add_inspect_parser(sub))

    meth = sub.add_parser("methods", help="list the merge methods, their hyperparameters and λ ranges")
    meth.add_argument("name", nargs="?", help="show one method only")
    meth.add_argument("--markdown", action="store_true", help="print the README's methods table")
    _common(meth)

    s = sub.add_parser(
        "suite",
        help="run the built-in experiment suite (the paper's three setups, on CPU)",
        description="Fine-tune a small CLIP-like ViT (pre-trained offline, shipped with the package) on eight "
        "tasks and compare every method at its tuned λ, at λ = 1 and with Weight Weaving, in the paper's "
        "three setups.",
    )
    s.add_argument(
        "--quick",
        action="store_true",
        help="the small profile: 6 tasks, 50 fine-tuning steps (faster than the full one)",
    )
    s.add_argument("--seed", type=int, default=0, help="seed of data, training and merging (default: 0)")
    s.add_argument("--seeds", type=int, nargs="+", help="run several seeds and write <out>/seed-spread.md")
    s.add_argument("--out", default="runs/suite", help="parent of the run folder (default: runs/suite)")
    s.add_argument("--cache-dir", help="checkpoint cache (default: ~/.cache/weightweaving/suite)")
    s.add_argument(
        "--workers",
        type=_positive_int,
        help="processes for fine-tuning and scoring (default: the usable cores, at most 8); "
        "results do not depend on it",
    )
    s.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="score the λ sweeps in local processes or on a Ray cluster (default: local)",
    )
    s.add_argument(
        "--ray-address", metavar="ADDR", help="the Ray cluster (default: RAY_ADDRESS or a new one)"
    )
    s.add_argument("--profile", help=argparse.SUPPRESS)
    _common(s)

    c = sub.add_parser(
        "convert",
        help="turn a pickled PyTorch checkpoint (a whole module or a state dict) into safetensors, "
        "without running it",
        description="Convert a torch.save file to safetensors without trusting it.\n\n"
        "Every class the file names becomes an inert record: nothing is imported and nothing in the file\n"
        "runs. Tensors are named by module path, exactly as state_dict() names them. A file that asks to\n"
        "call anything other than a class or a tensor constructor (os.system, eval, ...) is refused with\n"
        "that name. Made for the whole-module checkpoints (torch.save(model)) of the paper-line codebases:\n"
        "task_vectors, TSV, ISO, Weight Weaving.",
        epilog="examples:\n  weightweaving convert finetuned_SVHN.pt svhn.safetensors\n"
        "  weightweaving convert zeroshot.pt zeroshot/      (a folder holding model.safetensors)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("input", metavar="IN", help="a torch.save file (zip or legacy format) or a plain pickle")
    c.add_argument(
        "output", metavar="OUT", help="a .safetensors file, or a folder (no suffix) for model.safetensors"
    )
    c.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    _common(c)
    e = sub.add_parser(
        "evaluate",
        help="accuracy of a CLIP model's image encoder with zero-shot heads, per task",
        description="Evaluate a CLIP checkpoint (CLIPModel folder; or a CLIPVisionModel folder or an "
        "open_clip state dict with --base) with frozen zero-shot heads built from its text encoder.",
        epilog="examples:\n  weightweaving evaluate --model merged/ --task EuroSAT=data/eurosat/test "
        "--task MNIST=data/mnist --json acc.json\n  weightweaving evaluate --model ft/ --base clip-vit-b32/ "
        "--task mine=labels.csv --classes classes.txt",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--model", required=True, help="a CLIP folder or state dict to evaluate")
    _clip_task_flags(e)
    e.add_argument("--json", dest="json_out", metavar="OUT", help="also write the accuracies as JSON")
    _common(e)

    f = sub.add_parser(
        "finetune",
        help="fine-tune a CLIP image encoder on one task with a frozen zero-shot head",
        description="The paper-line recipe (task_vectors): image encoder only, frozen zero-shot head, AdamW "
        "lr 1e-5, weight decay 0.1, warm-up then cosine, batch 128. Writes a CLIPModel folder for 'merge'.",
        epilog="example:\n  weightweaving finetune --model clip-vit-b32/ --task EuroSAT=data/eurosat/train "
        "--steps 2000 --out ft/eurosat",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("--model", required=True, help="the CLIP folder to start from (the pre-trained model)")
    _clip_task_flags(f)
    f.add_argument("--out", required=True, help="the output CLIPModel folder")
    f.add_argument("--steps", type=_positive_int, help="optimizer steps (default: the epochs' worth)")
    f.add_argument(
        "--epochs", type=_positive_int, help="epochs (default: task_vectors' for a paper dataset, else 1)"
    )
    f.add_argument("--lr", type=float, default=1e-5, help="peak learning rate (default: 1e-05)")
    f.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: 0.1)")
    f.add_argument("--warmup", type=int, default=500, help="linear warm-up steps (default: 500)")
    f.add_argument("--seed", type=int, default=0, help="seeds the batch order (default: 0)")
    f.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _common(f)

    r = sub.add_parser(
        "reproduce",
        help="the paper's three setups over your CLIP checkpoints (Tables 1-3, plots, results.json)",
        description="Score every method at its tuned λ (privileged), at λ = 1 and with Weight Weaving on real "
        "CLIP fine-tunes, in the multi-task, domain-generalisation and continual setups. A stopped run "
        "continues where it was.",
        epilog="config (YAML; relative paths from its folder):\n  base: clip-vit-b32/\n  tasks:\n"
        "    EuroSAT: {data: data/eurosat/test, checkpoint: ft/eurosat}\n"
        "    MNIST: {data: data/mnist, checkpoint: ft/mnist}\n"
        "  continual: [{name: split3, data: data/c/test, checkpoints: [seq/1, seq/2, seq/3],\n"
        "    individual: [ind/1, ind/2, ind/3], class_groups: [[0, 1], [2, 3], [4, 5]]}]  # optional pair\n"
        "  methods: [task_arithmetic, ties, tsv]\n  out: runs/reproduce",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("config", help="the YAML config")
    r.add_argument("--out", help="the run folder (overrides the config's)")
    r.add_argument("--device", help="cpu or cuda (overrides the config's)")
    r.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="ray: one Ray task per λ point (overrides the config's; default: local)",
    )
    r.add_argument(
        "--ray-address", metavar="ADDR", help="the Ray cluster (default: RAY_ADDRESS or a new one)"
    )
    _common(r)
    return parser


def _clip_task_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base", help="the base CLIPModel folder giving the text side (and the tokenizer, processor)"
    )
    p.add_argument(
        "--task",
        dest="tasks",
        action="append",
        required=True,
        metavar="NAME=DATA",
        help="a task: an image folder (a sub-folder per class), a CSV of path,label, a paper dataset as "
        "torchvision or task_vectors store it, DATA[:SPLIT] (the dataset's folder or a root holding several; "
        "split default: test, finetune: train), or "
        "hf:FOLDER[:SPLIT] (a datasets save_to_disk folder; hf-hub:NAME loads one from the hub); "
        "a paper dataset NAME (SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD) brings its "
        "class names and templates (repeatable)",
    )
    p.add_argument(
        "--classes", action="append", default=[], metavar="[NAME=]FILE", help="class names, one a line"
    )
    p.add_argument(
        "--templates",
        action="append",
        default=[],
        metavar="[NAME=]FILE",
        help="prompt templates with {}, one a line",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--batch-size", type=_positive_int, default=128, help="images per batch (default: 128)")
    p.add_argument(
        "--cache-dir",
        help="cache zero-shot heads (keyed by text encoder, classes, templates) and image features "
        "(evaluate; keyed by image encoder, data, processor) here, as safetensors",
    )
    p.add_argument(
        "--workers", type=int, default=0, help="image-loading processes (default: 0, in the main one)"
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true", help="log details")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def add_option_flags(parser: Any, model: type[BaseModel]) -> None:
    """One flag per field of an options model: name, type, choices, default and help from the field."""
    for field, info in model.model_fields.items():
        extra = field_extra(info)
        flag = option_flag(field)
        kind = extra.get("kind")
        kwargs: dict[str, Any] = {"dest": f"opt_{field}", "help": f"{info.description}{default_text(info)}"}
        annotation = plain_type(info.annotation)
        if not (annotation is bool or field == "weave" or typing.get_origin(annotation) is Literal):
            kwargs["metavar"] = extra.get("metavar", field.upper())
        if kind == "negate":  # a switch that turns an option on by default off: --no-X
            kwargs.pop("metavar", None)
            parser.add_argument(flag, action="store_true", default=None, **kwargs)
        elif kind in ("lam", "weights"):  # a number or list of numbers, or auto:<rule>
            parser.add_argument(flag, type=_lam if kind == "lam" else _task_weights, **kwargs)
        elif kind is not None:  # repeatable NAME=VALUE, NAME=v1,v2 or YAML values
            parser.add_argument(flag, action="append", default=[], **kwargs)
        elif annotation is bool or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            parser.add_argument(flag, action="store_true", default=None, **kwargs)
        elif typing.get_origin(annotation) is Literal:
            parser.add_argument(flag, choices=list(typing.get_args(annotation)), **kwargs)
        elif typing.get_origin(annotation) is list:
            parser.add_argument(flag, nargs="+", **kwargs)
        else:
            parser.add_argument(flag, type=annotation if annotation in (int, float) else str, **kwargs)


def _flag_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields given on the command line (by field name), converted as their kind says."""
    values: dict[str, Any] = {}
    for field, info in model.model_fields.items():
        value = getattr(args, f"opt_{field}")
        flag, kind = option_flag(field), field_extra(info).get("kind")
        if value is None or value == []:
            continue
        if kind == "negate":
            value = False
        elif kind == "assign":
            pairs = [_parse_assignment(item, flag) for item in value]
            value = {name: _scalar(text) for name, text in pairs}
        elif kind == "grid":
            grid = {}
            for item in value:
                name, text = _parse_assignment(item, flag)
                grid[name] = [_scalar(v) for v in text.split(",") if v.strip()]
                if not grid[name]:
                    raise OptionError(f"{flag} {name}: the list of values is empty")
            value = grid
        elif kind == "yaml":
            value = [_yaml_value(item, flag) for item in value]
        elif kind == "pairs":  # repeatable NAME=TEXT, the text kept as given (a path)
            pairs = [_parse_assignment(item, flag) for item in value]
            value = dict(pairs)
            if len(value) != len(pairs):
                raise OptionError(f"{flag}: the same name is given twice")
        values[field] = value
    return values


def _yaml_value(text: str, flag: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise OptionError(f"{flag} '{text}' is not valid YAML") from None


def _clip_summary(out: Any) -> str | None:
    """For a CLIP merge, one line saying what was merged and what was kept from the base."""
    from pathlib import Path

    record_file = Path(out) / "weightweaving_config.yaml"
    if not record_file.is_file():
        return None
    clip = (yaml.safe_load(record_file.read_text()) or {}).get("clip")
    if not isinstance(clip, dict):
        return None
    kept = clip.get("kept_from_base") or []
    return (
        f"CLIP: merged {clip.get('merged_count', '?')} parameters of the image encoder, kept {len(kept)} "
        f"from the base (listed in {record_file.name}); --include chooses others"
    )


def _merge_options(args: argparse.Namespace) -> MergeOptions:
    values: dict[str, Any] = load_yaml(args.config) if args.config else {}
    source = args.config or "command line"
    flags = _flag_values(args, MergeOptions)
    weave_on = bool(flags.pop("weave", False))
    hyper = flags.pop("hyperparameters", {})
    for name in hyper:
        if name in reserved_names():
            raise OptionError(
                f"--set {name}: '{name}' is an option of its own ({option_flag(name)}), not a hyperparameter"
            )
    if "lam" in flags:
        values.pop("lam", None)
        values["lambda"] = flags.pop("lam")
    values.update(flags)
    if hyper:
        values["hyperparameters"] = {**(values.get("hyperparameters") or {}), **hyper}
    weave_flags = _flag_values(args, WeaveOptions)
    if weave_flags and not weave_on and "weave" not in values:
        listed = ", ".join(option_flag(f) for f in weave_flags)
        raise OptionError(f"{listed} need --weave")
    if weave_on or weave_flags:
        weave = dict(values.get("weave") or {})
        for key in ("search", "pool_hyperparameters"):  # repeated flags add to the config's
            if key in weave_flags and isinstance(weave.get(key), dict):
                weave_flags[key] = {**weave[key], **weave_flags[key]}
        values["weave"] = {**weave, **weave_flags}
    return validate(values, source)


def _lam(text: str) -> float | str:
    """``--lambda``: a number, or ``auto:<rule>`` (a data-free estimate)."""
    if text.strip().lower().startswith("auto:"):
        return text.strip()
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto:<rule>, got {text!r}") from None


def _task_weights(text: str) -> str | list[float]:
    """``--task-weights``: ``auto:<rule>`` or comma-separated numbers, one per fine-tuned model."""
    if text.strip().lower().startswith("auto:"):
        return text.strip()
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto:<rule> or numbers a,b,c, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _print_methods(name: str | None, *, markdown: bool = False) -> None:
    from .methods import get_method, list_methods

    if markdown:
        from .methods.table import methods_table

        print(methods_table())
        return
    names = [name] if name else list_methods()
    for n in names:
        method = get_method(n)
        lam = "no λ" if method.default_lam is None else f"default λ {method.default_lam}"
        print(f"{n}: {method.summary}")
        print(f"    λ: {method.lam_kind.value}, {lam}; scope: {method.scope.value}")
        print(f"    data-free: {'yes' if method.data_free else 'no'}; reference: {method.reference or '—'}")
        print(f"    reported (CLIP): {method.reported or '—'}")
        if method.paper_lam_ranges:
            ranges = ", ".join(f"{k} {a}–{b}" for k, (a, b) in method.paper_lam_ranges.items())
            print(f"    paper λ ranges: {ranges}")
        for field, info in method.params.model_fields.items():
            default = "(required)" if info.is_required() else info.get_default(call_default_factory=True)
            print(f"    --set {field}={default}    {info.description or ''}")


def _run_suite(args: argparse.Namespace) -> None:
    from pathlib import Path

    from .suite import run_suite
    from .suite.stability import seed_spread

    folders = [
        run_suite(
            quick=args.quick,
            seed=seed,
            out=args.out,
            cache_dir=args.cache_dir,
            profile=args.profile,
            workers=args.workers,
            executor=args.executor,
            ray_address=args.ray_address,
        )
        for seed in (args.seeds or [args.seed])
    ]
    if len(folders) > 1:  # a single run prints its own summary and report path
        print(f"seed spread: {seed_spread(folders, Path(args.out))}")


def main(argv: Sequence[str] | None = None) -> int:
    with interrupts_raise():  # SIGINT and SIGTERM: KeyboardInterrupt, so the writer cleans up
        try:
            return _main(argv)
        except KeyboardInterrupt as exc:
            print(exc.line() if isinstance(exc, InterruptedAfterOutput) else INTERRUPTED, file=sys.stderr)
            return 130


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    try:
        if args.command == "merge":
            options = _merge_options(args)
            out = run_options(options)
            print(f"wrote {out}")
            clip = _clip_summary(out)
            if clip:
                print(clip)
        elif args.command == "methods":
            _print_methods(args.name, markdown=args.markdown)
        elif args.command == "suite":
            _run_suite(args)
        elif args.command == "convert":
            from .checkpoints.convert import convert_checkpoint

            written, count, what = convert_checkpoint(args.input, args.output, overwrite=args.overwrite)
            print(f"wrote {written}: {count} tensors from {what}")
        elif args.command == "verify":
            return run_verify(args)
        elif args.command == "inspect":
            run_inspect(args)
        elif args.command == "finetune":
            from .models.finetune import Recipe, run_finetune

            if len(args.tasks) != 1:
                raise OptionError("finetune takes one --task")
            recipe = Recipe(
                lr=args.lr,
                weight_decay=args.weight_decay,
                batch_size=args.batch_size,
                warmup=args.warmup,
                steps=args.steps,
                epochs=args.epochs,
                seed=args.seed,
            )
            run_finetune(
                model=args.model,
                task=args.tasks[0],
                out=args.out,
                base=args.base,
                classes=args.classes,
                templates=args.templates,
                device=args.device,
                cache_dir=args.cache_dir,
                recipe=recipe,
                overwrite=args.overwrite,
                workers=args.workers,
            )
        elif args.command == "reproduce":
            from .models.reproduce import run_reproduce

            run_reproduce(
                args.config,
                out=args.out,
                device=args.device,
                executor=args.executor,
                ray_address=args.ray_address,
            )
        elif args.command == "evaluate":
            from .models.evaluate import run_evaluate

            run_evaluate(
                model=args.model,
                tasks=args.tasks,
                base=args.base,
                classes=args.classes,
                templates=args.templates,
                device=args.device,
                batch_size=args.batch_size,
                cache_dir=args.cache_dir,
                json_out=args.json_out,
                workers=args.workers,
            )
        return 0
    except WeightWeavingError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path problem no reader turned into its own message
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc.filename or 'a file'}: {problem(exc)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:  # out of memory outside a merged tensor (which says its sizes)
        if not is_out_of_memory(exc):
            raise
        print(f"error: out of memory; {ADVICE}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
