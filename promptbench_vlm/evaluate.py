"""The Evaluator: one learner, one dataset, a template set and perturbations -> metrics.

Encode once: image features are computed once per image, text features once per unique prompt
string; logits are streamed in blocks of (templates x images) so ``[T, N, C]`` never exists.
Only per-template arrays ``[T, N]`` (and ``[T, R, N]`` per perturbation) reach `metrics`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from . import distributed, metrics
from .backbone import autocast, precision
from .cache import CHUNK_IMAGES, SEGMENT_TEXTS, FeatureCache, image_key, text_key
from .data.base import CorruptImageError, ImageDataset
from .errors import UserError
from .learners.base import PromptLearner
from .perturb import Lexicon, PerturbSpec, load_lexicon
from .prompts import PromptTable, prompt_table
from .tokenizer import in_token_order, token_count

ProgressFn = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``; the CLI draws a bar from it."""

LOGIT_BLOCK_ELEMENTS = 1 << 22  # the largest logits block held at once: 4M floats = 16 MB
CPU_BLOCK_ELEMENTS = 1 << 18  # on the CPU: 256K floats = 1 MB, which stays in cache (`block_elements`)


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate beyond the learner and dataset; recorded in the result file.

    Attributes:
        templates: The clean templates, each with one ``{}``.
        perturbations: Perturbation specs; each is applied to every filled prompt `draws` times.
        draws: Independent draws R per perturbation.
        seed: Fixes every draw (perturbations, bootstrap).
        bootstrap: Bootstrap resamples for intervals; 0 turns intervals off.
        batch_size: Images per encoder batch.
        text_batch_size: Prompt strings per text-encoder batch.
        num_workers: DataLoader workers for image decoding.
        lexicon: Perturbation lexicon; None uses the shipped one.
        amp: Mixed precision on CUDA (bf16 where supported, else fp16); never on the CPU.
    """

    templates: tuple[str, ...]
    perturbations: tuple[PerturbSpec, ...] = ()
    draws: int = 1
    seed: int = 0
    bootstrap: int = 1000
    batch_size: int = 128
    text_batch_size: int = 512
    num_workers: int = 0
    lexicon: Lexicon | None = None
    amp: bool = True

    def __post_init__(self) -> None:
        if self.seed < 0:  # numpy's generators refuse it, after all the encoding
            raise UserError(f"--seed must be 0 or more, got {self.seed}")


@dataclass
class PerturbationResult:
    """Metrics for one perturbation spec (op at a rate) over all templates and draws."""

    spec: PerturbSpec
    draws: int
    metrics: dict[str, metrics.Estimate]


@dataclass
class SubsetResult:
    """Everything measured on one subset (all, base or new) of a dataset."""

    subset: str
    n_images: int
    n_classes: int
    skipped: list[dict[str, str]]
    metrics: dict[str, metrics.Estimate]
    per_template_acc: list[float]
    perturbations: list[PerturbationResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    per_image: dict = field(default_factory=dict)
    """Compact per-image values for paired comparisons of learners (`per_image_counts`)."""


class ImageItems(Dataset):
    """Adapts an ImageDataset to a torch Dataset; a corrupt image becomes None (skipped later)."""

    def __init__(self, dataset: ImageDataset, preprocess: Callable):
        self.dataset = dataset
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return self.preprocess(self.dataset.load(i)), i, None
        except CorruptImageError as err:
            return None, i, str(err)


def collate_skipping(batch):
    """Stack the readable images of a batch; return the corrupt ones separately."""
    good = [(x, i) for x, i, _ in batch if x is not None]
    bad = [(i, err) for x, i, err in batch if x is None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, [i for _, i in good], bad


@dataclass
class ImageFeatures:
    """The features of every readable image of a dataset, and where they came from.

    Attributes:
        features: ``[N', D]`` float32 on the learner's device, in dataset order.
        labels: ``[N']`` labels of the images kept.
        skipped: The unreadable images as ``{"item", "error"}`` records.
        encoded: Images run through the image encoder (over all ranks).
        cached: Images whose features came from the feature cache.
    """

    features: torch.Tensor
    labels: np.ndarray
    skipped: list[dict[str, str]]
    encoded: int
    cached: int


@torch.inference_mode()
def _encode_chunks(learner: PromptLearner, dataset: ImageDataset, chunks: list[range], batch_size: int,
                   num_workers: int, amp: bool, progress: ProgressFn | None = None
                   ) -> Iterator[tuple[range, torch.Tensor, list[int], list[dict[str, str]]]]:
    """Encode the readable images of each chunk, yielding each chunk as soon as it is done.

    One loader serves all chunks (workers start once); its batches never cross a chunk.
    """
    batches = [list(chunk[b : b + batch_size]) for chunk in chunks for b in range(0, len(chunk), batch_size)]
    loader = DataLoader(
        ImageItems(dataset, learner.backbone.preprocess),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_skipping,
        pin_memory=learner.device.type == "cuda",
    )
    batch_iter, total, done = iter(loader), sum(len(c) for c in chunks), 0
    for chunk in chunks:
        feats, kept, skipped = [], [], []
        while len(kept) + len(skipped) < len(chunk):
            images, indices, bad = next(batch_iter)
            skipped += [{"item": dataset.describe(i), "error": err} for i, err in bad]
            if images is not None:
                with autocast(learner.device, amp):
                    feats.append(learner.encode_images(images.to(learner.device, non_blocking=True)).float().cpu())
                kept += indices
            done += len(indices) + len(bad)
            if progress:
                progress("images", done, total)
        yield chunk, (torch.cat(feats) if feats else torch.empty(0, 0)), kept, skipped


def image_features(
    learner: PromptLearner,
    dataset: ImageDataset,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: ProgressFn | None = None,
    cache: FeatureCache | None = None,
    split: str = "",
    amp: bool = True,
) -> ImageFeatures:
    """Encode every readable image once, in chunks of `CHUNK_IMAGES` images.

    A chunk is the unit of caching, of resuming and of sharding: under torchrun each rank takes
    every world-th chunk and the chunks are gathered back in order. Batches never cross a chunk,
    so one process and N processes run the very same batches.
    """
    n = len(dataset)
    chunks = [range(s, min(s + CHUNK_IMAGES, n)) for s in range(0, n, CHUNK_IMAGES)]
    key = image_key(learner, dataset, split, precision(learner.device, amp)) if cache else None
    parts: dict[int, tuple[torch.Tensor, list[int], list[dict[str, str]], bool]] = {}
    todo = []
    for c in distributed.shard(range(len(chunks))):
        hit = cache.load_images(key, chunks[c].start, chunks[c].stop) if cache else None
        if hit is None:
            todo.append(chunks[c])
        else:
            parts[c] = (*hit, True)
    for chunk, feats, kept, skipped in _encode_chunks(learner, dataset, todo, min(batch_size, CHUNK_IMAGES),
                                                      num_workers, amp, progress):
        if cache:
            cache.store_images(key, chunk.start, chunk.stop, feats, kept, skipped)
        parts[chunk.start // CHUNK_IMAGES] = (feats, kept, skipped, False)
    for other in distributed.gather(parts):
        parts.update(other)
    ordered = [parts[c] for c in range(len(chunks))]
    kept = [i for _, indices, _, _ in ordered for i in indices]
    skipped = [record for _, _, bad, _ in ordered for record in bad]
    if not kept:
        raise UserError(f"no readable image in dataset {dataset.name} ({len(skipped)} corrupt)")
    features = torch.cat([f for f, indices, _, _ in ordered if indices]).to(learner.device)
    cached = sum(len(indices) for _, indices, _, hit in ordered if hit)
    labels = np.asarray([dataset.labels[i] for i in kept], dtype=np.int64)
    return ImageFeatures(features, labels, skipped, encoded=len(kept) - cached, cached=cached)


def encode_images(
    learner: PromptLearner,
    dataset: ImageDataset,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: ProgressFn | None = None,
) -> tuple[torch.Tensor, np.ndarray, list[dict[str, str]]]:
    """Encode every readable image once, without a cache.

    Returns:
        features ``[N', D]`` (float32, on the learner's device), labels ``[N']`` of the images
        kept, and the skipped images as ``{"item", "error"}`` records.
    """
    out = image_features(learner, dataset, batch_size, num_workers, progress)
    return out.features, out.labels, out.skipped


@torch.inference_mode()
def encode_texts(
    learner: PromptLearner, texts: Sequence[str], batch_size: int = 512, progress: ProgressFn | None = None,
    amp: bool = True,
) -> torch.Tensor:
    """Encode each string once, in batches: ``[M, D]`` float32 on the learner's device, in the order
    of `texts`.

    The strings are batched in order of token length, so each batch's strings have similar lengths
    and the text tower, which stops at a batch's last EOS, runs little padding.
    """
    tokenizer = getattr(learner.backbone, "tokenizer", None)
    order = sorted(range(len(texts)), key=lambda i: token_count(tokenizer, texts[i]))
    out = []
    for start in range(0, len(texts), batch_size):
        with autocast(learner.device, amp):
            out.append(learner.encode_texts([texts[i] for i in order[start : start + batch_size]]).float())
        if progress:
            progress("texts", min(start + batch_size, len(texts)), len(texts))
    if not out:
        return torch.empty(0, 0, device=learner.device)
    feats = torch.cat(out)
    return feats[torch.as_tensor(np.argsort(order), device=feats.device)]


def text_features(
    learner: PromptLearner,
    texts: Sequence[str],
    batch_size: int = 512,
    progress: ProgressFn | None = None,
    cache: FeatureCache | None = None,
    amp: bool = True,
) -> tuple[torch.Tensor, int, int]:
    """Features ``[M, D]`` of unique prompt strings, from the cache where present.

    The strings still missing are put in order of length, dealt round robin to the ranks, put
    in order of token count (`in_token_order`) and encoded in segments of `cache.SEGMENT_TEXTS`,
    each written to the cache as soon as it is done.

    Returns:
        The features (float32, on the learner's device), the number of strings encoded (over
        all ranks) and the number taken from the cache.
    """
    key = text_key(learner, precision(learner.device, amp)) if cache else None
    found = cache.load_texts(key, texts) if cache else {}
    # every rank must agree on what is missing, whatever it found (entries may appear meanwhile)
    missing_anywhere = set().union(*distributed.gather({t for t in texts if t not in found}))
    # in length order, so that segments (and the batches in them) hold strings of similar length
    missing = sorted((t for t in texts if t in missing_anywhere), key=len)
    n_cached = len(texts) - len(missing)
    # round robin: every rank gets the same mix of lengths; then each rank's share by token count
    block = in_token_order(getattr(learner.backbone, "tokenizer", None), distributed.shard(missing))
    encoded: list[torch.Tensor] = []
    for s0 in range(0, len(block), SEGMENT_TEXTS):
        segment = block[s0 : s0 + SEGMENT_TEXTS]
        step = (lambda stage, done, _total, s0=s0: progress(stage, s0 + done, len(block))) if progress else None
        feats = encode_texts(learner, segment, batch_size, step, amp).cpu()
        if cache:
            cache.store_texts(key, segment, feats)
        encoded.append(feats)
    names, parts = list(found), [torch.stack(list(found.values()))] if found else []
    # one tensor per rank: rows of a tensor would each carry (and pickle) its whole storage
    for texts_r, feats_r in distributed.gather((block, torch.cat(encoded) if encoded else None)):
        if feats_r is not None:
            names += texts_r
            parts.append(feats_r)
    row = {t: i for i, t in enumerate(names)}  # a string encoded here wins over its cached copy
    feats = torch.cat(parts) if parts else torch.empty(0, 0)
    return feats[torch.as_tensor([row[t] for t in texts], dtype=torch.long)].to(learner.device), len(missing), n_cached


@dataclass
class TemplateScores:
    """Per-template arrays over images: what the metrics consume."""

    pred: np.ndarray  # [B, N] argmax class
    p_true: np.ndarray  # [B, N] softmax probability of the true class
    cos_true: np.ndarray  # [B, N] cosine of image and true-class text feature


def js_divergence(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) of softmax(`logits`) and softmax(`reference`)
    over the last axis: the logit-level companion of LPR (docs/metrics.md, ``JSD``)."""
    logq = reference.log_softmax(-1)
    return _js_from_reference(logits, logq, logq.exp())


def _js_from_reference(logits: torch.Tensor, logq: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """`js_divergence` with the reference's log-probabilities and probabilities given, so that
    the perturbations of one clean set share them."""
    logp = logits.log_softmax(-1)
    logm = torch.logaddexp(logp, logq).sub_(np.log(2.0))
    kl_p = torch.sub(logp, logm).mul_(logp.exp()).sum(-1)
    kl_q = torch.sub(logq, logm).mul_(q).sum(-1)
    return kl_p.add_(kl_q).mul_(0.5).clamp_min_(0.0)


def _blocks(n_images: int, n_sets: int, n_classes: int, device: torch.device) -> tuple[int, int]:
    """Images and class-feature sets per logits block, at most `block_elements(device)` floats."""
    elements = block_elements(device)
    img_block = max(1, min(n_images, elements // max(1, n_classes)))
    return img_block, max(1, elements // (img_block * n_classes))


def block_elements(device: torch.device) -> int:
    """Logits per block: cache-sized on the CPU, where the passes over a block are memory-bound
    (1 MB blocks stay in cache between them: a third less scoring time than 16 MB ones), larger on
    an accelerator, where each pass is a kernel launch."""
    return LOGIT_BLOCK_ELEMENTS if device.type != "cpu" else min(LOGIT_BLOCK_ELEMENTS, CPU_BLOCK_ELEMENTS)


def _cosines(v: torch.Tensor, class_feats: torch.Tensor) -> torch.Tensor:
    """``[b, n, C]`` cosines of images `v` ``[n, D]`` and class features ``[b, C, D]``, contiguous:
    einsum returns a permuted view, over which the per-class reductions run at half speed."""
    return torch.einsum("nd,bcd->bnc", v, class_feats).contiguous()


@torch.inference_mode()
def score_templates(image_feats: torch.Tensor, labels: torch.Tensor, class_feats: torch.Tensor,
                    logit_scale: float) -> TemplateScores:
    """Score images against B sets of class features ``[B, C, D]`` in bounded-memory blocks:
    the predicted class, the true class's probability and cosine, per set and image."""
    n_sets, n_classes, _ = class_feats.shape
    n_images = image_feats.shape[0]
    img_block, set_block = _blocks(n_images, n_sets, n_classes, image_feats.device)
    pred = torch.empty(n_sets, n_images, dtype=torch.long)
    p_true, cos_true = torch.empty(n_sets, n_images), torch.empty(n_sets, n_images)
    for i0 in range(0, n_images, img_block):
        v, y = image_feats[i0 : i0 + img_block], labels[i0 : i0 + img_block]
        for s0 in range(0, n_sets, set_block):
            block = (slice(s0, s0 + set_block), slice(i0, i0 + img_block))
            cos = _cosines(v, class_feats[s0 : s0 + set_block])
            logits = logit_scale * cos
            true_cos = cos.gather(2, y.view(1, -1, 1).expand(cos.shape[0], -1, 1)).squeeze(2)
            # max's indices are argmax's (the first maximum; documented), at a quarter of its cost
            pred[block] = logits.max(2).indices.cpu()
            p_true[block] = (logit_scale * true_cos - logits.logsumexp(2)).exp().cpu()
            cos_true[block] = true_cos.cpu()
    return TemplateScores(pred.numpy(), p_true.numpy(), cos_true.numpy())


ClassSets = Callable[[int, int], torch.Tensor]
"""``sets(a, b)``: the class features ``[b - a, C, D]`` of sets a to b of one scoring."""


@torch.inference_mode()
def score_perturbed(
    image_feats: torch.Tensor, scorings: Sequence[ClassSets], n_sets: int, n_classes: int, logit_scale: float,
    reference: torch.Tensor,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Predictions and JS divergences ``[n_sets, N]`` of several scorings of `n_sets` perturbed
    class-feature sets each, against the `reference` sets ``[n_sets, C, D]`` they perturb.

    Each block of reference logits (and its softmax) is computed once for all scorings, and the
    scorings' sets of a block are scored together, one pass of each operation over all of them.
    Class features are fetched a block at a time, so memory stays at one block's. Only what the
    metrics read of a perturbed set is computed: its predictions and its divergence.
    """
    n_images, n_k = image_feats.shape[0], len(scorings)
    img_block, set_block = _blocks(n_images, n_sets, n_classes * n_k, image_feats.device)
    pred = torch.empty(n_k, n_sets, n_images, dtype=torch.long)
    divergence = torch.empty(n_k, n_sets, n_images)
    for i0 in range(0, n_images, img_block):
        v = image_feats[i0 : i0 + img_block]
        for s0 in range(0, n_sets, set_block):
            s1 = min(s0 + set_block, n_sets)
            block = (slice(None), slice(s0, s1), slice(i0, i0 + img_block))
            logq = _cosines(v, reference[s0:s1]).mul_(logit_scale).log_softmax(-1)  # [b, n, C]
            feats = torch.cat([sets(s0, s1) for sets in scorings])  # [K * b, C, D]
            logits = _cosines(v, feats).mul_(logit_scale).view(n_k, s1 - s0, v.shape[0], n_classes)
            pred[block] = logits.max(-1).indices.cpu()
            divergence[block] = _js_from_reference(logits, logq, logq.exp()).cpu()
    return [(pred[k].numpy(), divergence[k].numpy()) for k in range(n_k)]


@dataclass
class Scores:
    """Every per-template array the metrics need, for the clean templates and each perturbation."""

    clean: TemplateScores  # [T, N] arrays
    pred_ens: np.ndarray  # [N] prompt-ensemble predictions
    pert_pred: list[np.ndarray]  # per perturbation spec, [T, R, N]
    pert_divergence: list[np.ndarray]  # per perturbation spec, [T, R, N]: JS(clean, perturbed class distribution)
    text_cos: list[np.ndarray]  # per perturbation spec, [T, R, C]: cos(u_{t,c}, u'_{t,c,r})
    texts_encoded: int  # text-encoder sequences run


def score_shared_text(learner: PromptLearner, image_feats: torch.Tensor, labels: torch.Tensor, table: PromptTable,
                      text_feats: torch.Tensor, texts_encoded: int) -> Scores:
    """Scores for learners whose text features do not depend on the image: the features of
    each unique prompt string (`text_features`) are indexed, then logits are streamed in blocks."""
    scale = float(learner.logit_scale)
    clean_feats = text_feats[torch.as_tensor(table.clean, device=text_feats.device)]  # [T, C, D]
    clean = score_templates(image_feats, labels, clean_feats, scale)
    ensemble = F.normalize(clean_feats.mean(0), dim=-1)  # [C, D]
    pred_ens = score_templates(image_feats, labels, ensemble.unsqueeze(0), scale).pred[0]
    if not table.perturbed:
        return Scores(clean, pred_ens, [], [], [], texts_encoded)
    n_t, n_r, n_c = table.perturbed[0].shape
    rows = [torch.as_tensor(r, device=text_feats.device).reshape(n_t * n_r, n_c) for r in table.perturbed]
    text_cos = [(text_feats[r].view(n_t, n_r, n_c, -1) * clean_feats.unsqueeze(1)).sum(-1).cpu().numpy() for r in rows]
    # every perturbed set (t, r) is compared with the clean set of template t
    perts = score_perturbed(image_feats, [lambda a, b, r=r: text_feats[r[a:b]] for r in rows], n_t * n_r, n_c, scale,
                            clean_feats.repeat_interleave(n_r, 0))
    return Scores(clean, pred_ens, [pred.reshape(n_t, n_r, -1) for pred, _ in perts],
                  [div.reshape(n_t, n_r, -1) for _, div in perts], text_cos, texts_encoded)


@torch.inference_mode()
def score_conditional(learner: PromptLearner, image_feats: torch.Tensor, labels: torch.Tensor, table: PromptTable,
                      text_batch_size: int, progress: ProgressFn | None = None, amp: bool = True) -> Scores:
    """Scores for image-conditional learners (CoCoOp): text features are computed per image.

    Images are taken in chunks and templates one at a time; for each (chunk, template) the
    unique strings among the clean and perturbed prompts of that template are encoded once,
    conditioned on the chunk's images, so memory stays at ``chunk x strings x D``.
    `text_cos` is averaged over images.
    """
    n_images, n_t, n_c = image_feats.shape[0], *table.clean.shape
    n_r = table.perturbed[0].shape[1] if table.perturbed else 1
    rows_per_t = np.concatenate([table.clean[:, None, :]] + [p for p in table.perturbed], axis=1)  # [T, 1+K*R, C]
    scale = float(learner.logit_scale)
    chunk = max(1, min(n_images, text_batch_size // max(1, len(np.unique(rows_per_t[0])))))
    pred = np.empty((n_t, n_images), dtype=np.int64)
    p_true, cos_true = np.empty((n_t, n_images)), np.empty((n_t, n_images))
    pert_pred = [np.empty((n_t, n_r, n_images), dtype=np.int64) for _ in table.perturbed]
    pert_divergence = [np.empty((n_t, n_r, n_images), dtype=np.float32) for _ in table.perturbed]
    text_cos = [np.zeros((n_t, n_r, n_c)) for _ in table.perturbed]
    pred_ens = np.empty(n_images, dtype=np.int64)
    encoded = 0
    for i0 in range(0, n_images, chunk):
        v, y = image_feats[i0 : i0 + chunk], labels[i0 : i0 + chunk]
        ensemble = torch.zeros(v.shape[0], n_c, v.shape[1], device=v.device)
        for t in range(n_t):
            unique, inverse = np.unique(rows_per_t[t], return_inverse=True)
            with autocast(v.device, amp):  # features [n, U, D]
                feats = learner.encode_texts([table.texts[i] for i in unique], image_features=v).float()
            encoded += v.shape[0] * len(unique)
            per_row = feats[:, torch.as_tensor(inverse.reshape(rows_per_t[t].shape), device=v.device)]  # [n, 1+K*R, C, D]
            clean = per_row[:, 0]
            ensemble += clean
            cos = torch.einsum("nd,ncd->nc", v, clean)
            logits = scale * cos
            true_cos = cos.gather(1, y.view(-1, 1)).squeeze(1)
            pred[t, i0 : i0 + chunk] = logits.max(1).indices.cpu().numpy()
            p_true[t, i0 : i0 + chunk] = (scale * true_cos - logits.logsumexp(1)).exp().cpu().numpy()
            cos_true[t, i0 : i0 + chunk] = true_cos.cpu().numpy()
            for k in range(len(table.perturbed)):
                pert = per_row[:, 1 + k * n_r : 1 + (k + 1) * n_r]  # [n, R, C, D]
                pert_logits = scale * torch.einsum("nd,nrcd->rnc", v, pert)
                pert_pred[k][t, :, i0 : i0 + chunk] = pert_logits.max(2).indices.cpu().numpy()
                pert_divergence[k][t, :, i0 : i0 + chunk] = js_divergence(pert_logits, logits.unsqueeze(0)).cpu().numpy()
                text_cos[k][t] += (pert * clean.unsqueeze(1)).sum(-1).sum(0).cpu().numpy()
        ens = F.normalize(ensemble, dim=-1)
        pred_ens[i0 : i0 + chunk] = torch.einsum("nd,ncd->nc", v, ens).argmax(1).cpu().numpy()
        if progress:
            progress("images x texts", min(i0 + chunk, n_images), n_images)
    clean_scores = TemplateScores(pred, p_true.astype(np.float32), cos_true.astype(np.float32))
    return Scores(clean_scores, pred_ens, pert_pred, pert_divergence, [c / n_images for c in text_cos], encoded)


def per_image_counts(scores: Scores, labels: np.ndarray, specs: Sequence[PerturbSpec]) -> dict:
    """Per-image values as small integers, so a result file can hold them for paired tests.

    ``correct`` counts the templates (of T) that classify each image right, ``sensitivity`` is
    Var_t p_true (rounded to 1e-8); per perturbation, ``correct`` and ``preserved`` (prediction
    equal to the clean one of the same template) count over T x R, and ``divergence`` is the
    mean JS divergence over T x R (rounded to 1e-8). Every per-image headline metric of
    `metrics.per_image_clean` / `per_image_perturbation` follows from these exactly.
    """
    clean = scores.clean
    sensitivity = metrics.per_image_clean(clean.pred, clean.p_true, labels)["sensitivity"]
    return {
        "labels": labels.tolist(),
        "correct": np.count_nonzero(clean.pred == labels, axis=0).tolist(),
        "sensitivity": np.round(sensitivity, 8).tolist(),
        "perturbations": {
            spec.label: {"correct": np.count_nonzero(pp == labels, axis=(0, 1)).tolist(),
                         "preserved": np.count_nonzero(pp == clean.pred[:, None, :], axis=(0, 1)).tolist(),
                         "divergence": np.round(np.mean(js, axis=(0, 1), dtype=np.float64), 8).tolist()}
            for spec, pp, js in zip(specs, scores.pert_pred, scores.pert_divergence)
        },
    }


def merge_scores(parts: list[Scores | None], weights: list[int], conditional: bool) -> Scores:
    """Join the scores of consecutive image shards (one per rank) into the scores of all images.

    Per-image arrays are concatenated along the image axis. `text_cos` is the same on every
    shard for shared-text learners; for conditional ones it is a per-shard mean over images,
    combined with the shards' image counts `weights`.
    """
    if len(parts) == 1 and parts[0] is not None:
        return parts[0]
    kept = [(p, w) for p, w in zip(parts, weights) if p is not None]
    ss = [p for p, _ in kept]
    clean = TemplateScores(*(np.concatenate([getattr(p.clean, f) for p in ss], axis=1)
                             for f in ("pred", "p_true", "cos_true")))
    pert_pred = [np.concatenate([p.pert_pred[k] for p in ss], axis=2) for k in range(len(ss[0].pert_pred))]
    pert_divergence = [np.concatenate([p.pert_divergence[k] for p in ss], axis=2)
                       for k in range(len(ss[0].pert_divergence))]
    if conditional:
        total = sum(w for _, w in kept)
        text_cos = [sum(w * p.text_cos[k] for p, w in kept) / total for k in range(len(ss[0].text_cos))]
        encoded = sum(p.texts_encoded for p in ss)
    else:
        text_cos, encoded = ss[0].text_cos, ss[0].texts_encoded
    return Scores(clean, np.concatenate([p.pred_ens for p in ss]), pert_pred, pert_divergence, text_cos, encoded)


def run_metrics(scores: Scores, labels: np.ndarray, table: PromptTable, settings: EvalSettings
                ) -> tuple[dict[str, metrics.Estimate], list[dict[str, metrics.Estimate]], dict]:
    """The clean metrics, each perturbation's metrics and the per-image counts of one subset.

    Every interval of the run comes from one bootstrap resample of the images
    (`metrics.with_intervals`), drawn once for all metrics.
    """
    clean = scores.clean
    groups = [metrics.clean_points(clean.pred, clean.p_true, clean.cos_true, labels, scores.pred_ens)]
    groups += [metrics.perturbation_points(clean.pred, pert_pred, labels, text_cos, edits == 0, divergence=divergence,
                                           edits=edits)
               for pert_pred, divergence, text_cos, edits in zip(scores.pert_pred, scores.pert_divergence,
                                                                 scores.text_cos, table.edits)]
    clean_metrics, *pert_metrics = metrics.with_intervals(groups, n_resamples=settings.bootstrap, seed=settings.seed)
    return clean_metrics, pert_metrics, per_image_counts(scores, labels, settings.perturbations)


class Evaluator:
    """Scores one learner over templates and perturbations on a dataset.

    Under torchrun every rank runs the same calls: image chunks, the prompt table's perturbation
    work, missing prompt strings and the scoring of images are shared out across ranks and
    gathered; rank 0 computes the metrics (one bootstrap) and hands them to the others, so each
    rank ends with the result a single process computes.

    Args:
        learner: Any `PromptLearner` (image-conditional ones included).
        settings: Templates, perturbations, seeds and batch sizes.
        progress: Optional ``progress(stage, done, total)`` callback.
        cache: Where image (and shared text) features are kept between runs; None computes all.
        split: The dataset split, part of the image-feature cache key.
    """

    def __init__(self, learner: PromptLearner, settings: EvalSettings, progress: ProgressFn | None = None,
                 cache: FeatureCache | None = None, split: str = ""):
        self.learner = learner
        self.settings = settings
        self.progress = progress
        self.cache = cache
        self.split = split
        self.lexicon = settings.lexicon or load_lexicon()

    def run(self, dataset: ImageDataset, subset: str = "all", partial: list | None = None) -> SubsetResult:
        """Evaluate on `dataset`; the finished result is also appended to `partial` if given,
        so a caller evaluating several subsets keeps the finished ones if interrupted. The
        learner scores inside its `scoring(subset)` context (its path for seen or unseen classes)."""
        with self.learner.scoring(subset):
            return self._run(dataset, subset, partial)

    def _run(self, dataset: ImageDataset, subset: str, partial: list | None) -> SubsetResult:
        s = self.settings
        learner = self.learner.eval()
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        images = image_features(learner, dataset, s.batch_size, s.num_workers, self.progress, self.cache, self.split,
                                s.amp)
        labels_np, skipped = images.labels, images.skipped
        timings["encode_images_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        table = prompt_table(s.templates, dataset.classnames, s.perturbations, s.draws, s.seed, self.lexicon,
                             self.cache)
        timings["build_prompts_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        labels = torch.as_tensor(labels_np, device=images.features.device)
        mine = distributed.shard_range(len(labels_np))
        shard = slice(mine.start, mine.stop)
        texts_cached = 0
        if learner.conditional:
            part = score_conditional(learner, images.features[shard], labels[shard], table, s.text_batch_size,
                                     self.progress, s.amp) if len(mine) else None
        else:
            text_feats, encoded, texts_cached = text_features(learner, table.texts, s.text_batch_size, self.progress,
                                                              self.cache, s.amp)
            part = score_shared_text(learner, images.features[shard], labels[shard], table, text_feats,
                                     encoded) if len(mine) else None
        sizes = [len(r) for r in distributed.gather(mine)]
        scores = merge_scores(distributed.gather(part), sizes, learner.conditional)
        timings["encode_texts_and_score_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # rank 0 alone computes the metrics (one bootstrap resample for all) and hands them out
        clean_metrics, pert_metrics, per_image = distributed.main_only(
            lambda: run_metrics(scores, labels_np, table, s))
        result = SubsetResult(
            subset=subset,
            n_images=len(labels_np),
            n_classes=len(dataset.classnames),
            skipped=skipped,
            metrics=clean_metrics,
            per_template_acc=metrics.per_template_accuracy(scores.clean.pred, labels_np).tolist(),
            timings=timings,
            counts={"images_encoded": images.encoded, "texts_encoded": scores.texts_encoded,
                    **({"images_cached": images.cached, "texts_cached": texts_cached} if self.cache else {})},
            perturbations=[PerturbationResult(spec=spec, draws=s.draws, metrics=m)
                           for spec, m in zip(s.perturbations, pert_metrics)],
            per_image=per_image,
        )
        timings["metrics_s"] = time.perf_counter() - t0
        if partial is not None:
            partial.append(result)
        return result
