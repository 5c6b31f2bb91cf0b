"""The `promptbench` command: parse options, call the library, render. Nothing else lives here.

Every `UserError` becomes one line on stderr and exit code 2; an interrupted evaluation still
writes what it finished (marked incomplete).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .errors import UserError
from .files import sha256_file

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Measure how prompt wording moves CLIP-style prompt learners.")
console = Console(stderr=True)
DEFAULT_OUTPUT = "results/{learner}__{dataset}__{split}__{time}.json"


class Listable(str, Enum):
    learners = "learners"
    methods = "methods"
    templates = "templates"
    perturbations = "perturbations"
    datasets = "datasets"
    presets = "presets"


def explicit_flags(ctx: typer.Context, keys) -> set[str]:
    """The parameters of `keys` the user gave on the command line (``learner_opt`` for
    ``learner_options``), not left at their defaults: those win over a preset."""
    names = {"learner_options": "learner_opt", "method_options": "method_opt"}
    sources = {k: ctx.get_parameter_source(names.get(k, k)) for k in keys}
    return {k for k, source in sources.items() if source is not None and source.name != "DEFAULT"}


def output_path(template: str, **fields: str) -> Path:
    """Fill the --output template; field values are made safe for file names."""
    safe = {k: re.sub(r"[^A-Za-z0-9._-]+", "-", str(v)).strip("-") for k, v in fields.items()}
    try:
        return Path(template.format(**safe))
    except (KeyError, IndexError) as err:
        raise UserError(f"--output template has an unknown field {err}; fields: {', '.join(sorted(safe))}") from None


def environment_info() -> dict[str, Any]:
    """Versions and the command line, for the result file."""
    import open_clip
    import torch

    return {"package_version": __version__, "torch_version": torch.__version__,
            "open_clip_version": open_clip.__version__, "python": platform.python_version(), "command": sys.argv}


class _Bars:
    """A rich progress bar per evaluation stage, fed by the evaluator's progress callback."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help="open_clip architecture name, model-config JSON path, or toy-clip.")] = "toy-clip",
    pretrained: Annotated[Optional[str], typer.Option(help="Pretrained tag (hub) or local weights file; toy-clip uses its shipped weights.")] = None,
    learner: Annotated[str, typer.Option(help="Registered learner name or a learner checkpoint (.safetensors).")] = "zeroshot",
    learner_opt: Annotated[list[str], typer.Option("--learner-opt", help="Learner option KEY=VALUE (repeatable).")] = [],
    dataset: Annotated[str, typer.Option(help="toy-shapes | folder:PATH | coop:NAME@ROOT | hf:NAME | hf-disk:PATH")] = "toy-shapes",
    split: Annotated[str, typer.Option(help="Dataset split.")] = "test",
    subset: Annotated[str, typer.Option(help="all | base | new | base-new (both, with H).")] = "all",
    image_column: Annotated[str, typer.Option(help="HF datasets: the image column.")] = "image",
    label_column: Annotated[str, typer.Option(help="HF datasets: the label column.")] = "label",
    trust_remote_code: Annotated[bool, typer.Option(help="HF datasets: allow the dataset's own loading code.")] = False,
    templates: Annotated[str, typer.Option(help="Template set name or file (one template per line, {} = class).")] = "promptsrc60",
    wordings: Annotated[str, typer.Option(help="'split': score on the seen / held-out / out-of-family wordings (a checkpoint trained under the protocol: its recorded split; else the split of --templates, docs/wordings.md); 'all': on --templates whole.")] = "all",
    held_out: Annotated[float, typer.Option(help="--wordings split without a recorded split: share of the pool held out.")] = 1 / 3,
    wording_seed: Annotated[int, typer.Option(help="--wordings split without a recorded split: seed of the split.")] = 0,
    out_of_family: Annotated[str, typer.Option(help="--wordings split without a recorded split: the out-of-family set.")] = "out_of_family",
    perturb: Annotated[str, typer.Option(help="'default' (4 ops x weak/strong), 'none', or e.g. 'synonym:0.3,drop:weak'.")] = "default",
    draws: Annotated[int, typer.Option(min=1, help="Independent draws per perturbation.")] = 1,
    lexicon: Annotated[Optional[Path], typer.Option(help="Your own synonym lexicon (JSON).")] = None,
    mask_token: Annotated[str, typer.Option(help="Replacement string of the mask op.")] = "[MASK]",
    seed: Annotated[int, typer.Option(help="Seed of every draw (perturbations, bootstrap).")] = 0,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for 95% intervals; 0 = off.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 128,
    num_workers: Annotated[int, typer.Option(min=0, help="Image-decoding worker processes.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    output: Annotated[str, typer.Option(help="Result JSON path; fields {learner} {dataset} {split} {subset} {model} {seed} {time}.")] = DEFAULT_OUTPUT,
    csv: Annotated[Optional[Path], typer.Option(help="Also export the result as CSV here.")] = None,
    cache: Annotated[bool, typer.Option(help="Keep image and prompt features on disk and reuse them across runs.")] = True,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder (default: $PROMPTBENCH_CACHE or the user cache dir, /features).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run with the same options and --output: keep its finished subsets.")] = False,
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA (never on CPU).")] = True,
) -> None:
    """Score a prompt learner over templates and text perturbations; print the table, write the JSON.

    Under torchrun every rank runs this body on its share of the work; only rank 0 writes and prints.
    """
    from dataclasses import replace

    from . import distributed
    from .backbone import load_backbone
    from .cache import FeatureCache
    from .data import SUBSETS, DatasetOptions, load_dataset
    from .evaluate import EvalSettings, Evaluator
    from .files import cache_root
    from .learners import build_learner, check_learner_options, is_checkpoint, load_learner_checkpoint
    from .options import split_pairs
    from .perturb import load_lexicon, parse_perturbations
    from .report import render
    from .results import backbone_fields, build_result, read_result, write_csv, write_json
    from .resume import Terminated, find_previous, finished_subsets, sigterm_interrupts
    from .templates import load_templates
    from .wordings import WordingProtocol, evaluation_pools, subset_name, wording_fields, wording_split

    device = distributed.setup(device)
    main = distributed.is_main()
    subsets = ["base", "new"] if subset == "base-new" else [subset]
    if subsets[0] not in SUBSETS:
        raise UserError(f"unknown subset '{subset}'. Valid: all, base, new, base-new")
    started = time.perf_counter()
    template_set = load_templates(templates)
    wording, wording_note = wording_split(wordings, learner,
                                          WordingProtocol(templates, held_out, out_of_family, wording_seed))
    if wording_note and main:
        console.print(f"[yellow]warning:[/] {escape(wording_note)}", highlight=False, soft_wrap=True)
    specs = parse_perturbations(perturb)
    lex = load_lexicon(lexicon, mask_token=mask_token)
    options = DatasetOptions(split=split, image_column=image_column, label_column=label_column,
                             trust_remote_code=trust_remote_code)
    datasets = [load_dataset(dataset, options, s) for s in subsets]
    if not is_checkpoint(learner):  # an unknown name or option fails here, before any model loads
        learner_options = check_learner_options(learner, split_pairs(learner_opt, "--learner-opt"))
    backbone = load_backbone(model, pretrained, device)
    if backbone.pretrained is None and backbone.name != "toy-clip" and main:
        console.print(f"[yellow]warning:[/] no --pretrained given: {backbone.name} is randomly initialised")
    if is_checkpoint(learner):
        prompt_learner = load_learner_checkpoint(learner, backbone)
    else:
        prompt_learner = build_learner(learner, backbone, learner_options)
    settings = EvalSettings(templates=template_set.templates, perturbations=tuple(specs), draws=draws, seed=seed,
                            bootstrap=bootstrap, batch_size=batch_size, num_workers=num_workers, lexicon=lex,
                            amp=amp)
    run = {
        **environment_info(),
        **backbone_fields(backbone),
        "learner": prompt_learner.name,
        "learner_options": prompt_learner.options,
        "checkpoint": learner if is_checkpoint(learner) else None,
        "checkpoint_sha256": sha256_file(learner) if is_checkpoint(learner) else None,
        "dataset": dataset,
        "dataset_fingerprint": {d.name: d.fingerprint() for d in datasets},
        "split": split,
        "subset": subset,
        **wording_fields(wording, template_set),
        "perturbations": [{"label": p.label, "op": p.op, "rate": p.rate, "level": p.level} for p in specs],
        "draws": draws,
        "lexicon": str(lexicon) if lexicon else "shipped",
        "mask_token": mask_token,
        "seed": seed,
        "bootstrap": bootstrap,
        "device": str(backbone.device),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    fields = dict(learner=prompt_learner.name, dataset=dataset, split=split, subset=subset, model=backbone.name,
                  seed=str(seed))
    stamp = distributed.broadcast(dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    path = output_path(output, **fields, time=stamp)
    earlier: dict = {}
    if resume:
        pattern = str(output_path(output, **fields, time="RESUMETIME")).replace("RESUMETIME", "*")
        previous = distributed.main_only(lambda: find_previous(pattern, run))  # ranks' run fields may differ
        earlier, complete = finished_subsets(previous)
        if complete:
            if main:
                render(read_result(previous))
                console.print(f"{previous} is already complete: nothing to resume", highlight=False, soft_wrap=True)
            return
        path = previous or path
        if main:
            console.print(f"resuming {path}: {len(earlier)} finished subset(s) kept" if previous
                          else "--resume: no earlier result of this evaluation found; starting afresh",
                          highlight=False, soft_wrap=True)

    def warn(message: str) -> None:
        if main:
            console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)

    features = FeatureCache(cache_dir or cache_root() / "features", warn=warn) if cache else None
    finished: list = []
    with Progress(TextColumn("{task.description:>13}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not main) as progress, sigterm_interrupts():
        units = [(ds, subset_name(name, pool), Evaluator(prompt_learner, replace(settings, templates=pool_templates),
                                                         progress=_Bars(progress), cache=features, split=split))
                 for pool, pool_templates in evaluation_pools(wording, template_set.templates)
                 for ds, name in zip(datasets, subsets)]
        try:
            for ds, name, evaluator in units:
                if name in earlier:
                    continue
                evaluator.run(ds, subset=name, partial=finished)
                if main and len(earlier) + len(finished) < len(units):  # a finished unit survives any kill
                    write_json(build_result(run, finished, complete=False, earlier=earlier), path)
        except KeyboardInterrupt as interrupt:
            run["wall_time_s"] = time.perf_counter() - started
            if main:
                write_json(build_result(run, finished, complete=False, earlier=earlier), path)
                console.print(f"interrupted: partial results written to {path}; --resume continues it",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(143 if isinstance(interrupt, Terminated) else 130) from None
    run["wall_time_s"] = time.perf_counter() - started
    if not main:
        return
    doc = build_result(run, finished, earlier=earlier)
    write_json(doc, path)
    render(doc)
    if csv:
        write_csv(doc, csv)
    skipped = sum(len(r.skipped) for r in finished)
    if skipped:
        console.print(f"[yellow]warning:[/] {skipped} corrupt image(s) skipped; listed under 'skipped' in {path}")
    console.print(f"wrote {path} ({run['wall_time_s']:.1f} s)")


@app.command()
def train(
    ctx: typer.Context,
    method: Annotated[str, typer.Option(help="Training method (promptbench list methods).")] = "erm",
    learner: Annotated[str, typer.Option(help="Learner to train (promptbench list learners).")] = "coop",
    model: Annotated[str, typer.Option(help="open_clip architecture name, model-config JSON path, or toy-clip.")] = "toy-clip",
    pretrained: Annotated[Optional[str], typer.Option(help="Pretrained tag or local weights file.")] = None,
    dataset: Annotated[list[str], typer.Option(help="Dataset spec; its train split is trained on, its test split evaluated. Repeatable: train on several side by side (maml-clip: one task source each), evaluate on the first.")] = ["toy-shapes"],
    shots: Annotated[int, typer.Option(help="Images per class (few-shot, drawn with the seed); 0 = all.")] = 16,
    subset: Annotated[str, typer.Option(help="Classes to train on: base (then evaluate base and new), new or all.")] = "base",
    epochs: Annotated[int, typer.Option(min=1)] = 5,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate; default: the method's for the learner.")] = None,
    warmup_epochs: Annotated[int, typer.Option(min=0, help="Epochs at a constant 1e-5 before the cosine schedule.")] = 1,
    accumulate: Annotated[int, typer.Option(min=1, help="Batches per optimiser step.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the few-shot draw, data order and initialisation.")] = 1,
    init: Annotated[Optional[Path], typer.Option(help="Start from this learner checkpoint (e.g. a meta-prompt).")] = None,
    learner_opt: Annotated[list[str], typer.Option("--learner-opt", help="Learner option KEY=VALUE (repeatable).")] = [],
    method_opt: Annotated[list[str], typer.Option("--method-opt", help="Method option KEY=VALUE (repeatable).")] = [],
    eval_templates: Annotated[str, typer.Option(help="Template set of the final evaluation (the pool that --wordings split divides).")] = "promptsrc60",
    wordings: Annotated[str, typer.Option(help="'split': train on the seen wordings of --eval-templates only, report seen / held-out / out-of-family (docs/wordings.md); 'all': train as the method says, evaluate on --eval-templates.")] = "all",
    held_out: Annotated[float, typer.Option(help="--wordings split: share of the pool held out.")] = 1 / 3,
    wording_seed: Annotated[int, typer.Option(help="--wordings split: seed of the split (the same for every method and seed).")] = 0,
    out_of_family: Annotated[str, typer.Option(help="--wordings split: template set of the out-of-family pool.")] = "out_of_family",
    eval_perturb: Annotated[str, typer.Option(help="Perturbations of the final evaluation.")] = "default",
    bootstrap: Annotated[int, typer.Option(min=0)] = 1000,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA (never on CPU).")] = True,
    num_workers: Annotated[int, typer.Option(min=0)] = 0,
    output: Annotated[str, typer.Option(help="Run folder; fields {method} {learner} {dataset} {seed} {shots}.")] = "runs/{method}__{learner}__{dataset}__seed{seed}",
    overwrite: Annotated[bool, typer.Option(help="Replace a finished run in the output folder.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run with the same options and --output from its last finished epoch.")] = False,
    preset: Annotated[Optional[str], typer.Option(help="A paper's published configuration (promptbench list presets); explicit flags override it.")] = None,
) -> None:
    """Train a learner with a method on a few-shot split, then evaluate it on base and new classes.

    Under torchrun every rank trains on its share of each batch; only rank 0 writes and prints.
    """
    from . import distributed
    from .learners import LEARNERS
    from .options import split_pairs
    from .report import render
    from .resume import Terminated, sigterm_interrupts
    from .train.loop import TrainConfig
    from .train.method import METHODS
    from .train.run import TrainRequest, run_training
    from .wordings import protocol_for

    learner_options, method_options = split_pairs(learner_opt, "--learner-opt"), split_pairs(method_opt, "--method-opt")
    preset_record = None
    if preset:
        from .presets import apply_preset, check_init

        given = {"method": method, "learner": learner, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                 "warmup_epochs": warmup_epochs, "shots": shots, "subset": subset, "model": model,
                 "pretrained": pretrained, "learner_options": learner_options, "method_options": method_options}
        merged, preset_record = apply_preset(preset, given, explicit_flags(ctx, given))
        check_init(preset, init)
        method, learner, epochs, batch_size, lr = (merged[k] for k in ("method", "learner", "epochs", "batch_size", "lr"))
        warmup_epochs, shots, subset, model, pretrained = (
            merged[k] for k in ("warmup_epochs", "shots", "subset", "model", "pretrained"))
        learner_options, method_options = merged["learner_options"], merged["method_options"]
    METHODS.get(method)  # unknown names fail before anything loads
    if init is None:
        LEARNERS.get(learner)
    folder = output_path(output, method=method, learner=learner, dataset="+".join(dataset), seed=str(seed),
                         shots=str(shots))
    request = TrainRequest(
        method=method, learner=learner if init is None else "", model=model, pretrained=pretrained,
        dataset=dataset[0] if len(dataset) == 1 else dataset,
        shots=shots, subset=subset, output=str(folder), init=str(init) if init else None,
        learner_options=learner_options if init is None else {}, method_options=method_options,
        preset=preset_record,
        config=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=warmup_epochs,
                           accumulate=accumulate, seed=seed, amp=amp, num_workers=num_workers),
        eval_templates=eval_templates, eval_perturb=eval_perturb, bootstrap=bootstrap, device=device,
        overwrite=overwrite, resume=resume,
        wordings=protocol_for(wordings, eval_templates, held_out, wording_seed, out_of_family),
    )

    def note(message: str) -> None:
        console.print(message, highlight=False, soft_wrap=True)

    # the process group is joined inside run_training; torchrun's RANK already says who shows progress
    with Progress(TextColumn("{task.description:>13}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=os.environ.get("RANK", "0") != "0") as progress, \
            sigterm_interrupts():
        try:
            doc = run_training(request, environment_info(), progress=_Bars(progress), note=note)
        except KeyboardInterrupt as interrupt:
            if distributed.is_main():
                kept = ("checkpoint and training state of the last finished epoch; the same command with --resume "
                        "continues it") if METHODS.get(method).fit is None else "checkpoint of the last finished epoch"
                note(f"interrupted: {folder} keeps the {kept}")
            raise typer.Exit(143 if isinstance(interrupt, Terminated) else 130) from None
    if not distributed.is_main():
        return
    render(doc)
    training = doc["run"]["training"]
    console.print(f"trained {training['steps']} steps: loss {training['first_loss']:.4f} -> {training['last_loss']:.4f}; "
                  f"run folder {folder}/")
    weights = training.get("method_summary", {})
    if weights.get("weighting"):
        heaviest = ", ".join(f"{t['template']!r} {t['weight']:.3f}" for t in weights["top_templates"][:3])
        console.print(f"template weights: entropy {weights['w_entropy_p_in']:.2f} of {weights['w_entropy_p_in_max']:.2f} "
                      f"over P_in, {weights['w_entropy_all']:.2f} of {weights['w_entropy_all_max']:.2f} over all; "
                      f"heaviest {heaviest}", highlight=False, soft_wrap=True)


@app.command("import")
def import_(
    source: Annotated[Path, typer.Argument(help="A Dassl checkpoint of CoOp, CoCoOp, IVLP, MaPLe or PromptSRC (model.pth.tar-N).")],
    output: Annotated[Path, typer.Option(help="Where to write our learner checkpoint (.safetensors).")],
    learner: Annotated[Optional[str], typer.Option(help="The learner the file must hold; default: the one its names say.")] = None,
    model: Annotated[str, typer.Option(help="The backbone the prompts were trained on.")] = "ViT-B-16",
    pretrained: Annotated[Optional[str], typer.Option(help="Its weights: tag or local file (OpenAI weights build QuickGELU); '' for random init.")] = "openai",
    ctx_init: Annotated[str, typer.Option(help="The reference config's CTX_INIT; IVLP/MaPLe keep its words after n_ctx as fixed text; '' for none.")] = "a photo of a",
    learner_opt: Annotated[list[str], typer.Option("--learner-opt", help="Further learner option KEY=VALUE (e.g. class_token_position=middle).")] = [],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output file.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "cpu",
) -> None:
    """Convert a published reference prompt checkpoint into a learner checkpoint (docs/import.md).

    Reads the file with torch.load(weights_only=True) only; one that needs anything else unpickled is refused.
    """
    from .backbone import load_backbone
    from .learners.reference_import import import_checkpoint
    from .options import split_pairs

    if output.exists() and not overwrite:
        raise UserError(f"{output} exists; pass --overwrite to replace it")
    backbone = load_backbone(model, pretrained or None, device)
    prompt_learner, origin = import_checkpoint(source, backbone, learner, ctx_init or None,
                                               split_pairs(learner_opt, "--learner-opt"))
    prompt_learner.save(output, {"imported_from": origin})
    console.print(f"wrote {output}: {prompt_learner.name} {prompt_learner.options} from {source} "
                  f"(sha256 {origin['sha256'][:16]}, epoch {origin['epoch']})", highlight=False, soft_wrap=True)


@app.command()
def report(
    file: Annotated[Path, typer.Argument(help="A result JSON written by `promptbench evaluate`.")],
    csv: Annotated[Optional[Path], typer.Option(help="Export the result as CSV here.")] = None,
    plot: Annotated[bool, typer.Option(help="Also write PNG figures and a markdown report into FILE-plots/ (needs the [plot] extra).")] = False,
) -> None:
    """Re-render a saved result file; optionally export it as CSV and plot it."""
    from .report import render
    from .results import read_result, write_csv

    if plot:
        from .compare.plots import pyplot

        pyplot()  # without matplotlib: one line saying what to install, before anything else
    doc = read_result(file)
    render(doc)
    if csv:
        write_csv(doc, csv)
        console.print(f"wrote {csv}")
    if plot:
        from .compare.markdown import write_markdown
        from .compare.plots import all_plots
        from .compare.stats import Group, summarise

        run = doc["run"]
        group = Group((run.get("training") or {}).get("method", run["learner"]), run["learner"], run["dataset"],
                      {run.get("seed", 0): doc})
        summary = summarise(group, n_resamples=run.get("bootstrap", 1000), seed=run.get("seed", 0))
        folder = file.parent / f"{file.stem}-plots"
        paths = all_plots([summary], folder)
        md = write_markdown(folder / "report.md", f"{group.label} on {run['dataset']}", [f"result file: {file}"],
                            [summary], [], [], paths)
        console.print(f"wrote {len(paths)} figures and {md}")


@app.command()
def compare(
    sweep: Annotated[Optional[Path], typer.Argument(help="Sweep TOML file (docs/compare.md); flags override its keys.")] = None,
    method: Annotated[list[str], typer.Option("--method", help="Method to compare, repeatable; 'zeroshot' = no training.")] = [],
    learner: Annotated[list[str], typer.Option("--learner", help="Learner, repeatable (pairs that do not fit are left out).")] = [],
    dataset: Annotated[list[str], typer.Option("--dataset", help="Dataset spec, repeatable.")] = [],
    seed: Annotated[list[int], typer.Option("--seed", help="Seed, repeatable (default 1, 2, 3).")] = [],
    shots: Annotated[Optional[int], typer.Option(help="Images per class (default 16).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (default 5).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch size (default 8).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default: each method's own).")] = None,
    templates: Annotated[Optional[str], typer.Option(help="Evaluation template set (default promptsrc60).")] = None,
    perturb: Annotated[Optional[str], typer.Option(help="Evaluation perturbations (default 'default').")] = None,
    bootstrap: Annotated[Optional[int], typer.Option(help="Bootstrap resamples for intervals and tests (default 1000).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Backbone (default toy-clip).")] = None,
    pretrained: Annotated[Optional[str], typer.Option(help="Pretrained tag or local weights file.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    output: Annotated[Optional[str], typer.Option(help="Folder of the runs, summary and report (default runs/compare).")] = None,
    reference: Annotated[Optional[str], typer.Option(help="METHOD or METHOD/LEARNER the others are tested against (default erm-multi, else zeroshot, else the first method).")] = None,
    wordings: Annotated[Optional[str], typer.Option(help="'split' (default): every method trains on the seen wordings only, reported on seen / held-out / out-of-family; 'all': the old layout.")] = None,
    skip_existing: Annotated[bool, typer.Option(help="Reuse finished runs (resume an interrupted sweep).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Rerun finished runs.")] = False,
    plot: Annotated[bool, typer.Option(help="Write PNG figures into the report (needs the [plot] extra).")] = False,
    preset: Annotated[list[str], typer.Option("--preset", help="Add a paper's configuration as a sweep entry (promptbench list presets), repeatable.")] = [],
) -> None:
    """Run methods x learners x datasets x seeds and report them side by side, with paired tests."""
    from .compare.grid import load_groups, run_grid
    from .compare.markdown import write_markdown
    from .compare.stats import compare_to_reference, summarise
    from .compare.sweep import build_sweep, read_sweep_file
    from .compare.tables import headline_table, paired_table, runs_table, to_rich, wording_line

    if plot:
        from .compare.plots import all_plots, pyplot

        pyplot()  # fail before an hour of training, not after
    values = read_sweep_file(sweep) if sweep else {}
    flags = {"methods": method, "learners": learner, "datasets": dataset, "seeds": seed, "shots": shots,
             "epochs": epochs, "batch_size": batch_size, "lr": lr, "templates": templates, "perturb": perturb,
             "bootstrap": bootstrap, "model": model, "pretrained": pretrained, "device": device, "output": output,
             "reference": reference, "wordings": wordings}
    values.update({k: v for k, v in flags.items() if v not in (None, [])})
    for name in preset:  # an entry of its own, as `[method.NAME] preset = "NAME"` in a sweep file
        values["methods"] = [*values.get("methods", []), name]
        values.setdefault("method", {}).setdefault(name, {})["preset"] = name
    spec = build_sweep(values)

    def announce(record) -> None:
        note = f": {record.error}" if record.error else ""
        console.print(f"{record.status:>11} {record.method}/{record.learner}/{record.dataset}/seed{record.seed} "
                      f"({record.wall_time_s:.0f} s){note}", highlight=False)

    with Progress(TextColumn("{task.description:>13}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        records, left_out = run_grid(spec, environment_info(), skip_existing=skip_existing, overwrite=overwrite,
                                     progress=_Bars(progress), on_record=announce)
    groups = load_groups(records)
    if not groups:
        raise UserError(f"no run finished; see {spec.output}/summary.json for each run's error")
    order = {m: i for i, m in enumerate(spec.methods)}
    groups.sort(key=lambda g: (g.dataset, order[g.method], g.learner))
    summaries = [summarise(g, spec.bootstrap) for g in groups]
    comparisons = compare_to_reference(summaries, spec.reference_name(), spec.bootstrap)
    out = Console(width=160)
    out.print(to_rich(headline_table(summaries)))
    if comparisons:
        out.print(to_rich(paired_table(comparisons, clean_only=True)))
    failed = runs_table(records)
    if failed.rows:
        out.print(to_rich(failed))
    folder = Path(spec.output)
    paths = all_plots(summaries, folder / "plots") if plot else []
    setup = [f"sweep: {sweep or 'flags'}; reference: {spec.reference_name()}",
             f"model {spec.model}; datasets {', '.join(spec.datasets)}; seeds {spec.seeds}; {spec.shots} shots; "
             f"{spec.epochs} epochs; templates {spec.templates}; perturbations {spec.perturb}",
             wording_line(spec),
             f"runs: {sum(r.status in ('done', 'existing') for r in records)} finished, "
             f"{sum(r.status == 'failed' for r in records)} failed"
             + (f"; left out (method does not fit the learner): {', '.join(left_out)}" if left_out else "")]
    md = write_markdown(folder / "report.md", "promptbench comparison", setup, summaries, comparisons, records, paths)
    console.print(f"wrote {md} and {folder / 'summary.json'}")


@app.command("list")
def list_(
    what: Annotated[Listable, typer.Argument(help="What to list.")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Learners and methods: also each one's options (type, default, help) and capabilities.")] = False,
) -> None:
    """List learners and methods (built-in and plug-in), template sets, perturbation ops or dataset sources."""
    out = Console(soft_wrap=True, highlight=False)
    if what in (Listable.learners, Listable.methods):
        from .describe import describe_learner, describe_method
        from .learners import LEARNERS
        from .train.method import METHODS

        registry, describe = (LEARNERS, describe_learner) if what is Listable.learners else (METHODS, describe_method)
        for name in registry.names():
            out.print(escape(f"{name:<16} {registry.origin(name)}"))
            for line in describe(name) if verbose else []:
                out.print(escape(f"    {line}"))
    elif what is Listable.templates:
        from .templates import list_template_sets, load_templates

        for name in list_template_sets():
            out.print(f"{name:<24} {len(load_templates(name))} template(s)")
    elif what is Listable.perturbations:
        from .perturb import DEFAULT_OPS, LEVELS, OPS

        for op in OPS:
            out.print(f"{op:<10} {'(default)' if op in DEFAULT_OPS else ''}")
        out.print("levels: " + ", ".join(f"{k}={v}" for k, v in LEVELS.items()) + "; or any rate in [0, 1], e.g. drop:0.3")
    elif what is Listable.presets:
        import json

        from .presets import PRESETS

        for p in PRESETS.values():
            out.print(f"{p.name:<24} {p.summary}", highlight=False, soft_wrap=True)
            out.print(f"{'':<24} values: {json.dumps(p.values())}", highlight=False, soft_wrap=True)
            out.print(f"{'':<24} source: {p.source}" + ("; needs --init META" if p.needs_init else ""),
                      highlight=False, soft_wrap=True)
    else:
        from .data import SOURCES

        for name, description in SOURCES.items():
            out.print(f"{name:<12} {description}")


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """Click's usage-error base class as this typer raises it, and click's own.

    Typer 0.12-0.2x raises click's exceptions; later typer vendors click (``typer._click``), whose
    `ClickException` is not click's. Both are found from typer's public `BadParameter`.
    """
    vendored = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        import click  # not a dependency of the typer that vendors it
    except ImportError:
        return (vendored,)
    return (click.ClickException, vendored)


def usage_error_line(err: BaseException) -> str:
    """One line for a click/typer usage error: the command, the message, where help is."""
    message = " ".join(err.format_message().replace("Value error, ", "").split())  # type: ignore[attr-defined]
    ctx = getattr(err, "ctx", None)
    if ctx is not None:
        command = ctx.command_path
    else:  # errors of the option parser carry no context: name the subcommand from the command line
        names = {c.name or c.callback.__name__ for c in app.registered_commands if c.callback}
        command = " ".join(["promptbench", *[a for a in sys.argv[1:2] if a in names]])
    return f"{command}: {message} (see {command} --help)"


def main() -> None:
    """Console-script entry: run the app, turning user and usage errors into one line and exit code 2."""
    try:
        code = app(standalone_mode=False, prog_name="promptbench")  # returns the code of a typer.Exit
    except UserError as err:
        _fail(str(err))
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as err:  # click usage errors arrive here in standalone_mode=False
        if not isinstance(err, _usage_error_types()):
            raise
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `promptbench`: the help was shown
            sys.exit(2)
        _fail(usage_error_line(err))
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)
