"""autospa.ranker (L2, pure torch): RELION-4.0's class ranker.

- :mod:`autospa.ranker.features`: the 24 features and the 64 x 64 image of a class average;
- :mod:`autospa.ranker.network`: the CNN (RELION's architecture and checkpoint layout);
- :mod:`autospa.ranker.targets`: target scores from simulator truth (job score, category, resolution);
- :mod:`autospa.ranker.train`: training, MSE, particle FPR / FNR and threshold calibration;
- ``weights/``: the shipped weights (trained by ``autospa ranker train``, see its ``.json`` report).

Reading and writing files is :mod:`autospa.io.ranker_files`; the jobs are :mod:`autospa.jobs.rank`
(``autospa rank``, relion.select.class2dauto) and :mod:`autospa.jobs.ranker_train`.
"""
