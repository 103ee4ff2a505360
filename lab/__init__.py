"""The research package beside the product: everything used to make and judge the shipped weights, never run by
the gadgets.

* :mod:`lab.images` — real MR magnitude images shipped in Debian/PyPI packages, and the train/val/test/ood splits;
* :mod:`lab.physics`, :mod:`lab.acquisition`, :mod:`lab.mrd_writer` — the low-field simulator: phase, coils and
  noise; sampling and raw k-space; ISMRMRD files;
* :mod:`lab.datasets` — training and evaluation batches simulated on the fly;
* :mod:`lab.dictionary_learning`, :mod:`lab.train`, :mod:`lab.baselines`, :mod:`lab.manifest` — learning the
  dictionaries and networks, the learned baselines, recording them in the weights manifest;
* :mod:`lab.metrics`, :mod:`lab.bart`, :mod:`lab.evaluation` — metrics (over scikit-image), the BART reference,
  and the comparison (methods, run, report, targets);
* :mod:`lab.cli` — the ``cdl-lambda-lab`` command: ``simulate``, ``learn-dictionary``, ``train``, ``evaluate``.

It imports :mod:`recon`; nothing in :mod:`recon` or :mod:`gadgets` imports it. It is a distribution of its own,
``cdl-lambda-lab`` (``lab/pyproject.toml``), installed as ``cdl_lambda.lab`` with the command ``cdl-lambda-lab``:
``pip install -e . -e ./lab`` from the repository root.
"""
