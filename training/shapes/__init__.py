"""Synthetic "reasoning shapes" data: coloured shapes on textured backgrounds, with queries.

Deterministic from a seed, no downloads: the data the embedded demo model is trained on
(:mod:`training.demo_model`), written in the ReasonSeg layout so that ``lisa-train`` and
``lisa-eval`` read it like the real thing. Nothing is imported here; the modules, in the order
the data flows:

- :mod:`~training.shapes.vocabulary`: palette, background tones, shapes and their "world
  knowledge";
- :mod:`~training.shapes.scene`: scene settings, random scenes and their rendering;
- :mod:`~training.shapes.queries`: a scene's unambiguous queries with their targets;
- :mod:`~training.shapes.writer`: the data set on disk (ReasonSeg jsons, polygons,
  ``queries.jsonl``) and the ``lisa-make-shapes`` command;
- :mod:`~training.shapes.records`: reading ``queries.jsonl`` back, one validated record per
  image;
- :mod:`~training.shapes.datasets`: training conversations and validation samples over every
  query (``datasets: shapes`` of ``lisa-train``).
"""
