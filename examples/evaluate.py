"""Measure a distilled student (or its teacher) the way the papers do: FID, CLIP score and preference scores on a
prompt set, with a record of the protocol beside the numbers.

1. Images. A diffusers pipeline (``--pretrained_model_name_or_path``: SDXL, SD3, FLUX, ...) with the student's
   weights (``--student_weights``: a LoRA, as the training scripts write it, or a ``unet/`` / ``transformer/``
   folder) and its few-step sampler (``--scheduler``, ``--scheduler_config``, ``--num_inference_steps`` or
   ``--timesteps`` / ``--sigmas``, ``--guidance_scale``) samples every prompt of ``--prompts_file``; prompt ``i``
   from the noise of seed ``--seed + i`` (one generator per image, SiD-LSG's convention) into
   ``OUTPUT_DIR/images/{i:06d}.png``. ``--teacher`` samples the base pipeline with its own sampler instead (e.g.
   ``--num_inference_steps 50 --guidance_scale 5``; without ``--num_inference_steps``, the pipeline's own default
   steps -- SDXL / Wan 50, SD3 / FLUX 28 -- recorded, not the students' 4): the teacher row of the table, under
   the same protocol. Images are written as they come, quantised to uint8 by rounding (``--quantization
   truncate``: by truncation, as DMD2's evaluation); a batch with NaN / infinite pixels (a float16 VAE overflowing,
   a diverged student) is refused, naming the images, before any of it is written. A rerun generates only the
   missing ones, and refuses a folder whose images were made with other settings, seed, quantisation or prompts
   (``images/generation.json`` records them, and the package versions they were generated with; the student's
   weights by their SHA-256, hashed once by the main process; a Hub pipeline by the commit its id resolved to).
   ``--images DIR`` scores a folder of ``{i:06d}.png`` files made elsewhere (a folder this script generated says
   how itself; for another, ``--seed`` and ``--quantization`` are recorded as declared, ``generator.declared``).

   A student's run folder says how it is sampled, and that is used rather than retyped
   (:mod:`evaluation.generation`): a folder with ``unet_merged/`` (SDXL-Lightning's LoRA stages) is evaluated as
   that UNet, not as its LoRA fused into base SDXL; a LoRA trained on another UNet is refused unless
   ``--lora_base`` names it; the run's ``scheduler/``, ``student_sigmas.json`` (flow_dmd2, flow_ladd),
   ``student_grid.json`` (flow_tscd) or ``student_timesteps.json`` (the SDXL one-step generators: sdxl_sim,
   sdxl_diffusion2gan) give the sampler and grid unless ``--scheduler`` / ``--scheduler_config`` /
   ``--sigmas`` / ``--timesteps`` / ``--num_inference_steps`` are given, and its ``student_sampler.json`` (the flow
   scripts and the SDXL one-step generators, ``training.student_sampler``) the guidance the student was trained to
   be sampled at (1 for SD3 / Qwen-Image / Wan and the SDXL one-step generators, FLUX.1-dev's embedded
   ``--guidance``, none for FLUX.1-schnell; a flow_dmd2 grid starting below sigma 1 also its initial noise scale,
   SiD's input) and the prompt length unless
   ``--guidance_scale`` / ``--max_sequence_length`` are given, and the trained size (height x width, a video's
   frames; the SDXL scripts and flow_kd record the size alone) unless ``--resolution`` / ``--width``
   (``--num_frames``) are given; images are generated at
   ``--resolution`` x ``--width`` (default square; without a run's record, 1024). The record holds the guidance the pipeline ran with
   (without a saved one, its default, with a warning for a student; None for a FLUX.1-schnell ``FluxPipeline``,
   which has no guidance input and whose CFG is ``true_cfg_scale``), the prompt length, and the source of each
   sampler setting (``sampler_sources``). A FLUX / Qwen-Image DMD2 or TSCD grid is the schedule shifted for the
   trained size: evaluated at another ``--resolution``, it gets a warning and the record holds both sizes
   (``grid_size``). A ``--resolution`` the pipeline would change (not a multiple of the VAE's factor x the patch
   size: SD3 / FLUX / Qwen-Image 16) is refused with the nearest sizes it keeps. A stochastic sampler (flow_dmd2's
   ``scheduler/``) re-noises each image from ``training.student_sampler.renoise_seed(--seed + i)``, as the script's
   validation does: fresh noise, not the initial noise again.
2. Metrics (:mod:`diffdistill.metrics`), each image centre-cropped and LANCZOS-resized to ``--eval_resolution``
   first when given (GigaGAN's and DMD2's preparation). The metrics are built, and reference statistics checked,
   before any image is generated:

   * FID with clean-fid's Inception and resize (``metrics.fid.FID``) against ``--reference_dir`` (real images;
     ``--save_reference_stats ref.npz`` keeps their statistics, and ``ref.npz.json`` what they are: the folder's
     identity, their SHA-256, the eval resolution and the feature extractor) or ``--reference_stats`` (an ``.npz``
     of ``mu`` / ``sigma``, clean-fid's format). Statistics with a ``.json`` are refused when they are not the ones
     it describes (replaced since), or were made at another ``--eval_resolution`` or with another extractor (or
     dimension); without one (clean-fid's own files) they are used with a warning, recorded as of unknown
     preprocessing;
   * CLIP score with a named backbone, ``--clip open_clip:ViT-g-14:laion2b_s12b_b42k`` (open_clip model and
     pretrained tag) or ``--clip hf:openai/clip-vit-large-patch14`` (a transformers CLIP, hub id or folder);
   * preference scores where their packages are installed: ``--preference imagereward hpsv21 pickscore
     aesthetic``;
   * with ``--precision_recall``: improved precision and recall (Kynkaanniemi et al. 2019) and density and coverage
     (Naeem et al. 2020) against the ``--reference_dir`` images, in the FID's feature space (Inception pool
     features, as ADM's evaluation suite), ``--nearest_k`` 3 (``metrics.PrecisionRecall``; the features are
     extracted a second time for it, and every one is kept: they need the images, not ``--reference_stats``; image
     runs only: a video's frames would be each other's nearest neighbours).

   Any metric may instead be named ``module:callable`` (a factory returning an object with ``update`` /
   ``compute`` / ``all_reduce`` / ``protocol``): ``--clip``, ``--preference`` and ``--fid_features`` (the FID's
   feature extractor) take that form, for a custom backbone or a test's stand-in.
3. ``OUTPUT_DIR/results.json``: the numbers and the protocol (``metrics.protocol.EvaluationProtocol``: prompt-set
   hash, seeds, resolutions, quantisation, resize, FID reference, backbones -- local checkpoints by SHA-256, Hub ids
   by resolved commit, ``module:factory`` objects by spec and weights -- and package versions, and under
   ``generator`` the model, weights, sampler, steps, guidance and the versions the images were generated with). ``--compare a/results.json b/results.json ...`` prints one
   markdown table and refuses runs whose protocols differ in anything but ``generator``.

4. Videos (Wan text-to-video: a ``WanPipeline`` folder of Wan 2.1, Wan 2.2 TI2V-5B or A14B;
   :mod:`evaluation.video_generation`). The student is the flow scripts' run folder: its LoRA
   (``pytorch_lora_weights.safetensors``; A14B also ``pytorch_lora_weights_transformer_2.safetensors``, loaded into
   ``transformer_2`` -- refused when missing), fused, and its ``scheduler/`` + ``student_sigmas.json`` (flow_dmd2) /
   ``student_grid.json`` ``sigmas`` (flow_tscd), given to ``WanPipeline`` (which takes no ``sigmas=``) through the
   scripts' documented ``pipe.scheduler.set_timesteps`` override. ``--teacher`` samples with the pipeline's UniPC
   at ``--num_inference_steps`` and ``--guidance_scale`` (A14B: ``--guidance_scale_2`` where the low-noise expert
   runs; refused for other pipelines). ``--num_frames`` (4k + 1), ``--resolution`` / ``--width`` (height / width;
   default the student's trained size, else the pipeline's 81 frames at 480, square), ``--max_sequence_length``
   (umT5 tokens).
   Video ``i`` (seed ``--seed + i``, one generator per video) is written as ``OUTPUT_DIR/videos/{i:06d}/{f:03d}.png``
   (quantised as the images; a video folder appears only when complete), resumed and refused as the images are
   (``videos/generation.json``). Scores, all on every frame: frame FID (every frame of every video as an image,
   against ``--reference_dir`` / ``--reference_stats``; a teacher run's ``videos/`` folder works as
   ``--reference_dir``), FVD with ``--fvd_detector`` (StyleGAN-V's TorchScript I3D, a local file; the first
   ``--fvd_frames`` 16 frames of every video against each clip folder of ``--reference_dir``), CLIPSIM (the CLIP score of every
   frame with its video's prompt, averaged over frames and videos; Wu et al. 2021, GODIVA), preference scores the
   same way, and the frame consistency (``metrics.FrameConsistency``, Gen-1: the mean cosine of consecutive
   frames' CLIP image embeddings, on the ``--clip`` backbone). The protocol's ``extra.video`` records the frame
   count and what each metric does with the frames, so ``--compare`` refuses to put video and image runs (or
   videos of another length) in one table. ``--images DIR`` also scores a folder of ``{i:06d}/{f:03d}.png`` videos
   (of their own length: ``--num_frames`` is refused with it).

   Example (the 4-step DMD2 LoRA of Wan 2.1 1.3B of examples/README.md and its teacher, 81 frames at the trained
   480 x 480; the CLIP backbone is an example, not a published protocol)::

       COMMON="--pretrained_model_name_or_path Wan-AI/Wan2.1-T2V-1.3B-Diffusers --dtype bfloat16 \\
           --prompts_file prompts.txt --resolution 480 --num_frames 81 --batch_size 1 \\
           --clip open_clip:ViT-B-32:openai"
       accelerate launch examples/evaluate.py $COMMON --teacher --num_inference_steps 50 --guidance_scale 5 \\
           --output_dir eval/wan-teacher
       accelerate launch examples/evaluate.py $COMMON --student_weights out/dmd2-wan --guidance_scale 1 \\
           --reference_dir eval/wan-teacher/videos --output_dir eval/wan-dmd2
       python examples/evaluate.py --compare eval/wan-teacher eval/wan-dmd2

Multi-GPU: ``accelerate launch --num_processes N examples/evaluate.py ...`` splits the prompts by index (process
``r`` takes ``r, r + N, ...``) and sums every metric's statistics over the processes before computing it, so the
numbers are those of one process (up to float64 summation order).

Protocols: ``examples/evaluation/coco_prompts.py`` builds the prompt files of COCO-2014 30k (GigaGAN / SiD-LSG:
``--seed 0 --eval_resolution 256``, FID against all of val2014) and DMD2's COCO-10k (``--eval_resolution 512
--clip_eval_resolution 256``, FID against its ``coco10k/subset``), both with ``--clip_prefix "A photo depicts "``;
its docstring says what each source publishes and what is our choice. The record names such a protocol only when
the run follows it (the prompt file ``selection.json`` describes, all of it, and the protocol's seed, resolutions and
prefix); otherwise ``"<protocol> (modified)"``, with a warning and ``extra.protocol_deviations``.

Example (a 4-step SDXL LoRA student and its teacher on DMD2's COCO-10k protocol, our caption selection)::

    python examples/evaluation/coco_prompts.py --protocol dmd2-coco10k \\
        --annotations coco/annotations/captions_val2014.json --link_reference_images coco/val2014 \\
        --output_dir prompts/coco10k
    COMMON="--pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 --dtype float16 \\
        --prompts_file prompts/coco10k/prompts.txt --resolution 1024 --eval_resolution 512 \\
        --clip_eval_resolution 256 --clip open_clip:ViT-g-14:laion2b_s12b_b42k --clip_prefix 'A photo depicts '"
    accelerate launch examples/evaluate.py $COMMON --teacher --num_inference_steps 50 --guidance_scale 5 \\
        --reference_dir prompts/coco10k/reference --save_reference_stats prompts/coco10k/reference.npz \\
        --output_dir eval/teacher
    accelerate launch examples/evaluate.py $COMMON --student_weights out/hyper-sd \\
        --scheduler EulerDiscreteScheduler --scheduler_config timestep_spacing=trailing \\
        --num_inference_steps 4 --guidance_scale 0 --reference_stats prompts/coco10k/reference.npz \\
        --output_dir eval/student
    python examples/evaluate.py --compare eval/teacher eval/student
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from evaluation import generation, metric_specs, records, scoring, video_generation

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument(
        "--compare", nargs="+", default=None, help="results.json files / run folders: print one table"
    )
    g = p.add_argument_group("images")
    g.add_argument(
        "--pretrained_model_name_or_path", default=None, help="diffusers pipeline folder or hub id"
    )
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None)
    g.add_argument(
        "--student_weights",
        default=None,
        help="LoRA (.safetensors or a folder with pytorch_lora_weights.safetensors) or a unet/ / transformer/ folder",
    )
    g.add_argument("--lora_scale", type=float, default=None, help="scale the LoRA is fused with (default 1)")
    g.add_argument(
        "--lora_base",
        default=None,
        help="the unet/ / transformer/ folder the LoRA was trained on, when not the pipeline's (e.g. a Lightning "
        "stage's --init_unet): it replaces the pipeline's before the LoRA is fused",
    )
    g.add_argument("--teacher", action="store_true", help="sample the base pipeline (no --student_weights)")
    g.add_argument(
        "--images", default=None, help="score this folder of {index:06d}.png files instead of generating"
    )
    g.add_argument("--prompts_file", default=None, help="one prompt a line; image i is prompt i")
    g.add_argument(
        "--prompt_set",
        default=None,
        help="the prompt set's name in the protocol (default: coco_prompts.py's protocol name, else 'custom')",
    )
    g.add_argument("--num_prompts", type=int, default=None, help="the first N prompts only (quick looks)")
    g.add_argument("--seed", type=int, default=0, help="prompt i is sampled from seed + i")
    g.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="generated image height (square unless --width) or a video's height; default: a student's trained "
        "height (its run's student_sampler.json), else 1024 for images and the pipeline's for videos (WanPipeline 480)",
    )
    g.add_argument(
        "--width",
        type=int,
        default=None,
        help="generated image / video width (default: a student's trained width when --resolution is not "
        "given either, else --resolution: square)",
    )
    g.add_argument("--batch_size", type=int, default=4, help="prompts per pipeline call, per process")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="pipeline weights")
    g.add_argument(
        "--quantization",
        choices=generation.QUANTIZATIONS,
        default=None,
        help="float -> uint8: round (default; diffusers) or truncate (DMD2's evaluation). With --images: how the "
        "folder's images were made (default: its generation.json's, else round, recorded as declared)",
    )
    g = p.add_argument_group("videos (WanPipeline: Wan 2.1, Wan 2.2 TI2V-5B / A14B)")
    g.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="frames per video, 4k + 1 (default: the student's trained count, its run's student_sampler.json, else "
        "the pipeline's 81)",
    )
    g.add_argument(
        "--guidance_scale_2",
        type=float,
        default=None,
        help="Wan 2.2 A14B: CFG where the low-noise expert runs (WanPipeline's guidance_scale_2; default: the run "
        "folder's student_sampler.json, else --guidance_scale, the pipeline's rule)",
    )
    g = p.add_argument_group("sampler")
    g.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="prompt tokens of the T5 / umT5 / Qwen text encoder (SD3, FLUX, Qwen-Image, Wan; default: the run "
        "folder's student_sampler.json, else the pipeline's: SD3 256, FLUX / Wan 512)",
    )
    g.add_argument(
        "--scheduler", default=None, help="diffusers scheduler class name (default: the pipeline's)"
    )
    g.add_argument("--scheduler_config", nargs="*", default=None, help="key=value overrides of its config")
    g.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help=f"default: the run folder's saved grid, else {generation.DEFAULT_STEPS}; with --teacher the pipeline's "
        "own default (SDXL / Wan 50, SD3 / FLUX 28; recorded)",
    )
    g.add_argument(
        "--timesteps", type=int, nargs="+", default=None, help="explicit timesteps (UNet pipelines)"
    )
    g.add_argument("--sigmas", type=float, nargs="+", default=None, help="explicit sigmas (flow pipelines)")
    g.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="default: the run folder's student_sampler.json (flow scripts) or student_grid.json, else the "
        "pipeline's (recorded; a student gets a warning)",
    )
    g = p.add_argument_group("metrics")
    g.add_argument("--reference_dir", default=None, help="real images: FID reference")
    g.add_argument("--reference_stats", default=None, help="FID reference statistics (.npz, mu / sigma)")
    g.add_argument(
        "--save_reference_stats",
        default=None,
        help="write the --reference_dir statistics here (.npz, mu / sigma; and <file>.json, what they are) to pass "
        "as --reference_stats later",
    )
    g.add_argument(
        "--fid_features", default=None, help="module:callable FID feature extractor (default: Inception)"
    )
    g.add_argument(
        "--precision_recall",
        action="store_true",
        help="also precision, recall, density and coverage against --reference_dir, in the FID's feature space",
    )
    g.add_argument(
        "--nearest_k", type=int, default=None, help="--precision_recall's k (default 3, ADM's suite)"
    )
    g.add_argument(
        "--fvd_detector",
        default=None,
        help="video runs: StyleGAN-V's TorchScript I3D (i3d_torchscript.pt, a local file) for FVD against the clip "
        "folders of --reference_dir",
    )
    g.add_argument(
        "--fvd_frames", type=int, default=None, help="FVD clip length: the first N frames (default 16)"
    )
    g.add_argument(
        "--clip", default=None, help="open_clip:MODEL:PRETRAINED | hf:MODEL_OR_PATH | module:callable"
    )
    g.add_argument(
        "--clip_prefix",
        default="",
        help='text put before every prompt for the CLIP score: "A photo depicts " in GigaGAN / SiD-LSG / DMD2',
    )
    g.add_argument(
        "--preference", nargs="*", default=[], help=f"{' '.join(metric_specs.PREFERENCE)} | module:callable"
    )
    g.add_argument(
        "--eval_resolution", type=int, default=None, help="centre crop + LANCZOS to this side first"
    )
    g.add_argument(
        "--clip_eval_resolution",
        type=int,
        default=None,
        help="the CLIP score's crop + resize side when it differs from --eval_resolution (DMD2: 256, FID at 512)",
    )
    g.add_argument("--eval_batch_size", type=int, default=16)
    g.add_argument("--output_dir", default=None)
    args = p.parse_args(argv)
    check_args(args, p)
    return args


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse contradictory or missing options with a message naming them."""
    if args.compare:
        return
    if not args.output_dir or not args.prompts_file:
        parser.error("--output_dir and --prompts_file are needed (or --compare to print a table)")
    if args.images is None and not args.pretrained_model_name_or_path:
        parser.error(
            "--pretrained_model_name_or_path is needed to generate images (or --images DIR to score a folder)"
        )
    if args.teacher and args.student_weights:
        parser.error("--teacher samples the base pipeline: drop --student_weights")
    if args.reference_dir and args.reference_stats:
        parser.error("give --reference_dir or --reference_stats, not both")
    if args.save_reference_stats and not args.reference_dir:
        parser.error("--save_reference_stats saves the statistics of --reference_dir: give it")
    if args.precision_recall and not args.reference_dir:
        parser.error(
            "--precision_recall compares with the reference images' features one by one: give --reference_dir "
            "(statistics in --reference_stats cannot serve it)"
        )
    if args.nearest_k is not None and not args.precision_recall:
        parser.error("--nearest_k is --precision_recall's k: add --precision_recall or drop it")
    if (args.fvd_detector or args.fvd_frames is not None) and not (args.fvd_detector and args.reference_dir):
        parser.error(
            "FVD needs --fvd_detector (the I3D file) and --reference_dir (one folder of frames per video)"
        )
    if args.timesteps and args.sigmas:
        parser.error("give --timesteps or --sigmas, not both")
    if (args.timesteps or args.sigmas) and args.num_inference_steps is not None:
        parser.error("--timesteps / --sigmas set the steps: drop --num_inference_steps")
    for name in ("num_prompts", "batch_size", "num_inference_steps", "eval_resolution", "clip_eval_resolution",
                 "eval_batch_size", "num_frames", "max_sequence_length", "fvd_frames", "nearest_k"):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"expected --{name} >= 1, but got {value}")
    for name in ("resolution", "width"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            parser.error(f"expected --{name} a positive multiple of 8 (the VAE's factor), but got {value}")
    for name in ("guidance_scale", "guidance_scale_2"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"expected --{name} >= 0, but got {getattr(args, name)}")
    for name in ("sigmas", "timesteps"):
        if getattr(args, name) and min(getattr(args, name)) < 0:
            parser.error(f"expected --{name} >= 0, but got {getattr(args, name)}")
    if (args.lora_scale is not None or args.lora_base) and (args.teacher or not args.student_weights):
        parser.error("--lora_scale / --lora_base apply to a LoRA --student_weights: drop them")
    if args.images is not None and (args.student_weights or args.teacher):
        parser.error("--images scores a folder as it is: drop --student_weights / --teacher")
    paths = {
        "prompts_file": Path.is_file, "student_weights": Path.exists, "lora_base": Path.is_dir,
        "images": Path.is_dir, "reference_dir": Path.is_dir, "reference_stats": Path.is_file,
        "fvd_detector": Path.is_file,
    }  # fmt: skip
    for name, exists in paths.items():
        value = getattr(args, name)
        if value is not None and not exists(Path(value)):
            kind = "file" if exists is Path.is_file else "folder" if exists is Path.is_dir else "path"
            parser.error(f"--{name} {value}: no such {kind}")
    if args.output_dir and Path(args.output_dir).is_file():
        parser.error(f"--output_dir {args.output_dir} is a file: give a folder")
    try:  # the student's run folder's sampler (scheduler/, its grid, its trained size), where the options leave it
        generation.resolve_sampler(args)  # open; before check_media, whose defaults fill the size left open
    except ValueError as err:
        parser.error(str(err))
    try:  # images or videos: read from a local pipeline folder (a hub id: after its config is fetched, in main)
        check_media(args)
    except ValueError as err:
        parser.error(str(err))


def check_media(args: argparse.Namespace, *, download: bool = False) -> None:
    """Decide whether the run generates (or scores) videos -- a ``WanPipeline``, or an ``--images`` folder of
    ``{i:06d}/`` frame folders -- into ``args.video`` (None while a hub id's config is not read), refuse the options
    that do not fit (:func:`evaluation.video_generation.check_options`) and fill ``--resolution``'s image default."""
    if getattr(args, "video", None) is not None:
        return
    index = video_generation.model_index(args.pretrained_model_name_or_path, args.revision, download=download)
    if args.images is not None:
        args.video = video_generation.video_folder(args.images)
    elif index is not None:
        args.video = video_generation.is_video_index(index)
    else:  # a hub id, not read at parse time
        args.video = None
        return
    video_generation.check_options(args, index, args.video)
    if not args.video and args.resolution is None:
        args.resolution = 1024
    if not args.video and args.width is None:
        args.width = args.resolution


def main(args: argparse.Namespace, metrics: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Generate (or read) the images, score them and write ``results.json``; with ``--compare`` print the table.

    ``metrics`` replaces the metric objects the options would build (``{"fid": ..., "clip_score": ..., ...}``;
    a test passes stand-ins, as ``--clip module:callable`` does from the command line)."""
    if args.compare:
        table = records.comparison_table(args.compare)
        print(table)
        return None
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from training import data_sources

    accelerator = Accelerator()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    prompts = data_sources.read_prompts(args.prompts_file)[: args.num_prompts]
    mine = generation.shard(range(len(prompts)), rank, world)
    check_media(args, download=True)  # a hub id's model_index.json: images or videos
    video = bool(args.video)
    # FVD's reference clips, read (and refused when too short) before anything is generated
    fvd_clips = (
        video_generation.reference_clips(args.reference_dir, args.fvd_frames) if args.fvd_detector else []
    )
    images_dir = args.images or f"{args.output_dir}/{video_generation.VIDEO_DIR if video else 'images'}"
    # what a folder holds by index: images {i:06d}.png, or videos {i:06d}/ of frames {f:03d}.png
    entries = "[0-9]*" if video else "[0-9]*.png"

    # the metrics first: a mistyped backbone or reference statistics that do not fit this run (another extractor,
    # dimension or --eval_resolution, a stale sidecar) are refused before any image is generated
    if metrics is None:
        with accelerator.main_process_first():  # weights are downloaded once, by the main process
            metrics = metric_specs.build_metrics(args, device)
    fid = metrics.get("fid")
    reference = (
        metric_specs.check_reference_stats(args.reference_stats, fid, args.eval_resolution)
        if fid is not None and args.reference_stats and getattr(fid, "reference", None) is not None
        else None
    )

    # 1. images / videos: generated (missing ones only) or given
    sampler_record = None
    quantization = args.quantization or "round"
    if args.images is None:
        if video:
            pipe = video_generation.load_pipeline(args, device, DTYPES[args.dtype])
            sampler_record = video_generation.sampler_record(pipe, args, accelerator)
        else:
            pipe = generation.load_pipeline(args, device, DTYPES[args.dtype])
            # the student's weights are hashed by the main process and the digest broadcast
            sampler_record = generation.sampler_record(pipe, args, accelerator)
        # images are reused by index: only when they were made with these settings, seed, quantisation and prompts
        made_as = (images_dir, prompts, args.seed, sampler_record)
        resume = {"quantization": quantization, "entries": entries}
        generation.check_resume(*made_as, write=accelerator.is_main_process, **resume)
        accelerator.wait_for_everyone()  # no process writes an image before every process has checked
        if not accelerator.is_main_process:  # every process samples as the record process 0 wrote says
            generation.check_resume(*made_as, write=False, **resume)
        bar = tqdm(total=len(mine), desc="generating", disable=not accelerator.is_local_main_process)
        if video:
            sample = generation.pipeline_sampler(
                pipe, video_generation.call_kwargs(args, pipe), field="frames"
            )
            write = video_generation.generate_videos
        else:
            sample = generation.pipeline_sampler(pipe, generation.call_kwargs(args, pipe))
            write = generation.generate_images
        write(
            sample,
            prompts,
            mine,
            images_dir,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=bar,
            quantization=quantization,
        )
        bar.close()
        del pipe, sample
    elif (manifest := generation.read_manifest(images_dir)) is not None:
        # a folder this script generated: its record says how, and its seed and prompts must be this run's
        sampler_record = manifest["generator"]
        quantization = args.quantization or generation.manifest_quantization(manifest)
        generation.check_resume(
            images_dir,
            prompts,
            args.seed,
            sampler_record,
            write=False,
            quantization=quantization,
            entries=entries,
        )
    else:  # images made elsewhere: the seed and quantisation are the options', declared, not read
        sampler_record = generation.declared_record(args, quantization)
    # the package versions the images were generated with (generation.json), beside the scoring run's
    sampler_record = generation.with_generation_versions(sampler_record, images_dir)
    accelerator.wait_for_everyone()
    if video:
        num_frames = video_generation.frame_count(images_dir)
        video_generation.check_fvd_frames(args, num_frames)  # an --images folder's own length
        video_generation.check_complete(images_dir, mine, num_frames)
        files, file_prompts = video_generation.frame_files(images_dir, mine, prompts, num_frames)
    else:
        absent = generation.missing(images_dir, mine)
        if absent:
            raise ValueError(
                f"Expected an image per prompt in {images_dir}, but {len(absent)} are missing (first: "
                f"{generation.image_path(images_dir, absent[0]).name}). --images folders name image i "
                "{i:06d}.png."
            )
        files, file_prompts = [generation.image_path(images_dir, i) for i in mine], [prompts[i] for i in mine]

    # 2. metrics: this process's share of the images (and of the reference folder), then summed over processes;
    # a video's frames are scored as images with its prompt, and its frame consistency on the CLIP backbone
    if video:
        metrics = video_generation.add_frame_consistency(metrics)
        metrics = video_generation.add_fvd(metrics, args, device)
    image_metrics = {k: m for k, m in metrics.items() if k in scoring.IMAGE_METRICS}
    scored_apart = ("fvd", "frame_consistency")  # clips and frame pairs, below
    text_metrics = {k: m for k, m in metrics.items() if k not in (*scoring.IMAGE_METRICS, *scored_apart)}
    bar = tqdm(total=len(files), desc="scoring", disable=not accelerator.is_local_main_process)
    scoring.score_images(
        files,
        file_prompts,
        image_metrics=image_metrics,
        text_metrics=text_metrics,
        prefixes={"clip_score": args.clip_prefix},
        eval_resolution=args.eval_resolution,
        resolutions={"clip_score": args.clip_eval_resolution} if args.clip_eval_resolution else None,
        batch_size=args.eval_batch_size,
        device=device,
        progress=bar,
    )
    bar.close()
    if "frame_consistency" in metrics:
        video_generation.score_frame_consistency(
            metrics["frame_consistency"],
            images_dir,
            mine,
            num_frames,
            eval_resolution=args.clip_eval_resolution or args.eval_resolution,  # the CLIP score's frames
            device=device,
        )
    # FVD: clips of the first --fvd_frames frames, generated and this process's share of the reference
    if "fvd" in metrics:
        video_generation.score_fvd(
            metrics["fvd"],
            images_dir,
            mine,
            generation.shard(fvd_clips, rank, world),
            batch_size=args.eval_batch_size,
            device=device,
        )
    # the reference folder's identity (FID's images, FVD's clips: the same files) is recorded with either metric
    reference_files: list[Any] = scoring.image_files(args.reference_dir) if args.reference_dir else []
    if fid is not None and args.reference_dir:
        scoring.add_reference_images(
            list(image_metrics.values()),
            generation.shard(reference_files, rank, world),
            eval_resolution=args.eval_resolution,
            batch_size=args.eval_batch_size,
            device=device,
        )
    scoring.reduce_metrics(metrics)
    numbers = scoring.compute_metrics(metrics)
    if args.reference_dir:
        reference = metric_specs.reference_identity(args.reference_dir, reference_files, args.eval_resolution)
    if args.save_reference_stats and fid is not None and accelerator.is_main_process:
        fid.real.save(args.save_reference_stats)  # and what it is, so runs against it compare with this one
        sidecar = metric_specs.reference_sidecar(reference or {}, fid)  # and is checked by them
        records.write_results(f"{args.save_reference_stats}.json", sidecar)

    # 3. the record
    first = video_generation.frame_path(images_dir, 0, 0) if video else generation.image_path(images_dir, 0)
    protocol = metric_specs.evaluation_protocol(
        args,
        prompts,
        metrics,
        generator=sampler_record,
        image_size=scoring.image_size(first),
        reference=reference,
        quantization=quantization,
        video=video_generation.protocol_entry(num_frames) if video else None,
    )
    record = {
        "metrics": numbers,
        "protocol": protocol,
        "num_images": len(prompts) * (num_frames if video else 1),
        "images_dir": str(images_dir),
        "label": Path(args.output_dir).name,
        "command": sys.argv[1:] if __name__ == "__main__" else None,
    }
    if video:
        record["num_videos"] = len(prompts)
    if accelerator.is_main_process:
        path = records.write_results(f"{args.output_dir}/{records.RESULTS_NAME}", record)
        print(f"{path}: " + ", ".join(f"{k} {v:.4f}" for k, v in numbers.items()))
    accelerator.wait_for_everyone()
    return record


if __name__ == "__main__":
    main(parse_args())
