"""What ``examples/evaluate.py`` is made of, one module per concern (the script imports the modules and calls them by
qualified name, as the training scripts use ``examples/training/``).

Modules:

- :mod:`evaluation.generation`: the pipeline with the student's weights and sampler; seeded, resumable images
  (``{index:06d}.png``), prompts split over processes.
- :mod:`evaluation.video_generation`: the same for Wan text-to-video (``WanPipeline``: Wan 2.1, Wan 2.2 TI2V-5B /
  A14B): the student's LoRA(s) and grid, seeded resumable videos (``{index:06d}/{frame:03d}.png``), frame
  consistency and the video entry of the protocol.
- :mod:`evaluation.scoring`: reading images back with the protocol's resize, feeding the metric objects,
  reducing them over processes.
- :mod:`evaluation.metric_specs`: metric objects named on the command line (``--clip``, ``--preference``,
  ``--fid_features``) and the run's :class:`~diffdistill.metrics.protocol.EvaluationProtocol`.
- :mod:`evaluation.records`: ``results.json`` and the ``--compare`` table, refused across protocols.
- :mod:`evaluation.coco_prompts`: the prompt files of COCO-2014 30k (GigaGAN / SiD-LSG) and DMD2's COCO-10k,
  built from the caption annotations (also a command: ``python examples/evaluation/coco_prompts.py``).
"""
