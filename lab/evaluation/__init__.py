"""Evaluation of CDL-Λ against its baselines on identical data: :mod:`~lab.evaluation.methods` (the methods, by
id), :mod:`~lab.evaluation.run` (running them over the data), :mod:`~lab.evaluation.report` (Markdown and
figures), :mod:`~lab.evaluation.targets` (the targets, by method id)."""
