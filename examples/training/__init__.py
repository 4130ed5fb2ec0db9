"""The plumbing the ``examples/sdxl_*.py`` and ``examples/flow_*.py`` distillation scripts share, one module per concern.

A script imports the modules it needs (``from training import runtime, checkpoints``) and calls them by
qualified name (``runtime.adamw(...)``), so a reader sees where each piece lives and a test can replace one
function of one module. Nothing here is a loss: the methods live in the scripts and in ``diffdistill``.

Modules:

- :mod:`training.options`: the command-line options every script shares, and their validation.
- :mod:`training.sdxl_models`: loading the SDXL components, the student and the frozen teacher.
- :mod:`training.sdxl_encoding`: SDXL prompt encoding (two CLIP encoders, pooled embeddings, ``time_ids``,
  an on-disk cache) and VAE latents (encode, decode).
- :mod:`training.data_sources`: prompt lists and caption folders, read per optimisation step (``StepData``).
- :mod:`training.caption_folders`: image- and (Wan) video-caption folders: files, captions, crops (aspect buckets),
  cache keys.
- :mod:`training.compilation`: ``--compile``: the networks' blocks through ``torch.compile``, one block at a time
  (regional compilation, in place; works with LoRA, ``--shared_base`` and gradient checkpointing).
- :mod:`training.runtime`: the accelerate / DeepSpeed / FSDP runtime (accelerator, optimisers, backward,
  autocast, clipping).
- :mod:`training.checkpoints`: numbered ``checkpoint-{step}`` folders with pruning and exact resume, and the
  final diffusers-loadable weights.
- :mod:`training.ema_release`: the exponential moving average a run releases, checkpointed under every engine.
- :mod:`training.validation`: validation images during training.
- :mod:`training.loop`: the training loop (steps, checkpoints, validation, progress bar).
- :mod:`training.teacher_pairs`: Diffusion2GAN's teacher ODE pairs (shards, their recorded settings, reading).
- :mod:`training.score_distillation`: the online fake score and its alternation with the generator (SIM, SiD,
  DMD, Hyper-SD's one-step stage, MLCM's DMD phase), and DMD2's GAN classifier on the fake score's bottleneck.
- :mod:`training.rewards`: reward models named on the command line (``module:callable``), loaded and frozen.
- :mod:`training.lora_adapters`: several LoRA adapters on one UNet, trained one at a time and merged exactly
  into one diffusers LoRA file (Hyper-SD's unified LoRA).
- :mod:`training.shared_critics`: ``--shared_base``, one frozen UNet whose LoRA adapters are the generator, the
  fake score (SIM / SiD / DMD) or the discriminator (Diffusion2GAN), and the teacher that UNet with none.
- :mod:`training.flow_families`: what distinguishes the SD3 / FLUX / Qwen-Image / Wan families (pipeline classes,
  CFG or embedded guidance, packing, default guidance / negative prompt / video length, LoRA targets, Qwen-Image's
  CFG renormalisation, LADD text pooling, pipeline grids).
- :mod:`training.flow_models`: SD3 / FLUX / Qwen-Image / Wan components (``load_flow``), the flow denoiser with FLUX's packing
  (``FlowDenoiser``), latent normalisation, the resolution-shifted schedule, LoRA / full student, saving.
- :mod:`training.flow_encoding`: SD3 / FLUX / Qwen-Image / Wan prompt conditions through the pipeline's ``encode_prompt``,
  cached.
- :mod:`training.flow_packing`: FLUX / Qwen-Image latent packing (2x2 patches as tokens) and FLUX's position ids.
- :mod:`training.wan_experts`: Wan 2.2 A14B's two experts as one transformer (or one discriminator per expert)
  routed by timestep, the optimiser-step rule for experts no process used, one expert's training range, and the
  flow scripts' LoRA files (one per expert for A14B).
- :mod:`training.flow_teacher_samples`: the teacher's own samples of a prompt list in shards that record their
  settings (LADD's data; flow_kd's prompt-only data).
- :mod:`training.aspect_buckets`: multi-aspect training (``--aspect_buckets``): the sizes of the teacher samples or
  the nearest size of each image, batches drawn within one size, each size's schedule (FLUX's ``mu``).
- :mod:`training.flow_options`: the flow scripts' options (``--guidance``, ``--max_sequence_length``,
  ``--num_frames``).
- :mod:`training.flow_validation`: few-step validation grids (Wan: videos) of flow students.
- :mod:`training.student_sampler`: what a flow run records about sampling its student (guidance, size, text
  length) for evaluate.py, and the seed of DMD2's re-noising draws.
- :mod:`training.flow_critics`: shared-base critics of SD3 / FLUX / Wan score distillation (DMD2 / SiD / SIM): one frozen
  transformer with the generator's and the fake score's adapters, DMD2's backward simulation and sampler, GAN
  heads on the fake score, adapter export.

Determinism and resume: every optimisation step draws its data indices, noise and timesteps from a
``torch.Generator`` seeded by ``(seed, step, process, micro-batch)``
(:func:`training.data_sources.step_generator`), so a run resumed from ``checkpoint-N`` computes exactly the
step ``N + 1`` that an uninterrupted run computes.
"""
