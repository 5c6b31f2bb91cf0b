"""The `promptbench` command: parse options, call the library, render. Nothing else lives here.

Every `UserError` becomes one line on stderr and exit code 2; an interrupted evaluation still
writes what it finished (marked incomplete).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import InputWarning, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Measure how prompt wording moves CLIP-style prompt learners.")
console = Console(stderr=True)
T = TypeVar("T")


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


def _note(message: str) -> None:
    """A one-line message for the user on stderr; ``warning: ...`` is shown as a warning."""
    if message.startswith("warning: "):
        message = f"[yellow]warning:[/] {escape(message.removeprefix('warning: '))}"
    else:
        message = escape(message)
    console.print(message, highlight=False, soft_wrap=True)


class _Bars:
    """A rich progress bar per evaluation stage, fed by the evaluator's progress callback."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


@contextmanager
def _progress() -> Iterator[Callable[[str, int, int], None]]:
    """Transient progress bars on stderr; under torchrun only rank 0 draws (torchrun's RANK says
    which, before the library joins the process group)."""
    with Progress(TextColumn("{task.description:>13}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=os.environ.get("RANK", "0") != "0") as progress:
        yield _Bars(progress)


def _interruptible(call: Callable[[Callable[[str, int, int], None]], T]) -> T:
    """`call(progress)` under progress bars; Ctrl-C exits 130 and SIGTERM 143, after the library
    has kept what it finished (and said so)."""
    from .resume import Terminated, sigterm_interrupts

    with _progress() as progress, sigterm_interrupts():
        try:
            return call(progress)
        except KeyboardInterrupt as interrupt:
            raise typer.Exit(143 if isinstance(interrupt, Terminated) else 130) from None


ModelOption = Annotated[str, typer.Option("--model", help="open_clip architecture name, model-config JSON path, or toy-clip.")]
LearnerOption = Annotated[str, typer.Option("--learner", help="Registered learner name or a learner checkpoint (.safetensors).")]
LearnerOpts = Annotated[list[str], typer.Option("--learner-opt", help="Learner option KEY=VALUE (repeatable).")]
DatasetOption = Annotated[str, typer.Option("--dataset", help="toy-shapes | folder:PATH | coop:NAME@ROOT | hf:NAME | hf-disk:PATH")]
"""Options that `evaluate`, `attack` and `train` declare alike, written once."""


@app.command()
def evaluate(
    model: ModelOption = "toy-clip",
    pretrained: Annotated[Optional[str], typer.Option(help="Pretrained tag (hub) or local weights file; toy-clip uses its shipped weights.")] = None,
    learner: LearnerOption = "zeroshot",
    learner_opt: LearnerOpts = [],
    dataset: DatasetOption = "toy-shapes",
    split: Annotated[str, typer.Option(help="Dataset split.")] = "test",
    subset: Annotated[str, typer.Option(help="all | base | new | base-new (both, with H).")] = "all",
    target: Annotated[list[str], typer.Option("--target", help="Also score this dataset (same split, all its classes) as subset target:LABEL: cross-dataset / domain-generalization transfer. Repeatable.")] = [],
    image_column: Annotated[str, typer.Option(help="HF datasets: the image column.")] = "image",
    label_column: Annotated[str, typer.Option(help="HF datasets: the label column.")] = "label",
    trust_remote_code: Annotated[bool, typer.Option(help="HF datasets: allow the dataset's own loading code.")] = False,
    templates: Annotated[str, typer.Option(help="Template set name or file (one template per line, {} = class).")] = "promptsrc60",
    wordings: Annotated[str, typer.Option(help="'split': score on the seen / held-out / out-of-family wordings (a checkpoint trained under the protocol: its recorded split; else the split of --templates, docs/wordings.md); 'all': on --templates whole.")] = "all",
    held_out: Annotated[float, typer.Option(help="--wordings split without a recorded split: share of the pool held out.")] = 1 / 3,
    wording_seed: Annotated[int, typer.Option(help="--wordings split without a recorded split: seed of the split.")] = 0,
    out_of_family: Annotated[str, typer.Option(help="--wordings split without a recorded split: the out-of-family set.")] = "out_of_family",
    perturb: Annotated[str, typer.Option(help="'default' (5 ops x weak/strong), 'none', or e.g. 'synonym:0.3,drop:weak'.")] = "default",
    draws: Annotated[int, typer.Option(min=1, help="Independent draws per perturbation.")] = 1,
    lexicon: Annotated[Optional[Path], typer.Option(help="Your own synonym lexicon (JSON).")] = None,
    mask_token: Annotated[str, typer.Option(help="Replacement string of the mask op.")] = "[MASK]",
    seed: Annotated[int, typer.Option(help="Seed of every draw (perturbations, bootstrap).")] = 0,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples for 95% intervals; 0 = off.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 128,
    num_workers: Annotated[int, typer.Option(min=0, help="Image-decoding worker processes.")] = 0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    output: Annotated[str, typer.Option(help="Result JSON path; fields {learner} {dataset} {split} {subset} {model} {seed} {time}.")] = "results/{learner}__{dataset}__{split}__{time}.json",
    csv: Annotated[Optional[Path], typer.Option(help="Also export the result as CSV here.")] = None,
    cache: Annotated[bool, typer.Option(help="Keep image and prompt features on disk and reuse them across runs.")] = True,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder (default: $PROMPTBENCH_CACHE or the user cache dir, /features).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run with the same options and --output: keep its finished subsets.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing result file (one promptbench wrote) at --output / --csv.")] = False,
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA (never on CPU).")] = True,
) -> None:
    """Score a prompt learner over templates and text perturbations; print the table, write the JSON.

    Under torchrun every rank runs this body on its share of the work; only rank 0 writes and prints.
    """
    from . import distributed
    from .data import DatasetOptions
    from .evaluation import EvalRequest, run_evaluation
    from .files import check_output_file
    from .options import split_pairs
    from .report import render
    from .results import write_csv
    from .wordings import protocol_for

    request = EvalRequest(
        model=model, pretrained=pretrained, learner=learner, learner_options=split_pairs(learner_opt, "--learner-opt"),
        dataset=dataset, dataset_options=DatasetOptions(split=split, image_column=image_column,
                                                        label_column=label_column, trust_remote_code=trust_remote_code),
        subset=subset, templates=templates, perturb=perturb, draws=draws, lexicon=str(lexicon) if lexicon else None,
        mask_token=mask_token, seed=seed, bootstrap=bootstrap, batch_size=batch_size, num_workers=num_workers,
        device=device, amp=amp, cache=cache, cache_dir=str(cache_dir) if cache_dir else None, output=output,
        resume=resume, overwrite=overwrite,
        wordings=protocol_for(wordings, templates, held_out, wording_seed, out_of_family), targets=tuple(target),
    )
    if csv and distributed.is_main():
        check_output_file(csv, overwrite, flag="--csv")
    result = _interruptible(lambda progress: run_evaluation(request, progress=progress, note=_note))
    if not distributed.is_main():
        return
    render(result.doc)
    if result.already_complete:
        return
    if csv:
        write_csv(result.doc, csv)
    if result.n_skipped:
        _note(f"warning: {result.n_skipped} corrupt image(s) skipped; listed under 'skipped' in {result.path}")
    _note(f"wrote {result.path} ({result.doc['run']['wall_time_s']:.1f} s)")


@app.command()
def train(
    ctx: typer.Context,
    method: Annotated[str, typer.Option(help="Training method (promptbench list methods).")] = "erm",
    learner: Annotated[Optional[str], typer.Option(help="Learner to train (promptbench list learners); default coop, or with --init the checkpoint's (any other is refused).")] = None,
    model: ModelOption = "toy-clip",
    pretrained: Annotated[Optional[str], typer.Option(help="Pretrained tag or local weights file.")] = None,
    dataset: Annotated[list[str], typer.Option(help="Dataset spec; its train split is trained on, its test split evaluated. Repeatable: train on several side by side (maml-clip: one task source each), evaluate on the first.")] = ["toy-shapes"],
    shots: Annotated[int, typer.Option(help="Images per class (few-shot, drawn with the seed); 0 = all.")] = 16,
    subset: Annotated[str, typer.Option(help="Classes to train on: base (then evaluate base and new), new or all.")] = "base",
    target: Annotated[list[str], typer.Option("--target", help="Also evaluate the trained learner on this dataset's test split with its own classes (cross-dataset / domain-generalization; train with --subset all). Repeatable.")] = [],
    epochs: Annotated[int, typer.Option(min=1)] = 5,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate; default: the method's for the learner.")] = None,
    warmup_epochs: Annotated[int, typer.Option(min=0, help="Epochs at a constant 1e-5 before the cosine schedule.")] = 1,
    accumulate: Annotated[int, typer.Option(min=1, help="Batches per optimiser step.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the few-shot draw, data order and initialisation.")] = 1,
    init: Annotated[Optional[Path], typer.Option(help="Start from this learner checkpoint (e.g. a meta-prompt).")] = None,
    learner_opt: LearnerOpts = [],
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
    from .evaluation import output_path
    from .options import split_pairs
    from .report import render
    from .train.loop import TrainConfig
    from .train.run import TrainRequest, checkpoint_learner, run_training
    from .wordings import protocol_for

    if init is None and learner is None:
        learner = "coop"
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
    if init is not None:
        learner = checkpoint_learner(init, learner)
    folder = output_path(output, method=method, learner=learner, dataset="+".join(dataset), seed=str(seed),
                         shots=str(shots))
    request = TrainRequest(
        method=method, learner=learner, model=model, pretrained=pretrained,
        dataset=dataset[0] if len(dataset) == 1 else dataset,
        shots=shots, subset=subset, output=str(folder), init=str(init) if init else None,
        learner_options=learner_options, method_options=method_options,
        preset=preset_record,
        config=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, warmup_epochs=warmup_epochs,
                           accumulate=accumulate, seed=seed, amp=amp, num_workers=num_workers),
        eval_templates=eval_templates, eval_perturb=eval_perturb, bootstrap=bootstrap, device=device,
        overwrite=overwrite, resume=resume,
        wordings=protocol_for(wordings, eval_templates, held_out, wording_seed, out_of_family),
        eval_targets=list(target) or None,
    )
    doc = _interruptible(lambda progress: run_training(request, progress=progress, note=_note))
    if not distributed.is_main():
        return
    render(doc)
    training = doc["run"]["training"]
    _note(f"trained {training['steps']} steps: loss {training['first_loss']:.4f} -> {training['last_loss']:.4f}; "
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
        _note(f"wrote {csv}")
    if plot:
        from .compare.run import plot_result

        paths, md = plot_result(doc, file)
        _note(f"wrote {len(paths)} figures and {md}")


@app.command()
def attack(
    model: ModelOption = "toy-clip",
    pretrained: Annotated[Optional[str], typer.Option(help="Pretrained tag (hub) or local weights file.")] = None,
    learner: LearnerOption = "zeroshot",
    learner_opt: LearnerOpts = [],
    dataset: DatasetOption = "toy-shapes",
    split: Annotated[str, typer.Option(help="Dataset split the found wordings are reported on.")] = "test",
    subset: Annotated[str, typer.Option(help="Classes: all | base | new.")] = "all",
    search_split: Annotated[str, typer.Option(help="'half': search on a seeded half of --split's images, report on the other half; or a split name (e.g. val) to search on.")] = "half",
    templates: Annotated[str, typer.Option(help="Start templates: a template set name or file.")] = "promptsrc60",
    objective: Annotated[str, typer.Option(help="accuracy (minimised) | loss | sensitivity (maximised).")] = "accuracy",
    budget: Annotated[int, typer.Option(min=1, help="Wordings scored in all, start templates included (at most budget x C prompt strings encoded).")] = 300,
    beam: Annotated[int, typer.Option(min=1, help="Wordings expanded per round.")] = 8,
    max_edits: Annotated[int, typer.Option(min=1, help="Edits allowed from a start template.")] = 3,
    top: Annotated[int, typer.Option(min=1, help="Worst wordings listed.")] = 10,
    lexicon: Annotated[Optional[Path], typer.Option(help="Your own synonym lexicon (JSON).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the half split, the candidate order and the bootstrap.")] = 0,
    bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap resamples of the report images for 95% intervals; 0 = off.")] = 1000,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per batch.")] = 128,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    output: Annotated[str, typer.Option(help="Result JSON path; fields {learner} {dataset} {split} {subset} {model} {seed} {time}.")] = "results/attack__{learner}__{dataset}__{split}__{time}.json",
    cache: Annotated[bool, typer.Option(help="Reuse image and prompt features from the feature cache.")] = True,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Feature cache folder.")] = None,
    amp: Annotated[bool, typer.Option(help="Mixed precision on CUDA (never on CPU).")] = True,
) -> None:
    """Search the meaning-preserving wordings near the templates for the one the learner fails on (docs/attack.md)."""
    from rich.table import Table

    from .attack import AttackSettings, run_attack
    from .data import DatasetOptions
    from .evaluation import EvalRequest
    from .options import split_pairs

    settings = AttackSettings(budget=budget, beam=beam, max_edits=max_edits, objective=objective,
                              search_split=search_split, top=top, seed=seed)
    request = EvalRequest(
        model=model, pretrained=pretrained, learner=learner, learner_options=split_pairs(learner_opt, "--learner-opt"),
        dataset=dataset, dataset_options=DatasetOptions(split=split), subset=subset, templates=templates,
        lexicon=str(lexicon) if lexicon else None, seed=seed, bootstrap=bootstrap, batch_size=batch_size, device=device,
        amp=amp,
        cache=cache, cache_dir=str(cache_dir) if cache_dir else None, output=output)
    result = _interruptible(lambda progress: run_attack(request, settings, progress=progress, note=_note))
    summary = result.doc["summary"]
    table = Table(title=f"worst wordings ({summary['objective']}; search / report accuracy)")
    for column in ("wording", "search acc", "report acc", "edits from start"):
        table.add_column(column)
    for w in result.doc["worst"]:
        table.add_row(escape(w["template"]), f"{w['search']['acc']:.3f}", f"{w['report']['acc']:.3f}",
                      escape("; ".join(f"{e['op']} {e['detail']}" for e in w["path"]) or "(start template)"))
    Console().print(table)
    ci = f" [{summary['gap_ci'][0]:.3f}, {summary['gap_ci'][1]:.3f}]" if summary["gap_ci"] else ""
    print(f"worst-case accuracy {summary['worst_case_acc']:.3f} vs mean {summary['mean_acc']:.3f} "
          f"(gap {summary['gap']:.3f}{ci}) on the report images; {summary['wordings_scored']} wordings scored")
    _note(f"wrote {result.path}")


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
    protocol: Annotated[Optional[str], typer.Option(help="base2new (default) | cross-dataset | domain-generalization (docs/compare.md).")] = None,
    target: Annotated[list[str], typer.Option("--target", help="Target dataset spec of cross-dataset / domain-generalization, repeatable.")] = [],
    skip_existing: Annotated[bool, typer.Option(help="Reuse finished runs recorded with the sweep's settings (resume an interrupted sweep); rerun the others, naming the keys that differ.")] = False,
    refuse_mismatched: Annotated[bool, typer.Option(help="With --skip-existing: refuse, naming the keys, instead of rerunning a finished run recorded with other settings.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Rerun finished runs.")] = False,
    jobs: Annotated[int, typer.Option(help="Runs at once on this machine: one GPU each when GPUs are present, else a share of the CPU threads.")] = 1,
    shard: Annotated[Optional[str], typer.Option(help="I/N: run only the I-th of N disjoint parts of the grid (a job-array task); build the report with --report-only after all of them.")] = None,
    report_only: Annotated[bool, typer.Option(help="Run nothing: build the report and statistics from the finished runs in the output folder.")] = False,
    tensorboard: Annotated[bool, typer.Option(help="Also write every finished run's training curves under OUTPUT/tensorboard (needs the [tensorboard] extra).")] = False,
    launcher: Annotated[Optional[str], typer.Option(help="Hand the runs to submitit as one job array: 'slurm', or 'local' (subprocesses); resources from the sweep's [resources] table (needs the [cluster] extra).")] = None,
    plot: Annotated[bool, typer.Option(help="Write PNG figures into the report (needs the [plot] extra).")] = False,
    preset: Annotated[list[str], typer.Option("--preset", help="Add a paper's configuration as a sweep entry (promptbench list presets), repeatable.")] = [],
    attack_budget: Annotated[Optional[int], typer.Option(help="Also attack every finished cell with this budget of wordings (the sweep's 'attack' table, docs/compare.md): worst-case accuracy, with paired tests.")] = None,
) -> None:
    """Run methods x learners x datasets x seeds and report them side by side, with paired tests."""
    from .compare.launch import parse_shard
    from .compare.run import run_comparison
    from .compare.sweep import build_sweep, read_sweep_file
    from .compare.tables import headline_table, paired_table, runs_table, to_rich, worst_case_table

    values = read_sweep_file(sweep) if sweep else {}
    flags = {"methods": method, "learners": learner, "datasets": dataset, "seeds": seed, "shots": shots,
             "epochs": epochs, "batch_size": batch_size, "lr": lr, "templates": templates, "perturb": perturb,
             "bootstrap": bootstrap, "model": model, "pretrained": pretrained, "device": device, "output": output,
             "reference": reference, "wordings": wordings, "protocol": protocol, "targets": target}
    values.update({k: v for k, v in flags.items() if v not in (None, [])})
    if attack_budget is not None:
        table = values.get("attack", {})
        values["attack"] = {**table, "budget": attack_budget} if isinstance(table, dict) else table
    for name in preset:  # an entry of its own, as `[method.NAME] preset = "NAME"` in a sweep file
        values["methods"] = [*values.get("methods", []), name]
        values.setdefault("method", {}).setdefault(name, {})["preset"] = name

    def announce(record) -> None:
        error = f": {record.error}" if record.error else ""
        _note(f"{record.status:>11} {record.method}/{record.learner}/{record.dataset}/seed{record.seed} "
              f"({record.wall_time_s:.0f} s){error}")

    spec = build_sweep(values)
    part = parse_shard(shard) if shard is not None else None
    result = _interruptible(lambda progress: run_comparison(
        spec, source=str(sweep or "flags"), skip_existing=skip_existing, overwrite=overwrite, plot=plot,
        progress=progress, on_record=announce, note=_note, refuse_mismatched=refuse_mismatched, shard=part,
        jobs=jobs, report_only=report_only, launcher=launcher, tensorboard=tensorboard))
    if result.report is None:
        _note(f"shard {shard}: {len(result.records)} runs, statuses in {result.summary_file}; once every shard "
              "has finished, build the report with --report-only")
        return
    out = Console(width=160)
    out.print(to_rich(headline_table(result.summaries)))
    if (worst := worst_case_table(result.summaries, spec)) is not None:
        out.print(to_rich(worst))
    if result.comparisons:
        out.print(to_rich(paired_table(result.comparisons, clean_only=True)))
    failed = runs_table(result.records)
    if failed.rows:
        out.print(to_rich(failed))
    _note(f"wrote {result.report} (statistics.json and statistics.csv beside it) and {result.summary_file}")


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
        out.print("levels: " + ", ".join(f"{k}={v}" for k, v in LEVELS.items()) + " (strong: at least one edit more than weak); or any rate in [0, 1], e.g. drop:0.3 (0 = unchanged)")
    elif what is Listable.presets:
        import json

        from .presets import PRESETS

        for p in PRESETS.values():
            out.print(f"{p.name:<24} {p.summary}", highlight=False, soft_wrap=True)
            out.print(f"{'':<24} values: {json.dumps(p.values())}", highlight=False, soft_wrap=True)
            out.print(f"{'':<24} source: {p.source}" + ("; needs --init META" if p.needs_init else ""),
                      highlight=False, soft_wrap=True)
    else:
        from .data import DATASET_SOURCES

        for name in DATASET_SOURCES.names():
            source = DATASET_SOURCES.get(name)
            out.print(escape(f"{source.usage:<16} {source.description}  ({DATASET_SOURCES.origin(name)})"))


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


cache_app = typer.Typer(no_args_is_help=True, help="Inspect or clear the feature and few-shot caches.")
app.add_typer(cache_app, name="cache")
CacheDirOption = Annotated[Optional[Path], typer.Option(help="A feature cache folder (as evaluate --cache-dir); default: the user cache (features and few-shot draws).")]


def _cache_contents(cache_dir: Optional[Path]):
    from .cache import cache_contents
    from .files import cache_root

    if cache_dir is not None:
        return [cache_contents(cache_dir, ("images", "texts", "prompts"))]
    return [cache_contents(cache_root() / "features", ("images", "texts", "prompts")),
            cache_contents(cache_root() / "fewshot", ("few-shot",))]


@cache_app.command("info")
def cache_info(cache_dir: CacheDirOption = None) -> None:
    """Where the caches are, how many entries of each kind they hold and their size."""
    out = Console()
    for contents in _cache_contents(cache_dir):
        out.print(f"{contents.root}{'' if contents.root.is_dir() else ' (absent)'}", highlight=False)
        for kind, paths in contents.entries.items():
            out.print(f"  {kind:<10} {len(paths):>7} file(s) {contents.size(kind) / 2**20:>10.1f} MiB", highlight=False)
        if contents.other:
            out.print(f"  {len(contents.other)} other file(s), not written by promptbench (clear leaves them), "
                      f"e.g. {contents.other[0]}", highlight=False)


@cache_app.command("clear")
def cache_clear(cache_dir: CacheDirOption = None) -> None:
    """Remove the cache entries (only files this package wrote there; anything else stays)."""
    from .cache import clear_cache

    for contents in _cache_contents(cache_dir):
        removed = clear_cache(contents)
        kept = f"; {len(contents.other)} other file(s) left alone" if contents.other else ""
        _note(f"{contents.root}: removed {removed} cache file(s){kept}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Input warnings as one ``warning:`` line on stderr (rank 0 only); others as Python shows them."""
    if not issubclass(category, InputWarning):
        _python_showwarning(message, category, filename, lineno, file, line)
    elif os.environ.get("RANK", "0") == "0":
        _note(f"warning: {message}")


_python_showwarning = warnings.showwarning


def main() -> None:
    """Console-script entry: run the app, turning user and usage errors into one line and exit code 2."""
    warnings.showwarning = _show_warning
    warnings.simplefilter("always", InputWarning)
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
