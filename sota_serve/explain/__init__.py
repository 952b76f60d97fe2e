"""Explanations: which parts of an image a label's score depends on (occlusion maps,
:mod:`sota_serve.explain.occlusion`), drawn for people (:mod:`sota_serve.explain.heatmap`) and
on the command line (:mod:`sota_serve.explain.cli`)."""
